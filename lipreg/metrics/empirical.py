r"""``EmpiricalLipschitz``: the running maximum of local Jacobian norms, a torchmetrics ``Metric`` over
:func:`~lipreg.metrics.functional.lower_bound` (a **lower** bound of :math:`L(f)`, Scaman & Virmaux 2018, Thm. 1)."""
from __future__ import annotations

import contextlib

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lipreg.capture.trace import eval_mode
from lipreg.metrics.functional import lower_bound

__all__ = ["EmpiricalLipschitz"]


class EmpiricalLipschitz(Metric):
    r"""Running max of local Jacobian spectral norms: a lower bound of the Lipschitz constant.

    Each :meth:`update` computes, with :func:`~lipreg.metrics.functional.lower_bound`,

    .. math:: \max_b \|J_f(x_b)\|_2 \;\le\; \sup_x \|J_f(x)\|_2 = L(f)

    (Rademacher; Scaman & Virmaux 2018, Thm. 1), optionally refined by ``ascent_steps`` steps of
    gradient ascent on the inputs, and keeps the maximum over all updates.  Every value is a
    local Jacobian norm (estimated by power iteration, which converges from below), so the result
    is always a valid lower bound of :math:`L(f)`; it never certifies anything.

    The model is stored as a plain attribute, **not** a submodule: the metric's ``state_dict``,
    ``parameters()`` and ``.to()`` do not touch it (keep model and inputs on the same device).
    During :meth:`update` the model is put in eval mode (BatchNorm uses running statistics, Dropout
    is off, samples do not interact) and every submodule's ``training`` flag is restored afterwards.
    No backward pass is run: the model's ``.grad`` fields are never written.

    State: ``value`` (0-dim float, ``dist_reduce_fx="max"``, default 0).

    Args:
        model: the network, a callable ``(B, *in) -> (B, *out)`` (usually an ``nn.Module``).
        n_iter: power iterations per local norm.
        ascent_steps: gradient-ascent steps on the inputs (useful for smooth activations only).
        lr: Euclidean step length of the ascent.
        kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    value: Tensor

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        n_iter: int = 20,
        ascent_steps: int = 0,
        lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n_iter < 0 or ascent_steps < 0:
            raise ValueError(f"n_iter and ascent_steps must be >= 0, got {n_iter}, {ascent_steps}")
        # Bypass nn.Module.__setattr__: the model must not become a registered submodule.
        object.__setattr__(self, "model", model)
        self.n_iter = n_iter
        self.ascent_steps = ascent_steps
        self.lr = lr
        self.add_state("value", default=torch.tensor(0.0), dist_reduce_fx="max")

    def update(self, x: Tensor) -> None:
        """Lower-bound the Lipschitz constant on the batch ``x`` of shape ``(B, *in)`` and keep the running max."""
        model = self.model
        with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
            lb = lower_bound(model, x, ascent_steps=self.ascent_steps, lr=self.lr, n_iter=self.n_iter,
                             dtype=self.value.dtype)  # rounded down into the state's dtype
        self.value = torch.maximum(self.value, lb.to(device=self.value.device))

    def compute(self) -> Tensor:
        """The largest local Jacobian norm seen since the last reset (0 before any update)."""
        return self.value

"""``LipschitzPenalty``: the Lipschitz bound as a loss term, ``loss = task_loss + penalty()``.

Because it is part of the loss returned by ``training_step``, Lightning's gradient accumulation (the loss is
divided by the accumulation factor), AMP (the loss is scaled; the bound itself is computed in float32 with
autocast off) and DDP (gradients are averaged, and every rank computes the same bound from the same weights and
warm vectors) apply to it exactly as to the task loss. Adding its gradient from a callback hook would not.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .estimator import LipschitzEstimator
from .options import Method, PenaltyKind, validate_method, validate_penalty


def _linear(bound: Tensor, target: float | None) -> Tensor:
    return bound


def _log(bound: Tensor, target: float | None) -> Tensor:
    return torch.log(bound)


def _hinge(bound: Tensor, target: float | None) -> Tensor:
    return F.relu(bound - target)


def _squared_hinge(bound: Tensor, target: float | None) -> Tensor:
    return F.relu(bound - target) ** 2


PENALTY_KINDS: dict[str, Callable[[Tensor, float | None], Tensor]] = {
    "linear": _linear, "log": _log, "hinge": _hinge, "squared_hinge": _squared_hinge,
}
"""``h`` in ``weight * h(L)``: ``L``, ``log L`` (scale-free: the gradient is ``dL / L``, so deep nets whose bound
spans orders of magnitude are penalised evenly), ``relu(L - target)`` and ``relu(L - target)^2`` (only push
the bound down to a target, e.g. the constant a certified radius needs)."""


class LipschitzPenalty(nn.Module):
    """``weight * h(L)`` with ``L`` the estimator's bound after ``n_iter`` warm iterations (default 1).

    Put it on your LightningModule (``self.lip_penalty = LipschitzPenalty(self.net, example)``): its warm vectors
    are buffers, so they are checkpointed with the module, follow ``.to()``, and are broadcast by DDP.
    A non-finite bound (NaN weights) skips the penalty for that step with a warning: the returned zero has no
    autograd history, so no NaN reaches a gradient, and the warm vectors stay finite (a non-finite operator keeps
    its vector; the others iterate as usual).

    ``last_bound`` holds the (detached) bound of the last call.
    """

    def __init__(self, model: nn.Module, example_input: Tensor, weight: float = 1e-3, kind: PenaltyKind = "log",
                 target: float | None = None, method: Method = "autolip", n_iter: int = 1,
                 **estimator_options: Any) -> None:
        super().__init__()
        validate_penalty(kind, target)
        validate_method(method, estimator_options)
        self.weight = float(weight)
        self.kind = kind
        self.target = target
        self.estimator = LipschitzEstimator(model, example_input, method=method, n_iter=n_iter, **estimator_options)
        self.last_bound: Tensor | None = None

    def forward(self) -> Tensor:
        bound = self.estimator()
        self.last_bound = bound.detach()
        if not torch.isfinite(self.last_bound):
            warnings.warn("LipschitzPenalty: the bound is not finite; the penalty is skipped for this step.",
                          RuntimeWarning, stacklevel=2)
            return torch.zeros((), device=bound.device)
        return self.weight * PENALTY_KINDS[self.kind](bound, self.target)

    def extra_repr(self) -> str:
        target = f", target={self.target}" if self.target is not None else ""
        return f"weight={self.weight}, kind={self.kind!r}{target}, method={self.estimator.method!r}"

"""``LipschitzPenalty``: the Lipschitz bound as a loss term, ``loss = task_loss + penalty()``.

Because it is part of the loss returned by ``training_step``, Lightning's gradient accumulation (the loss is
divided by the accumulation factor), AMP (the loss is scaled; the bound itself is computed in float32 with
autocast off) and DDP (gradients are averaged, and every rank computes the same bound from the same weights and
warm vectors) apply to it exactly as to the task loss. Adding its gradient from a callback hook would not.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .estimator import LipschitzEstimator
from .finite import finite_bound, zero_gradient_unless
from .options import (METHOD, N_ITER, PENALTY_KIND, PENALTY_KINDS, Method, PenaltyKind, checked_keywords,
                      validate_penalty)


def _linear(bound: Tensor, threshold: float | None) -> Tensor:
    return bound


def _log(bound: Tensor, threshold: float | None) -> Tensor:
    return torch.log(bound)


def _hinge(bound: Tensor, threshold: float | None) -> Tensor:
    return F.relu(bound - threshold)


def _squared_hinge(bound: Tensor, threshold: float | None) -> Tensor:
    return F.relu(bound - threshold) ** 2


PENALTY_FUNCTIONS: dict[str, Callable[[Tensor, float | None], Tensor]] = {
    "linear": _linear, "log": _log, "hinge": _hinge, "squared_hinge": _squared_hinge,
}
"""``h`` in ``coefficient * h(L)``, one per :data:`~lipreg.options.PenaltyKind`: ``L``, ``log L`` (scale-free: the
gradient is ``dL / L``, so deep nets whose bound spans orders of magnitude are penalised evenly),
``relu(L - threshold)`` and ``relu(L - threshold)^2`` (only push the bound down to a threshold, e.g. the constant a
certified radius needs)."""
assert tuple(PENALTY_FUNCTIONS) == PENALTY_KINDS, "one function per PenaltyKind"


def warn_batch_statistics(model: nn.Module, who: str) -> None:
    """Warn when ``model`` holds batch norm that normalises by batch statistics in training mode.

    The bound is that of eval-mode batch norm (running statistics: the scale ``gamma / sqrt(var + eps)``), while
    training-mode batch norm divides by the batch's statistics. A loss on the bound, back-propagated through
    training-mode batch norm, is ill-posed: scaling a conv's weights leaves the training forward unchanged but scales
    the bound, so the optimiser can shrink one layer's factor and inflate the running-variance-driven factor of the
    next. Certifiable alternatives: a BN-free network (``experiments.models.LipCNN``), or batch norm without
    variance scaling (mean centring only: in eval mode a shift by the running mean, of constant 1).
    """
    layers = [name for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)]
    if layers:
        warnings.warn(
            f"{who} on a network whose batch norm layers {layers} normalise by batch statistics in training mode. The "
            "bound is that of eval-mode batch norm (running statistics), so a loss on it through training-mode batch "
            "norm is ill-posed: rescaling a layer changes the bound but not the training forward, and the optimiser "
            "can trade one layer's factor against the next BN's. Train a BN-free network (model=lipcnn), use mean "
            "centring without variance scaling, or put the batch norm layers in eval mode (frozen statistics).",
            UserWarning, stacklevel=3)


def skip_non_finite(value: Tensor, bound: Tensor, through: Sequence[Tensor] = ()) -> Tensor:
    """``value`` (a term computed from an estimator's ``bound``), or zeros if ``bound`` is not finite (NaN or inf
    weights, an overflow), chosen on the device: no host synchronisation (the estimator warns, at its next
    :meth:`~lipreg.LipschitzEstimator.check_finite`).

    The zeros' gradient is exactly 0: ``torch.where`` stops it at ``value``, the estimator's own gate
    (:func:`~lipreg.finite.zero_gradient_unless`) at the bound's factors, and the same gate at each of ``through``,
    the nodes between them where the non-finite bound meets the gradient of another parameter (the pairwise margin
    ``||w_y - w_j|| L``, whose gradient w.r.t. the head is ``0 * L``)."""
    finite = finite_bound(bound)
    zero_gradient_unless(finite, through)
    return torch.where(finite, value, 0.0)


class LipschitzPenalty(nn.Module):
    """``coefficient * h(L)`` with ``L`` the estimator's bound after ``n_iter`` warm iterations (default 1).

    Put it on your LightningModule (``self.lip_penalty = LipschitzPenalty(self.net, example)``) and add it to the
    loss ``training_step`` returns: its warm vectors are buffers, so they are checkpointed with the module, follow
    ``.to()``, and are broadcast by DDP; a :class:`~lipreg.LipschitzCallback` finds it there and logs its bound and
    value. A non-finite bound (NaN or inf weights, an overflow) skips the penalty for that step: it returns 0 with a
    gradient of exactly 0 w.r.t. every parameter, and the warm vectors stay finite (a non-finite operator keeps its
    vector; the others iterate as usual). No host synchronisation: the warning comes at the estimator's next
    :meth:`~lipreg.LipschitzEstimator.check_finite` (every ``check_finite_every`` calls, or ``layer_bounds()``).

    Args:
        model, example_input: as for :class:`~lipreg.LipschitzEstimator`.
        coefficient: the factor of ``h(L)`` in the loss (``weight=`` before; the old name still works, deprecated).
        kind: ``h``, one of :data:`~lipreg.options.PenaltyKind`.
        threshold: the hinges' ``relu(L - threshold)``: the largest bound that is not penalised (``target=`` before).
        method, n_iter, **estimator_options: of the :class:`~lipreg.LipschitzEstimator` (``fuse``, ``search``...).

    ``last_bound`` and ``last_value`` hold the (detached) bound and penalty of the last call.
    """

    @checked_keywords(forwards_to=lambda: LipschitzEstimator, renamed={"weight": "coefficient", "target": "threshold"})
    def __init__(self, model: nn.Module, example_input: Tensor, *, coefficient: float = 1e-3,
                 kind: PenaltyKind = PENALTY_KIND, threshold: float | None = None, method: Method = METHOD,
                 n_iter: int = N_ITER, **estimator_options: Any) -> None:
        super().__init__()
        validate_penalty(kind, threshold)
        if not coefficient >= 0:
            raise ValueError(f"coefficient must be >= 0, got {coefficient}")
        if coefficient:
            warn_batch_statistics(model, "LipschitzPenalty")
        self.coefficient = float(coefficient)
        self.kind = kind
        self.threshold = threshold
        self.estimator = LipschitzEstimator(model, example_input, method=method, n_iter=n_iter, **estimator_options)
        self.last_bound: Tensor | None = None
        self.last_value: Tensor | None = None

    def forward(self) -> Tensor:
        bound = self.estimator()
        value = skip_non_finite(self.coefficient * PENALTY_FUNCTIONS[self.kind](bound, self.threshold), bound)
        self.last_bound, self.last_value = bound.detach(), value.detach()
        return value

    def extra_repr(self) -> str:
        threshold = f", threshold={self.threshold}" if self.threshold is not None else ""
        return f"coefficient={self.coefficient}, kind={self.kind!r}{threshold}, method={self.estimator.method!r}"

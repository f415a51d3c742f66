"""The Lipschitz terms of the module's own loss, as the callback logs them.

The callback never adds to the loss: a :class:`~lipreg.LipschitzPenalty` or :class:`~lipreg.LipschitzMarginLoss`
belongs in the loss ``training_step`` returns. The callback finds them on the module (``named_modules``) and logs
what their last call left, every ``log_every_n_steps``: the penalty's value (``lipschitz/penalty``), the margin
loss's bound (an estimate) and current radius (``lipschitz/margin_bound``, ``lipschitz/margin_eps``), each under
``.../<module name>`` when the module holds several.
"""
from __future__ import annotations

from torch import nn

from .. import keys
from ..losses import LipschitzMarginLoss
from ..penalty import LipschitzPenalty


def loss_term_metrics(module: nn.Module) -> dict[str, float]:
    """The last values of every Lipschitz loss term on ``module`` (terms not called yet are left out)."""
    return {**_penalty_metrics(module), **_margin_metrics(module)}


def _penalty_metrics(module: nn.Module) -> dict[str, float]:
    penalties = [(name, m) for name, m in module.named_modules() if isinstance(m, LipschitzPenalty)]
    return {keys.penalty(None if len(penalties) == 1 else name): float(penalty.last_value)
            for name, penalty in penalties if penalty.last_value is not None}


def _margin_metrics(module: nn.Module) -> dict[str, float]:
    losses = [(name, m) for name, m in module.named_modules() if isinstance(m, LipschitzMarginLoss)]
    metrics: dict[str, float] = {}
    for name, loss in losses:
        if loss.last_bound is not None:
            tag = None if len(losses) == 1 else name
            metrics[keys.margin("bound", tag)] = float(loss.last_bound)
            metrics[keys.margin("eps", tag)] = loss.last_eps
    return metrics

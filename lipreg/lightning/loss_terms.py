"""The Lipschitz terms of the module's own loss, as the callback logs them.

The callback never adds to the loss: a :class:`~lipreg.LipschitzPenalty` or :class:`~lipreg.LipschitzMarginLoss`
belongs in the loss ``training_step`` returns. The callback finds them on the module (``named_modules``) and logs
what their last call left, every ``log_every_n_steps``: the penalty's value (``lipschitz/penalty``), the margin
loss's bound (an estimate) and current radius (``lipschitz/margin_bound``, ``lipschitz/margin_eps``), each under
``.../<module name>`` when the module holds several. At fit start it gives a margin loss whose warm-up is a
fraction of the run (``warmup_fraction``) the run's length in training calls, read from the trainer.
"""
from __future__ import annotations

import math
from typing import Any

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


def plan_warmups(module: nn.Module, trainer: Any) -> None:
    """Every :class:`~lipreg.LipschitzMarginLoss` on ``module`` whose warm-up is a fraction of the run told the
    run's length in training calls: the trainer's optimizer steps times its gradient accumulation."""
    losses = [m for m in module.modules() if isinstance(m, LipschitzMarginLoss) and m.warmup_fraction is not None]
    if not losses:
        return
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("LipschitzMarginLoss(warmup_fraction=...) needs a run of known length: set the trainer's "
                         "max_epochs or max_steps, or give the loss warmup=<training calls> instead")
    for loss in losses:
        loss.plan_warmup(int(steps) * trainer.accumulate_grad_batches)

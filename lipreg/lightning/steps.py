"""What the callback logs after optimizer steps: the bound every ``log_every_n_steps``, the certificate every
``certify_every_n_steps``.

Both are logged at the step Lightning uses for its own metrics of that batch, and for the weights after that
step's optimizer step (those a checkpoint then holds). The certificate comes with the gap between the two on the
same weights,

    ``lipschitz/gap_percent = 100 (certified / estimate - 1)``,

which reads better on a chart than ratios of 1.004, 1.008 rounded to 1, 1.01. A ratio ``certified / estimate``
above ``reconverge_gap`` means the warm vector lags behind a switch of the top singular direction: the estimate is
re-converged first. Not when the certificate is AutoLip's for a SeqLip estimate: that ratio stays large once
converged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import keys
from .loss_terms import loss_term_metrics
from .source import EstimatorSource

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


def certified_over_estimate(certified: Tensor, estimate: Tensor) -> float:
    """The ratio ``certified / estimate`` (``>= 1`` when the estimate is one from below), compared with
    ``reconverge_gap``."""
    return float(certified / estimate)


def gap_percent(ratio: float) -> float:
    """``100 (ratio - 1)``: how many percent the certificate lies above the estimate (``lipschitz/gap_percent``)."""
    return 100.0 * (ratio - 1.0)


@dataclass
class StepLogger:
    """The step-level schedule of one fit (the options are the callback's, see :class:`LipschitzCallback`)."""

    source: EstimatorSource
    log_every_n_steps: int
    certify_every_n_steps: int
    reconverge_gap: float
    eval_n_iter: int
    per_layer: bool
    prog_bar: bool
    last_global_step: int = 0

    def after_step(self, trainer: Trainer, pl_module: LightningModule, penalised: bool) -> None:
        """After a training batch: log what is due if the optimizer stepped. ``penalised``: the estimator is a
        penalty's, which ``training_step`` already iterated (on the weights before the step), so the bound is only
        re-evaluated."""
        if trainer.global_step == self.last_global_step:
            return  # accumulating gradients: no optimizer step, the weights did not change
        self.last_global_step = trainer.global_step
        step = trainer.global_step - 1  # the step of Lightning's own train metrics for this batch
        log_now = (step + 1) % self.log_every_n_steps == 0
        certify_now = bool(self.certify_every_n_steps) and (step + 1) % self.certify_every_n_steps == 0
        if penalised and not (log_now or certify_now):
            return
        with torch.no_grad():
            bound = self.source.estimator(n_iter=0 if penalised else None)
        metrics: dict[str, float] = {}
        if log_now:
            metrics[keys.bound(self.source.estimator.method)] = float(bound)
            if self.per_layer:
                metrics.update({keys.layer(k): v for k, v in self.source.estimator.layer_factors().items()})
            metrics.update(loss_term_metrics(pl_module))
            if self.prog_bar:
                pl_module.log(keys.PROG_BAR, bound, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if certify_now and torch.isfinite(bound):  # non-finite weights (warned about) have no certificate
            metrics.update(self.certify(bound))
        for logger in trainer.loggers if metrics else ():
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()
    def certify(self, estimate: Tensor) -> dict[str, float]:
        """The certified bound, the estimate (re-converged when the ratio exceeds ``reconverge_gap``) and the gap,
        all on the current weights; nothing when there is no certificate."""
        certified = self.source.certified_bound()
        if certified is None:
            return {}
        estimator = self.source.estimator
        ratio = certified_over_estimate(certified, estimate)
        if ratio > self.reconverge_gap and estimator.exact_search:
            estimate = estimator.converge(max_iter=self.eval_n_iter).detach()
            ratio = certified_over_estimate(certified, estimate)
        return {keys.bound(estimator.method): float(estimate), keys.certified(estimator.method): float(certified),
                keys.GAP_PERCENT: gap_percent(ratio)}

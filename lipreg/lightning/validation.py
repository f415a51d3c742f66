"""What the callback measures at each validation epoch.

At the epoch start the estimate is converged (``eval_n_iter`` iterations at most) and certified; during the epoch
the certified robust accuracy (global and, with a linear head, per pair: :mod:`lipreg.lightning.robust`) and the
empirical lower bound (:class:`~lipreg.metrics.EmpiricalLipschitz`, on the first ``lower_bound_batches`` batches)
accumulate; at the end the estimate, the certificate, the lower bound, their ratio ``upper_over_lower`` and the
accuracies are logged through ``pl_module.log`` (torchmetrics states are synced across ranks), with two figures on
rank 0: the linear layers' factors and the certified accuracy against the radius.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import keys
from ..margins import MarginCertificate
from ..metrics import EmpiricalLipschitz, upper_over_lower
from .robust import RobustEpoch, radius_curve
from .source import EstimatorSource
from .tensorboard import layer_chart, log_figure

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


@dataclass
class ValidationEvaluation:
    """The validation-epoch metrics of one fit (the options are the callback's, see :class:`LipschitzCallback`)."""

    source: EstimatorSource
    method: str
    eval_n_iter: int
    robust_eps: Sequence[float]
    lower_bound_batches: int
    lower_bound_ascent_steps: int
    batch_to_input: Callable[[Any], Tensor]
    batch_to_target: Callable[[Any], Tensor]
    bound: Tensor | None = None  # the certified bound of this epoch, None when nothing is measured
    robust: RobustEpoch | None = None
    lower: EmpiricalLipschitz | None = None
    _pair_certificate: MarginCertificate | None = field(default=None, repr=False)  # built at the first epoch

    def start(self, pl_module: LightningModule) -> None:
        estimator = self.source.estimator
        if not torch.isfinite(estimator.converge(max_iter=self.eval_n_iter)):
            return  # non-finite weights (the estimator warned): nothing to certify or log this epoch
        with torch.no_grad():
            self.bound = self.source.certified_bound()
        if self.bound is None:
            return
        device = pl_module.device
        self.robust = RobustEpoch(self.bound, self._pairwise(), self.robust_eps, device) if self.robust_eps else None
        self.lower = EmpiricalLipschitz(estimator.model, ascent_steps=self.lower_bound_ascent_steps).to(device)

    def update(self, batch: Any, batch_idx: int) -> None:
        x = self.batch_to_input(batch)
        if self.robust is not None:
            with torch.no_grad():
                logits = self.source.estimator.model(x)  # the logits of the very map the bound is for
            if logits.ndim != 2 or logits.shape[1] < 2:
                raise ValueError(f"LipschitzCallback: the certified robust accuracy needs class logits of shape "
                                 f"(batch, classes >= 2), got {tuple(logits.shape)}; pass robust_eps=None to turn "
                                 "the robust metrics off (e.g. for a regression net)")
            self.robust.update(logits, self.batch_to_target(batch))
        if batch_idx < self.lower_bound_batches:
            self.lower.update(x)

    def end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            estimate = self.source.estimator(n_iter=0)
        lower, certified = self.lower.compute(), self.bound
        metrics = {keys.bound(self.method): estimate, keys.certified(self.source.certified_method(self.method)):
                   certified, keys.LOWER: lower, keys.UPPER_OVER_LOWER: upper_over_lower(certified, lower)}
        if self.robust is not None:
            metrics.update(self.robust.compute())
        for name, value in metrics.items():  # identical on every rank (synced metrics, broadcast warm state)
            pl_module.log(name, value, on_step=False, on_epoch=True)
        self.bound = None
        if trainer.is_global_zero:
            log_figure(trainer.loggers, keys.LAYER_CHART, lambda: layer_chart(self.source.varying_layer_bounds()),
                       trainer.global_step)
            if self.robust is not None:
                robust = self.robust
                log_figure(trainer.loggers, keys.RADIUS_CURVE,
                           lambda: radius_curve(robust.radii(), 2.0 * max(self.robust_eps), robust.kind),
                           trainer.global_step)

    def _pairwise(self) -> MarginCertificate | None:
        """The per-pair certificate of the bounded model (built once per fit), or ``None`` without a linear head."""
        if self._pair_certificate is None:
            estimator = self.source.estimator
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # no linear head: the global metric says it all
                self._pair_certificate = MarginCertificate(estimator.model, estimator.graph.sample)
        return self._pair_certificate if self._pair_certificate.pairwise else None

"""What the callback measures at each validation epoch.

At the epoch start the estimate is converged (``eval_n_iter`` iterations at most) and certified; during the epoch
the optional jobs accumulate, each its own small piece: the certified robust accuracy
(:class:`~lipreg.lightning.certified_accuracy.CertifiedAccuracyPass`, off with ``robust_eps=None``) and the empirical
lower bound (:class:`~lipreg.lightning.lower_bound.LowerBoundPass`); at the end the estimate, the certificate and
the jobs' metrics are logged through ``pl_module.log`` (torchmetrics states are synced across ranks), with the
figures on rank 0 (:mod:`lipreg.lightning.figures`): the linear layers' factors and the certified accuracy against
the radius. The end-of-run evaluation of ``experiments/estimate.py`` runs the same two passes over a whole split.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import keys
from ..margins import MarginCertificate
from .certified_accuracy import CertifiedAccuracyPass, pair_certificate
from .figures import layer_chart, log_figure, radius_curve
from .lower_bound import LowerBoundPass
from .source import EstimatorSource

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


@dataclass
class ValidationEvaluation:
    """The validation-epoch metrics of one fit (the options are the callback's, see :class:`LipschitzCallback`)."""

    source: EstimatorSource
    eval_n_iter: int
    robust_eps: Sequence[float]
    lower_bound_batches: int
    lower_bound_ascent_steps: int
    batch_to_input: Callable[[Any], Tensor]
    batch_to_target: Callable[[Any], Tensor]
    bound: Tensor | None = None  # the certified bound of this epoch, None when nothing is measured
    robust: CertifiedAccuracyPass | None = None
    lower: LowerBoundPass | None = None
    _pair_certificate: MarginCertificate | None = field(default=None, repr=False)  # built at the first epoch
    _pair_built: bool = field(default=False, repr=False)  # None above may be the answer (no linear head)

    def start(self, pl_module: LightningModule) -> None:
        estimator = self.source.estimator
        if not torch.isfinite(estimator.converge(max_iter=self.eval_n_iter)):
            return  # non-finite weights (the estimator warned): nothing to certify or log this epoch
        with torch.no_grad():
            self.bound = self.source.certified_bound()
        if self.bound is None:
            return
        device = pl_module.device
        if self.robust_eps:
            certificate = self._pairwise()
            self.robust = CertifiedAccuracyPass(self.bound, None if certificate is None else certificate.certified(),
                                                self.robust_eps, device)
        else:
            self.robust = None
        self.lower = LowerBoundPass(estimator.model, self.lower_bound_batches, self.lower_bound_ascent_steps, device)

    def update(self, batch: Any, batch_idx: int) -> None:
        x = self.batch_to_input(batch)
        if self.robust is not None:
            with torch.no_grad():
                logits = self.source.estimator.model(x)  # the logits of the very map the bound is for
            self.robust.update(logits, self.batch_to_target(batch))
        self.lower.update(x, batch_idx)

    def end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        estimator = self.source.estimator
        with torch.no_grad():
            estimate = estimator(n_iter=0)
        metrics = {keys.bound(estimator.method): estimate, keys.certified(estimator.method): self.bound,
                   **self.lower.compute(self.bound)}
        if self.robust is not None:
            metrics.update(self.robust.compute())
        for name, value in metrics.items():  # identical on every rank (synced metrics, broadcast warm state)
            pl_module.log(name, value, on_step=False, on_epoch=True)
        self.bound = None
        if trainer.is_global_zero:
            self._log_figures(trainer)

    def _log_figures(self, trainer: Trainer) -> None:
        log_figure(trainer.loggers, keys.LAYER_CHART, lambda: layer_chart(self.source.estimator.layer_factors()),
                   trainer.global_step)
        if self.robust is not None:
            robust, max_radius = self.robust, 2.0 * max(self.robust_eps)
            log_figure(trainer.loggers, keys.RADIUS_CURVE, lambda: radius_curve(robust.radii(), max_radius),
                       trainer.global_step)

    def _pairwise(self) -> MarginCertificate | None:
        """The per-pair certificate of the bounded model (:func:`pair_certificate`, built once per fit)."""
        if not self._pair_built:
            estimator = self.source.estimator
            self._pair_certificate = pair_certificate(estimator.model, estimator.example_input)
            self._pair_built = True
        return self._pair_certificate

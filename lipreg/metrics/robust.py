r"""``CertifiedRobustAccuracy``: the fraction of samples certified robust at each :math:`\ell_2` radius, a
torchmetrics ``Metric`` over the kernels of :func:`~lipreg.metrics.functional.certified_accuracy`
(:func:`~lipreg.metrics.functional.certified_radius`, counted by ``certified_counts``) (Tsuzuku, Sato & Sugiyama 2018,
"Lipschitz-margin training", Prop. 1; per pair: GloRo, Leino et al. 2021)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lipreg import keys
from lipreg.metrics.functional import certified_counts, certified_radius

__all__ = ["CertifiedRobustAccuracy"]


class CertifiedRobustAccuracy(Metric):
    r"""Fraction of samples certified robust at :math:`\ell_2` radius ``eps`` by a Lipschitz margin.

    For logits :math:`f(x)\in\mathbb{R}^C`, target :math:`t`, and the margin
    :math:`M(x) = f_t(x) - \max_{j\ne t} f_j(x)`, each difference :math:`f_t - f_j` is
    :math:`\sqrt2\,L`-Lipschitz when :math:`f` is :math:`L`-Lipschitz w.r.t. :math:`\ell_2`
    (:math:`\|e_t-e_j\|_2=\sqrt2`), hence

    .. math:: M(x) > \sqrt{2}\, L\, \varepsilon \;\Longrightarrow\;
              \arg\max_j f_j(x+\delta) = t \quad \forall\, \|\delta\|_2 \le \varepsilon

    (Tsuzuku, Sato & Sugiyama 2018, "Lipschitz-margin training", Prop. 1).  A sample counts as
    certified at ``eps`` iff that inequality holds: it is then correctly classified with a top
    logit that beats the runner-up by more than :math:`\sqrt2 L\varepsilon`.  The inequality is
    strict, so ties for the top logit are never certified, even at ``eps=0`` (which therefore gives
    the accuracy with ties counted as errors).

    **Pairwise.**  Given per-pair constants ``K`` of shape ``(C, C)`` instead of a scalar ``L``
    (:class:`lipreg.margins.MarginCertificate`, GloRo, Leino et al. 2021), a sample is certified at
    ``eps`` iff :math:`f_t - f_j > K_{tj}\varepsilon` for every :math:`j \ne t`, i.e. iff its
    :func:`certified_radius` exceeds ``eps``; the scalar case is :math:`K_{tj} = \sqrt2 L`.

    **Soundness.**  ``lipschitz_bound`` must be a true upper bound of the Lipschitz constant of the
    logit map (e.g. from ``est.certified_bound()``).  A bound from a power iteration converges from
    *below*, so a "certificate" computed from it is unsound; such an estimate is rejected with a
    ``ValueError`` (``certified=False``) unless ``allow_estimate=True``.  With ``allow_estimate=True``
    the metric counts the samples scored with an estimated bound (state ``n_estimated``); if any
    were seen since the last reset, :meth:`compute` labels **all** its results
    ``"estimated_acc@{eps:g}"`` instead of ``"certified_acc@{eps:g}"`` (a mixed accumulation is only
    as sound as its weakest part), so logged keys change as soon as an estimate is used.

    States: ``correct_certified`` (long, ``(len(eps),)``, sum), ``total`` (long, sum),
    ``n_estimated`` (long, sum).

    Args:
        eps: one radius or a sequence of radii (finite, ``>= 0``, distinct under ``{:g}``).
        allow_estimate: accept ``certified=False`` bounds, labelling the results as estimated.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    :meth:`compute` returns ``{f"certified_acc@{eps:g}": tensor, ...}`` (one 0-dim float tensor per
    radius, in the order given; 0 before any sample).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct_certified: Tensor
    total: Tensor
    n_estimated: Tensor

    def __init__(
        self,
        eps: float | Sequence[float] = (0.1,),
        allow_estimate: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        eps_t = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
        eps_t = tuple(float(e) for e in eps_t)
        if not eps_t:
            raise ValueError("eps must contain at least one radius")
        if any(not math.isfinite(e) or e < 0 for e in eps_t):
            raise ValueError(f"every eps must be finite and >= 0, got {eps_t}")
        if len({f"{e:g}" for e in eps_t}) != len(eps_t):
            raise ValueError(f"eps values must be distinct when formatted with {{:g}}, got {eps_t}")
        self.eps = eps_t
        self.allow_estimate = bool(allow_estimate)
        self.add_state("correct_certified", default=torch.zeros(len(eps_t), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_estimated", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, lipschitz_bound: float | Tensor, *, certified: bool) -> None:
        """Score a batch.

        Args:
            logits: ``(B, C)`` with ``C >= 2``.
            target: ``(B,)`` integer class indices in ``[0, C)``.
            lipschitz_bound: a scalar upper bound ``L`` of the ``l2 -> l2`` Lipschitz constant of the logit map
                (global certificate, ``K_yj = sqrt(2) L``), or ``(C, C)`` per-pair constants ``K_yj`` bounding the
                constant of ``z_y - z_j`` (pairwise certificate, e.g. ``MarginCertificate.certified()``); finite,
                ``>= 0``.
            certified: keyword-only, no default: whether ``lipschitz_bound`` is a guaranteed upper bound (e.g.
                ``est.certified`` for ``est()``, ``True`` for ``est.certified_bound()``). ``False`` raises unless the
                metric was built with ``allow_estimate=True``.
        """
        if not certified and not self.allow_estimate:
            raise ValueError(
                "CertifiedRobustAccuracy got an estimated Lipschitz bound (certified=False). A power-iteration "
                "estimate converges from below, so a certificate computed from it is unsound. Pass a certified "
                "upper bound (e.g. est.certified_bound()), or build the metric with allow_estimate=True to accept "
                "it; the results are then reported as 'estimated_acc@eps'."
            )
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"logits must have shape (B, C) with C >= 2, got {tuple(logits.shape)}")
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target must have shape {tuple(logits.shape[:1])}, got {tuple(target.shape)}")
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        n_classes = logits.shape[1]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_classes):
            raise ValueError(f"target values must lie in [0, {n_classes}), got range [{int(target.min())}, {int(target.max())}]")

        radius = certified_radius(logits, target, lipschitz_bound)  # (B,); 0 when misclassified, tied or NaN
        self.correct_certified += certified_counts(radius, self.eps).to(self.correct_certified)
        self.total += target.shape[0]
        if not certified:
            self.n_estimated += target.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``{"certified_acc@{eps:g}": acc}`` per radius (``"estimated_acc@..."`` if an estimate was used)."""
        estimated = int(self.n_estimated) > 0
        total = self.total.clamp(min=1).to(torch.float32)
        acc = self.correct_certified.to(torch.float32) / total
        return {keys.accuracy_at(e, estimated): acc[k] for k, e in enumerate(self.eps)}

r"""``LipschitzMarginLoss``: cross-entropy on logits shifted by the margin a certificate needs.

Lipschitz-margin training (Tsuzuku, Sato & Sugiyama 2018, arXiv:1802.04034, eq. 6): add :math:`K_{yj}\varepsilon`
to every non-target logit ``j`` before the cross-entropy,

.. math:: \ell(z, y) = T \cdot \mathrm{CE}\big((z + \varepsilon K_{y,:}) / T,\; y\big),               \tag{1}

so that driving the loss to 0 drives every sample to :math:`z_y - z_j > K_{yj}\varepsilon`, the certificate of
:mod:`lipreg.margins` (eq. 1 there). ``K`` is that module's global :math:`\sqrt2 L` (Tsuzuku et al., Prop. 1) or
per-pair :math:`\|w_y - w_j\| L(\text{body})` (GloRo, Leino et al. 2021, eq. 4; the per-pair margins of EMMA, Hu et al.
2023). The temperature ``T`` (the ``1/tau`` of deel-lip's ``TauCategoricalCrossentropy``) sets how hinge-like the
loss is: small ``T`` only pushes the samples that violate the margin.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .margins import MarginCertificate
from .penalty import skip_non_finite, warn_batch_statistics


class LipschitzMarginLoss(nn.Module):
    r"""``loss = loss_fn(logits, target)``: eq. (1) with ``K`` from its own warm estimator on ``model``.

    The constants come from a :class:`~lipreg.margins.MarginCertificate` (``self.certificate``): pairwise (GloRo)
    when ``pairwise=True`` and the graph ends in a linear head, global :math:`\sqrt2 L` otherwise
    (``self.pairwise`` says which). They are recomputed at each call from ``n_iter`` warm power iterations,
    differentiably, so the loss also pulls the bound down where the margin needs it. The bound is an estimate
    (from below): certify a trained model with :meth:`certified_constants`, never with ``last_bound``.

    ``eps`` ramps linearly from 0 over the first ``warmup`` calls in training mode (0: no ramp); the call count is a
    buffer, so with the warm vectors it is checkpointed, follows ``.to()`` and is identical on every DDP rank.
    ``last_bound`` holds the (detached) bound used by the last call (of the body when pairwise), ``last_eps`` its
    radius. A non-finite bound (NaN weights) gives the plain cross-entropy for that step, with a warning.

    Args:
        model: the network whose logits the loss gets; traced once, never modified.
        example_input: a batch of inputs (its first sample's shape is used).
        eps: the L2 radius to certify (after warm-up).
        pairwise: per-pair constants when the head is linear.
        method, n_iter: of the estimator (``"autolip"`` or ``"seqlip"``).
        warmup: number of training calls over which ``eps`` ramps up from 0.
        temperature: ``T`` of eq. (1).
        **estimator_options: passed to :class:`~lipreg.LipschitzEstimator`.
    """

    def __init__(self, model: nn.Module, example_input: Tensor, eps: float, pairwise: bool = True,
                 method: str = "autolip", n_iter: int = 1, warmup: int = 1000, temperature: float = 1.0,
                 **estimator_options: Any) -> None:
        super().__init__()
        if not eps >= 0 or not temperature > 0 or warmup < 0:
            raise ValueError(f"need eps >= 0, temperature > 0, warmup >= 0; got {eps}, {temperature}, {warmup}")
        warn_batch_statistics(model, "LipschitzMarginLoss")
        self.eps = float(eps)
        self.warmup = int(warmup)
        self.temperature = float(temperature)
        self.certificate = MarginCertificate(model, example_input, pairwise=pairwise, method=method, n_iter=n_iter,
                                             **estimator_options)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.last_bound: Tensor | None = None
        self.last_eps = 0.0

    @property
    def pairwise(self) -> bool:
        return self.certificate.pairwise

    def current_eps(self) -> float:
        """The ramped radius of the next call: ``eps * min(1, calls / warmup)``."""
        if self.warmup == 0:
            return self.eps
        return self.eps * min(1.0, int(self.calls) / self.warmup)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Eq. (1) on ``logits`` ``(B, C)`` of ``model`` and class indices ``target`` ``(B,)``."""
        eps = self.current_eps()
        if self.training:
            self.calls += 1
        K, bound = self.certificate()
        self.last_bound = bound.detach()
        self.last_eps = eps
        shifted = logits + skip_non_finite(eps * K, bound, through=[K])[target].to(logits.dtype)
        return self.temperature * F.cross_entropy(shifted / self.temperature, target)

    def certified_constants(self) -> Tensor:
        """The certified ``K`` (``(C, C)``, float64) of the current weights: what certified accuracy uses."""
        return self.certificate.certified()

    def extra_repr(self) -> str:
        return f"eps={self.eps}, warmup={self.warmup}, temperature={self.temperature}"

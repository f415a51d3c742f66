"""The callback's certified robust accuracy of one validation epoch.

Global: a prediction ``y`` is certified at radius ``eps`` when ``z_y - z_j > sqrt(2) L eps`` for every ``j``, with
``L`` the certified bound of the whole network (eq. 2 of :mod:`lipreg.margins`). Per pair (GloRo, Leino et al.
2021), when the network ends in a linear layer: ``z_y - z_j > ||w_y - w_j|| L(body) eps`` (eq. 3), with the
certified bound of everything before the head. Both come from certificates, never from estimates, and both are
:class:`~lipreg.metrics.CertifiedRobustAccuracy` (synced across DDP ranks). Each sample's certified radius (the
tightest of the two) is kept for the accuracy-vs-radius figure.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import keys
from ..margins import MarginCertificate
from ..metrics import CertifiedRobustAccuracy, certified_radius


class CertifiedAccuracyEpoch:
    """Global and (with a linear head) pairwise certified accuracy at each radius, and every sample's radius.

    Args:
        bound: the certified bound ``L`` of the whole network.
        certificate: the per-pair certificate of the network, or ``None`` (no linear head): global only.
        eps: the radii.
        device: where the metric states live.
    """

    def __init__(self, bound: Tensor, certificate: MarginCertificate | None, eps: Sequence[float],
                 device: torch.device) -> None:
        self.bound = bound
        self.pair_constants = certificate.certified() if certificate is not None and certificate.pairwise else None
        self.global_acc = CertifiedRobustAccuracy(eps=eps).to(device)
        self.pair_acc = CertifiedRobustAccuracy(eps=eps).to(device) if self.pair_constants is not None else None
        self._radii: list[Tensor] = []

    @property
    def kind(self) -> str:
        """Which certificate the radii come from: ``"pairwise"`` or ``"global"``."""
        return "global" if self.pair_constants is None else "pairwise"

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"LipschitzCallback: the certified robust accuracy needs class logits of shape "
                             f"(batch, classes >= 2), got {tuple(logits.shape)}; pass robust_eps=None to turn "
                             "the robust metrics off (e.g. for a regression net)")
        self.global_acc.update(logits, target, self.bound, certified=True)
        tightest = self.bound if self.pair_constants is None else self.pair_constants
        if self.pair_acc is not None:
            self.pair_acc.update(logits, target, self.pair_constants, certified=True)
        self._radii.append(certified_radius(logits, target, tightest).cpu())

    def compute(self) -> dict[str, Tensor]:
        """``robust/certified_acc@eps`` and, with a linear head, ``robust/pairwise_certified_acc@eps``."""
        metrics = {keys.in_group(k): v for k, v in self.global_acc.compute().items()}
        if self.pair_acc is not None:
            metrics.update({keys.in_group(k, pairwise=True): v for k, v in self.pair_acc.compute().items()})
        return metrics

    def radii(self) -> dict[str, Tensor]:
        """This process's certified radii so far (float64, on the CPU), under the certificate's kind."""
        return {self.kind: torch.cat(self._radii) if self._radii else torch.empty(0, dtype=torch.float64)}

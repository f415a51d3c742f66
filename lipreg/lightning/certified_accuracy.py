"""The certified robust accuracy of one pass over data: a validation epoch of the callback, or a split of the
end-of-run evaluation (``experiments/estimate.py``), through the same code.

Global: a prediction ``y`` is certified at radius ``eps`` when ``z_y - z_j > sqrt(2) L eps`` for every ``j``, with
``L`` the certified bound of the whole network (eq. 2 of :mod:`lipreg.margins`). Per pair (GloRo, Leino et al.
2021), when the network ends in a linear layer: ``z_y - z_j > ||w_y - w_j|| L(body) eps`` (eq. 3), with the
certified bound of everything before the head. Both come from certificates, never from estimates, and both are
:class:`~lipreg.metrics.CertifiedRobustAccuracy` (synced across DDP ranks). Each sample's certified radius under
each certificate is kept for the accuracy-vs-radius figure (:func:`lipreg.lightning.figures.radius_curve`).

Nothing here imports Lightning.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import keys
from ..margins import MarginCertificate
from ..metrics import CertifiedRobustAccuracy, certified_radius

GLOBAL, PAIRWISE = "global", "pairwise"
"""The two certificates, as :meth:`CertifiedAccuracyPass.radii` and the figure name them."""


def pair_certificate(model: nn.Module, example_input: Tensor) -> MarginCertificate | None:
    """The per-pair certificate of ``model``, or ``None`` when it does not end in a linear layer or does not return
    class logits (the global accuracy then says what is wrong). Build it once and call ``.certified()`` on the
    weights of the moment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no linear head: the global metric says it all
        try:
            certificate = MarginCertificate(model, example_input)
        except ValueError:  # not a classifier's logits: CertifiedAccuracyPass.update says what to do
            return None
    return certificate if certificate.pairwise else None


class CertifiedAccuracyPass:
    """Global and (with a linear head) pairwise certified accuracy at each radius, and every sample's radius.

    Args:
        bound: the certified bound ``L`` of the whole network.
        pair_constants: the certified per-pair constants ``K`` (``(C, C)``, ``.certified()`` of
            :func:`pair_certificate`), or ``None`` (no linear head): global only.
        eps: the radii.
        device: where the metric states live.
    """

    def __init__(self, bound: Tensor | float, pair_constants: Tensor | None, eps: Sequence[float],
                 device: torch.device | str = "cpu") -> None:
        self.bound = bound
        self.pair_constants = pair_constants
        self.global_acc = CertifiedRobustAccuracy(eps=eps).to(device)
        self.pair_acc = CertifiedRobustAccuracy(eps=eps).to(device) if self.pair_constants is not None else None
        self._radii: dict[str, list[Tensor]] = {GLOBAL: []}
        if self.pair_constants is not None:
            self._radii[PAIRWISE] = []

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"LipschitzCallback: the certified robust accuracy needs class logits of shape "
                             f"(batch, classes >= 2), got {tuple(logits.shape)}; pass robust_eps=None to turn "
                             "the robust metrics off (e.g. for a regression net)")
        self.global_acc.update(logits, target, self.bound, certified=True)
        self._radii[GLOBAL].append(certified_radius(logits, target, self.bound).cpu())
        if self.pair_acc is not None:
            self.pair_acc.update(logits, target, self.pair_constants, certified=True)
            self._radii[PAIRWISE].append(certified_radius(logits, target, self.pair_constants).cpu())

    def compute(self, group: str = keys.ROBUST) -> dict[str, Tensor]:
        """``<group>/certified_acc@eps`` and, with a linear head, ``<group>/pairwise_certified_acc@eps`` (0-dim
        tensors): ``robust/...`` for the callback, ``test/...`` for a split of the end-of-run evaluation."""
        metrics = {keys.in_group(k, group): v for k, v in self.global_acc.compute().items()}
        if self.pair_acc is not None:
            metrics.update({keys.in_group(k, group, pairwise=True): v for k, v in self.pair_acc.compute().items()})
        return metrics

    def radii(self) -> dict[str, Tensor]:
        """This process's certified radii so far (float64, on the CPU), per certificate: ``{"global": ...}`` and,
        with a linear head, ``"pairwise"``."""
        return {kind: torch.cat(r) if r else torch.empty(0, dtype=torch.float64) for kind, r in self._radii.items()}

"""The certified robust accuracy of one validation epoch, as the callback logs it.

Global: a prediction ``y`` is certified at radius ``eps`` when ``z_y - z_j > sqrt(2) L eps`` for every ``j``, with
``L`` the certified bound of the whole network (eq. 2 of :mod:`lipreg.margins`). Per pair (GloRo, Leino et al.
2021), when the network ends in a linear layer: ``z_y - z_j > ||w_y - w_j|| L(body) eps`` (eq. 3), with the
certified bound of everything before the head. Both come from certificates, never from estimates. Each sample's
certified radius (the tightest of the two) feeds the certified-accuracy-vs-radius curve.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import keys
from ..losses import LipschitzMarginLoss
from ..margins import MarginCertificate
from ..metrics import CertifiedRobustAccuracy, certified_accuracy_curve, certified_radius


class RobustEpoch:
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

    def radii(self) -> Tensor:
        """This process's certified radii so far (float64, on the CPU)."""
        return torch.cat(self._radii) if self._radii else torch.empty(0, dtype=torch.float64)


def radius_curve(radii: Tensor, max_radius: float, kind: str) -> Any | None:
    """The certified accuracy against the radius on ``[0, max_radius]`` as a bare matplotlib ``Figure`` (no pyplot:
    nothing global is touched); ``None`` without matplotlib (an optional dependency) or without samples."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not len(radii):
        return None
    grid = torch.linspace(0.0, max_radius, 41, dtype=torch.float64)
    fig = Figure(figsize=(4.0, 3.0))
    ax = fig.add_subplot()
    ax.plot(grid.tolist(), certified_accuracy_curve(radii, grid).tolist())
    ax.set_xlabel("L2 radius")
    ax.set_ylabel(f"certified accuracy ({kind})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def margin_metrics(module: nn.Module) -> dict[str, float]:
    """The bound (an estimate) and the current radius of each :class:`~lipreg.LipschitzMarginLoss` on ``module``:
    ``lipschitz/margin_bound`` and ``lipschitz/margin_eps`` (``lipschitz/margin/<name>_...`` for several)."""
    losses = [(name, m) for name, m in module.named_modules() if isinstance(m, LipschitzMarginLoss)]
    metrics: dict[str, float] = {}
    for name, loss in losses:
        if loss.last_bound is not None:
            tag = None if len(losses) == 1 else name
            metrics[keys.margin("bound", tag)] = float(loss.last_bound)
            metrics[keys.margin("eps", tag)] = loss.last_eps
    return metrics

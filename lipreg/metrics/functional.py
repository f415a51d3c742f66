r"""Functional kernels of the metrics: plain functions of tensors, no state (the torchmetrics classes of
:mod:`lipreg.metrics` are thin wrappers over them).

* :func:`local_jacobian_norm`, :func:`lower_bound` — local Jacobian norms, each a valid **lower** bound of
  :math:`L(f)=\sup_x\|J_f(x)\|_2` (Scaman & Virmaux 2018, Thm. 1), computed on a float64 copy of the model and
  rounded down into the output dtype, see :mod:`lipreg.metrics.jacobian`.
* :func:`certified_radius` — per-sample certified :math:`\ell_2` radius from a global bound or per-pair
  constants (:mod:`lipreg.margins`); :func:`certified_accuracy`, the certified robust accuracy at given radii
  (the kernel of :class:`~lipreg.metrics.CertifiedRobustAccuracy`), and :func:`certified_accuracy_curve`, the
  accuracy-vs-radius curve (Tsuzuku, Sato & Sugiyama 2018, "Lipschitz-margin training", Prop. 1).
* :func:`upper_over_lower` — the ratio ``upper / lower`` of the two brackets of :math:`L(f)` (logged as
  ``lipschitz/upper_over_lower``).

Only :mod:`lipreg.margins` and :mod:`lipreg.metrics.jacobian` are imported from the package: no torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lipreg.margins import global_constants
from lipreg.metrics.jacobian import local_jacobian_norm, lower_bound

__all__ = ["certified_accuracy", "certified_accuracy_curve", "certified_counts", "certified_radius",
           "local_jacobian_norm", "lower_bound", "upper_over_lower"]


def _as_float(x: float | Tensor, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.detach().reshape(()).item())
    return float(x)


def upper_over_lower(upper: float | Tensor, lower: float | Tensor) -> Tensor:
    r"""Ratio :math:`\bar L / \underline L \ge 1` between an upper and a lower bound of :math:`L(f)`, a float64
    0-dim tensor.

    The true constant lies in :math:`[\underline L, \bar L]`, so the ratio bounds the relative
    looseness of either bracket (logged as ``lipschitz/upper_over_lower``).  Returns ``inf`` when
    ``lower == 0 < upper`` and ``1.0`` when both are ``0`` (a constant function: the bounds agree).
    A value below 1 means ``upper`` is not a true upper bound (e.g. an estimate) or ``lower`` is
    not a true lower bound.

    Raises:
        ValueError: if a bound is negative or NaN.
    """
    u, lo = _as_float(upper, "upper"), _as_float(lower, "lower")
    if math.isnan(u) or math.isnan(lo) or u < 0 or lo < 0:
        raise ValueError(f"bounds must be non-negative numbers, got upper={u}, lower={lo}")
    if lo == 0.0:
        return torch.tensor(1.0 if u == 0.0 else math.inf, dtype=torch.float64)
    return torch.tensor(u / lo, dtype=torch.float64)


def _margin_constants(bound: float | Tensor, n_classes: int) -> Tensor:
    """``(C, C)`` float64 constants ``K``: a given per-pair matrix, or eq. (2) of :mod:`lipreg.margins` from a
    scalar bound ``L``."""
    if isinstance(bound, Tensor) and bound.dim() == 2:
        if bound.shape != (n_classes, n_classes):
            raise ValueError(f"per-pair constants must have shape ({n_classes}, {n_classes}), got {tuple(bound.shape)}")
        K = bound.detach().to(torch.float64)
    else:
        K = global_constants(torch.tensor(_as_float(bound, "lipschitz_bound"), dtype=torch.float64), n_classes)
    if not bool(torch.isfinite(K).all()) or bool((K < 0).any()):
        raise ValueError("the Lipschitz bound (or every per-pair constant) must be finite and >= 0")
    return K


def certified_radius(logits: Tensor, target: Tensor, bound: float | Tensor) -> Tensor:
    r"""Per-sample certified :math:`\ell_2` radius ``(B,)`` float64, rounded downwards:

    .. math:: r(x) = \min_{j \ne y} \frac{z_y(x) - z_j(x)}{K_{yj}}, \qquad 0 \text{ if some } z_y - z_j \le 0,

    so that no :math:`\|\delta\|_2 < r(x)` changes the prediction from ``y`` (eq. 1 of :mod:`lipreg.margins`;
    ``inf`` when every ``K_yj`` is 0 and ``y`` wins). ``bound`` is a certified scalar ``L`` (then
    ``K_yj = sqrt(2) L``) or certified per-pair constants ``(C, C)`` (``MarginCertificate.certified()``).
    """
    z = logits.detach().to(torch.float64)
    target = target.to(device=z.device, dtype=torch.long)
    K = _margin_constants(bound, z.shape[1]).to(z.device)[target]  # (B, C)
    gaps = z.gather(1, target[:, None]) - z  # (B, C), 0 at the target
    others = torch.ones_like(gaps, dtype=torch.bool).scatter(1, target[:, None], False)
    ratios = torch.where(gaps > 0, gaps / K, torch.zeros_like(gaps))  # x / 0 = inf for a positive gap
    ratios = torch.where(others, torch.nan_to_num(ratios, nan=0.0), torch.full_like(gaps, math.inf))
    radius = ratios.min(dim=1).values
    return torch.nextafter(radius, torch.zeros_like(radius)).clamp_min(0.0)


def certified_counts(radii: Tensor, eps: Sequence[float] | Tensor) -> Tensor:
    """How many samples have a certified radius above each radius of ``eps``: ``(len(eps),)`` long (a strict
    inequality: a radius of exactly ``eps`` is not certified at ``eps``)."""
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=radii.device).reshape(-1)
    return (radii.to(torch.float64)[None, :] > eps_t[:, None]).sum(dim=1)


def certified_accuracy_curve(radii: Tensor, grid: Sequence[float] | Tensor) -> Tensor:
    """Fraction of the samples whose certified radius exceeds each radius of ``grid``, ``(len(grid),)`` float64
    (the accuracy-vs-radius curve; at 0, the accuracy with ties counted as errors; 0 without samples)."""
    return certified_counts(radii, grid).to(torch.float64) / max(radii.numel(), 1)


def certified_accuracy(logits: Tensor, target: Tensor, bound: float | Tensor,
                       eps: float | Sequence[float]) -> Tensor:
    r"""The certified robust accuracy at each :math:`\ell_2` radius of ``eps``, ``(len(eps),)`` float64: the fraction
    of samples whose :func:`certified_radius` exceeds it (correctly classified, with a margin that beats
    ``K_yj eps`` for every other class). The kernel of :class:`~lipreg.metrics.CertifiedRobustAccuracy`.

    ``bound`` must be certified (a scalar ``L`` or per-pair constants ``(C, C)``): an estimate from below gives an
    unsound accuracy.
    """
    grid = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
    return certified_accuracy_curve(certified_radius(logits, target, bound), grid)

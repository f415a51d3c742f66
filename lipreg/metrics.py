r"""torchmetrics metrics around the Lipschitz constant of a network.

* :class:`EmpiricalLipschitz` — running maximum of local Jacobian norms over the batches seen: a
  valid **lower** bound of :math:`L(f)=\sup_x\|J_f(x)\|_2` (Scaman & Virmaux 2018,
  arXiv:1805.10965), see :mod:`lipreg.lower_bound`.
* :class:`CertifiedRobustAccuracy` — fraction of samples whose prediction is provably constant on
  an :math:`\ell_2` ball, from the logit margin and an upper bound of :math:`L(f)`
  (Tsuzuku, Sato & Sugiyama 2018, "Lipschitz-margin training", NeurIPS, arXiv:1802.04034).
* :func:`certified_radius` — per-sample certified :math:`\ell_2` radius from a global bound or per-pair
  constants (:mod:`lipreg.margins`), and :func:`certified_accuracy_curve`, the accuracy-vs-radius curve.
* :func:`lipschitz_gap` — ratio ``upper / lower`` of the two brackets of :math:`L(f)` (logged as
  ``lipschitz/gap``).

Only :mod:`lipreg.lower_bound`, :mod:`lipreg.margins` and the eval-mode context manager of
:mod:`lipreg.capture.trace` are imported from the package.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lipreg.capture.trace import eval_mode
from lipreg.lower_bound import lower_bound
from lipreg.margins import global_constants

__all__ = ["EmpiricalLipschitz", "CertifiedRobustAccuracy", "certified_accuracy_curve", "certified_radius",
           "lipschitz_gap"]


def _as_float(x: float | Tensor, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.detach().reshape(()).item())
    return float(x)


def lipschitz_gap(upper: float | Tensor, lower: float | Tensor) -> float:
    r"""Ratio :math:`\bar L / \underline L \ge 1` between an upper and a lower bound of :math:`L(f)`.

    The true constant lies in :math:`[\underline L, \bar L]`, so the ratio bounds the relative
    looseness of either bracket (logged as ``lipschitz/gap``).  Returns ``inf`` when
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
        return 1.0 if u == 0.0 else math.inf
    return u / lo


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


def certified_accuracy_curve(radii: Tensor, grid: Sequence[float] | Tensor) -> Tensor:
    """Fraction of the samples whose certified radius exceeds each radius of ``grid`` (the accuracy-vs-radius
    curve; at 0, the accuracy with ties counted as errors)."""
    grid_t = torch.as_tensor(grid, dtype=torch.float64, device=radii.device)
    return (radii.to(torch.float64)[None, :] > grid_t[:, None]).to(torch.float64).mean(dim=1)


class EmpiricalLipschitz(Metric):
    r"""Running max of local Jacobian spectral norms: a lower bound of the Lipschitz constant.

    Each :meth:`update` computes, with :func:`lipreg.lower_bound.lower_bound`,

    .. math:: \max_b \|J_f(x_b)\|_2 \;\le\; \sup_x \|J_f(x)\|_2 = L(f)

    (Rademacher; Scaman & Virmaux 2018, Thm. 1), optionally refined by ``ascent_steps`` steps of
    gradient ascent on the inputs, and keeps the maximum over all updates.  Every value is a
    local Jacobian norm (estimated by power iteration, which converges from below), so the result
    is always a valid lower bound of :math:`L(f)`; it never certifies anything.

    The model is stored as a plain attribute, **not** a submodule: the metric's ``state_dict``,
    ``parameters()`` and ``.to()`` do not touch it (keep model and inputs on the same device).
    During :meth:`update` the model is put in eval mode (BatchNorm uses running statistics, Dropout
    is off, samples do not interact) and every submodule's ``training`` flag is restored afterwards.
    No backward pass is run: the model's ``.grad`` fields are never written.

    State: ``value`` (0-dim float, ``dist_reduce_fx="max"``, default 0).

    Args:
        model: the network, a callable ``(B, *in) -> (B, *out)`` (usually an ``nn.Module``).
        n_iter: power iterations per local norm.
        ascent_steps: gradient-ascent steps on the inputs (useful for smooth activations only).
        lr: Euclidean step length of the ascent.
        kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    value: Tensor

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        n_iter: int = 20,
        ascent_steps: int = 0,
        lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n_iter < 0 or ascent_steps < 0:
            raise ValueError(f"n_iter and ascent_steps must be >= 0, got {n_iter}, {ascent_steps}")
        # Bypass nn.Module.__setattr__: the model must not become a registered submodule.
        object.__setattr__(self, "model", model)
        self.n_iter = n_iter
        self.ascent_steps = ascent_steps
        self.lr = lr
        self.add_state("value", default=torch.tensor(0.0), dist_reduce_fx="max")

    def update(self, x: Tensor) -> None:
        """Lower-bound the Lipschitz constant on the batch ``x`` (B, *in) and keep the running max."""
        model = self.model
        with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
            lb = lower_bound(model, x, ascent_steps=self.ascent_steps, lr=self.lr, n_iter=self.n_iter)
        self.value = torch.maximum(self.value, lb.to(device=self.value.device, dtype=self.value.dtype))

    def compute(self) -> Tensor:
        """The largest local Jacobian norm seen since the last reset (0 before any update)."""
        return self.value


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
        eps = torch.tensor(self.eps, dtype=torch.float64, device=radius.device)
        ok = radius[None, :] > eps[:, None]  # (K, B)
        self.correct_certified += ok.sum(dim=1).to(self.correct_certified)
        self.total += target.shape[0]
        if not certified:
            self.n_estimated += target.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``{"certified_acc@{eps:g}": acc}`` per radius (``"estimated_acc@..."`` if an estimate was used)."""
        prefix = "estimated_acc" if int(self.n_estimated) > 0 else "certified_acc"
        total = self.total.clamp(min=1).to(torch.float32)
        acc = self.correct_certified.to(torch.float32) / total
        return {f"{prefix}@{e:g}": acc[k] for k, e in enumerate(self.eps)}

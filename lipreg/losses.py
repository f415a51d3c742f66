r"""``LipschitzMarginLoss``: a classification loss on the margins a Lipschitz certificate needs.

With the margin constants ``K`` of :mod:`lipreg.margins` (eq. 1 there: the prediction ``y`` is certified at radius
:math:`\varepsilon` when :math:`z_y - z_j > K_{yj}\varepsilon` for every ``j != y``), write, for every ``j != y``,

.. math:: m_j = z_y - z_j - \varepsilon K_{yj} \;\;\text{(certified margin)}, \qquad
          r_j = \frac{z_y - z_j}{K_{yj}} \;\;\text{(radius of the pair)}.                               \tag{1}

Three losses of a sample (``kind=``), averaged over the batch:

* ``"ce"``, the Lipschitz-margin cross-entropy (Tsuzuku, Sato & Sugiyama 2018, arXiv:1802.04034, eq. 6; the
  ``1/tau`` of deel-lip's ``TauCategoricalCrossentropy`` is ``T``): cross-entropy on the logits with
  :math:`K_{yj}\varepsilon` added to every non-target logit,

  .. math:: \ell_{ce} = T \cdot \mathrm{CE}\big((z + \varepsilon K_{y,:}) / T,\; y\big)
            = T \log\big(1 + \textstyle\sum_{j \ne y} e^{-m_j / T}\big).                                \tag{2}

  Never 0; a sample with :math:`\ell_{ce} < T \log 2` is certified at :math:`\varepsilon`.
* ``"hinge"``, the multi-class hinge on the pair radii (deel-lip's ``MulticlassHinge`` with its margin set to the
  certificate's; the hard-margin end of Losch et al. 2023, "Certified robust models with slack control"):

  .. math:: \ell_{hinge} = \textstyle\sum_{j \ne y} \operatorname{relu}(\varepsilon - r_j).                \tag{3}

  0 exactly when :math:`r_j \ge \varepsilon` for every ``j``: the sample is certified at every radius below
  :math:`\varepsilon`. In radius units, (3) is invariant to a rescaling of the network (the logits and ``K``
  scale together), which a hinge on the logits is not: that one is minimised by shrinking the whole network.
* ``"lse"``, the log-sum-exp (soft-max) margin (deel-lip's LSE; the smooth worst-class margin of EMMA, Hu et al.
  2023), with a temperature ``T`` in radius units:

  .. math:: \ell_{lse} = \operatorname{relu}\Big(T \log \textstyle\sum_{j \ne y} e^{(\varepsilon - r_j)/T}\Big). \tag{4}

  As :math:`\max_j x_j \le T\log\sum_j e^{x_j/T} \le \max_j x_j + T\log(C-1)`, (4) is 0 only when the sample is
  certified at :math:`\varepsilon`, and is 0 when it is certified at :math:`\varepsilon + T\log(C-1)`; as
  :math:`T \to 0` it is the hinge on the worst class (Crammer-Singer).

``K`` is :mod:`lipreg.margins`' global :math:`\sqrt2 L` (eq. 2 there) or per-pair :math:`\|w_y - w_j\| L(\text{body})`
(GloRo, eq. 3 there). ``ce_weight`` adds :math:`\lambda\, \mathrm{CE}(z, y)` on the unshifted logits (clean accuracy
against certified accuracy).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .estimator import LipschitzEstimator
from .finite import finite_bound, zero_gradient_unless
from .margins import MarginCertificate
from .options import METHOD, N_ITER, MarginKind, Method, check_choice, checked_keywords
from .penalty import warn_batch_statistics

DEFAULT_TEMPERATURE = {"ce": 1.0, "hinge": 1.0, "lse": 0.1}  # ce: logit units; lse: radius units; hinge: unused


def margin_ce(logits: Tensor, target: Tensor, K_y: Tensor, eps: float | Tensor, temperature: float) -> Tensor:
    """Eq. (2), averaged over the batch; ``K_y = K[target]`` ``(B, C)`` (0 at the target)."""
    shifted = logits + eps * K_y
    return temperature * F.cross_entropy(shifted / temperature, target)


def pair_radii(logits: Tensor, target: Tensor, K_y: Tensor) -> Tensor:
    """The :math:`r_j` of eq. (1), ``(B, C)``, ``+inf`` at the target (it is no competing class)."""
    gaps = logits.gather(1, target[:, None]) - logits
    radii = gaps / K_y.clamp_min(torch.finfo(logits.dtype).tiny)
    return radii.scatter(1, target[:, None], math.inf)


def margin_hinge(radii: Tensor, eps: float | Tensor) -> Tensor:
    """Eq. (3), averaged over the batch (the target's ``+inf`` radius adds 0)."""
    return F.relu(eps - radii).sum(1).mean()


def margin_lse(radii: Tensor, eps: float | Tensor, temperature: float) -> Tensor:
    """Eq. (4), averaged over the batch (the target's ``+inf`` radius adds ``exp(-inf) = 0``)."""
    return F.relu(temperature * torch.logsumexp((eps - radii) / temperature, dim=1)).mean()


class LipschitzMarginLoss(nn.Module):
    r"""``loss = loss_fn(logits, target)``: eq. (2), (3) or (4) with ``K`` from its own warm estimator on ``model``.

    The constants come from a :class:`~lipreg.margins.MarginCertificate` (``self.certificate``): pairwise (GloRo)
    when ``pairwise=True`` and the graph ends in a linear head, global :math:`\sqrt2 L` otherwise
    (``self.pairwise`` says which). They are recomputed at each call from ``n_iter`` warm power iterations,
    differentiably, so the loss also pulls the bound down where the margin needs it. The bound is an estimate
    (from below): certify a trained model with :meth:`certified_constants`, never with ``last_bound``.

    ``eps`` ramps linearly from 0 over the first ``warmup`` calls in training mode (0: no ramp), or over the first
    ``warmup_fraction`` of the run's training calls: :meth:`plan_warmup` fixes them from the run's length (a
    :class:`~lipreg.LipschitzCallback` does it at fit start, from the trainer), and a training call before that is an
    error. The call count is a
    buffer, so with the warm vectors it is checkpointed, follows ``.to()`` and is identical on every DDP rank.
    ``last_bound`` holds the (detached) bound used by the last call (of the body when pairwise), ``last_eps`` its
    radius. A non-finite bound (NaN weights) gives the plain cross-entropy for that step, with a warning.

    Args:
        model: the network whose logits the loss gets; traced once, never modified.
        example_input: a batch of inputs (its first sample's shape is used).
        eps: the L2 radius to certify (after warm-up).
        pairwise: per-pair constants when the head is linear.
        method, n_iter: of the estimator (``"autolip"``, ``"seqlip"`` or ``"liplt"``; with ``"liplt"`` and a linear
            head the per-pair constants are also carried through the body's last chain).
        warmup: number of training calls over which ``eps`` ramps up from 0 (``None``: ``warmup_fraction``).
        warmup_fraction: the fraction of the run (in ``[0, 1]``) over which it ramps up, when ``warmup`` is not
            given: 0.3 by default, the measured recipe's. The run's length comes from :meth:`plan_warmup`, which
            a :class:`~lipreg.lightning.LipschitzCallback` calls at fit start from
            ``trainer.estimated_stepping_batches``; a loop of your own calls it once before training, or gives
            ``warmup`` instead (a call before either is an error that says so).
        kind: ``"ce"`` (eq. 2), ``"hinge"`` (eq. 3) or ``"lse"`` (eq. 4).
        temperature: ``T`` of eq. (2) (logit units) or (4) (radius units); ``None``: 1 for ``"ce"``, 0.1 for
            ``"lse"``; the hinge has none.
        ce_weight: :math:`\lambda \ge 0` of the added plain cross-entropy :math:`\lambda\,\mathrm{CE}(z, y)`.
        **estimator_options: passed to :class:`~lipreg.LipschitzEstimator`.

    Every option after ``example_input`` is keyword-only; a misspelled one fails here, naming the closest valid one.
    The model must return one tensor of logits ``(B, C)``, ``C >= 2`` (else a ``ValueError`` says so).
    """

    @checked_keywords(forwards_to=lambda: LipschitzEstimator)
    def __init__(self, model: nn.Module, example_input: Tensor, *, eps: float, pairwise: bool = True,
                 method: Method = METHOD, n_iter: int = N_ITER, warmup: int | None = None,
                 warmup_fraction: float | None = 0.3, kind: MarginKind = "ce", temperature: float | None = None,
                 ce_weight: float = 0.0, **estimator_options: Any) -> None:
        super().__init__()
        check_choice("margin loss kind", kind, MarginKind)
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE[kind]
        elif kind == "hinge":
            raise ValueError("kind='hinge' has no temperature (eq. 3): drop temperature=..., or use kind='lse', "
                             "its smooth version")
        if not eps >= 0 or not temperature > 0 or (warmup is not None and warmup < 0) or not ce_weight >= 0:
            raise ValueError(f"need eps >= 0, temperature > 0, warmup >= 0, ce_weight >= 0; got {eps}, "
                             f"{temperature}, {warmup}, {ce_weight}")
        if warmup is None and warmup_fraction is None:
            raise ValueError("LipschitzMarginLoss needs a warm-up: warmup=<training calls> or warmup_fraction=<of "
                             "the run> (0 for none)")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1] (a fraction of the run), got {warmup_fraction}")
        warn_batch_statistics(model, "LipschitzMarginLoss")
        self.eps = float(eps)
        self.warmup: int | None = int(warmup) if warmup is not None else None  # None: until plan_warmup
        self.warmup_fraction = warmup_fraction if warmup is None else None  # calls given: they win
        self.kind = kind
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.certificate = MarginCertificate(model, example_input, pairwise=pairwise, method=method, n_iter=n_iter,
                                             **estimator_options)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.last_bound: Tensor | None = None
        self._last_eps: Tensor | float = 0.0

    @property
    def pairwise(self) -> bool:
        return self.certificate.pairwise

    @property
    def last_eps(self) -> float:
        """The radius of the last call (a host read: for logs, not for the training step)."""
        return float(self._last_eps)

    def current_eps(self) -> float:
        """The ramped radius of the next call, :meth:`ramped_eps` read on the host."""
        return float(self.ramped_eps())

    def plan_warmup(self, total_calls: int) -> None:
        """With ``warmup_fraction``: ramp over that fraction of a run of ``total_calls`` training calls (one per
        ``training_step``; with gradient accumulation, optimizer steps times the accumulation). No-op otherwise."""
        if self.warmup_fraction is not None:
            self.warmup = round(self.warmup_fraction * total_calls)

    def ramped_eps(self) -> Tensor | float:
        """``eps * min(1, calls / warmup)``, on the device of the call count (no host synchronisation)."""
        if self.warmup is None:
            raise RuntimeError(f"LipschitzMarginLoss ramps eps over warmup_fraction={self.warmup_fraction} of the "
                               "run, whose length it does not know yet: call loss.plan_warmup(total_training_calls) "
                               "before training, give warmup=<training calls> instead, or let a LipschitzCallback "
                               "plan it (it reads the trainer's estimated_stepping_batches at fit start)")
        if self.warmup == 0:
            return self.eps
        return self.eps * torch.clamp(self.calls / self.warmup, max=1.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of ``kind`` on ``logits`` ``(B, C)`` of ``model`` and class indices ``target`` ``(B,)``."""
        eps = self.ramped_eps()
        if self.training:
            self.calls += 1
        K, bound = self.certificate()
        self.last_bound = bound.detach()
        finite = finite_bound(bound)  # on the device: a skipped step costs no host synchronisation
        zero_gradient_unless(finite, [K])  # d K / d head = 0 * L when L is not finite: exactly 0 instead
        self._last_eps = eps.detach() if isinstance(eps, Tensor) else eps
        K_y = torch.where(finite, K, 1.0)[target].to(logits.dtype)  # any finite K on a skipped step
        if self.kind == "ce":
            loss = margin_ce(logits, target, K_y, eps, self.temperature)
        elif self.kind == "hinge":
            loss = margin_hinge(pair_radii(logits, target, K_y), eps)
        else:
            loss = margin_lse(pair_radii(logits, target, K_y), eps, self.temperature)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, target)
        return torch.where(finite, loss, F.cross_entropy(logits, target))

    def certified_constants(self) -> Tensor:
        """The certified ``K`` (``(C, C)``, float64) of the current weights: what certified accuracy uses."""
        return self.certificate.certified()

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, warmup={self.warmup}, kind={self.kind!r}, temperature={self.temperature}, "
                f"ce_weight={self.ce_weight}")

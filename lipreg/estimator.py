"""``LipschitzEstimator``: the public ``nn.Module``, its options and entry points, over one piece per concept.

:mod:`lipreg.tracing` builds what the traced graph fixes (again when the model changes), :mod:`lipreg.warm` owns the
warm vectors (buffers: ``state_dict``) and their convergence, :mod:`lipreg.estimates` computes the warm bound,
:mod:`lipreg.certification` the certificates, and :mod:`lipreg.diagnostics` the warnings of non-finite bounds and
re-traces. The estimator holds the model, the options and the state of the last call, and keeps them in step.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .bounds.certificates import ChainBounds
from .bounds.liplt import LipLT
from .bounds.seqlip import SeqLip
from .capture.graph import LipGraph, LipNode
from .certification import (certified64, certified_layer_norms, certified_pair_bounds, float64_operators,
                            round_up, tightest64)
from .diagnostics import check_certificate, report, warn_retraced, watch
from .estimates import estimate, named_factors, pair_estimates
from .finite import NonFiniteRecord
from .operator import LinearOperator, Operators, linear_operators
from .options import Method, Search, checked_keywords, validate_method
from .policy import BoundPolicy
from .tracing import build, model_device
from .warm import WARM_MAX_ITER, WARM_TOL, PowerVectors, converge, rebuild_keeping_warm_state


class LipschitzEstimator(nn.Module):
    """Upper-bound estimates of the Lipschitz constant (L2 -> L2) of ``model``, differentiable w.r.t. its
    parameters, with warm-started power iterations kept between calls (like ``spectral_norm``'s ``u``).

    ``est()`` runs ``n_iter`` warm iterations per linear operator (default 1, cheap enough for every training
    step) and returns the AutoLip bound (paper Alg. 1) built from ``||A v||``. Power iterations converge to
    ``sigma_1`` from below, so this is an **estimate** of the AutoLip bound, not a certificate: ``est.certified``
    says which one you have, and :meth:`certified_bound` gives a guaranteed upper bound.

    The bound is that of the model in **eval mode**: batch norm with its running statistics, dropout as the
    identity. The model is traced with ``torch.fx`` but never modified or copied; the estimator holds it
    without registering it, so its ``state_dict`` holds the warm state only. Computation is in ``dtype``
    (float32 by default) with autocast disabled; certificates (:meth:`certified_bound`, and ``est()`` when
    ``est.certified``) are computed from the weights in float64 and rounded upwards into ``dtype``. Every call
    first checks that the model is still the one traced (:class:`lipreg.capture.fingerprint.ModelFingerprint`: the
    modules the graph uses and their children, every attribute the traced forward read, methods set on the
    instance, tensor shapes and dtypes, and hooks); if not, it is traced again (in the model's dtype now), with a
    warning, keeping the warm state that still fits.

    Non-finite weights (NaN or inf), or a bound that overflows ``dtype``, give a non-finite bound whose gradient is
    exactly 0 (see :mod:`lipreg.finite` for the one case it cannot reach), and the operators concerned keep their
    warm vectors. This costs no host synchronisation with ``method="autolip"`` (SeqLip's vertex search reads
    values on the host): the non-finite calls are recorded on the device, and the ``RuntimeWarning`` that names the
    non-finite factors comes at the next :meth:`check_finite`, run every :attr:`check_finite_every` calls and by
    :meth:`layer_bounds`, :meth:`converge` and :meth:`certified_bound`.

    Args:
        model: any ``nn.Module`` of one tensor input that ``torch.fx`` can trace.
        example_input: a batch of inputs (only its first sample's shape is used).
        method: ``"autolip"``, ``"seqlip"`` (paper eq. 8 on every chain, AutoLip elsewhere) or ``"liplt"`` (LipLT
            on every chain, :mod:`lipreg.bounds.liplt`: warm power iterations on the products of consecutive
            operators). Whatever the method, :meth:`certified_bound` is the tightest certificate the policy allows.
        n_iter: warm power iterations per call.
        fuse: fuse consecutive linear ops into one operator (tighter, and cheaper).
        dtype: computation dtype (``torch.float64`` for references).
        seed: seed of the initial vectors (identical on every process).
        concrete_args: passed to ``torch.fx.Tracer.trace`` to fix non-tensor arguments.
        policy: every size limit (dense or per-op certificates, exact or greedy SeqLip search, full or low-rank
            SeqLip factors) and the low-rank sizes; default ``BoundPolicy()``.
        search: SeqLip's search over activation patterns (``method="seqlip"`` only; default ``"auto"``).
        warm_start: start every warm vector from one Lanczos solve (:meth:`warm_start`) rather than from its random
            draw, so that the first ``est()`` is already near the converged value.

    Every option after ``example_input`` is keyword-only; a misspelled one fails here, naming the closest valid one.
    """

    check_finite_every: int = 100
    """Calls of ``est()`` between two reads of the non-finite record (:meth:`check_finite`), each a host
    synchronisation: 1 warns at the call itself."""

    @checked_keywords()
    def __init__(self, model: nn.Module, example_input: Tensor, *, method: Method = "autolip", n_iter: int = 1,
                 fuse: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
                 concrete_args: dict[str, Any] | None = None, policy: BoundPolicy | None = None,
                 search: Search | None = None, warm_start: bool = True) -> None:
        super().__init__()
        validate_method(method, search)
        object.__setattr__(self, "model", model)  # not a submodule: its weights are the user's, not our state
        self.method = method
        self.n_iter = n_iter
        self.dtype = dtype
        if policy is not None and not isinstance(policy, BoundPolicy):
            raise TypeError(f"policy must be a lipreg.BoundPolicy, got {type(policy).__name__}: "
                            "pass policy=lipreg.BoundPolicy(...)")
        self.policy = BoundPolicy() if policy is None else policy
        self._trace_options: dict[str, Any] = {"fuse": fuse, "concrete_args": concrete_args}
        self._seed = seed
        self._search = search
        self._power = PowerVectors(self)  # the warm vector of each iterated operator
        self.certificate: str | None = None
        """The certificates the last :meth:`certified_bound` used (``"autolip"``, ``"liplt+eclipse"``...), ``None``
        before its first call."""
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start must be True or False, got {warm_start!r}")
        self._warm_start = warm_start
        self._build(LipGraph(model, example_input, **self._trace_options))
        if warm_start:
            self.warm_start()

    def _build(self, graph: LipGraph) -> None:
        """Everything the graph fixes (:func:`~lipreg.tracing.build`): the nonlinear nodes' constants, the chains,
        SeqLip or LipLT, which operators have a closed form, and a fresh warm vector for every operator that needs
        the power method; then the warm state on the model's device."""
        structure = build(graph, self.method, dtype=self.dtype, device=self._device(), seed=self._seed,
                          policy=self.policy, search=self._search)
        self._structure = structure
        self.graph = graph
        self.seqlip: SeqLip | None = structure.seqlip  # submodules: their warm state is in state_dict
        self.liplt: LipLT | None = structure.liplt
        self._last_factors: dict[str, Tensor | float] = {}
        self._last_eval: tuple[dict[LipNode, Tensor], ChainBounds | None] | None = None  # with grad
        self._non_finite = NonFiniteRecord()  # of this graph's factors
        self._power.reset(structure.power, structure.generator, self.dtype)
        device = model_device(self.model)
        if device is not None:
            self.to(device)

    def _refresh(self) -> None:
        """Trace the model again if it changed since it was traced (:meth:`LipGraph.stale`: a submodule replaced,
        a hyper-parameter changed...), so that no bound describes a model that no longer exists. The warm state
        (power vectors, SeqLip patterns and subspaces) is kept wherever its name and shape are unchanged."""
        change = self.graph.stale()
        if change is None:
            return
        self.check_finite()  # before the record of the old graph's factors goes
        warn_retraced(change)
        old, sample = self.graph, self.graph.current_sample()
        # if the trace fails, the old estimator is restored: still stale, it raises again at the next call
        new = rebuild_keeping_warm_state(self, lambda: self._build(LipGraph(self.model, sample, **self._trace_options)),
                                         lambda: self._build(old))
        if self._warm_start and new:  # new operators: warm them too
            self.warm_start()

    # ----------------------------------------------------------------- bounds
    def forward(self, n_iter: int | None = None) -> Tensor:
        """The bound (scalar tensor, differentiable w.r.t. the model's parameters) after ``n_iter`` warm
        iterations per linear operator (default ``self.n_iter``)."""
        n_iter = self.n_iter if n_iter is None else n_iter
        with self._evaluation() as operators:
            if self.certified:  # no iteration: the bound is the certificate, computed and rounded as one
                bound64, factors, chains = certified64(self.graph, self._structure.bounded, self._float64(operators),
                                                       self.policy, self.seqlip, self._device())
                bound = round_up(self.graph, bound64, self.dtype)
            else:
                bound, factors, chains = estimate(self._structure, self._power, operators, n_iter, self.dtype,
                                                  self._device())
        self._last_eval = (factors, chains)
        self._last_factors = named_factors(self._structure, factors)
        self._watch_finite(bound, [*factors.values(), *(chain for _, chain in (chains or {}).values())])
        return bound

    def _watch_finite(self, bound: Tensor, factors: list[Tensor]) -> None:
        """No host synchronisation: a non-finite ``bound`` gets an exact zero gradient through every factor
        (:func:`~lipreg.finite.zero_gradient_unless`) and is recorded on the device; the record is read (and warned
        about) every :attr:`check_finite_every` calls, or at :meth:`check_finite`."""
        watch(self._non_finite, bound, factors,
              {name: f for name, f in self._last_factors.items() if isinstance(f, Tensor)})
        if self._non_finite.calls >= self.check_finite_every:
            self.check_finite()

    def check_finite(self) -> bool:
        """Whether a call since the last check gave a non-finite bound (NaN or inf weights, or an overflow); if
        so, a ``RuntimeWarning`` names the non-finite factors of the last of them. It reads a device-side record:
        one host synchronisation, which is why ``est()`` only does it every :attr:`check_finite_every` calls;
        :meth:`layer_bounds`, :meth:`converge` and :meth:`certified_bound` check too."""
        return report(self._non_finite, self.model, self._device(), self.dtype)

    def converge(self, tol: float = 1e-6, max_iter: int = 2000, progress: bool = False) -> Tensor:
        """Iterate every operator to its top singular triple (Golub-Kahan-Lanczos from its warm vector,
        :func:`~lipreg.linalg.krylov.lanczos_top_singular`) until ``||A^T u - sigma v|| <= tol * sigma``, or
        ``max_iter`` products by ``A`` each; store the right singular vectors as the warm vectors and return the
        (differentiable) bound. Still an **estimate from below**: each ``sigma`` is a Ritz value, at most
        ``sigma_1``, and within ``tol / 2`` of it whenever ``1 - sigma_2^2 / sigma_1^2 >= tol``
        (:func:`~lipreg.linalg.power.converged`). The residual test also bounds the vectors' error (by
        ``tol sigma / gap``), which a stalled ``sigma`` does not. SeqLip's subspaces are iterated too.
        ``progress=True`` shows a bar over the operators."""
        with torch.no_grad(), self._evaluation() as operators:
            converge(self._power, self._structure, operators, tol, max_iter, progress)
        bound = self(n_iter=0)
        self.check_finite()
        return bound

    def warm_start(self, tol: float = WARM_TOL, max_iter: int = WARM_MAX_ITER) -> None:
        """One Golub-Kahan-Lanczos solve per operator (and SeqLip subspace) from its warm vector, to the residual
        ``tol`` or ``max_iter`` products: :meth:`converge` without the bound. Run at construction (unless
        ``warm_start=False``): a random vector's Rayleigh quotient is far below ``sigma_1`` (``||A v|| ~
        ||A||_F / sqrt(n)``), and a product of such factors over a deep net is orders of magnitude below the
        converged bound, while a Ritz value's error is about the square of its residual, so every factor starts within
        ``tol^2`` (relative) of its converged value when the top singular value is separated. The values stay
        estimates; the vectors are the warm buffers, saved and restored by ``state_dict``."""
        with torch.no_grad(), self._evaluation() as operators:
            converge(self._power, self._structure, operators, tol, max_iter)

    def certified_bound(self, progress: bool = False, *, differentiable: bool = False) -> Tensor:
        """A guaranteed upper bound on the Lipschitz constant, with no random state.

        The tightest certificate the policy allows (:mod:`lipreg.bounds.certificates`): AutoLip with every linear
        operator's norm certified instead of estimated (:meth:`LinearOperator.certified_norm`), each chain bounded by
        the smallest of LipLT, ECLipsE-Fast (when its dense matrices fit ``policy``; no gradient) and exact SeqLip
        (when the SeqLip plan is exact on full SVDs), whatever ``method``; :attr:`certificate` says which were
        used. Greedy or low-rank SeqLip can miss the max, so it never certifies (a warning says so with
        ``method="seqlip"``). Whatever ``dtype``, everything is computed from the weights in float64 and the result
        rounded upwards into ``dtype``. It is computed under ``torch.no_grad()`` (no autograd graph is kept: a
        certificate to log or compare costs no backward memory) unless ``differentiable=True``, which returns it
        differentiable w.r.t. the model's parameters (to penalise it). ``progress=True`` shows a bar over the
        operators.
        """
        self._refresh()  # before the nodes are read: the graph must be the model's as it is now
        self.check_finite()
        if not self.exact_search:
            warnings.warn("this SeqLip search is not exact on full SVDs, so it cannot be certified: "
                          "certified_bound() returns the tightest of the other certificates", stacklevel=2)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()), self._evaluation() as operators:
            operators64 = self._float64(operators)
            (bound, factors, _), self.certificate = tightest64(self.graph, self._structure.chains, operators64,
                                                               self.policy, self._device(), progress)
            check_certificate(bound, factors, self.model, self.dtype)  # off the hot path: the host may wait
            return round_up(self.graph, bound, self.dtype)

    def pair_constants(self, weight: Tensor) -> Tensor | None:
        """Per-pair LipLT estimates ``(C, C)`` for a linear head ``weight`` after this (body) network, from the last
        call's warm product norms and the exact head rows through the body's last chain
        (:func:`~lipreg.bounds.liplt.pair_bounds`), differentiable; ``None`` unless ``method="liplt"`` and the body
        ends in an activation after a linear node (:func:`~lipreg.bounds.certificates.head_tail`)."""
        if self._last_eval is None:
            return None
        return pair_estimates(self._structure, self._last_eval, weight, self.dtype, self._device())

    def certified_pairs(self, weight: Tensor) -> dict[str, Tensor]:
        """Per-pair certificates ``(C, C)`` (float64, rounded upwards) for a linear head ``weight`` after this (body)
        network, by name (:func:`~lipreg.certification.certified_pair_bounds`): GloRo's ``||w_y - w_j|| L`` on
        :meth:`certified_bound`'s tightest ``L`` (named by its certificates, which :attr:`certificate` takes), and,
        when the body ends in an activation after a linear node, the certificates carried through its last chain
        (pairwise LipLT, and ECLipsE-Fast when the policy allows). The body is certified once for all of them."""
        self.check_finite()
        with torch.no_grad(), self._evaluation() as operators:
            pairs, self.certificate, (bound, factors, _) = certified_pair_bounds(
                self.graph, self._structure.chains, self._float64(operators), weight, self.policy, self.dtype,
                self._device())
            check_certificate(bound, factors, self.model, self.dtype)
        return pairs

    def linear_operators(self) -> dict[str, LinearOperator]:
        """The :class:`~lipreg.operator.LinearOperator` of every (fused) linear node, by node name, in ``dtype`` on
        the model's device, reading the model's weights as they are now."""
        self._refresh()
        return {node.name: operator
                for node, operator in linear_operators(self.graph, self.dtype, self._device()).items()}

    def layer_bounds(self, certified: bool = False) -> dict[str, float]:
        """Each node's own factor: ``||A v||`` of each (fused) linear operator in the last call, the constant of
        each activation or pooling, for SeqLip the factor of each pair of a chain, and for LipLT the norm of each
        product of two or more consecutive operators (``"A_j~A_k"``). With ``certified=True``,
        each linear operator's certified norm instead (computed now, from the current weights in float64, rounded
        upwards into ``dtype``). Checks the record of non-finite bounds first (:meth:`check_finite`)."""
        self.check_finite()
        if not certified:
            return {name: float(value) for name, value in self._last_factors.items()}
        with torch.no_grad(), self._evaluation() as operators:
            bounds = certified_layer_norms(self._float64(operators), self.policy, self.dtype)
        return {**bounds, **self._structure.constants}

    def layer_factors(self) -> dict[str, float]:
        """The factors of the last call that the weights set, in graph order: each (fused) linear operator's and, for
        SeqLip, each pair's; without the constants of activations and pooling (fixed by the graph: a ReLU stays 1)."""
        order = {node.name: i for i, node in enumerate(self.graph.nodes)}
        factors = {k: v for k, v in self.layer_bounds().items() if k not in self._structure.constants}
        return dict(sorted(factors.items(), key=lambda item: order.get(item[0].split("~")[0], len(order))))

    @property
    def example_input(self) -> Tensor:
        """The input the model was traced with: one sample (batch of 1) of the given example."""
        return self.graph.sample

    @property
    def exact_search(self) -> bool:
        """Whether the method's bound is certifiable once its norms are: ``False`` only for a greedy or low-rank
        SeqLip search, which can miss the max, so that its converged estimate can stay below every certificate."""
        return self.seqlip is None or self.seqlip.certified

    @property
    def certified(self) -> bool:
        """Whether the last bound is a guaranteed upper bound: only when no operator needed a power
        iteration (every norm in closed form) and any SeqLip search was exact on full SVDs."""
        exact_norms = len(self._power) == 0
        return exact_norms and self.exact_search and \
            (self.liplt is None or not self.liplt.chains)

    def extra_repr(self) -> str:
        """The method, the model, each bounded operator (its norm by power iteration or closed form) and the size
        of the warm state (every buffer: power vectors, SeqLip patterns and subspaces)."""
        operators = [node.name for node in self.graph.linear_nodes()]
        chained = self.seqlip or self.liplt
        chains = f", {self.method}_chains={len(chained.chains)}" if chained is not None else ""
        numel = sum(buffer.numel() for buffer in self.buffers())
        size = sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())
        return (f"method={self.method!r}, model={type(self.model).__name__}, operators={operators} "
                f"(power iteration: {len(self._power)}, closed form: {len(self._structure.closed_form)}){chains}, "
                f"warm_state={numel} values ({size / 1024:.1f} KiB), dtype={self.dtype}")

    # --------------------------------------------------------------- helpers
    def _float64(self, operators: Operators) -> Operators:
        """``operators`` if they are float64, else the float64 operators: certificates start from float64 weights."""
        return float64_operators(self.graph, operators, self.dtype, self._device())

    @contextmanager
    def _evaluation(self) -> Iterator[Operators]:
        """One evaluation on the model's device (the warm state follows a model moved after the estimator was
        built), with autocast off and the linear operators reading the model's weights now; the graph first
        rebuilt if the model changed (:meth:`_refresh`)."""
        self._refresh()
        device = self._device()
        if any(buffer.device != device for buffer in self.buffers()):
            self.to(device)
        with torch.autocast(device.type, enabled=False):
            yield linear_operators(self.graph, self.dtype, device)

    def _device(self) -> torch.device:
        return model_device(self.model) or torch.device("cpu")

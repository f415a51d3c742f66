"""The estimator's certificates, as functions of the graph, its float64 operators and the policy: no warm state.

Every certificate starts from the weights in float64 (:func:`float64_operators`): each linear operator's norm is
:meth:`~lipreg.operator.LinearOperator.certified_norm` (an upper bound, rounded upwards), Alg. 1 combines them
(:func:`~lipreg.bounds.autolip.autolip_bound`) with the chains' certified bounds, and :func:`round_up` casts the
float64 result upwards into the estimator's dtype with a margin that covers Alg. 1's own float64 rounding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .bounds.autolip import autolip_bound, node_constants
from .bounds.certificates import ChainBounds, certified_chains, certified_pairs, head_tail, pairwise_constants
from .bounds.seqlip import SeqLip
from .bounds.seqlip.chains import Chain
from .bounds.seqlip.plan import plan_certified, plan_chain
from .capture.graph import LipGraph, LipNode
from .linalg.certify import arithmetic_margin, certified_cast
from .operator import Operators, linear_operators
from .policy import BoundPolicy
from .progress import progress as _progress

Certified = tuple[Tensor, dict[LipNode, Tensor], ChainBounds | None]
"""A float64 bound before :func:`round_up`, the certified factors and the chain bounds it was built from."""

_SMALLEST_SUBNORMAL = torch.finfo(torch.float64).smallest_normal * 2.0**-52  # 4.9e-324


def float64_operators(graph: LipGraph, operators: Operators, dtype: torch.dtype, device: torch.device) -> Operators:
    """``operators`` (in ``dtype``) if ``dtype`` is float64, else the graph's float64 operators: certificates start
    from float64 weights."""
    return operators if dtype == torch.float64 else linear_operators(graph, torch.float64, device)


def round_up(graph: LipGraph, bound64: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 result of Alg. 1 on certified factors, rounded upwards into ``dtype``: each factor (and each
    exact SeqLip chain bound) is already >= its exact value, and the margin covers the float64 rounding of the
    products, sums and square roots of Alg. 1 (at most ``2 k + 2`` of them at a node of ``k`` inputs)."""
    n_ops = sum(2 * len(node.inputs) + 2 for node in graph.nodes)
    return certified_cast(bound64, dtype, arithmetic_margin(n_ops))


def certified_factors(nodes: Sequence[LipNode], operators64: Operators, policy: BoundPolicy,
                      progress: bool = False) -> dict[LipNode, Tensor]:
    """Each node's :meth:`~lipreg.operator.LinearOperator.certified_norm` in float64 (``progress``: a bar)."""
    return {node: operators64[node].certified_norm(policy) for node in _progress(nodes, progress, "certify")}


def certified64(graph: LipGraph, nodes: Sequence[LipNode], operators64: Operators, policy: BoundPolicy,
                seqlip: SeqLip | None, device: torch.device) -> Certified:
    """The method's own bound, certified: Alg. 1 on the certified norms of ``nodes`` (the bounded ones) and, with
    ``seqlip`` (an exact plan on full SVDs), its chains' bounds (eq. 8) from the float64 operators."""
    factors = certified_factors(nodes, operators64, policy)
    chains = seqlip(factors, operators64, 0) if seqlip is not None else None
    return autolip_bound(graph, factors, chains, dtype=torch.float64, device=device), factors, chains


def tightest64(graph: LipGraph, chains: Sequence[Chain], operators64: Operators, policy: BoundPolicy,
               device: torch.device, progress: bool = False) -> tuple[Certified, str]:
    """The tightest certified bound in float64 (before :func:`round_up`), with the certified factors and chain
    bounds it uses, and the certificates used (:func:`~lipreg.bounds.certificates.certified_chains`)."""
    factors = certified_factors(graph.linear_nodes(), operators64, policy, progress)
    if not all(bool(torch.isfinite(f).all()) for f in factors.values()):  # NaN or inf weights: no chain is
        # bounded better than by its non-finite factors (the estimator's warning names them)
        return (autolip_bound(graph, factors, {}, dtype=torch.float64, device=device), factors, {}), "autolip"
    exact = None
    if chains and all(plan_certified(plan_chain(c, "auto", policy, set())) for c in chains):
        # a fresh SeqLip (its warm state is irrelevant to an exact search), seeded: no global random state
        generator = torch.Generator().manual_seed(0)
        seqlip = SeqLip(graph, dtype=torch.float64, generator=generator, policy=policy).to(device)
        exact = seqlip(factors, operators64, 0)
    bounds, certificate = certified_chains(chains, operators64, policy, exact, factors)
    bound = autolip_bound(graph, factors, bounds, dtype=torch.float64, device=device)
    if all(bool((f > 0).all()) for f in factors.values()):  # a product of positive factors that underflowed
        bound = bound.clamp_min(_SMALLEST_SUBNORMAL)  # to 0 (1e-30 gains on 12 layers): round it up
    return (bound, factors, bounds), certificate


def certified_pair_bounds(graph: LipGraph, chains: Sequence[Chain], operators64: Operators, weight: Tensor,
                          policy: BoundPolicy, dtype: torch.dtype, device: torch.device
                          ) -> tuple[dict[str, Tensor], str, Certified]:
    """Per-pair certificates ``(C, C)`` for a linear head ``weight`` after the graph's (body) network, by name: the
    GloRo product ``||w_y - w_j|| L(body)`` on the body's tightest bound (named after its certificates) and, when
    the body ends in an activation after a linear node (:func:`~lipreg.bounds.certificates.head_tail`), those
    carried through that chain (:func:`~lipreg.bounds.certificates.certified_pairs`); with the body's certificates
    and its tightest float64 bound (before :func:`round_up`)."""
    body, certificate = tightest64(graph, chains, operators64, policy, device)
    bound, factors, bounds = body
    rounded = round_up(graph, bound, dtype).to(torch.float64)
    pairs = {certificate: certified_cast(pairwise_constants(weight, rounded), torch.float64)}
    tail = head_tail(graph, chains)
    if tail is not None and weight.shape[0] >= 2:
        (entry,) = tail[0].ops[0].inputs
        constant = node_constants(graph, factors, bounds, dtype=torch.float64, device=device)[entry]
        constant = round_up(graph, constant, dtype).to(torch.float64)
        pairs.update(certified_pairs(tail, operators64, weight, constant, policy, factors))
    return pairs, certificate, body


def certified_layer_norms(operators64: Operators, policy: BoundPolicy, dtype: torch.dtype) -> dict[str, float]:
    """Each linear operator's certified norm, by node name, rounded upwards into ``dtype``."""
    norms = certified_factors(list(operators64), operators64, policy)
    return {node.name: float(certified_cast(norm, dtype, margin=0.0)) for node, norm in norms.items()}

"""The estimator's warm **estimates**, as functions of its :class:`~lipreg.tracing.Structure` and warm state.

Each iterated operator's factor is a Rayleigh quotient ``||A v||`` of its warm vector (at most ``sigma_1``: an
estimate from below), each closed-form one exact; SeqLip (eq. 8) or LipLT replace their chains' products by their
own warm bounds; Alg. 1 (:func:`~lipreg.bounds.autolip.autolip_bound`) combines them, differentiably w.r.t. the
weights. None of it is a certificate (:mod:`lipreg.certification` computes those).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bounds.autolip import autolip_bound, node_constants
from .bounds.certificates import ChainBounds, head_tail
from .bounds.liplt import pair_bounds
from .capture.graph import LipNode
from .operator import Operators, linear_operators
from .tracing import Structure
from .warm import PowerVectors

Estimate = tuple[Tensor, dict[LipNode, Tensor], ChainBounds | None]
"""A bound, the factors of the bounded operators and the chains' bounds (``None`` for AutoLip) it was built from."""


def estimate(structure: Structure, power: PowerVectors, operators: Operators, n_iter: int, dtype: torch.dtype,
             device: torch.device) -> Estimate:
    """The method's warm bound after ``n_iter`` power steps per operator (and SeqLip or LipLT iterations per
    chain): closed-form norms as they are, the others ``||A v||`` (:meth:`PowerVectors.norms`)."""
    factors = {node: operators[node].closed_form_norm() for node in structure.closed_form}
    factors.update(power.norms(operators, n_iter))
    chains = chain_estimates(structure, factors, operators, n_iter)
    return autolip_bound(structure.graph, factors, chains, dtype=dtype, device=device), factors, chains


def chain_estimates(structure: Structure, factors: dict[LipNode, Tensor], operators: Operators,
                    n_iter: int) -> ChainBounds | None:
    """The chains' warm bounds of SeqLip or LipLT (``None`` for AutoLip)."""
    if structure.seqlip is not None:
        return structure.seqlip(factors, operators, n_iter)
    if structure.liplt is not None:
        return structure.liplt(operators, n_iter)
    return None


def named_factors(structure: Structure, factors: dict[LipNode, Tensor]) -> dict[str, Tensor | float]:
    """Every factor of a bound by name, detached: the linear operators', the constants of activations and pooling,
    and SeqLip's pair factors or LipLT's product norms (``"A_j~A_k"``)."""
    named: dict[str, Tensor | float] = {node.name: f.detach() for node, f in factors.items()}
    named.update(structure.constants)
    if structure.seqlip is not None:
        named.update(structure.seqlip.pair_factors())
    if structure.liplt is not None:
        named.update(structure.liplt.pair_factors())
    return named


def pair_estimates(structure: Structure, last: tuple[dict[LipNode, Tensor], ChainBounds | None], weight: Tensor,
                   dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Per-pair LipLT estimates ``(C, C)`` for a linear head ``weight`` after the (body) network, from the last
    call's factors and chain bounds (``last``), its warm product norms and the exact head rows through the body's
    last chain (:func:`~lipreg.bounds.liplt.pair_bounds`), differentiable; ``None`` unless the method is LipLT and
    the body ends in an activation after a linear node (:func:`~lipreg.bounds.certificates.head_tail`)."""
    liplt, graph = structure.liplt, structure.graph
    tail = head_tail(graph, structure.chains) if liplt is not None else None
    if liplt is None or tail is None or weight.shape[0] < 2:
        return None
    factors, chains = last
    chain, out_slopes = tail
    index = next((i for i, c in enumerate(liplt.chains) if c is chain), None)
    norm = liplt.last_norms(index) if index is not None else (lambda j, k: factors[chain.ops[0]])
    operators = linear_operators(graph, dtype, device)
    pairs = pair_bounds(norm, [operators[node] for node in chain.ops], [*chain.slopes, out_slopes], weight.to(dtype))
    (entry,) = chain.ops[0].inputs
    return pairs * node_constants(graph, factors, chains, dtype=dtype, device=device)[entry]

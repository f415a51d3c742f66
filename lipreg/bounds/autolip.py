"""AutoLip (paper Alg. 1): Lipschitz constants propagated through the DAG in topological order.

The input has constant 1, parameters and constants 0 (they are not nodes of the DAG), and a node
``f(a_1..a_k)`` gets ``sum_i L_i(f) L(a_i)`` where ``L_i(f)`` bounds its i-th partial Jacobian:

* (fused) linear operator ``A``: ``sigma_1(A) L(a)``;
* activation with slopes in ``[a, b]``: ``max(|a|, |b|) L(a)``; an op of known constant ``c`` (jointly in its
  arguments): ``c L(a)``, or ``c sqrt(sum_i L(a_i)^2)`` for several;
* ``sum_i c_i a_i``: ``sum_i |c_i| sqrt(k_i) L(a_i)``, with ``k_i`` the copies broadcasting makes of ``a_i``'s entries
  (a residual block ``x + g(x)`` gets ``1 + L(g)``, never a product);
* concatenation: ``sqrt(sum_i L(a_i)^2)``, tighter than the generic sum since the parts are orthogonal blocks.

Every root of a sum of squares is computed as ``m sqrt(sum_i (L(a_i) / m)^2)``, ``m = max_i L(a_i)``
(:func:`root_sum_squares`): squaring ``L(a_i)`` itself overflows float32 from ``1.8e19`` (a deep DenseNet's
concatenations reach ``1e20`` with a bound that fits), while the scaled form overflows only if the result does.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from ..capture.graph import LipGraph, LipNode
from ..ops import Activation, Concat, Constant, Sum


def own_constant(node: LipNode) -> float:
    """The Lipschitz constant of a single-input nonlinear node: ``max(|a|, |b|)`` or its stated constant."""
    rule, info = node.rule, node.ops[0]
    if isinstance(rule, Activation):
        a, b = rule.slopes(info)
        return max(abs(a), abs(b))
    if isinstance(rule, Constant):
        return rule.constant(info)
    raise TypeError(f"node {node.name!r} has no constant of its own ({rule.describe()})")


def root_sum_squares(values: list[Tensor]) -> Tensor:
    """``sqrt(sum_i x_i^2)`` of non-negative scalars, as ``m sqrt(sum_i (x_i / m)^2)`` with ``m = max_i x_i``: no
    overflow unless the result overflows, no host synchronisation (``m = 0`` divides by 1 instead; an infinite
    ``m`` gives ``inf``, not the ``inf / inf`` NaN). The gradient is that of the plain form: the scaled form is
    1-homogeneous, so ``m``'s own derivative cancels (Euler)."""
    if len(values) == 1:
        return values[0]
    stacked = torch.stack(values)
    top = stacked.max()
    scale = torch.where(top > 0, top, torch.ones_like(top))
    scaled = scale * torch.linalg.vector_norm(stacked / scale)
    return torch.where(top < math.inf, scaled, top)


def propagate(node: LipNode, parents: list[Tensor], factors: Mapping[LipNode, Tensor]) -> Tensor:
    """One step of Alg. 1: ``L(node)`` from its parents' constants."""
    if isinstance(node.rule, Sum):
        info = node.ops[0]
        coefficients = node.rule.coefficients(info)
        # a summand broadcast to the output's shape has each entry copied out/in times: its norm grows by the root
        copies = [math.sqrt(info.out_shape.numel() / shape.numel()) for shape in info.in_shapes]
        return sum(abs(c) * k * L for c, k, L in zip(coefficients, copies, parents))
    if isinstance(node.rule, Concat):
        return root_sum_squares(parents)
    if node in factors:
        (parent,) = parents
        return factors[node] * parent
    # c-Lipschitz jointly in its arguments: ||f(a) - f(a')|| <= c sqrt(sum_i ||a_i - a_i'||^2)
    return own_constant(node) * root_sum_squares(parents)


def chain_interiors(endpoints: Mapping[LipNode, LipNode]) -> set[LipNode]:
    """The nodes of each chain ``{last: first}`` but its last: ``first`` and everything between (a chain is a
    path whose interior nodes have one input and one user)."""
    inside: set[LipNode] = set()
    for last, first in endpoints.items():
        node = last
        while node is not first:
            (node,) = node.inputs
            inside.add(node)
    return inside


def autolip_bound(graph: LipGraph, factors: Mapping[LipNode, Tensor],
                  chains: Mapping[LipNode, tuple[LipNode, Tensor]] | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """``L(f)`` by Alg. 1, given the norm of every linear node (``factors``).

    ``chains`` maps the last node of a chain to ``(its first node, bound of the whole chain)``: the chain's
    product of factors is replaced by that bound (how SeqLip plugs in: eq. 8 per chain, AutoLip elsewhere).
    The input's constant 1 takes ``dtype`` and ``device`` (by default those of the factors): a graph with no
    linear node (pooling and activations only) has nothing else to take them from.
    """
    return node_constants(graph, factors, chains, dtype, device)[graph.output]


def node_constants(graph: LipGraph, factors: Mapping[LipNode, Tensor],
                   chains: Mapping[LipNode, tuple[LipNode, Tensor]] | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | None = None) -> dict[LipNode, Tensor]:
    """The constant of every node that :func:`autolip_bound` reaches (all but the chains' interiors): a bound on the
    Lipschitz constant of the map from the input to that node."""
    like = next(iter(factors.values()), torch.ones(()))
    one = torch.ones((), dtype=dtype or like.dtype, device=device or like.device)
    constants: dict[LipNode, Tensor] = {graph.nodes[0]: one}
    inside = chain_interiors({last: first for last, (first, _) in (chains or {}).items()})
    for node in graph.nodes[1:]:
        if node in inside:
            continue  # its constant is never needed: the chain's bound replaces the product
        if chains and node in chains:
            first, bound = chains[node]
            (parent,) = first.inputs
            constants[node] = bound * constants[parent]
        else:
            constants[node] = propagate(node, [constants[p] for p in node.inputs], factors)
    return constants

"""What a traced graph fixes for an estimator, whatever the weights: the nonlinear nodes' constants, the chains,
the method's chain bounds (SeqLip or LipLT, with their warm state), which operators the chains replace, which have
a closed-form norm, and which need the power method. Re-traced as one piece when the model changes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .bounds.autolip import chain_interiors, own_constant
from .bounds.liplt import LipLT
from .bounds.seqlip import SeqLip, find_chains
from .bounds.seqlip.chains import Chain
from .capture.graph import LipGraph, LipNode
from .operator import linear_operators
from .ops import Activation, Constant
from .options import Method, Search
from .policy import BoundPolicy


@dataclass
class Structure:
    """The pieces of an estimator that ``graph`` fixes. ``seqlip`` and ``liplt`` (at most one, by the method) are
    modules whose buffers are warm state; ``power`` lists the bounded operators left to the power method, whose
    vectors are drawn from ``generator`` after those of SeqLip or LipLT (so that a seed gives the same state)."""

    graph: LipGraph
    constants: dict[str, float]
    """The constant of each activation and each op of known constant, by node name."""
    chains: list[Chain]
    seqlip: SeqLip | None
    liplt: LipLT | None
    bounded: list[LipNode]
    """The linear nodes whose norm enters the bound: all but those SeqLip's or LipLT's chains replace."""
    closed_form: set[LipNode]
    power: list[LipNode]
    generator: torch.Generator


def build(graph: LipGraph, method: Method, *, dtype: torch.dtype, device: torch.device, seed: int,
          policy: BoundPolicy, search: Search | None) -> Structure:
    """The :class:`Structure` of ``graph`` for ``method``, with fresh warm state drawn from ``seed``; every linear
    operator's kernels are checked (:meth:`~lipreg.operator.LinearOperator.check_kernels`) on ``device``."""
    constants = {node.name: own_constant(node) for node in graph.nodes[1:]
                 if isinstance(node.rule, (Activation, Constant))}
    generator = torch.Generator().manual_seed(seed)
    chains = find_chains(graph)
    seqlip = liplt = None
    chained: set[LipNode] = set()  # linear nodes whose norm SeqLip or LipLT replaces: never iterated
    if method == "seqlip":
        seqlip = SeqLip(graph, dtype=dtype, generator=generator, policy=policy,
                        **({} if search is None else {"search": search}))
        chained = chain_interiors(seqlip.endpoints) | set(seqlip.endpoints)
    elif method == "liplt":
        liplt = LipLT(chains, dtype=dtype, generator=generator)
        chained = chain_interiors(liplt.endpoints) | set(liplt.endpoints)
    operators = linear_operators(graph, dtype, device)
    for operator in operators.values():
        operator.check_kernels()
    bounded = [node for node in graph.linear_nodes() if node not in chained]
    with torch.no_grad():
        closed_form = {node for node in bounded if operators[node].closed_form_norm() is not None}
    return Structure(graph, constants, chains, seqlip, liplt, bounded, closed_form,
                     [node for node in bounded if node not in closed_form], generator)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); ``None`` for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None

r"""The chains SeqLip bounds: maximal paths ``A_1 -> rho_1 -> A_2 -> ... -> A_K`` of the reduced DAG.

Each ``A_i`` is a (fused) linear node and each ``rho_i`` an elementwise activation whose slopes lie in
``[a_i, b_i]`` with ``a_i >= 0`` (ReLU, tanh, sigmoid ``[0, 1/4]``, LeakyReLU ``[alpha, 1]``, ELU with
``alpha <= 1``...). Every node but the last has exactly one user, so the chain's Jacobian is
``A_K D_{K-1} ... D_1 A_1`` with ``D_i = diag(sigma_i)``, ``sigma_i in [a_i, b_i]^{n_i}``. GELU / SiLU (negative
slopes), max pooling, sums and concatenations end a chain.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...capture.graph import LipGraph, LipNode
from ...ops import Activation

Link = tuple[LipNode, LipNode, tuple[float, float]]
"""``(activation, next linear node, slope interval of the activation)``."""


@dataclass(eq=False)
class Chain:
    """``ops[0] -> acts[0] -> ops[1] -> ... -> ops[-1]``, with the slope interval of each activation."""

    ops: list[LipNode]
    acts: list[LipNode]
    slopes: list[tuple[float, float]]

    @property
    def name(self) -> str:
        return "~".join(op.name for op in self.ops)


def find_chains(graph: LipGraph) -> list[Chain]:
    """Every maximal chain ``A_1 -> rho_1 -> ... -> A_K`` with ``K >= 2`` (``K = 1`` needs nothing: AutoLip already
    uses ``sigma_1(A_1)``)."""
    users = _users(graph)
    linear = [node for node in graph.nodes if node.is_linear]
    nexts = {op: _link(op, users, graph.output) for op in linear}
    has_prev = {nxt[1] for nxt in nexts.values() if nxt is not None}
    chains = []
    for op in linear:
        if op in has_prev:
            continue
        chain = Chain([op], [], [])
        while nexts[chain.ops[-1]] is not None:
            act, nxt, slopes = nexts[chain.ops[-1]]
            chain.acts.append(act)
            chain.ops.append(nxt)
            chain.slopes.append(slopes)
        if len(chain.ops) >= 2:
            chains.append(chain)
    return chains


def _users(graph: LipGraph) -> dict[LipNode, list[LipNode]]:
    users: dict[LipNode, list[LipNode]] = {node: [] for node in graph.nodes}
    for node in graph.nodes:
        for parent in node.inputs:
            users[parent].append(node)
    return users


def _link(op: LipNode, users: dict[LipNode, list[LipNode]], output: LipNode) -> Link | None:
    """The activation and linear node that continue a chain after ``op``, if any: ``op``'s only user is an
    activation of nonnegative slopes (not the output), whose only user is linear."""
    if op is output or len(users[op]) != 1:
        return None
    act = users[op][0]
    if not isinstance(act.rule, Activation) or act is output or len(act.inputs) != 1:
        return None
    lo, hi = act.rule.slopes(act.ops[0])
    if lo < 0 or len(users[act]) != 1 or not users[act][0].is_linear:
        return None
    return act, users[act][0], (float(lo), float(hi))

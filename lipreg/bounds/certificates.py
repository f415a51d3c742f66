r"""The tightest certificate the policy allows: per chain, and per pair of classes behind a linear head.

Every candidate is a certified upper bound of the same quantity (a chain's Lipschitz constant, or the constant
``K_yj`` of the logit gap ``z_y - z_j``), so their minimum is one too; :func:`tightest` takes it and says which
certificates gave it. The candidates:

* ``"autolip"``: the product of the certified norms (Alg. 1), what a graph without chains gets;
* ``"seqlip"``: exact SeqLip on full SVDs (eq. 8), when the estimator's SeqLip plan is certified;
* ``"liplt"``: :mod:`lipreg.bounds.liplt`, always (the dense products within ``BoundPolicy.dense_node``);
* ``"eclipse"``: :mod:`lipreg.bounds.eclipse`, when the chain's dense matrices fit the policy
  (:func:`~lipreg.bounds.eclipse.eligible`).

Per pair (:func:`certified_pairs`), the candidates are the GloRo product ``||w_y - w_j|| L(body)`` (named after the
body's certificate) and, when the body ends in an activation after a chain or a lone linear node
(:func:`head_tail`), pairwise LipLT and pairwise ECLipsE-Fast through that chain, times the constant of the chain's
input (Alg. 1 on the rest of the body).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..capture.graph import LipGraph, LipNode
from ..linalg.certify import arithmetic_margin, certified_cast
from ..operator import Operators
from ..ops import Activation
from ..policy import BoundPolicy
from .eclipse import certified_eclipse, eligible
from .liplt import certified_chain, certified_products, pair_bounds, pair_differences
from .seqlip.chains import Chain

CERTIFICATES = ("autolip", "seqlip", "liplt", "eclipse")
"""The certificates implemented, in the order ties are given to."""
ChainBounds = dict[LipNode, tuple[LipNode, Tensor]]


def tightest(candidates: Mapping[str, Tensor]) -> tuple[str, Tensor]:
    """The entrywise minimum of several certified bounds of the same shape, and the names of those that reached it
    (``"+"``-joined, in the candidates' order; an entry where all candidates tie counts for none, and if every entry
    ties, the first name is given). A NaN candidate entry is a failed computation (exact SeqLip on all-zero
    weights divides 0 by 0), not a bound: it is skipped, and an entry stays NaN only when every candidate is NaN
    there (NaN weights)."""
    names = list(candidates)
    stacked = torch.stack([candidates[name].to(torch.float64) for name in names])
    failed = stacked.isnan()
    best, index = torch.where(failed, math.inf, stacked).min(0)
    best = torch.where(failed.all(0), math.nan, best)
    contested = (stacked != best).any(0) & ~failed.all(0)
    won = {names[i] for i in index[contested].flatten().tolist()}
    return "+".join(name for name in names if name in won) or names[0], best


def pairwise_constants(weight: Tensor, body_bound: Tensor) -> Tensor:
    """GloRo's per-pair constants ``K_yj = ||w_y - w_j||_2 L(body)`` for a linear head ``weight`` after a body of
    bound ``L(body)`` (:mod:`lipreg.margins`, eq. 3), ``(C, C)``, in float64 (differentiable; the gradient of the zero
    diagonal is 0)."""
    w = weight.to(torch.float64)
    diff = w[:, None, :] - w[None, :, :]
    squared = (diff * diff).sum(-1)
    off = ~torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
    norms = torch.where(off, squared.clamp_min(torch.finfo(torch.float64).tiny), 1.0).sqrt() * off
    return norms * body_bound.to(torch.float64)


def certified_chains(chains: Sequence[Chain], operators64: Operators, policy: BoundPolicy,
                     seqlip: ChainBounds | None = None, factors: Mapping[LipNode, Tensor] | None = None
                     ) -> tuple[ChainBounds, str]:
    """The tightest certified bound of every chain, for :func:`~lipreg.bounds.autolip.autolip_bound`, and the
    certificates used (``"autolip"`` when there is no chain); ``factors``: the operators' own certificates, when the
    caller has them already (each is costly to recompute)."""
    bounds: ChainBounds = {}
    used: list[str] = []
    for chain in chains:
        ops = [operators64[node] for node in chain.ops]
        norms = None if factors is None else [factors[node] for node in chain.ops]
        candidates = {"liplt": certified_chain(ops, chain.slopes, policy, norms)}
        if seqlip is not None:
            candidates["seqlip"] = seqlip[chain.ops[-1]][1]
        sizes = [ops[0].in_shape.numel(), *(op.out_shape.numel() for op in ops)]
        if eligible(sizes, policy):
            value = certified_eclipse([op.dense() for op in ops[:-1]], chain.slopes, ops[-1].dense())
            if value is not None:
                candidates["eclipse"] = value
        name, bound = tightest(candidates)
        bounds[chain.ops[-1]] = (chain.ops[0], bound)
        used += [n for n in name.split("+") if n not in used]
    return bounds, "+".join(sorted(used, key=CERTIFICATES.index)) or "autolip"


def head_tail(graph: LipGraph, chains: Sequence[Chain]) -> tuple[Chain, tuple[float, float]] | None:
    """``(chain, slopes)`` when the graph's output is an activation of slopes ``[a, b]`` on a linear node, with the
    chain that ends at that node (a one-operator chain for a lone linear node); else ``None``."""
    out = graph.output
    if not isinstance(out.rule, Activation) or len(out.inputs) != 1 or not out.inputs[0].is_linear:
        return None
    (op,) = out.inputs
    lo, hi = out.rule.slopes(out.ops[0])
    chain = next((c for c in chains if c.ops[-1] is op), Chain([op], [], []))
    return chain, (float(lo), float(hi))


def certified_pairs(tail: tuple[Chain, tuple[float, float]], operators64: Operators, weight: Tensor,
                    entry: Tensor, policy: BoundPolicy, factors: Mapping[LipNode, Tensor] | None = None
                    ) -> dict[str, Tensor]:
    """Per-pair certificates ``(C, C)`` through the tail chain (pairwise LipLT, and ECLipsE-Fast when eligible), each
    times ``entry``, the certified constant of the chain's input; ``factors`` as in :func:`certified_chains`."""
    chain, out_slopes = tail
    ops = [operators64[node] for node in chain.ops]
    slopes = [*chain.slopes, out_slopes]
    weight = weight.to(torch.float64)
    certs = certified_products(ops, policy, None if factors is None else [factors[node] for node in chain.ops])
    out = {"pairwise_liplt": pair_bounds(lambda j, k: certs[(j, k)], ops, slopes, weight, rounding=True)}
    sizes = [ops[0].in_shape.numel(), *(op.out_shape.numel() for op in ops), 1]
    if eligible(sizes, policy):
        rows, i, j = pair_differences(weight)
        values = certified_eclipse([op.dense() for op in ops], slopes, rows, per_row=True)
        if values is not None:
            pairs = torch.zeros(weight.shape[0], weight.shape[0], dtype=torch.float64, device=weight.device)
            out["pairwise_eclipse"] = pairs.index_put((i, j), values).index_put((j, i), values)
    margin = arithmetic_margin(8 * len(ops) ** 2 + 8)  # (L3)'s products and sums, then the product by entry
    return {name: certified_cast(value * entry.to(torch.float64), torch.float64, margin)
            for name, value in out.items()}

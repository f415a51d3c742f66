"""What SeqLip does on each chain, fixed by the graph and the :class:`~lipreg.BoundPolicy`: for each operator a full
SVD or a low-rank subspace, for each pair an exact or a greedy search, and the names of their buffers."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...capture.graph import LipNode
from ...policy import BoundPolicy
from ..naming import buffer_name
from .chains import Chain


@dataclass(eq=False)
class OpPlan:
    node: LipNode
    lowrank: bool
    rank: int = 0  # E (low-rank only)
    width: int = 0  # E + oversampling, the subspace's size (low-rank only)
    buffer: str | None = None  # the subspace buffer (low-rank only)


@dataclass(eq=False)
class PairPlan:
    name: str  # "A_i~A_{i+1}"
    exact: bool
    lo: float
    hi: float
    width: int  # the activation's number of units n
    pattern: str  # buffer names
    pairvec: str


@dataclass(eq=False)
class ChainPlan:
    chain: Chain
    ops: list[OpPlan] = field(default_factory=list)
    pairs: list[PairPlan] = field(default_factory=list)


def plan_certified(plan: ChainPlan) -> bool:
    """Whether the chain's SeqLip bound is certified: exact search on the full SVD of every operator."""
    return all(pair.exact for pair in plan.pairs) and not any(op.lowrank for op in plan.ops)


def plan_chain(chain: Chain, search: str, policy: BoundPolicy, taken: set[str]) -> ChainPlan:
    """The plan of one chain; buffer names are made unique among ``taken``."""
    plan = ChainPlan(chain)
    plan.ops = [_plan_op(op, search, policy, taken) for op in chain.ops]
    plan.pairs = [_plan_pair(chain, i, search, policy, taken) for i in range(len(chain.acts))]
    return plan


def _plan_op(op: LipNode, search: str, policy: BoundPolicy, taken: set[str]) -> OpPlan:
    """A full SVD when the operator is small enough (``policy.seqlip_dense_entries``, ``seqlip_dense_rank``) and the
    search is not ``"lowrank"``; a subspace of ``E + oversampling`` vectors otherwise."""
    n_in, n_out = op.in_shape.numel(), op.out_shape.numel()
    small = n_in * n_out <= policy.seqlip_dense_entries and min(n_in, n_out) <= policy.seqlip_dense_rank
    if search != "lowrank" and small:
        return OpPlan(op, lowrank=False)
    rank = min(policy.lowrank_rank, n_in, n_out)
    width = min(rank + policy.lowrank_oversample, n_in, n_out)
    return OpPlan(op, lowrank=True, rank=rank, width=width, buffer=buffer_name("subspace", op.name, taken))


def _plan_pair(chain: Chain, i: int, search: str, policy: BoundPolicy, taken: set[str]) -> PairPlan:
    """Exact search for ``search="exact"``, or ``"auto"`` on at most ``policy.exact_search_units`` units; refused
    beyond ``policy.exact_search_limit``."""
    act = chain.acts[i]
    width = act.out_shape.numel()
    exact = search == "exact" or (search == "auto" and width <= policy.exact_search_units)
    if exact and width > policy.exact_search_limit:
        raise ValueError(f"search='exact' on {act.name!r} of width {width}: 2^{width} patterns are out "
                         f"of reach (limit 2^{policy.exact_search_limit}, BoundPolicy.exact_search_limit); use "
                         "search='auto' or 'greedy'")
    lo, hi = chain.slopes[i]
    pattern = buffer_name("pattern", act.name, taken)
    pairvec = buffer_name("pairvec", act.name, taken)
    return PairPlan(f"{chain.ops[i].name}~{chain.ops[i + 1].name}", exact, lo, hi, width, pattern, pairvec)

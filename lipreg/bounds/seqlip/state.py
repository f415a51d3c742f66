"""``SeqLip``: the chain bounds of a graph, as an ``nn.Module`` whose buffers are the warm state.

Buffers (so ``state_dict`` holds them): the pattern of every pair (``pattern_*``, bool: the greedy's start and the
exact search's first incumbent on the next call), the subspace of every low-rank operator (``subspace_*``), and
for diagnostics the top left singular vector of every pair matrix at its pattern, mapped to the activation space
(``pairvec_*``: the direction in which the chain's Jacobian bound is attained).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ...capture.graph import LipGraph, LipNode
from ...operator import Operators, linear_operators
from ...linalg.power import converged, ritz_residuals
from ...options import SEARCHES, Search, check_choice
from ...policy import BoundPolicy
from .chains import find_chains
from .factors import Factor, dense_factor, lowrank_factor, random_subspace, ritz
from .gradient import Pair, gradient_surrogate
from .plan import ChainPlan, OpPlan, PairPlan, plan_certified, plan_chain
from .search import exact_search, greedy_local_max, pair_matrix, rounding_slack, top_singular, vertex_sigma


class SeqLip(nn.Module):
    """SeqLip on every chain of a :class:`LipGraph` (see :mod:`lipreg.bounds.seqlip`); used by
    ``LipschitzEstimator(method="seqlip")``.

    ``forward(factors, operators, n_iter)`` returns ``{last node of chain: (first node, chain bound)}`` for
    :func:`lipreg.bounds.autolip.autolip_bound`. ``n_iter`` is the number of warm subspace iterations of the low-rank
    operators; each greedy search runs ``policy.greedy_rounds_per_call`` rounds from the stored pattern (exact
    searches run to their end), and :meth:`converge` runs them to a local max.

    Args:
        graph: the traced graph.
        dtype: the estimator's dtype (of the returned bound and of the warm vectors).
        generator: seeds the initial low-rank subspaces.
        search: ``"auto"``, ``"exact"``, ``"greedy"`` or ``"lowrank"``.
        policy: the size limits (full SVD or low rank, exact or greedy search) and the low-rank sizes.
    """

    def __init__(self, graph: LipGraph, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 search: Search = "auto", policy: BoundPolicy = BoundPolicy()) -> None:
        super().__init__()
        check_choice("search", search, Search)
        object.__setattr__(self, "graph", graph)  # not a module: plain attribute
        self.dtype = dtype
        self.search = search
        self.policy = policy
        self.chains = find_chains(graph)
        self._last_pairs: dict[str, Tensor] = {}
        taken: set[str] = set()
        self.plans: list[ChainPlan] = []
        for chain in self.chains:
            plan = plan_chain(chain, search, policy, taken)
            for op in plan.ops:
                if op.lowrank:
                    self.register_buffer(op.buffer, random_subspace(op.node.in_shape, op.width, generator, dtype))
            for pair in plan.pairs:
                self.register_buffer(pair.pattern, torch.ones(pair.width, dtype=torch.bool))
                self.register_buffer(pair.pairvec, torch.zeros(pair.width, dtype=dtype))
            self.plans.append(plan)

    # ------------------------------------------------------------------ public
    @property
    def certified(self) -> bool:
        """Whether every chain's bound is certified: exact search on the full SVD of every operator."""
        return all(plan_certified(plan) for plan in self.plans)

    @property
    def endpoints(self) -> dict[LipNode, LipNode]:
        """``{last operator: first operator}`` of every chain."""
        return {plan.chain.ops[-1]: plan.chain.ops[0] for plan in self.plans}

    def pair_factors(self) -> dict[str, Tensor]:
        """``{"A_i~A_{i+1}": factor}`` of every pair of every chain, from the last call."""
        return dict(self._last_pairs)

    def forward(self, factors: Mapping[LipNode, Tensor], operators: Operators,
                n_iter: int = 1) -> dict[LipNode, tuple[LipNode, Tensor]]:
        self._last_pairs = {}
        return {plan.chain.ops[-1]: (plan.chain.ops[0], self._chain_bound(plan, operators, n_iter))
                for plan in self.plans}

    @torch.no_grad()
    def converge(self, operators: Operators, tol: float = 1e-6, max_iter: int = 2000) -> None:
        """Run the subspace iteration of every low-rank operator until each of its top-``E`` Ritz triples passes
        :func:`~lipreg.linalg.power.converged` (``||A^T u_i - s_i v_i|| <= tol s_i``), or ``max_iter`` steps, then
        every greedy search to a local max (``policy.greedy_max_rounds``); a warm call runs
        ``policy.greedy_rounds_per_call`` rounds. (Full SVDs and exact searches need no iterations.)"""
        for op in self._lowrank_ops():
            operator, subspace = operators[op.node], self.get_buffer(op.buffer)
            for _ in range(max_iter):
                lowrank_factor(operator, subspace, op.rank, 1)  # a power step, then the Ritz rotation
                values, residuals = ritz_residuals(operator.matmat, subspace[: op.rank])
                if not bool(torch.isfinite(residuals).all()) or converged(residuals, values, tol):
                    break
        for plan in self.plans:  # then every greedy search to a local max, from the converged factors
            if not all(pair.exact for pair in plan.pairs):
                self._searched(plan, operators, 0, self.policy.greedy_max_rounds)

    def subspace_singular_values(self, node: LipNode) -> Tensor:
        """The top-``E`` singular values of a low-rank operator from its current subspace (Rayleigh-Ritz, float64):
        for tests and diagnostics."""
        op = next((op for op in self._lowrank_ops() if op.node is node), None)
        if op is None:
            raise ValueError(f"{node.name!r} is not a low-rank operator of a chain")
        with torch.no_grad():
            device = next((b.device for b in self.buffers()), torch.device("cpu"))
            operator = linear_operators(self.graph, self.dtype, device)[node]
            Q, triples = ritz(operator, self.get_buffer(op.buffer))
            return triples[1][: op.rank] if triples is not None else Q.new_full((op.rank,), float("nan"))

    # ------------------------------------------------------------------ one chain
    def _lowrank_ops(self) -> list[OpPlan]:
        return [op for plan in self.plans for op in plan.ops if op.lowrank]

    def _factor(self, op: OpPlan, operators: Operators, n_iter: int) -> Factor:
        operator = operators[op.node]
        if not op.lowrank:
            return dense_factor(operator)
        return lowrank_factor(operator, self.get_buffer(op.buffer), op.rank, n_iter)

    def _chain_bound(self, plan: ChainPlan, operators: Operators, n_iter: int) -> Tensor:
        """``prod_i s_i`` over the pairs (paper eq. 8), its value from the searches (warm: at most
        ``policy.greedy_rounds_per_call`` greedy rounds) and its gradient from the surrogate (:mod:`.gradient`)."""
        first = operators[plan.chain.ops[0]]
        device, dtype = first.device, first.dtype
        with torch.no_grad():
            facs, pairs = self._searched(plan, operators, n_iter, self._rounds_per_call())
            if pairs is None:
                for pair in plan.pairs:
                    self._last_pairs[pair.name] = torch.tensor(float("nan"), dtype=dtype, device=device)
                return torch.tensor(float("nan"), dtype=dtype, device=device)
            values = torch.stack([pair.s for pair in pairs])
            value = values.prod()
        surrogate = gradient_surrogate([op.node for op in plan.ops], facs, pairs, values, operators)
        return value.to(dtype) + (surrogate - surrogate.detach())

    def _rounds_per_call(self) -> int:
        cap = self.policy.greedy_max_rounds
        per_call = self.policy.greedy_rounds_per_call
        return per_call if cap is None else min(per_call, cap)

    def _searched(self, plan: ChainPlan, operators: Operators, n_iter: int,
                  rounds: int | None) -> tuple[list[Factor], list[Pair] | None]:
        """The chain's factors and its pairs, searched (greedy ones for at most ``rounds`` rounds, ``None``: to a
        local max); ``None`` pairs when a factor is not finite."""
        facs = [self._factor(op, operators, n_iter) for op in plan.ops]
        if not all(f.finite for f in facs):
            return facs, None
        dtype = operators[plan.chain.ops[0]].dtype
        return facs, [self._search_pair(pp, facs[i], facs[i + 1], i, len(facs), dtype, rounds)
                      for i, pp in enumerate(plan.pairs)]

    def _search_pair(self, pp: PairPlan, left: Factor, right: Factor, i: int, K: int, dtype: torch.dtype,
                     rounds: int | None) -> Pair:
        """Pair ``i`` of a chain of ``K`` operators: ``max_sigma ||R_{i+1} diag(sigma) L_i||`` with
        ``L_i = U_i Sigma~_i``, ``R_{i+1} = Sigma~_{i+1} V_{i+1}^T`` (``Sigma~ = Sigma`` at the ends of the chain,
        ``Sigma^{1/2}`` inside), searched warm from the stored pattern, which is updated (and the pair vector, in
        ``dtype``, the operators')."""
        C = left.U * left.scaled(1.0 if i == 0 else 0.5)  # L_i = U_i Sigma~_i
        B = (right.V * right.scaled(1.0 if i + 1 == K - 1 else 0.5)).T  # R_{i+1} = Sigma~_{i+1} V_{i+1}^T
        pattern = self.get_buffer(pp.pattern)
        if pp.exact:
            p = exact_search(B, C, pp.lo, pp.hi, pattern.to(B.device), max_units=self.policy.exact_search_limit)
            s, x, y = top_singular(pair_matrix(B, C, vertex_sigma(p, pp.lo, pp.hi)))
            s = s + rounding_slack(B, C, pp.lo, pp.hi)
        else:
            p, s, x, y = greedy_local_max(B, C, pp.lo, pp.hi, pattern.to(B.device), rounds)
        pair = Pair(B, C, vertex_sigma(p, pp.lo, pp.hi), s, x, y)
        pattern.copy_(p)
        self.get_buffer(pp.pairvec).copy_((right.V @ x).to(dtype))
        self._last_pairs[pp.name] = s.to(dtype)
        return pair

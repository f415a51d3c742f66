r"""SeqLip (Scaman & Virmaux 2018, eq. 8) on every maximal chain of the graph; AutoLip everywhere else.

**Chains.** A chain is a maximal path ``A_1 -> rho_1 -> A_2 -> ... -> A_K`` of the reduced DAG where each ``A_i`` is
a (fused) linear node and each ``rho_i`` an elementwise activation whose slopes lie in ``[a_i, b_i]`` with
``a_i >= 0`` (ReLU, tanh, sigmoid ``[0, 1/4]``, LeakyReLU ``[alpha, 1]``, ELU with ``alpha <= 1``...). Every node but
the last has exactly one user, so the chain's Jacobian is ``A_K D_{K-1} ... D_1 A_1`` with
``D_i = diag(sigma_i)``, ``sigma_i in [a_i, b_i]^{n_i}``. GELU / SiLU (negative slopes), max pooling, sums and
concatenations end a chain. ``K = 1`` chains need nothing: AutoLip already uses ``sigma_1(A_1)``. The graph
bound is AutoLip with each chain's product of factors replaced by the chain's SeqLip bound (a residual block
``x + g(x)`` gets ``1 + SeqLip(g)``).

**The bound** (eq. 8). With ``A_i = U_i Sigma_i V_i^T`` (thin SVD of the operator as an ``n_out x n_in`` matrix of
the flattened per-sample map),

    ``L(chain) <= prod_{i<K} max_{sigma_i} || R_{i+1} diag(sigma_i) L_i ||_2``,
    ``L_i = U_i Sigma~_i``, ``R_{i+1} = Sigma~_{i+1} V_{i+1}^T``,

with ``Sigma~ = Sigma`` for the first and the last operator and ``Sigma^{1/2}`` for the inner ones (for ``K = 2`` this
is exactly ``max_sigma ||A_2 D A_1||``). ``torch.linalg.svd`` returns ``Vh = V^T``; it is used as such. The norm is
convex in ``sigma``, so the max over the box is attained at a vertex ``sigma_k in {a, b}``.

**Searches** (``search=``), per pair of the chain:

* ``"exact"``: every vertex (``2^n``), by branch and bound on the batched enumeration (chunks of patterns; the
  greedy's value first, then patterns whose Frobenius or Schatten-4 norm cannot beat it are dropped, and the rest
  get a batched ``eigvalsh`` of their Gram matrices). See :func:`exact_search` for costs.
* ``"greedy"``: local search from the previous pattern (all ones on the first call). Phase 1: alternating
  maximisation (top singular vectors ``x, y`` of the pair matrix -> the vertex maximising ``x^T P(sigma) y``, i.e.
  ``sigma_k = b`` where ``(B^T x)_k (C y)_k > 0``, ``a`` where it is negative), each step a strict increase.
  Phase 2: single flips, tested **exactly** for all ``n`` candidates at once: a flip is a rank-one update
  ``P + d b_k c_k^T``, i.e. a rank-two update of the Gram matrix ``P^T P = Y Lambda Y^T``, and ``lambda_max`` of the
  update exceeds ``tau > lambda_1`` iff a 2x2 matrix (Haynsworth inertia) is positive definite; the value of each
  improving flip is found by bisection on that test. The improving flips are then applied all together, else the
  better half, ..., else the best one alone (the first set that beats the best single flip). Phases repeat until
  no single flip improves: the result is a local max for single flips, never below the starting pattern. Costs one
  ``r^3`` eigendecomposition and ``O(n r^2)`` per round; a warm call after a small weight change usually has one
  round (two small decompositions per pair). Cold, from all ones: about 0.05 s per 128-wide pair, 0.3 s per
  384-wide one (one CPU thread).
* ``"lowrank"``: operators are replaced by their top-``E`` singular triplets (``rank=E``, default 200, at most the
  true rank), found by warm-started subspace (block power) iteration through autograd on a block of ``E`` (+10
  oversampling) vectors, with QR and a Rayleigh-Ritz rotation, never forming the matrix: ``n_iter`` iterations per
  call (``est.converge()`` iterates to convergence). The operator is then ``A Q_E Q_E^T`` with ``Q_E`` the top ``E``
  Ritz vectors, the pair matrices are ``E x E`` and the greedy (or exact) search runs on them. This drops the tail
  of the spectrum: an **estimate**, not a bound. With ``n_iter = 0`` the stored ``Q_E`` is used as it is.
* ``"auto"`` (default): exact when the pair's width ``n <= exact_max_units`` (16), greedy otherwise; per operator a
  full SVD of its dense matrix when it has at most ``dense_max_entries`` (4e6) entries and
  ``min(n_in, n_out) <= dense_max_rank`` (512: the greedy costs ``O(n r^2)`` per flip), low-rank otherwise.

Only exact search on full SVDs of every operator is certified (:attr:`SeqLip.certified`); its pair norms carry a
float64 rounding slack (:func:`rounding_slack`), and the estimator then evaluates the chain from float64 weights.

**Gradients.** With the patterns fixed, the bound is a differentiable function of the weights. Its gradient is
computed in a gauge-invariant form that stays finite with repeated or zero singular values (``torch``'s SVD
backward divides by ``sigma_i^2 - sigma_j^2``): Danskin's theorem for each pair norm (top singular vectors ``x, y``
fixed), the exact derivative of ``U Sigma`` / ``Sigma V^T`` at the ends (``A V`` and ``U^T A`` with ``U, V``
fixed), and for the inner ``Sigma^{1/2}`` factors the Daleckii-Krein derivative of ``(A^T A)^{1/4}`` and
``(A A^T)^{1/4}`` (divided differences ``1 / ((sqrt s_a + sqrt s_b)(s_a + s_b))``, no cancellation). The result is a
matrix ``Xi_j`` per operator, given as a few outer products, and the returned tensor is
``value + sum_j (<A_j, Xi_j> - <A_j, Xi_j>.detach())``, where ``<A_j, Xi_j>`` is computed by applying ``A_j``
(through autograd, with the weights' history) to ``r + 2`` vectors. Value exact, gradient ``sum_j Xi_j``.

All search and small linear algebra is done in float64, whatever the estimator's dtype.

**Warm state** (buffers, so ``state_dict`` holds it): the pattern of every pair (``pattern_*``, bool: the greedy's
start and the exact search's first incumbent on the next call), the subspace of every low-rank operator
(``subspace_*``), and for diagnostics the top left singular vector of every pair matrix at its pattern, mapped to
the activation space (``pairvec_*``: the direction in which the chain's Jacobian bound is attained).

**Cost per call** (``est()``; every call re-runs the searches, warm): the dense matrix and float64 SVD of every
chain operator (fixed cost), the searches, and ``r + 2`` applications of each operator with grad. Measured on the
digits models (``experiments/bench/bench_seqlip.py``): 15-25 ms for the MLP and CNN, 0.2-0.3 s for the
AlexNet-shaped net, a warm call about half a cold one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ..capture.graph import LipGraph, LipNode
from ..operator import LinearOperator, linear_operators
from ..linalg.power import converged, ritz_residuals
from ..ops import Activation

SEARCHES = ("auto", "exact", "greedy", "lowrank")
DEFAULT_RANK = 200
EXACT_HARD_LIMIT = 22
"""No exhaustive search beyond ``2^22`` patterns per pair, whatever ``search="exact"`` says."""

_RTOL = 1e-9  # a flip must raise the pair norm by this relative amount (float64 search)
_F64 = torch.float64
Operators = Mapping[LipNode, LinearOperator]


# --------------------------------------------------------------------------- chains
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
    """Every maximal chain ``A_1 -> rho_1 -> ... -> A_K`` with ``K >= 2`` (see the module docstring)."""
    users: dict[LipNode, list[LipNode]] = {node: [] for node in graph.nodes}
    for node in graph.nodes:
        for parent in node.inputs:
            users[parent].append(node)
    output = graph.output

    def link(op: LipNode) -> tuple[LipNode, LipNode, tuple[float, float]] | None:
        if op is output or len(users[op]) != 1:
            return None
        act = users[op][0]
        if not isinstance(act.rule, Activation) or act is output or len(act.inputs) != 1:
            return None
        lo, hi = act.rule.slopes(act.ops[0])
        if lo < 0 or len(users[act]) != 1 or not users[act][0].is_linear:
            return None
        return act, users[act][0], (float(lo), float(hi))

    linear = [node for node in graph.nodes if node.is_linear]
    nexts = {op: link(op) for op in linear}
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


# --------------------------------------------------------------------------- pair searches (float64)
def pair_matrix(B: Tensor, C: Tensor, sigma: Tensor) -> Tensor:
    """``B diag(sigma) C``."""
    return B @ (sigma[:, None] * C)


def _top(P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, x, y)``: the top singular value and vectors of ``P`` (``P y = s x``)."""
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    return S[0], U[:, 0], Vh[0]


def _sigma(p: Tensor, lo: float, hi: float) -> Tensor:
    return torch.where(p, torch.tensor(hi, dtype=_F64, device=p.device), torch.tensor(lo, dtype=_F64, device=p.device))


def exact_search(B: Tensor, C: Tensor, lo: float, hi: float, start: Tensor | None = None,
                 chunk: int = 1 << 13) -> Tensor:
    """The vertex pattern (bool, ``True`` = slope ``hi``) maximising ``||B diag(sigma) C||_2`` over all ``2^n``.

    Branch and bound over the enumeration, batched by chunks of patterns: the greedy local max from ``start``
    (default all ones) gives a first value ``v``; a pattern is dropped when its Frobenius norm (a quadratic form in
    ``sigma``, ``O(n^2)``), then its Schatten-4 norm (``||P^T P||_F^{1/2}``), is at most ``v`` (both bound the spectral
    norm from above); the survivors get a batched ``eigvalsh`` of their Gram matrix and raise ``v``. Exact up to
    a relative ``1e-12`` in the pruning."""
    n = B.shape[1]
    if n > EXACT_HARD_LIMIT:
        raise ValueError(f"exact SeqLip search over 2^{n} patterns is out of reach (limit 2^{EXACT_HARD_LIMIT}); "
                         "use search='greedy'")
    device = B.device
    if hi == lo or n == 0:
        return torch.ones(n, dtype=torch.bool, device=device)
    start = torch.ones(n, dtype=torch.bool, device=device) if start is None else start
    best_p, best_s, _, _ = greedy_local_max(B, C, lo, hi, start)
    best = float(best_s) ** 2  # lambda_max of the Gram matrix
    r2, r1 = B.shape[0], C.shape[1]
    quad = (B.T @ B) * (C @ C.T)  # ||P(sigma)||_F^2 = sigma^T quad sigma
    outer = (B.T[:, :, None] * C[:, None, :]).reshape(n, r2 * r1)  # b_k c_k^T, flattened
    base = (lo * (B @ C)).reshape(1, r2 * r1)
    bits = torch.arange(n, device=device)
    keep_margin = 1 + 1e-12
    for first in range(0, 1 << n, chunk):
        index = torch.arange(first, min(first + chunk, 1 << n), device=device)
        sigma = lo + (hi - lo) * ((index[:, None] >> bits) & 1).to(_F64)
        frobenius2 = ((sigma @ quad) * sigma).sum(1)
        index, sigma = index[frobenius2 > best * keep_margin], sigma[frobenius2 > best * keep_margin]
        if index.numel() == 0:
            continue
        P = (base + (sigma - lo) @ outer).view(-1, r2, r1)
        gram = P @ P.mT if r2 <= r1 else P.mT @ P
        schatten4 = (gram * gram).sum((1, 2))  # ||P||_S4^4 >= lambda_max^2
        alive = schatten4 > (best * keep_margin) ** 2
        if not bool(alive.any()):
            continue
        top = torch.linalg.eigvalsh(gram[alive])[:, -1]
        value, arg = top.max(0)
        if float(value) > best:
            best = float(value)
            best_p = ((index[alive][arg] >> bits) & 1).bool()
    return best_p


def rounding_slack(B: Tensor, C: Tensor, lo: float, hi: float) -> Tensor:
    """An upper bound on the float64 error of a pair norm ``||B diag(sigma) C||`` computed from SVD factors.

    The SVDs, the products and the top singular value are backward stable: the computed value is exact for
    factors perturbed by ``O(n eps)`` relative to their norms, so its absolute error is at most
    ``c n eps max(|lo|, |hi|) ||B||_2 ||C||_2`` -- large, relative to the value, when the pair nearly cancels
    (``||A_2 A_1|| << ||A_2|| ||A_1||``). Taken with ``c = 16`` and ``n`` the sum of the three dimensions."""
    n = B.shape[0] + B.shape[1] + C.shape[1]
    scale = max(abs(lo), abs(hi)) * torch.linalg.matrix_norm(B, 2) * torch.linalg.matrix_norm(C, 2)
    return 16 * n * torch.finfo(_F64).eps * scale


def _flip_test(Lam: Tensor, alpha: Tensor, gamma: Tensor, t: Tensor, tau: Tensor) -> Tensor:
    """For each candidate ``k``: does ``Lambda + a c^T + c a^T + t c c^T`` have an eigenvalue above ``tau``?

    ``alpha, gamma``: (k, r) rows ``a, c`` in the eigenbasis; ``t``: (k,); ``tau``: (k,) above ``max Lambda``.
    Haynsworth: with ``N = Lambda - tau I < 0``, the number of eigenvalues above ``tau`` is ``pos(T) - 1`` for
    ``T = [[t, -1], [-1, 0]] + Z^T (tau I - Lambda)^{-1} Z``, ``Z = [a c]``: there is one iff ``T`` is positive
    definite.
    """
    inv = 1.0 / (tau[:, None] - Lam[None, :])
    t11 = t + (alpha * alpha * inv).sum(1)
    t12 = -1.0 + (alpha * gamma * inv).sum(1)
    t22 = (gamma * gamma * inv).sum(1)
    return (t11 > 0) & (t11 * t22 - t12 * t12 > 0)


@dataclass(eq=False)
class _GramState:
    """The current pair matrix ``P`` (``r2 x r1``, ``r1 <= r2``) with the eigendecomposition of ``P^T P``."""

    P: Tensor
    lam: Tensor  # ascending eigenvalues of P^T P
    Y: Tensor  # their eigenvectors (columns)

    @property
    def s(self) -> float:
        return float(self.lam[-1].clamp_min(0).sqrt())

    def vectors(self) -> tuple[Tensor, Tensor]:
        """``(x, y)``, top left and right singular vectors (``P y = s x``)."""
        y = self.Y[:, -1]
        x = self.P @ y
        norm = x.norm()
        return (x / norm if norm > 0 else x), y


def _gram_state(B: Tensor, C: Tensor, p: Tensor, lo: float, hi: float) -> _GramState:
    P = pair_matrix(B, C, _sigma(p, lo, hi))
    lam, Y = torch.linalg.eigh(P.T @ P)
    return _GramState(P, lam, Y)


def _improving_flips(B: Tensor, C: Tensor, p: Tensor, lo: float, hi: float, state: _GramState,
                     exclude: Tensor, steps: int = 48) -> tuple[Tensor, Tensor]:
    """The single flips that raise ``||P||`` (tested exactly, all ``n`` at once) and their new norms (bisection).

    A flip of unit ``k`` is the rank-one update ``P + d_k b_k c_k^T``; in the eigenbasis of ``P^T P`` its Gram matrix
    is ``Lambda + a c^T + c a^T + t c c^T`` (see :func:`_flip_test`)."""
    lam, Y, P = state.lam, state.Y, state.P
    s2 = float(lam[-1].clamp_min(0))
    d = (hi - lo) * (1.0 - 2.0 * p.to(_F64))  # change of sigma_k when flipping k
    alpha = d[:, None] * (B.T @ (P @ Y))  # rows: d_k Y^T P^T b_k
    gamma = C @ Y  # rows: Y^T c_k
    t = d * d * (B * B).sum(0)
    upper = (s2 ** 0.5 + d.abs() * B.norm(dim=0) * C.norm(dim=1)) ** 2  # Weyl
    floor = 1e-300 + 1e-24 * float(upper.max())
    tau = torch.full_like(d, s2 * (1 + _RTOL) + floor)
    improving = _flip_test(lam, alpha, gamma, t, tau) & ~exclude
    idx = improving.nonzero().squeeze(1)
    if idx.numel() == 0:
        return idx, d.new_zeros(0)
    alpha, gamma, t = alpha[idx], gamma[idx], t[idx]
    low, high = tau[idx], upper[idx] * (1 + 1e-9) + floor
    for _ in range(steps):  # bisection on "lambda_max(G_k) > mid"
        mid = 0.5 * (low + high)
        above = _flip_test(lam, alpha, gamma, t, mid)
        low = torch.where(above, mid, low)
        high = torch.where(above, high, mid)
    return idx, low.sqrt()


def greedy_search(B: Tensor, C: Tensor, lo: float, hi: float, p0: Tensor,
                  max_rounds: int | None = None) -> Tensor:
    """The pattern of :func:`greedy_local_max`."""
    return greedy_local_max(B, C, lo, hi, p0, max_rounds)[0]


def greedy_local_max(B: Tensor, C: Tensor, lo: float, hi: float, p0: Tensor,
                     max_rounds: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A local max of ``||B diag(sigma) C||_2`` over the vertices, from the pattern ``p0`` (module docstring).

    The value never decreases from ``p0``'s, and at the end no single flip raises it (tested exactly). Each round
    first runs the alternating maximisation, then tries the improving single flips: all of them at once, then the
    better half..., down to the best one alone, keeping the first set whose norm beats the best single flip.
    Returns ``(pattern, s, x, y)`` with ``s = ||P||`` and ``P y = s x`` at that pattern."""
    n = B.shape[1]
    p = p0.clone()
    if hi == lo or n == 0:
        return (p, *_top(pair_matrix(B, C, _sigma(p, lo, hi))))
    transposed = B.shape[0] < C.shape[1]
    if transposed:  # work on P^T = C^T diag B^T so that the Gram matrix is the small side
        B, C = C.T, B.T

    def result() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = state.vectors()
        s = state.lam[-1].clamp_min(0).sqrt()
        return (p, s, y, x) if transposed else (p, s, x, y)
    max_rounds = 4 * n + 10 if max_rounds is None else max_rounds
    state = _gram_state(B, C, p, lo, hi)
    exclude = torch.zeros(n, dtype=torch.bool, device=p.device)
    for _ in range(max_rounds):
        for _ in range(100):  # alternating maximisation of x^T P(sigma) y
            x, y = state.vectors()
            score = (B.T @ x) * (C @ y)
            p_new = torch.where(score > 0, True, torch.where(score < 0, False, p))
            if bool((p_new == p).all()):
                break
            new = _gram_state(B, C, p_new, lo, hi)
            if not new.s > state.s * (1 + _RTOL):
                break
            p, state = p_new, new
            exclude.zero_()
        idx, values = _improving_flips(B, C, p, lo, hi, state, exclude)
        if idx.numel() == 0:
            return result()
        order = idx[values.argsort(descending=True)]
        best = float(values.max())
        m = order.numel()
        while m >= 1:
            q = p.clone()
            q[order[:m]] = ~q[order[:m]]
            new = _gram_state(B, C, q, lo, hi)
            if new.s > (best * (1 - 1e-12) if m > 1 else state.s * (1 + 0.5 * _RTOL)):
                p, state = q, new
                exclude.zero_()
                break
            m //= 2
        else:  # rounding fooled the test on the best flip: never cycle
            exclude[order[0]] = True
    return result()


# --------------------------------------------------------------------------- operator factorisations
@dataclass(eq=False)
class _Factor:
    """Thin SVD ``A ~ U diag(S) V^T`` of one operator (float64, detached); ``Q`` spans the low-rank subspace."""

    U: Tensor
    S: Tensor
    V: Tensor
    Q: Tensor | None = None
    finite: bool = True

    def scaled(self, power: float) -> Tensor:
        return self.S.clamp_min(0) ** power


@dataclass(eq=False)
class _Pair:
    B: Tensor  # R_{i+1}: r2 x n
    C: Tensor  # L_i: n x r1
    sigma: Tensor  # the chosen vertex, float64 (n,)
    s: Tensor  # ||B diag(sigma) C||
    x: Tensor  # left top singular vector (r2)
    y: Tensor  # right top singular vector (r1)


@dataclass(eq=False)
class _OpPlan:
    node: LipNode
    lowrank: bool
    rank: int = 0  # E (low-rank only)
    buffer: str | None = None  # the subspace buffer (low-rank only)


@dataclass(eq=False)
class _PairPlan:
    name: str  # "A_i~A_{i+1}"
    exact: bool
    lo: float
    hi: float
    pattern: str  # buffer names
    pairvec: str


@dataclass(eq=False)
class _ChainPlan:
    chain: Chain
    ops: list[_OpPlan] = field(default_factory=list)
    pairs: list[_PairPlan] = field(default_factory=list)


def _safe_name(prefix: str, name: str, taken: set[str]) -> str:
    base = f"{prefix}_{re.sub(r'[^0-9a-zA-Z_]', '_', name)}"
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


class SeqLip(nn.Module):
    """SeqLip on every chain of a :class:`LipGraph` (see the module docstring); used by
    ``LipschitzEstimator(method="seqlip")``.

    ``forward(factors, operators, n_iter)`` returns ``{last node of chain: (first node, chain bound)}`` for
    :func:`lipreg.bounds.autolip.autolip_bound`. ``n_iter`` is the number of warm subspace iterations of the low-rank
    operators; the pattern search runs to its end on every call (warm from the stored patterns).

    Args:
        graph: the traced graph.
        dtype: the estimator's dtype (of the returned bound and of the warm vectors).
        generator: seeds the initial low-rank subspaces.
        search: ``"auto"``, ``"exact"``, ``"greedy"`` or ``"lowrank"``.
        rank: ``E``, the number of singular triplets kept by low-rank operators (default 200).
        exact_max_units: ``"auto"`` searches exactly the pairs of width ``n <= exact_max_units``.
        dense_max_entries, dense_max_rank: ``"auto"``/``"greedy"``/``"exact"`` take the full SVD of an operator
            with at most that many matrix entries and ``min(n_in, n_out) <= dense_max_rank``; low-rank otherwise.
        oversample: extra vectors in the low-rank subspace iteration (faster, more accurate top ``E``).
        max_rounds: cap on the greedy's rounds per pair and call (default ``4 n + 10``).
    """

    def __init__(self, graph: LipGraph, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 search: str = "auto", rank: int | None = None, exact_max_units: int = 16,
                 dense_max_entries: int = 4_000_000, dense_max_rank: int = 512, oversample: int = 10,
                 max_rounds: int | None = None) -> None:
        super().__init__()
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        object.__setattr__(self, "graph", graph)  # not a module: plain attribute
        self.dtype = dtype
        self.search = search
        self.rank = DEFAULT_RANK if rank is None else int(rank)
        self.exact_max_units = int(exact_max_units)
        self.max_rounds = max_rounds
        self.chains = find_chains(graph)
        self._last_pairs: dict[str, Tensor] = {}
        taken: set[str] = set()
        self.plans: list[_ChainPlan] = []
        for chain in self.chains:
            plan = _ChainPlan(chain)
            for op in chain.ops:
                n_in, n_out = op.in_shape.numel(), op.out_shape.numel()
                small = n_in * n_out <= dense_max_entries and min(n_in, n_out) <= dense_max_rank
                if search != "lowrank" and small:
                    plan.ops.append(_OpPlan(op, lowrank=False))
                    continue
                rank_e = min(self.rank, n_in, n_out)
                width = min(rank_e + max(0, oversample), n_in, n_out)
                name = _safe_name("subspace", op.name, taken)
                q0 = torch.randn(n_in, width, generator=generator, dtype=torch.float64)
                q0 = torch.linalg.qr(q0).Q.T.to(dtype).reshape(width, *op.in_shape[1:])
                self.register_buffer(name, q0.contiguous())
                plan.ops.append(_OpPlan(op, lowrank=True, rank=rank_e, buffer=name))
            for i, act in enumerate(chain.acts):
                width = act.out_shape.numel()
                exact = search == "exact" or (search == "auto" and width <= self.exact_max_units)
                if exact and width > EXACT_HARD_LIMIT:
                    raise ValueError(f"search='exact' on {act.name!r} of width {width}: 2^{width} patterns are out "
                                     f"of reach (limit 2^{EXACT_HARD_LIMIT}); use search='auto' or 'greedy'")
                lo, hi = chain.slopes[i]
                pattern = _safe_name("pattern", act.name, taken)
                pairvec = _safe_name("pairvec", act.name, taken)
                self.register_buffer(pattern, torch.ones(width, dtype=torch.bool))
                self.register_buffer(pairvec, torch.zeros(width, dtype=dtype))
                plan.pairs.append(_PairPlan(f"{chain.ops[i].name}~{chain.ops[i + 1].name}", exact, lo, hi,
                                            pattern, pairvec))
            self.plans.append(plan)

    # ------------------------------------------------------------------ public
    @property
    def certified(self) -> bool:
        """Whether every chain's bound is certified: exact search on the full SVD of every operator."""
        return all(pair.exact for plan in self.plans for pair in plan.pairs) and \
            not any(op.lowrank for plan in self.plans for op in plan.ops)

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
        :func:`~lipreg.linalg.power.converged` (``||A^T u_i - s_i v_i|| <= tol s_i``), or ``max_iter`` steps.
        (Full SVDs and searches need no iterations.)"""
        for plan in self.plans:
            for op in plan.ops:
                if not op.lowrank:
                    continue
                apply = operators[op.node].matmat
                for _ in range(max_iter):
                    self._subspace_step(op, operators, 1)
                    values, residuals = ritz_residuals(apply, self._subspace(op)[: op.rank])
                    if not bool(torch.isfinite(residuals).all()) or converged(residuals, values, tol):
                        break

    def subspace_singular_values(self, node: LipNode) -> Tensor:
        """The top-``E`` singular values of a low-rank operator from its current subspace (Rayleigh-Ritz, float64):
        for tests and diagnostics."""
        op = next((op for plan in self.plans for op in plan.ops if op.node is node and op.lowrank), None)
        if op is None:
            raise ValueError(f"{node.name!r} is not a low-rank operator of a chain")
        with torch.no_grad():
            device = next((b.device for b in self.buffers()), torch.device("cpu"))
            return self._ritz(op, linear_operators(self.graph, self.dtype, device))[1][: op.rank]

    # ------------------------------------------------------------------ operators
    @staticmethod
    def _apply_block(operator: LinearOperator, vs: Tensor) -> Tensor:
        """``A v`` for a block ``(k, *in_shape[1:])`` -> ``(k, n_out)``."""
        return operator.matmat(vs).reshape(vs.shape[0], -1)

    def _dense(self, op: _OpPlan, operators: Operators) -> _Factor:
        A = operators[op.node].dense().to(_F64)  # n_out x n_in
        if not bool(torch.isfinite(A).all()):
            r = min(A.shape)
            nan = torch.full((), float("nan"), dtype=_F64, device=A.device)
            return _Factor(A.new_zeros(A.shape[0], r), nan.expand(r), A.new_zeros(A.shape[1], r), finite=False)
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return _Factor(U, S, Vh.T)

    def _subspace(self, op: _OpPlan) -> Tensor:
        return self.get_buffer(op.buffer)

    def _subspace_step(self, op: _OpPlan, operators: Operators, n_iter: int) -> None:
        """``n_iter`` block power iterations ``Q <- qr(A^T A Q)`` on the subspace buffer (no grad to the weights),
        then (if ``n_iter > 0``) a Rayleigh-Ritz rotation ``Q <- Q W`` that puts the top right singular vectors of
        ``A Q`` first: the bound uses the first ``E`` columns."""
        buffer = self._subspace(op)
        width = buffer.shape[0]
        for _ in range(n_iter):
            with torch.enable_grad():
                q = buffer.detach().requires_grad_(True)
                aq = self._apply_block(operators[op.node], q)
                (w,) = torch.autograd.grad(aq, q, grad_outputs=aq.detach())
            w = w.reshape(width, -1).to(_F64)
            if not bool(torch.isfinite(w).all()) or not bool(w.abs().sum() > 0):
                return  # keep the warm state unpoisoned
            buffer.copy_(torch.linalg.qr(w.T).Q.T.to(buffer.dtype).reshape(buffer.shape))
        if n_iter > 0:
            Q, _, Wh = self._ritz(op, operators)
            if Wh is not None:
                buffer.copy_((Q @ Wh.T).T.to(buffer.dtype).reshape(buffer.shape))

    def _ritz(self, op: _OpPlan, operators: Operators) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rayleigh-Ritz on the whole subspace: ``(Q, singular values, W^T)`` from the SVD ``A Q = U S W^T``
        (``W^T`` is ``None`` when ``A Q`` is not finite)."""
        buffer = self._subspace(op)
        width = buffer.shape[0]
        Q = buffer.reshape(width, -1).T.to(_F64)  # n_in x width, orthonormal columns
        AQ = self._apply_block(operators[op.node], buffer).T.to(_F64)  # n_out x width
        if not bool(torch.isfinite(AQ).all()):
            return Q, torch.full((width,), float("nan"), dtype=_F64, device=AQ.device), None
        _, S, Wh = torch.linalg.svd(AQ, full_matrices=False)
        return Q, S, Wh

    def _lowrank(self, op: _OpPlan, operators: Operators) -> _Factor:
        """The SVD of ``A Q_E`` with ``Q_E`` the first ``E`` (stored, fixed) subspace vectors: the bound is a function
        of ``A Q_E Q_E^T``, whose gradient the surrogate gives exactly."""
        r = op.rank
        QE = self._subspace(op)[:r]
        Q = QE.reshape(r, -1).T.to(_F64)
        AQ = self._apply_block(operators[op.node], QE).T.to(_F64)  # n_out x E
        if not bool(torch.isfinite(AQ).all()):
            nan = torch.full((r,), float("nan"), dtype=_F64, device=AQ.device)
            return _Factor(AQ.new_zeros(AQ.shape[0], r), nan, Q, Q=Q, finite=False)
        U, S, Wh = torch.linalg.svd(AQ, full_matrices=False)
        return _Factor(U, S, Q @ Wh.T, Q=Q)

    def _factor(self, op: _OpPlan, operators: Operators, n_iter: int) -> _Factor:
        if not op.lowrank:
            return self._dense(op, operators)
        self._subspace_step(op, operators, n_iter)
        return self._lowrank(op, operators)

    # ------------------------------------------------------------------ one chain
    def _chain_bound(self, plan: _ChainPlan, operators: Operators, n_iter: int) -> Tensor:
        first = operators[plan.chain.ops[0]]
        device, dtype = first.device, first.dtype
        with torch.no_grad():
            facs = [self._factor(op, operators, n_iter) for op in plan.ops]
            if not all(f.finite for f in facs):
                for pair in plan.pairs:
                    self._last_pairs[pair.name] = torch.tensor(float("nan"), dtype=dtype, device=device)
                return torch.tensor(float("nan"), dtype=dtype, device=device)
            K = len(facs)
            pairs: list[_Pair] = []
            for i, pp in enumerate(plan.pairs):
                left, right = facs[i], facs[i + 1]
                C = left.U * left.scaled(1.0 if i == 0 else 0.5)  # L_i = U_i Sigma~_i
                B = (right.V * right.scaled(1.0 if i + 1 == K - 1 else 0.5)).T  # R_{i+1} = Sigma~_{i+1} V_{i+1}^T
                pattern = self.get_buffer(pp.pattern)
                if pp.exact:
                    p = exact_search(B, C, pp.lo, pp.hi, pattern.to(B.device))
                    s, x, y = _top(pair_matrix(B, C, _sigma(p, pp.lo, pp.hi)))
                    s = s + rounding_slack(B, C, pp.lo, pp.hi)
                else:
                    p, s, x, y = greedy_local_max(B, C, pp.lo, pp.hi, pattern.to(B.device), self.max_rounds)
                sigma = _sigma(p, pp.lo, pp.hi)
                pairs.append(_Pair(B, C, sigma, s, x, y))
                pattern.copy_(p)
                self.get_buffer(pp.pairvec).copy_((right.V @ x).to(dtype))
                self._last_pairs[pp.name] = s.to(dtype)
            values = torch.stack([pair.s for pair in pairs])
            value = values.prod()
        surrogate = self._gradient_surrogate(plan, facs, pairs, values, operators)
        return value.to(dtype) + (surrogate - surrogate.detach())

    def _gradient_surrogate(self, plan: _ChainPlan, facs: list[_Factor], pairs: list[_Pair], values: Tensor,
                            operators: Operators) -> Tensor:
        """``sum_j <A_j, Xi_j>`` with ``Xi_j`` the gradient of the chain bound w.r.t. ``A_j`` (module docstring),
        computed with the weights' autograd history. Zero (without graph) when nothing requires grad."""
        K = len(facs)
        weights = [torch.prod(torch.cat([values[:i], values[i + 1:]])) if K > 2 else values.new_ones(())
                   for i in range(K - 1)]
        total = None
        for j, (op, f) in enumerate(zip(plan.ops, facs)):
            with torch.no_grad():
                r = f.S.shape[0]
                floor = 1e-300 + 1e-20 * float(f.S.max()) if r else 1e-300
                s_safe = f.S.clamp_min(floor)
                M = torch.zeros(r, r, dtype=_F64, device=f.S.device)
                lefts: list[Tensor] = []
                rights: list[Tensor] = []
                F = None
                if 0 < j < K - 1:
                    rs = s_safe.sqrt()
                    F = 1.0 / ((rs[:, None] + rs[None, :]) * (s_safe[:, None] + s_safe[None, :]))
                if j < K - 1:  # op j is the right factor L_j of pair j
                    pair, w = pairs[j], weights[j]
                    g = pair.sigma * (pair.B.T @ pair.x)
                    if j == 0:  # L_1 = A_1 V_1
                        lefts.append(w * g)
                        rights.append(f.V @ pair.y)
                    else:  # L_j = U_j Sigma_j^{1/2} ~ (A A^T)^{1/4}
                        gh = f.U.T @ g
                        sym = 0.5 * (gh[:, None] * pair.y[None, :] + pair.y[:, None] * gh[None, :])
                        M += 2 * w * (F * sym) * f.S[None, :]
                        lefts.append(w * (g - f.U @ gh))
                        rights.append(f.V @ (pair.y / s_safe.sqrt()))
                if j > 0:  # op j is the left factor R_j of pair j - 1
                    pair, w = pairs[j - 1], weights[j - 1]
                    h = pair.sigma * (pair.C @ pair.y)
                    if f.Q is not None:  # low rank: the bound is a function of A Q
                        h = f.Q @ (f.Q.T @ h)
                    if j == K - 1:  # R_K = U_K^T A_K
                        lefts.append(w * (f.U @ pair.x))
                        rights.append(h)
                    else:  # R_j = Sigma_j^{1/2} V_j^T ~ (A^T A)^{1/4}
                        hh = f.V.T @ h
                        sym = 0.5 * (pair.x[:, None] * hh[None, :] + hh[:, None] * pair.x[None, :])
                        M += 2 * w * f.S[:, None] * (F * sym)
                        lefts.append(w * (f.U @ (pair.x / s_safe.sqrt())))
                        rights.append(h - f.V @ hh)
                P_cols = torch.stack(lefts, 1)
                Q_cols = torch.stack(rights, 1)
                if F is not None:
                    P_cols = torch.cat([f.U @ M, P_cols], 1)
                    Q_cols = torch.cat([f.V, Q_cols], 1)
                operator = operators[op.node]
                probes = Q_cols.T.to(operator.dtype).reshape(Q_cols.shape[1], *op.node.in_shape[1:])
                P_cols = P_cols.to(operator.dtype)
            with torch.enable_grad():
                term = (self._apply_block(operator, probes) * P_cols.T).sum()
            total = term if total is None else total + term
        return total

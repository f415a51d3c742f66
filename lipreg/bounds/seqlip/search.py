r"""The vertex searches of SeqLip, pure float64 linear algebra on the factors of one pair (no module, no graph).

A pair ``i`` of a chain is bounded by ``max_sigma ||B diag(sigma) C||_2`` (paper eq. 8, ``B = R_{i+1}``,
``C = L_i``) over the box ``sigma in [lo, hi]^n``. The norm is convex in ``sigma``, so the max is attained at a
vertex, a pattern ``p in {0, 1}^n`` (``True`` = slope ``hi``).

* :func:`exact_search`: every vertex (``2^n``), by branch and bound on the batched enumeration.
* :func:`greedy_local_max`: a local search from a starting pattern. Phase 1: alternating maximisation (top singular
  vectors ``x, y`` of the pair matrix -> the vertex maximising ``x^T P(sigma) y``, i.e. ``sigma_k = hi`` where
  ``(B^T x)_k (C y)_k > 0``, ``lo`` where it is negative), each step a strict increase. Phase 2: single flips,
  tested **exactly** for all ``n`` candidates at once: a flip is a rank-one update ``P + d b_k c_k^T``, i.e. a
  rank-two update of the Gram matrix ``P^T P = Y Lambda Y^T``, and ``lambda_max`` of the update exceeds
  ``tau > lambda_1`` iff a 2x2 matrix (Haynsworth inertia) is positive definite; the value of each improving flip
  is found by bisection on that test. The improving flips are then applied all together, else the better half,
  ..., else the best one alone (the first set that beats the best single flip). Phases repeat until no single
  flip improves: the result is a local max for single flips, never below the starting pattern. One ``r^3``
  eigendecomposition and ``O(n r^2)`` per round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...policy import BoundPolicy

_RTOL = 1e-9  # a flip must raise the pair norm by this relative amount (float64 search)
_KEEP_MARGIN = 1 + 1e-12  # the exact search prunes a pattern only when its upper bound is below best * this
_F64 = torch.float64
Found = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(pattern, s, x, y)``: a vertex pattern, ``s = ||P||`` there and its top singular vectors, ``P y = s x``."""


def pair_matrix(B: Tensor, C: Tensor, sigma: Tensor) -> Tensor:
    """``B diag(sigma) C``."""
    return B @ (sigma[:, None] * C)


def top_singular(P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, x, y)``: the top singular value and vectors of ``P`` (``P y = s x``)."""
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    return S[0], U[:, 0], Vh[0]


def vertex_sigma(p: Tensor, lo: float, hi: float) -> Tensor:
    """The slopes of pattern ``p``: ``hi`` where ``p``, ``lo`` elsewhere (float64)."""
    return torch.where(p, torch.tensor(hi, dtype=_F64, device=p.device), torch.tensor(lo, dtype=_F64, device=p.device))


def rounding_slack(B: Tensor, C: Tensor, lo: float, hi: float) -> Tensor:
    """An upper bound on the float64 error of a pair norm ``||B diag(sigma) C||`` computed from SVD factors.

    The SVDs, the products and the top singular value are backward stable: the computed value is exact for
    factors perturbed by ``O(n eps)`` relative to their norms, so its absolute error is at most
    ``c n eps max(|lo|, |hi|) ||B||_2 ||C||_2`` -- large, relative to the value, when the pair nearly cancels
    (``||A_2 A_1|| << ||A_2|| ||A_1||``). Taken with ``c = 16`` and ``n`` the sum of the three dimensions."""
    n = B.shape[0] + B.shape[1] + C.shape[1]
    scale = max(abs(lo), abs(hi)) * torch.linalg.matrix_norm(B, 2) * torch.linalg.matrix_norm(C, 2)
    return 16 * n * torch.finfo(_F64).eps * scale


# --------------------------------------------------------------------------- exact
def exact_search(B: Tensor, C: Tensor, lo: float, hi: float, start: Tensor | None = None,
                 chunk: int = 1 << 13, max_units: int = BoundPolicy.exact_search_limit) -> Tensor:
    """The vertex pattern (bool, ``True`` = slope ``hi``) maximising ``||B diag(sigma) C||_2`` over all ``2^n``.

    Branch and bound over the enumeration, batched by chunks of patterns: the greedy local max from ``start``
    (default all ones) gives a first value ``v``; a pattern is dropped when its Frobenius norm (a quadratic form in
    ``sigma``, ``O(n^2)``), then its Schatten-4 norm (``||P^T P||_F^{1/2}``), is at most ``v`` (both bound the spectral
    norm from above); the survivors get a batched ``eigvalsh`` of their Gram matrix and raise ``v``. Exact up to
    a relative ``1e-12`` in the pruning. Refused beyond ``n = max_units``."""
    n = B.shape[1]
    if n > max_units:
        raise ValueError(f"exact SeqLip search over 2^{n} patterns is out of reach (limit 2^{max_units}); "
                         "use search='greedy'")
    device = B.device
    if hi == lo or n == 0:
        return torch.ones(n, dtype=torch.bool, device=device)
    start = torch.ones(n, dtype=torch.bool, device=device) if start is None else start
    best_p, best_s, _, _ = greedy_local_max(B, C, lo, hi, start)
    best = float(best_s) ** 2  # lambda_max of the Gram matrix
    patterns = _Enumeration(B, C, lo, hi)
    for first in range(0, 1 << n, chunk):
        found = patterns.best_in(torch.arange(first, min(first + chunk, 1 << n), device=device), best)
        if found is not None:
            best, best_p = found
    return best_p


class _Enumeration:
    """The pair matrices ``P(sigma) = lo B C + sum_k (sigma_k - lo) b_k c_k^T`` of patterns given by their index
    (bit ``k`` = unit ``k``), with the quadratic form of ``||P(sigma)||_F^2 = sigma^T quad sigma``."""

    def __init__(self, B: Tensor, C: Tensor, lo: float, hi: float) -> None:
        n = B.shape[1]
        self.lo, self.hi = lo, hi
        self.r2, self.r1 = B.shape[0], C.shape[1]
        self.quad = (B.T @ B) * (C @ C.T)
        self.outer = (B.T[:, :, None] * C[:, None, :]).reshape(n, self.r2 * self.r1)  # b_k c_k^T, flattened
        self.base = (lo * (B @ C)).reshape(1, self.r2 * self.r1)
        self.bits = torch.arange(n, device=B.device)

    def best_in(self, index: Tensor, best: float) -> tuple[float, Tensor] | None:
        """``(lambda_max, pattern)`` of the best pattern of ``index`` whose Gram matrix's top eigenvalue exceeds
        ``best``; ``None`` if there is none (the Frobenius, then Schatten-4, bounds prune the others)."""
        sigma = self.lo + (self.hi - self.lo) * ((index[:, None] >> self.bits) & 1).to(_F64)
        frobenius2 = ((sigma @ self.quad) * sigma).sum(1)
        index, sigma = index[frobenius2 > best * _KEEP_MARGIN], sigma[frobenius2 > best * _KEEP_MARGIN]
        if index.numel() == 0:
            return None
        P = (self.base + (sigma - self.lo) @ self.outer).view(-1, self.r2, self.r1)
        gram = P @ P.mT if self.r2 <= self.r1 else P.mT @ P
        schatten4 = (gram * gram).sum((1, 2))  # ||P||_S4^4 >= lambda_max^2
        alive = schatten4 > (best * _KEEP_MARGIN) ** 2
        if not bool(alive.any()):
            return None
        top = torch.linalg.eigvalsh(gram[alive])[:, -1]
        value, arg = top.max(0)
        if not float(value) > best:
            return None
        return float(value), ((index[alive][arg] >> self.bits) & 1).bool()


# --------------------------------------------------------------------------- greedy
def greedy_search(B: Tensor, C: Tensor, lo: float, hi: float, p0: Tensor,
                  max_rounds: int | None = BoundPolicy.greedy_max_rounds) -> Tensor:
    """The pattern of :func:`greedy_local_max`."""
    return greedy_local_max(B, C, lo, hi, p0, max_rounds)[0]


def greedy_local_max(B: Tensor, C: Tensor, lo: float, hi: float, p0: Tensor,
                     max_rounds: int | None = BoundPolicy.greedy_max_rounds) -> Found:
    """A local max of ``||B diag(sigma) C||_2`` over the vertices, from the pattern ``p0`` (module docstring).

    The value never decreases from ``p0``'s, and at the end no single flip raises it (tested exactly), unless
    ``max_rounds`` (default ``4 n + 10``) rounds ran out first. Returns ``(pattern, s, x, y)`` at that pattern."""
    n = B.shape[1]
    if hi == lo or n == 0:
        p = p0.clone()
        return (p, *top_singular(pair_matrix(B, C, vertex_sigma(p, lo, hi))))
    transposed = B.shape[0] < C.shape[1]
    if transposed:  # work on P^T = C^T diag B^T so that the Gram matrix is the small side
        B, C = C.T, B.T
    p, state = _local_max(B, C, lo, hi, p0.clone(), 4 * n + 10 if max_rounds is None else max_rounds)
    x, y = state.vectors()
    s = state.lam[-1].clamp_min(0).sqrt()
    return (p, s, y, x) if transposed else (p, s, x, y)


@dataclass(eq=False)
class _GramState:
    """The current pair matrix ``P`` (``r2 x r1``, ``r1 <= r2``) with the eigendecomposition of ``P^T P``."""

    P: Tensor
    lam: Tensor  # ascending eigenvalues of P^T P
    Y: Tensor  # their eigenvectors (columns)

    @classmethod
    def at(cls, B: Tensor, C: Tensor, p: Tensor, lo: float, hi: float) -> _GramState:
        P = pair_matrix(B, C, vertex_sigma(p, lo, hi))
        lam, Y = torch.linalg.eigh(P.T @ P)
        return cls(P, lam, Y)

    @property
    def s(self) -> float:
        return float(self.lam[-1].clamp_min(0).sqrt())

    def vectors(self) -> tuple[Tensor, Tensor]:
        """``(x, y)``, top left and right singular vectors (``P y = s x``)."""
        y = self.Y[:, -1]
        x = self.P @ y
        norm = x.norm()
        return (x / norm if norm > 0 else x), y


def _local_max(B: Tensor, C: Tensor, lo: float, hi: float, p: Tensor, max_rounds: int) -> tuple[Tensor, _GramState]:
    """Rounds of alternating maximisation then improving flips, until no single flip improves (``r1 <= r2``)."""
    state = _GramState.at(B, C, p, lo, hi)
    exclude = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)  # flips the rounding fooled
    for _ in range(max_rounds):
        p, state, moved = _alternate(B, C, lo, hi, p, state, max_steps=min(100, max_rounds))
        if moved:
            exclude.zero_()
        idx, values = _improving_flips(B, C, p, lo, hi, state, exclude)
        if idx.numel() == 0:
            break
        p, state = _apply_flips(B, C, lo, hi, p, state, idx, values, exclude)
    return p, state


def _alternate(B: Tensor, C: Tensor, lo: float, hi: float, p: Tensor, state: _GramState,
               max_steps: int) -> tuple[Tensor, _GramState, bool]:
    """Alternating maximisation of ``x^T P(sigma) y``: ``(pattern, state, whether it moved)``, each step a strict
    increase of the norm."""
    moved = False
    for _ in range(max_steps):
        x, y = state.vectors()
        score = (B.T @ x) * (C @ y)
        p_new = torch.where(score > 0, True, torch.where(score < 0, False, p))
        if bool((p_new == p).all()):
            break
        new = _GramState.at(B, C, p_new, lo, hi)
        if not new.s > state.s * (1 + _RTOL):
            break
        p, state, moved = p_new, new, True
    return p, state, moved


def _apply_flips(B: Tensor, C: Tensor, lo: float, hi: float, p: Tensor, state: _GramState, idx: Tensor,
                 values: Tensor, exclude: Tensor) -> tuple[Tensor, _GramState]:
    """Flip the improving units ``idx`` (new norms ``values``): all of them, else the better half, ..., down to the
    best one alone, keeping the first set whose norm beats the best single flip. If even the best flip fails
    (rounding fooled its test) it is marked in ``exclude`` (in place), so that the search never cycles; a
    success clears ``exclude``."""
    order = idx[values.argsort(descending=True)]
    best = float(values.max())
    m = order.numel()
    while m >= 1:
        q = p.clone()
        q[order[:m]] = ~q[order[:m]]
        new = _GramState.at(B, C, q, lo, hi)
        if new.s > (best * (1 - 1e-12) if m > 1 else state.s * (1 + 0.5 * _RTOL)):
            exclude.zero_()
            return q, new
        m //= 2
    exclude[order[0]] = True
    return p, state


def _improving_flips(B: Tensor, C: Tensor, p: Tensor, lo: float, hi: float, state: _GramState,
                     exclude: Tensor, steps: int = 8) -> tuple[Tensor, Tensor]:
    """The single flips that raise ``||P||`` (tested exactly, all ``n`` at once) and lower bounds of their new norms
    (``steps`` bisections: they order the flips; every move is accepted on its exact norm).

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

r"""ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024, "ECLipsE: Efficient compositional Lipschitz constant estimation
for deep neural networks"): LipSDP-Neuron with one scalar multiplier per layer, solved in closed
form layer by layer, and checked in floating point. The derivation below is self-contained. The labels (E1)-(E3)
are this module's own: the paper's equation, theorem and algorithm numbers could not be read from its text
(arXiv:2404.04375) when this was written, so none is quoted; (E3) is not from the paper at all. The closed form
(E2) is what the authors' ``Matlab_implementation/ECLipsE/ECLipsE_Fast.m`` (https://github.com/YuezhuXu/ECLipsE)
computes for slopes in ``[0, 1]`` (``m = 1/2``): ``li = 1/(2*m^2*max(eig(Wi*Inv_Xi_prev*Wi')))``,
``Xi = li*eye(di)-li^2*m^2*Wi*Inv_Xi_prev*Wi'`` and the estimate ``sqrt(max(eig((Wl'*Wl)/(Xi_prev))))``.

**The matrix inequality.** Take hidden layers ``v_i = W_i x_{i-1}``, ``x_i = rho_i(v_i)`` (``i = 1..l``), output
``y = V x_l``, each ``rho_i`` elementwise with slopes in ``[a_i, b_i]``, ``a_i >= 0``. For ``x, x'``, per neuron
``(dx - a dv)(b dv - dx) >= 0`` (``dx = d dv`` with ``d in [a, b]``). For ``lambda_i >= 0`` and ``L > 0``, if the
quadratic form

    ``Q = ||dx_0||^2 - ||V dx_l||^2 / L^2 - sum_i lambda_i (dx_i - a_i W_i dx_{i-1})^T (b_i W_i dx_{i-1} - dx_i)``

is positive semidefinite in ``(dx_0, ..., dx_l)``, then ``||V dx_l|| <= L ||dx_0||`` (E1): the network is
``L``-Lipschitz (LipSDP-Neuron, Fazlyab et al. 2019, with one scalar multiplier per layer). Its matrix ``M`` is block
tridiagonal: diagonal blocks ``I``, ``lambda_i I`` and ``lambda_l I - V^T V / L^2``, off-diagonal blocks
``-lambda_i c_i W_i`` with ``c_i = (a_i + b_i) / 2``; the terms ``lambda_i a_i b_i ||W_i dx_{i-1}||^2 >= 0`` are dropped
(``Q`` only grows with them).

**Closed form** (ECLipsE-Fast). The Schur complements ``X_0 = I``,
``X_i = lambda_i I - lambda_i^2 c_i^2 W_i X_{i-1}^{-1} W_i^T`` must stay positive definite; ECLipsE-Fast picks each
``lambda_i`` to maximise the smallest eigenvalue of ``X_i``: ``lambda_i = 1 / (2 c_i^2 s_i)``, ``s_i =
lambda_max(W_i X_{i-1}^{-1} W_i^T)``; then ``M >= 0`` iff ``L^2 >= lambda_max(V X_l^{-1} V^T)`` (E2). Per pair of
classes, ``V`` is the row ``c^T W`` of the head and the bound is ``sqrt(c^T W X_l^{-1} W^T c)``.

**Sound in floating point** (:func:`verified`, (E3)). The recursion is only a proposal: the bound returned is ``L' =
L (1 + tau)`` for the first ``tau`` of :data:`INFLATIONS` for which ``M(lambda, L')`` is *proved* positive
semidefinite: the float64 Cholesky factorisation of ``M~ - s I`` succeeds, where ``M~`` is ``M`` as computed and

    ``s = 2 (gamma_{2N+2} / (1 - gamma_{2N+2}) tr(M~) + e)``

with ``N`` the order of ``M``: Rump's shift (S. M. Rump, "Verification of positive definiteness", BIT 46, 2006,
main theorem: if floating-point Cholesky of ``A - c I`` runs to completion with ``c >= gamma_{n+1} (1 - gamma_{n+1})^{-1}
tr(A)``, then ``A`` is positive definite), taken twice with a larger ``gamma``, plus ``e >= ||M - M~||_2``, the
rounding of the entries (``3u`` relative for ``lambda_i c_i W_i``, ``gamma_{m+2} + 4u`` of ``||V||_F^2 / L'^2`` for
``V^T V / L'^2``), so ``M >= M~ - e I > 0`` (Weyl). The factorisation is blocked (:func:`checker`): the leading
blocks, shared by every pair of classes, once; then the last block's Schur complement per pair, an ordinary Cholesky
step whose entries are inner products like any other (the error bound behind Rump's theorem holds for any order of
their terms); ``s`` is taken for the largest trace and entry error among the pairs. The dense ``W_i`` are the float64 matrices of
:meth:`~lipreg.operator.LinearOperator.dense`, as for every dense certificate of lipreg.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..linalg.certify import arithmetic_margin, certified_cast
from ..policy import BoundPolicy

INFLATIONS = (1e-10, 1e-7, 1e-4, 1e-2)
"""The relative inflations of the proposed ``L`` tried, in order, by :func:`certified_eclipse`."""
_U = torch.finfo(torch.float64).eps / 2


def eligible(sizes: Sequence[int], policy: BoundPolicy) -> bool:
    """Whether ECLipsE's dense check fits the policy: every layer's matrix (``sizes[i] x sizes[i+1]``) has at most
    ``policy.dense_entries`` entries, and the verified matrix ``M`` (order ``N``, the sum of all but the last size)
    at most ``4 policy.dense_entries``."""
    n = sum(sizes[:-1])
    layers = all(a * b <= policy.dense_entries for a, b in zip(sizes[:-1], sizes[1:]))
    return layers and n * n <= 4 * policy.dense_entries


def multipliers(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]]) -> tuple[list[float], Tensor]:
    """ECLipsE-Fast's ``lambda_i`` and the Cholesky factor of the last ``X_l`` (float64), or ``([], empty)`` when a
    Schur complement is not positive definite or a layer is zero."""
    X = torch.eye(weights[0].shape[1], dtype=torch.float64, device=weights[0].device)
    lams = []
    for W, (a, b) in zip(weights, slopes):
        chol, info = torch.linalg.cholesky_ex(X)
        if int(info) != 0:
            return [], X
        Y = torch.linalg.solve_triangular(chol, W.T, upper=False)  # X^{-1} = chol^{-T} chol^{-1}
        S = Y.T @ Y
        s = float(torch.linalg.eigvalsh(S)[-1])
        c = (a + b) / 2
        if not s > 0 or not c > 0 or not math.isfinite(s):
            return [], X
        lam = 1.0 / (2 * c * c * s)
        lams.append(lam)
        X = lam * torch.eye(S.shape[0], dtype=torch.float64, device=S.device) - (lam * lam * c * c) * S
        X = (X + X.T) / 2
    chol, info = torch.linalg.cholesky_ex(X)
    return (lams, chol) if int(info) == 0 else ([], X)


def proposals(chol: Tensor, last: Tensor) -> Tensor:
    """``sqrt(v X^{-1} v^T)`` for every row ``v`` of ``last`` (per pair), or, for ``last`` of a single 2-D matrix
    given as ``(1, m, n)``, ``sqrt(lambda_max(V X^{-1} V^T))`` (global)."""
    if last.dim() == 3:
        Y = torch.linalg.solve_triangular(chol, last[0].T, upper=False)
        return torch.linalg.eigvalsh(Y.T @ Y)[-1:].clamp_min(0).sqrt()
    Y = torch.linalg.solve_triangular(chol, last.T, upper=False)
    return (Y * Y).sum(0).sqrt()


def checker(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]], lams: Sequence[float],
            lasts: Sequence[Tensor], floors: Sequence[float]) -> Callable[[Tensor, float], bool]:
    """A test of ``M(lambda, bound) >= 0`` (module docstring) for final matrices ``V`` among ``lasts`` and bounds at
    least their ``floors``: a shifted float64 Cholesky factorisation (Rump's test, with the explicit rounding margin
    of the module docstring). The factorisation is blocked: the leading blocks (``x_0 .. x_{l-1}``), the same for every
    ``V``, are factored once; each call factors the last block's Schur complement only. One shift ``s`` serves every
    call: it uses the largest trace and entry error of all ``lasts`` at their ``floors`` (a larger shift than needed
    is still a proof)."""
    device = weights[0].device
    sizes = [weights[0].shape[1], *(W.shape[0] for W in weights)]
    n, head = sum(sizes), sum(sizes[:-1])
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    M = torch.zeros(head, head, dtype=torch.float64, device=device)
    M[: sizes[0], : sizes[0]] = torch.eye(sizes[0], dtype=torch.float64, device=device)
    coupling = torch.zeros(head, sizes[-1], dtype=torch.float64, device=device)
    entry_error = 0.0
    for i, (W, (a, b), lam) in enumerate(zip(weights, slopes, lams), start=1):
        rows, cols = slice(starts[i], starts[i + 1]), slice(starts[i - 1], starts[i])
        block = -(lam * ((a + b) / 2)) * W
        entry_error += 2 * 3 * _U * float(torch.linalg.matrix_norm(block))
        if i < len(weights):
            M[rows, rows] = lam * torch.eye(sizes[i], dtype=torch.float64, device=device)
            M[rows, cols] = block
            M[cols, rows] = block.T
        else:
            coupling[cols] = block.T
    squares = [float((V * V).sum()) / (floor * floor) * (1 + 8 * _U) for V, floor in zip(lasts, floors)]
    worst = max((_gamma(V.shape[0] + 2) + 4 * _U) * sq for V, sq in zip(lasts, squares))
    trace = float(torch.diagonal(M).abs().sum()) + sizes[-1] * lams[-1] + max(squares)
    g = _gamma(2 * n + 2)
    shift = 2 * (g / (1 - g) * trace + entry_error + worst)
    M.diagonal().sub_(shift)
    chol, info = torch.linalg.cholesky_ex(M)
    schur = None
    if int(info) == 0:
        Y = torch.linalg.solve_triangular(chol, coupling, upper=False)
        schur = (lams[-1] - shift) * torch.eye(sizes[-1], dtype=torch.float64, device=device) - Y.T @ Y

    def check(V: Tensor, bound: float) -> bool:
        if schur is None:
            return False
        return int(torch.linalg.cholesky_ex(schur - (V.T @ V) / (bound * bound)).info) == 0
    return check


def verified(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]], lams: Sequence[float],
             last: Tensor, bound: float) -> bool:
    """Whether ``M(lambda, bound)`` (module docstring) is proved positive semidefinite (:func:`checker`)."""
    return checker(weights, slopes, lams, [last], [bound])(last, bound)


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def certified_eclipse(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]], last: Tensor,
                      per_row: bool = False) -> Tensor | None:
    """The verified ECLipsE-Fast bound (float64, rounded upwards) of ``last o rho_l o W_l ... rho_1 o W_1``: one
    value for the whole matrix ``last`` (global), or one per row of ``last`` with ``per_row`` (a row per pair of
    classes; ``inf`` where no inflation verifies). ``None`` when the recursion breaks down (a zero layer), when a
    matrix has a NaN or inf entry (no finite certificate, and ``eigvalsh`` would fail on it), or when a slope
    interval has ``a < 0`` (the dropped terms ``lambda_i a_i b_i ||W_i dx||^2`` would be negative)."""
    if any(a < 0 or b < a for a, b in slopes):
        return None
    with torch.no_grad():
        weights = [W.detach().to(torch.float64) for W in weights]
        last = last.detach().to(torch.float64)
        if not all(bool(torch.isfinite(M).all()) for M in [*weights, last]):
            return None
        lams, chol = multipliers(weights, slopes)
        if not lams:
            return None
        matrices = [row[None] for row in last] if per_row else [last]
        guesses = proposals(chol, last) if per_row else proposals(chol, last[None])
        guesses = guesses.tolist()
        positive = [(V, guess) for V, guess in zip(matrices, guesses) if guess > 0]
        check = checker(weights, slopes, lams, *zip(*positive)) if positive else None
        out = []
        for V, guess in zip(matrices, guesses):
            value = math.inf
            if guess == 0.0:
                value = 0.0 if not bool(V.abs().sum() > 0) else math.inf
            else:
                value = next((guess * (1 + tau) for tau in INFLATIONS if check(V, guess * (1 + tau))), math.inf)
            out.append(value)
        result = torch.tensor(out, dtype=torch.float64, device=last.device)
        return certified_cast(result, torch.float64, arithmetic_margin(2)) if per_row else \
            certified_cast(result[0], torch.float64, arithmetic_margin(2))

r"""The gradient of a chain's SeqLip bound w.r.t. the weights, with the activation patterns fixed.

The bound is ``prod_i s_i`` with ``s_i = ||R_{i+1} diag(sigma_i) L_i||`` (paper eq. 8), ``L_1 = U_1 Sigma_1``,
``R_K = Sigma_K V_K^T`` at the ends and ``Sigma^{1/2}`` factors inside. Its gradient is computed in a
gauge-invariant form that stays finite with repeated or zero singular values (``torch``'s SVD backward divides by
``sigma_i^2 - sigma_j^2``):

* Danskin's theorem for each pair norm: ``d s_i = x_i^T d(R_{i+1} D_i L_i) y_i``, top singular vectors fixed;
* at the ends, the exact derivative of ``U Sigma = A V`` and ``Sigma V^T = U^T A`` (``U, V`` fixed);
* for the inner ``Sigma^{1/2}`` factors, the Daleckii-Krein derivative of ``(A^T A)^{1/4}`` and ``(A A^T)^{1/4}``,
  with divided differences ``1 / ((sqrt s_a + sqrt s_b)(s_a + s_b))`` (no cancellation).

The result is a matrix ``Xi_j = P_j Q_j^T`` per operator, given by a few columns, and the surrogate is
``sum_j <A_j, Xi_j> = sum_j sum_c p_c^T A_j q_c``, computed by applying ``A_j`` (through autograd, with the weights'
history) to the columns ``q_c``: its value is to be discarded, its gradient is ``sum_j Xi_j``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ...capture.graph import LipNode
from ...operator import LinearOperator
from .factors import Factor, apply_block

_F64 = torch.float64
Columns = tuple[Tensor, Tensor, Tensor | None]
"""``(p, q, M)``: the term ``w p q^T`` of ``Xi_j`` from one pair, and its ``U M V^T`` part (inner factors)."""


@dataclass(eq=False)
class Pair:
    """One pair of a chain at its chosen vertex: ``s = ||B diag(sigma) C||``, ``B diag(sigma) C y = s x``."""

    B: Tensor  # R_{i+1}: r2 x n
    C: Tensor  # L_i: n x r1
    sigma: Tensor  # the chosen vertex, float64 (n,)
    s: Tensor
    x: Tensor  # left top singular vector (r2)
    y: Tensor  # right top singular vector (r1)


def gradient_surrogate(nodes: list[LipNode], factors: list[Factor], pairs: list[Pair], values: Tensor,
                       operators: Mapping[LipNode, LinearOperator]) -> Tensor:
    """``sum_j <A_j, Xi_j>`` with ``Xi_j`` the gradient of the chain bound ``prod(values)`` w.r.t. ``A_j`` (module
    docstring), computed with the weights' autograd history. Zero (without graph) when nothing requires grad."""
    weights = _cofactors(values)
    total = None
    for j, (node, factor) in enumerate(zip(nodes, factors)):
        with torch.no_grad():
            P_cols, Q_cols = _xi_columns(j, factor, pairs, weights)
            operator = operators[node]
            probes = Q_cols.T.to(operator.dtype).reshape(Q_cols.shape[1], *node.in_shape[1:])
            P_cols = P_cols.to(operator.dtype)
        with torch.enable_grad():
            term = (apply_block(operator, probes) * P_cols.T).sum()
        total = term if total is None else total + term
    return total


def _cofactors(values: Tensor) -> list[Tensor]:
    """``d prod(values) / d values_i = prod_{k != i} values_k`` for each pair ``i``."""
    n = values.shape[0]
    if n == 1:
        return [values.new_ones(())]
    return [torch.prod(torch.cat([values[:i], values[i + 1:]])) for i in range(n)]


def _xi_columns(j: int, factor: Factor, pairs: list[Pair], weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` with ``Xi_j = P Q^T``: operator ``j`` is the right factor ``L_j`` of pair ``j`` (unless last) and
    the left factor ``R_j`` of pair ``j - 1`` (unless first)."""
    last = len(pairs)
    s_safe = factor.S.clamp_min(_floor(factor.S))
    kernel = _daleckii_krein(s_safe) if 0 < j < last else None
    terms = []
    if j < last:
        terms.append(_as_right(factor, pairs[j], weights[j], s_safe, kernel))
    if j > 0:
        terms.append(_as_left(factor, pairs[j - 1], weights[j - 1], s_safe, kernel))
    P_cols = torch.stack([p for p, _, _ in terms], 1)
    Q_cols = torch.stack([q for _, q, _ in terms], 1)
    if kernel is None:
        return P_cols, Q_cols
    M = torch.zeros(kernel.shape, dtype=_F64, device=factor.S.device)
    for _, _, m in terms:
        M += m
    return torch.cat([factor.U @ M, P_cols], 1), torch.cat([factor.V, Q_cols], 1)


def _floor(S: Tensor) -> float:
    """The clamp of singular values below which ``S^{-1/2}`` and the divided differences would blow up."""
    return 1e-300 + 1e-20 * float(S.max()) if S.shape[0] else 1e-300


def _daleckii_krein(s: Tensor) -> Tensor:
    """``F_ab = 1 / ((sqrt s_a + sqrt s_b)(s_a + s_b))``: the divided differences of the fourth root of ``s^2``."""
    rs = s.sqrt()
    return 1.0 / ((rs[:, None] + rs[None, :]) * (s[:, None] + s[None, :]))


def _as_right(f: Factor, pair: Pair, w: Tensor, s_safe: Tensor, kernel: Tensor | None) -> Columns:
    """The term of ``L_j`` in ``w ds``: ``L_1 = A_1 V_1`` (first operator), else ``U_j Sigma_j^{1/2}``, i.e.
    ``(A A^T)^{1/4}`` up to the fixed ``U_j``."""
    g = pair.sigma * (pair.B.T @ pair.x)
    if kernel is None:
        return w * g, f.V @ pair.y, None
    gh = f.U.T @ g
    sym = 0.5 * (gh[:, None] * pair.y[None, :] + pair.y[:, None] * gh[None, :])
    return w * (g - f.U @ gh), f.V @ (pair.y / s_safe.sqrt()), 2 * w * (kernel * sym) * f.S[None, :]


def _as_left(f: Factor, pair: Pair, w: Tensor, s_safe: Tensor, kernel: Tensor | None) -> Columns:
    """The term of ``R_j`` in ``w ds``: ``R_K = U_K^T A_K`` (last operator), else ``Sigma_j^{1/2} V_j^T``, i.e.
    ``(A^T A)^{1/4}`` up to the fixed ``V_j``. A low-rank factor is a function of ``A Q``: ``h`` is projected."""
    h = pair.sigma * (pair.C @ pair.y)
    if f.Q is not None:
        h = f.Q @ (f.Q.T @ h)
    if kernel is None:
        return w * (f.U @ pair.x), h, None
    hh = f.V.T @ h
    sym = 0.5 * (pair.x[:, None] * hh[None, :] + hh[:, None] * pair.x[None, :])
    return w * (f.U @ (pair.x / s_safe.sqrt())), h - f.V @ hh, 2 * w * f.S[:, None] * (kernel * sym)

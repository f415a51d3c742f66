r"""Thin SVD factors ``A ~ U diag(S) V^T`` of the chain operators, float64 and detached.

* Dense: the full SVD of the operator's ``n_out x n_in`` matrix (``torch.linalg.svd`` returns ``Vh = V^T``).
* Low rank: ``A Q_E Q_E^T``, with ``Q_E`` the first ``E`` columns of a subspace kept warm between calls (a buffer,
  ``(width, *in_shape[1:])``, rows orthonormal), refined by block power iteration ``Q <- qr(A^T A Q)`` through
  autograd and a Rayleigh-Ritz rotation, never forming the matrix. This drops the tail of the spectrum: an
  **estimate**, not a bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...operator import LinearOperator

_F64 = torch.float64


@dataclass(eq=False)
class Factor:
    """Thin SVD ``A ~ U diag(S) V^T`` of one operator (float64, detached); ``Q`` spans the low-rank subspace."""

    U: Tensor
    S: Tensor
    V: Tensor
    Q: Tensor | None = None
    finite: bool = True

    def scaled(self, power: float) -> Tensor:
        return self.S.clamp_min(0) ** power


def apply_block(operator: LinearOperator, vs: Tensor) -> Tensor:
    """``A v`` for a block ``(k, *in_shape[1:])`` -> ``(k, n_out)``."""
    return operator.matmat(vs).reshape(vs.shape[0], -1)


def dense_factor(operator: LinearOperator) -> Factor:
    """The full thin SVD of the dense matrix (a NaN factor, ``finite=False``, if it is not finite)."""
    A = operator.dense().to(_F64)  # n_out x n_in
    if not bool(torch.isfinite(A).all()):
        r = min(A.shape)
        nan = torch.full((), float("nan"), dtype=_F64, device=A.device)
        return Factor(A.new_zeros(A.shape[0], r), nan.expand(r), A.new_zeros(A.shape[1], r), finite=False)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return Factor(U, S, Vh.T)


def lowrank_factor(operator: LinearOperator, subspace: Tensor, rank: int) -> Factor:
    """The SVD of ``A Q_E`` with ``Q_E`` the first ``E = rank`` (fixed) rows of ``subspace``: the bound is a function
    of ``A Q_E Q_E^T``, whose gradient the surrogate (:mod:`.gradient`) gives exactly."""
    QE = subspace[:rank]
    Q = QE.reshape(rank, -1).T.to(_F64)
    AQ = apply_block(operator, QE).T.to(_F64)  # n_out x E
    if not bool(torch.isfinite(AQ).all()):
        nan = torch.full((rank,), float("nan"), dtype=_F64, device=AQ.device)
        return Factor(AQ.new_zeros(AQ.shape[0], rank), nan, Q, Q=Q, finite=False)
    U, S, Wh = torch.linalg.svd(AQ, full_matrices=False)
    return Factor(U, S, Q @ Wh.T, Q=Q)


def random_subspace(in_shape: torch.Size, width: int, generator: torch.Generator | None,
                    dtype: torch.dtype) -> Tensor:
    """A random orthonormal start ``(width, *in_shape[1:])`` for :func:`subspace_step` (QR in float64)."""
    q0 = torch.randn(in_shape.numel(), width, generator=generator, dtype=_F64)
    return torch.linalg.qr(q0).Q.T.to(dtype).reshape(width, *in_shape[1:]).contiguous()


def subspace_step(operator: LinearOperator, subspace: Tensor, n_iter: int) -> None:
    """``n_iter`` block power iterations ``Q <- qr(A^T A Q)`` on ``subspace`` in place (no grad to the weights),
    then (if ``n_iter > 0``) a Rayleigh-Ritz rotation ``Q <- Q W`` that puts the top right singular vectors of
    ``A Q`` first: the bound uses the first ``E`` rows. A step that is not finite leaves the subspace as it was."""
    width = subspace.shape[0]
    for _ in range(n_iter):
        with torch.enable_grad():
            q = subspace.detach().requires_grad_(True)
            aq = apply_block(operator, q)
            (w,) = torch.autograd.grad(aq, q, grad_outputs=aq.detach())
        w = w.reshape(width, -1).to(_F64)
        if not bool(torch.isfinite(w).all()) or not bool(w.abs().sum() > 0):
            return  # keep the warm state unpoisoned
        subspace.copy_(torch.linalg.qr(w.T).Q.T.to(subspace.dtype).reshape(subspace.shape))
    if n_iter > 0:
        Q, _, Wh = ritz(operator, subspace)
        if Wh is not None:
            subspace.copy_((Q @ Wh.T).T.to(subspace.dtype).reshape(subspace.shape))


def ritz(operator: LinearOperator, subspace: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rayleigh-Ritz on the whole subspace: ``(Q, singular values, W^T)`` from the SVD ``A Q = U S W^T``
    (``W^T`` is ``None``, the values NaN, when ``A Q`` is not finite)."""
    width = subspace.shape[0]
    Q = subspace.reshape(width, -1).T.to(_F64)  # n_in x width, orthonormal columns
    AQ = apply_block(operator, subspace).T.to(_F64)  # n_out x width
    if not bool(torch.isfinite(AQ).all()):
        return Q, torch.full((width,), float("nan"), dtype=_F64, device=AQ.device), None
    _, S, Wh = torch.linalg.svd(AQ, full_matrices=False)
    return Q, S, Wh

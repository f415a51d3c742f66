r"""Thin SVD factors ``A ~ U diag(S) V^T`` of the chain operators, float64 and detached.

* Dense: the full SVD of the operator's ``n_out x n_in`` matrix (``torch.linalg.svd`` returns ``Vh = V^T``).
* Low rank: ``A Q_E Q_E^T``, with ``Q_E`` the top ``E`` Ritz vectors of a subspace kept warm between calls (a
  buffer, ``(width, *in_shape[1:])``, rows orthonormal), refined by block power iteration ``Q <- qr(A^T A Q)``
  through autograd, never forming the matrix: ``width`` products by ``A`` and ``A^T`` per iteration and ``width``
  more for the Ritz step. This drops the tail of the spectrum: an **estimate**, not a bound.
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


def lowrank_factor(operator: LinearOperator, subspace: Tensor, rank: int, n_iter: int) -> Factor:
    """The factor of ``A Q_E`` for a subspace ``Q_E`` of ``E = rank`` vectors held fixed: the bound is a function of
    ``A Q_E Q_E^T``, whose gradient the surrogate (:mod:`.gradient`) gives exactly.

    With ``n_iter > 0``: ``n_iter - 1`` block power iterations (:func:`subspace_step`), then a last one that shares its
    products with the factor (as :meth:`~lipreg.warm.PowerVectors.norms` does): from ``A Q = U S W^T``, the top
    ``E`` Ritz vectors ``Q_E = Q W_E`` give ``A Q_E = U_E S_E``, and the subspace advances to ``qr(A^T A Q W)``, its
    columns in the Ritz order (the top ones first). With ``n_iter = 0``: ``Q_E``, the stored first ``E`` vectors, as
    they are."""
    if n_iter == 0:
        QE = subspace[:rank].reshape(rank, -1).T.to(_F64)
        _, triples = ritz(operator, subspace[:rank])
        if triples is None:
            return _not_finite(operator, QE)
        U, S, Wh = triples
        return Factor(U, S, QE @ Wh.T, Q=QE)
    subspace_step(operator, subspace, n_iter - 1)
    width = subspace.shape[0]
    Q = subspace.reshape(width, -1).T.to(_F64)
    aq, gram_q = _gram_block(operator, subspace)
    AQ = aq.T.to(_F64)
    if not bool(torch.isfinite(AQ).all()):
        return _not_finite(operator, Q[:, :rank])
    U, S, Wh = thin_svd(AQ)
    QE = (Q @ Wh.T)[:, :rank]
    _advance(subspace, gram_q.reshape(width, -1).T.to(_F64) @ Wh.T)
    return Factor(U[:, :rank], S[:rank], QE, Q=QE)


def _not_finite(operator: LinearOperator, QE: Tensor) -> Factor:
    """The factor of a non-finite ``A Q_E``: NaN singular values, ``finite=False``."""
    rank = QE.shape[1]
    nan = torch.full((rank,), float("nan"), dtype=_F64, device=QE.device)
    return Factor(QE.new_zeros(operator.out_shape.numel(), rank), nan, QE, Q=QE, finite=False)


def random_subspace(in_shape: torch.Size, width: int, generator: torch.Generator | None,
                    dtype: torch.dtype) -> Tensor:
    """A random orthonormal start ``(width, *in_shape[1:])`` for :func:`subspace_step` (QR in float64)."""
    q0 = torch.randn(in_shape.numel(), width, generator=generator, dtype=_F64)
    return torch.linalg.qr(q0).Q.T.to(dtype).reshape(width, *in_shape[1:]).contiguous()


def subspace_step(operator: LinearOperator, subspace: Tensor, n_iter: int) -> None:
    """``n_iter`` block power iterations ``Q <- qr(A^T A Q)`` on ``subspace`` in place (no grad to the weights). A
    step that is not finite leaves the subspace as it was."""
    width = subspace.shape[0]
    for _ in range(n_iter):
        _advance(subspace, _gram_block(operator, subspace)[1].reshape(width, -1).T.to(_F64))


def _gram_block(operator: LinearOperator, subspace: Tensor) -> tuple[Tensor, Tensor]:
    """``(A Q, A^T A Q)`` for the block ``subspace`` (rows), through autograd, detached: ``(width, n_out)`` and
    ``(width, *in_shape[1:])``."""
    with torch.enable_grad():
        q = subspace.detach().requires_grad_(True)
        aq = apply_block(operator, q)
        (w,) = torch.autograd.grad(aq, q, grad_outputs=aq.detach())
    return aq.detach(), w


def _advance(subspace: Tensor, columns: Tensor) -> None:
    """``subspace <- qr(columns)`` (``n_in x width``, float64) in place, in the columns' order; a block that is not
    finite or is zero leaves the subspace as it was (the warm state stays unpoisoned)."""
    if not bool(torch.isfinite(columns).all()) or not bool(columns.abs().sum() > 0):
        return
    subspace.copy_(torch.linalg.qr(columns).Q.T.to(subspace.dtype).reshape(subspace.shape))


def ritz(operator: LinearOperator, subspace: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Rayleigh-Ritz on the whole subspace: ``Q`` (``n_in x width``, float64) and the SVD ``A Q = U S W^T`` as
    ``(U, S, W^T)`` (``None`` when ``A Q`` is not finite)."""
    width = subspace.shape[0]
    Q = subspace.reshape(width, -1).T.to(_F64)  # n_in x width, orthonormal columns
    AQ = apply_block(operator, subspace).T.to(_F64)  # n_out x width
    if not bool(torch.isfinite(AQ).all()):
        return Q, None
    return Q, thin_svd(AQ)


def thin_svd(AQ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, W^T)`` with ``AQ = U diag(S) W^T`` for a tall ``n_out x width`` block (float64), from the
    eigendecomposition of its ``width x width`` Gram matrix: ``O(n_out width^2)``, a few times cheaper than a
    Householder SVD. A singular value below ``sqrt(eps) S_max`` has a relative error of up to ``eps S_max^2 / S^2``,
    and its left vector is set to 0 below ``1e-150 S_max``: an estimate's precision, for the top triples that
    matter."""
    lam, W = torch.linalg.eigh(AQ.T @ AQ)
    lam, W = lam.flip(0).clamp_min(0), W.flip(1)
    S = lam.sqrt()
    floor = 1e-150 * S[:1].clamp_min(1e-300)
    U = (AQ @ W) / torch.where(S > floor, S, 1.0) * (S > floor)
    return U, S, W.T

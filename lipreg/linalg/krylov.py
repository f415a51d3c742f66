"""The top singular triple of a linear map by Golub-Kahan-Lanczos bidiagonalisation (thick-restarted).

From a unit ``p_1`` (the warm power vector), the Golub-Kahan recurrence builds orthonormal bases
``P_m = [p_1..p_m]`` of the Krylov space ``K_m(A^T A, p_1)`` and ``Q_m = [q_1..q_m]`` of ``A K_m``, with

    A P_m = Q_m B_m,        A^T Q_m = P_m B_m^T + beta_m p_{m+1} e_m^T,

``B_m = Q_m^T A P_m`` small and upper triangular (bidiagonal before a restart). Each step applies ``A`` once and
``A^T`` once. If ``B_m = X S Y^T``, the Ritz triple ``(s_1, u = Q_m x_1, v = P_m y_1)`` satisfies ``A v = s_1 u``
and ``||A^T u - s_1 v|| = beta_m |x_1[m]|``: its residual is known without another product, and the stopping test
(:func:`lipreg.linalg.power.converged`) is that residual against ``tol * s_1``; Ritz values within ``tol`` of
``s_1`` (a cluster, such as the nearly double top singular values of zero-padded convolutions) are tested by their
joint residual ``beta_m ||X[m, cluster]||``, since any unit vector of their span has ``||A v||`` within the
cluster. The power method converges at the
rate ``(sigma_2 / sigma_1)^2`` per step; the Krylov space holds the Chebyshev polynomials of ``A^T A`` of the same
degree, which converge at about the square root of that rate (Golub & Van Loan, Matrix Computations, 4th ed.,
sec. 10.4; Saad, Numerical Methods for Large Eigenvalue Problems, ch. 6).

Both bases are reorthogonalised in full (the recurrence's known coefficient first, then one classical
Gram-Schmidt pass, a second one only when it cancelled), so ``k`` (20-60) vectors per side are kept; when
``k`` steps are not enough, the ``k // 2`` leading Ritz pairs and ``p_{m+1}`` start the next cycle (thick restart,
Baglama & Reichel, SIAM J. Sci. Comput. 27 (2005), the augmented Lanczos bidiagonalisation): ``B`` becomes
``diag(s_1..s_l)`` with the column ``beta_m x_i[m]`` next to it, which the next step's Gram-Schmidt coefficients
reproduce.

``s_1`` is the largest singular value of a compression ``Q^T A P`` of ``A`` (orthonormal ``Q``, ``P``), so it is
a **lower estimate** of ``sigma_1(A)`` (up to rounding), like every power-method value: never a certificate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .power import LinearFn, converged

_F64 = torch.float64


@dataclass(frozen=True)
class TopSingular:
    """The top singular triple estimate of :func:`lanczos_top_singular`: ``sigma`` (float64, a lower estimate of
    ``sigma_1``; NaN if ``A`` gave a non-finite value), ``v`` (unit, shaped like the start vector; the start vector
    itself when ``A`` is zero or non-finite), ``u`` (unit, shaped like ``A v``; ``None`` unless asked for or when
    there is none), ``residual`` (``||A^T u - sigma v||``), ``converged`` (the stopping test passed) and ``steps``
    (products by ``A``, each with one by ``A^T``)."""

    sigma: Tensor
    v: Tensor
    u: Tensor | None
    residual: Tensor
    converged: bool
    steps: int


class _Bases:
    """The two orthonormal bases, as the leading rows of preallocated ``(k + 1) x n_in`` and ``k x n_out`` buffers
    (``P``, ``Q``), and ``B = Q^T A P`` (float64) over the first ``cols`` rows of ``P``."""

    def __init__(self, p1: Tensor, k: int) -> None:
        self._P = p1.new_empty(k + 1, p1.numel())
        self._P[0] = p1.reshape(-1)
        self._Q: Tensor | None = None  # allocated at the first A p, whose size it takes
        self.n_p, self.n_q, self.cols = 1, 0, 0  # cols: the leading vectors of P that A has been applied to
        self._alpha = self._beta = 0.0  # the last alpha and beta: the recurrence's known coefficients
        self.B = torch.zeros(k, k + 1, dtype=_F64, device=p1.device)

    @property
    def P(self) -> Tensor:
        return self._P[: self.n_p]

    @property
    def Q(self) -> Tensor:
        return self._Q[: self.n_q] if self._Q is not None else self._P[:0]

    def extend_q(self, w: Tensor) -> float:
        """``q = (A p_last - Q c) / alpha``: appends ``q`` and the column ``(c, alpha)`` of ``B``, returns
        ``alpha``: 0 on a breakdown (``A p_last`` in the span of ``Q``: the bases span an invariant pair), NaN for a
        non-finite ``A p_last``."""
        w = w.reshape(-1)
        if self._Q is None:
            self._Q = w.new_empty(self.B.shape[0], w.numel())
        coefficients, w, alpha = _orthogonalise(w, self.Q, self._beta)
        self._alpha = alpha
        m, self.cols = self.n_q, self.n_p
        self.B[:m, self.cols - 1] = coefficients.to(_F64)
        self.B[m, self.cols - 1] = alpha
        if alpha > 0:
            torch.div(w, alpha, out=self._Q[m])
            self.n_q += 1
        return alpha

    def extend_p(self, r: Tensor) -> float:
        """``p = (A^T q_last - P d) / beta``: appends ``p`` (unless ``beta`` is 0 or NaN) and returns ``beta``."""
        _, r, beta = _orthogonalise(r.reshape(-1), self.P, self._alpha)
        self._beta = beta
        if beta > 0:
            torch.div(r, beta, out=self._P[self.n_p])
            self.n_p += 1
        return beta

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``X, S, Y`` of the SVD ``B = X S Y^T`` (float64; ``Y`` over the first ``cols`` vectors of ``P``)."""
        X, S, Yh = torch.linalg.svd(self.B[: self.n_q, : self.cols], full_matrices=False)
        return X, S, Yh.T

    def restart(self, X: Tensor, S: Tensor, Y: Tensor, keep: int) -> None:
        """Keep the ``keep`` leading Ritz pairs and the last ``p`` (thick restart): ``B = diag(S[:keep])``; the
        column coupling the Ritz vectors to ``p`` comes back as the next ``extend_q``'s coefficients."""
        self._Q[:keep] = X[:, :keep].T.to(self._Q) @ self.Q
        last = self._P[self.cols : self.n_p].clone()
        self._P[:keep] = Y[:, :keep].T.to(self._P) @ self._P[: self.cols]
        self._P[keep : keep + len(last)] = last
        self.n_q, self.n_p, self.cols = keep, keep + len(last), keep
        self._beta = 0.0  # A p_last now couples to every kept q: the full pass finds the column
        self.B.zero_()
        self.B[range(keep), range(keep)] = S[:keep]


def _orthogonalise(w: Tensor, basis: Tensor, local: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """``w`` minus its projection on the orthonormal rows of ``basis``, the projection's coefficients and the
    remainder's norm. ``local`` is the coefficient of the last row that the Golub-Kahan recurrence predicts
    (``beta_{j-1}`` for ``A p_j`` on ``q_{j-1}``, ``alpha_j`` for ``A^T q_j`` on ``p_j``): it is subtracted first,
    so the full classical Gram-Schmidt pass that follows only removes the rounding drift. That pass is repeated
    once when it cancelled more than ``1 - 1/sqrt(2)`` of the norm (the criterion of Daniel, Gragg, Kaufman &
    Stewart, Math. Comp. 30 (1976): twice is enough). The norm is 0 when the remainder is at the rounding level of
    ``w`` (numerically in the span), NaN when ``w`` is not finite."""
    scale = before = float(torch.linalg.vector_norm(w))
    if local:
        w = torch.add(w, basis[-1], alpha=-local)
        before = float(torch.linalg.vector_norm(w))
    coefficients = basis @ w
    w = torch.addmv(w, basis.T, coefficients, alpha=-1)
    norm = float(torch.linalg.vector_norm(w))
    if norm < before / math.sqrt(2):
        correction = basis @ w
        w = torch.addmv(w, basis.T, correction, alpha=-1)
        coefficients, norm = coefficients + correction, float(torch.linalg.vector_norm(w))
    if local:
        coefficients[-1] += local
    if not scale < math.inf:
        norm = math.nan
    elif norm <= 4 * torch.finfo(w.dtype).eps * scale:
        norm = 0.0
    return coefficients, w, norm


def lanczos_top_singular(matvec: LinearFn, rmatvec: LinearFn, v0: Tensor, tol: float = 1e-6,
                         max_iter: int = 2000, k: int = 20, left: bool = False) -> TopSingular:
    """The top singular triple of the linear map ``A`` with ``A v = matvec(v)`` and ``A^T u = rmatvec(u)``
    (tensors of any shapes, flattened as vectors), by thick-restarted Golub-Kahan-Lanczos from ``v0``.

    Stops when ``||A^T u - sigma v|| <= tol * sigma`` (:func:`~lipreg.linalg.power.converged`; the joint residual of
    the Ritz values within ``tol`` of the top one; a ``tol`` below the resolution ``eps`` of ``v0``'s dtype is raised
    to it, as products rounded in that dtype cannot resolve a smaller residual), after
    ``max_iter`` products by ``A``, or when the Krylov space is invariant (the triple is then exact). Keeps at most
    ``k`` basis vectors per side (``k >= 2``). The value is a **lower estimate** of ``sigma_1`` (a Ritz value of a
    compression of ``A``), and the residual test, unlike a stalled value, also bounds the vectors' error (by
    ``tol sigma / gap``). A non-finite product stops the iteration with ``sigma = NaN`` and ``v = v0``: a warm
    state is never poisoned; a zero map gives ``sigma = 0`` and ``v = v0``.
    """
    if k < 2 or max_iter < 1:
        raise ValueError(f"need k >= 2 and max_iter >= 1, got k={k}, max_iter={max_iter}")
    norm0 = torch.linalg.vector_norm(v0)
    if not bool(norm0 > 0) or not bool(torch.isfinite(norm0)):
        raise ValueError("v0 must be finite and nonzero")
    bases, shape = _Bases(v0 / norm0, k), v0.shape
    tol = max(tol, torch.finfo(v0.dtype).eps)
    nan, zero = (torch.full((), value, dtype=_F64, device=v0.device) for value in (float("nan"), 0.0))
    for step in range(1, max_iter + 1):
        av = matvec(bases.P[-1].reshape(shape))
        alpha = bases.extend_q(av)  # host floats from here on: no tensor check per step
        if math.isnan(alpha):
            return TopSingular(nan, v0, None, nan, False, step)
        if bases.n_q == 0:  # A v0 = 0 (a zero map, or v0 in its kernel)
            return TopSingular(zero, v0, None, zero, True, step)
        beta = bases.extend_p(rmatvec(bases.Q[-1].reshape(av.shape))) if alpha > 0 else 0.0
        if math.isnan(beta):
            return TopSingular(nan, v0, None, nan, False, step)
        X, S, Y = bases.ritz()
        cluster = S >= S[0] * (1 - tol)  # Ritz values within tol of the top: their joint residual decides
        residual = beta * torch.linalg.vector_norm(X[-1, cluster])
        done = beta == 0 or converged(residual, S[0], tol)  # beta = 0 also when alpha = 0: invariant
        if done or step == max_iter:
            break
        if bases.n_q == k:
            bases.restart(X, S, Y, keep=k // 2)
    return _triple(bases, X, S, Y, residual, done, step, shape, av.shape if left else None)


def _triple(bases: _Bases, X: Tensor, S: Tensor, Y: Tensor, residual: Tensor, done: bool, steps: int,
            shape: torch.Size, out_shape: torch.Size | None) -> TopSingular:
    """The leading Ritz triple ``(S[0], P y_1, Q x_1)`` as tensors of the map's shapes (unit vectors)."""
    v = Y[:, 0].to(bases.P) @ bases.P[: bases.cols]
    v = (v / torch.linalg.vector_norm(v)).reshape(shape)
    u = None
    if out_shape is not None:
        u = X[:, 0].to(bases.Q) @ bases.Q
        u = (u / torch.linalg.vector_norm(u)).reshape(out_shape)
    return TopSingular(S[0], v, u, residual, done, steps)


def vjp_adjoint(matvec: LinearFn, like: Tensor) -> LinearFn:
    """``u -> A^T u`` for the linear ``A = matvec`` by reverse-mode autograd: ``A`` is recorded once at ``like`` (a
    tensor of its input shape) and its graph replayed for every ``u`` (no grad reaches the weights)."""
    with torch.enable_grad():
        x = like.detach().clone().requires_grad_(True)
        out = matvec(x)
    return lambda u: torch.autograd.grad(out, x, grad_outputs=u, retain_graph=True)[0]

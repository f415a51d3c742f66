"""The Golub-Kahan-Lanczos solver (``lipreg.linalg.krylov``) and ``converge()`` on it, against float64 SVDs of
explicit matrices and of ``jacrev`` Jacobians."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from lipreg.linalg.krylov import lanczos_top_singular, vjp_adjoint
from lipreg.linalg.power import converged, normalized_or_kept, ritz_residuals

DT = torch.float64


def matrix_maps(W: torch.Tensor):
    return (lambda v: v @ W.T), (lambda u: u @ W)


def with_spectrum(singular_values: list[float], n_out: int, n_in: int, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` with random orthonormal ``U``, ``V``: a matrix whose spectrum the test chooses."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=DT)).Q[:, : len(singular_values)]
    V = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=DT)).Q[:, : len(singular_values)]
    return U @ torch.diag(torch.tensor(singular_values, dtype=DT)) @ V.T


def assert_top_triple(W: torch.Tensor, top, rel: float = 1e-10, vector_tol: float = 1e-6) -> None:
    U, S, Vh = torch.linalg.svd(W)
    assert float(top.sigma) == pytest.approx(float(S[0]), rel=rel)
    assert float(top.sigma) <= float(S[0]) * (1 + 1e-13)  # a Ritz value: from below
    assert float((top.v.reshape(-1) @ Vh[0]).abs()) == pytest.approx(1.0, abs=vector_tol)
    assert float((top.u.reshape(-1) @ U[:, 0]).abs()) == pytest.approx(1.0, abs=vector_tol)


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (10, 400)])
def test_dense_value_and_vectors_match_the_svd(shape):
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=DT)
    top = lanczos_top_singular(*matrix_maps(W), torch.randn(1, shape[1], dtype=DT), tol=1e-8, left=True)
    assert top.converged and top.steps < 150  # restarts (k = 20) included
    assert_top_triple(W, top)


def test_close_top_singular_values_converge_where_a_stalled_value_would_stop():
    """sigma_2 / sigma_1 = 1 - 1e-4: the power method moves sigma by < 1e-6 per step long before v is right; the
    residual test keeps going until the vectors are right too."""
    W = with_spectrum([1.0, 1 - 1e-4, 0.9, 0.5, 0.1], 60, 80, seed=1)
    top = lanczos_top_singular(*matrix_maps(W), torch.randn(1, 80, dtype=DT), tol=1e-9, left=True)
    assert top.converged
    assert_top_triple(W, top, rel=1e-12, vector_tol=1e-8)


@pytest.mark.parametrize("relative_gap", [1e-6, 1e-4, 1e-2])
def test_the_value_is_within_half_tol_whatever_the_gap(relative_gap):
    """The guarantee documented in ``converged``: r <= tol sigma puts sigma within tol / 2 of sigma_1 (from below)
    whenever 1 - sigma_2^2 / sigma_1^2 >= tol, the Kato-Temple inequality with no estimate of the gap."""
    tol = 1e-6
    spectrum = [1.0, (1 - relative_gap) ** 0.5, 0.95, 0.9] + [0.8 * 0.99**i for i in range(40)]
    W = with_spectrum(spectrum, 70, 90, seed=10)
    top = lanczos_top_singular(*matrix_maps(W), torch.randn(1, 90, dtype=DT), tol=tol)
    assert top.converged
    assert -1e-14 <= 1 - float(top.sigma) <= tol / 2


def test_rank_deficient_and_invariant_start():
    """Rank 3: the Krylov space becomes invariant after a few steps and the triple is exact."""
    W = with_spectrum([3.0, 2.0, 1.0], 50, 70, seed=2)
    top = lanczos_top_singular(*matrix_maps(W), torch.randn(1, 70, dtype=DT), tol=1e-14, left=True)
    assert top.converged and top.steps <= 5
    assert_top_triple(W, top, rel=1e-13)


def test_convolution_operator_against_its_jacobian():
    torch.manual_seed(3)
    weight = torch.randn(4, 3, 3, 3, dtype=DT)
    conv = lambda v: F.conv2d(v, weight, stride=2, padding=1)  # noqa: E731
    x = torch.zeros(1, 3, 9, 8, dtype=DT)
    top = lanczos_top_singular(conv, vjp_adjoint(conv, x), torch.randn(x.shape, dtype=DT), tol=1e-10, left=True)
    jacobian = torch.func.jacrev(conv)(x).reshape(-1, x.numel())
    assert top.v.shape == x.shape and top.u.shape == conv(x).shape
    assert_top_triple(jacobian, top)


def test_zero_operator_keeps_the_start_vector():
    v0 = torch.randn(2, 5, dtype=DT)
    top = lanczos_top_singular(lambda v: 0 * v[..., :3], lambda u: torch.zeros(2, 5, dtype=DT), v0)
    assert float(top.sigma) == 0.0 and top.v is v0 and top.converged


@pytest.mark.parametrize("where", ["forward", "adjoint"])
def test_nan_operator_keeps_the_start_vector(where):
    W = torch.randn(6, 5, dtype=DT)
    matvec, rmatvec = matrix_maps(W)
    poisoned = lambda x: x * float("nan")  # noqa: E731
    maps = (lambda v: poisoned(matvec(v)), rmatvec) if where == "forward" else (matvec, lambda u: poisoned(rmatvec(u)))
    v0 = torch.randn(1, 5, dtype=DT)
    top = lanczos_top_singular(*maps, v0)
    assert torch.isnan(top.sigma) and not top.converged and torch.equal(top.v, v0)


def test_max_iter_bounds_the_work_and_the_value_stays_below():
    W = with_spectrum([1.0, 0.999, 0.998, 0.997] + [0.5] * 20, 40, 40, seed=4)
    top = lanczos_top_singular(*matrix_maps(W), torch.randn(1, 40, dtype=DT), tol=1e-14, max_iter=3)
    assert top.steps == 3 and not top.converged
    assert 0 < float(top.sigma) <= 1.0


def test_a_tolerance_below_the_dtype_resolution_is_raised_to_it():
    """float32 products cannot resolve a residual of 1e-14: the test stops at eps instead of running on."""
    torch.manual_seed(9)
    W = torch.randn(120, 160)
    top = lanczos_top_singular(*matrix_maps(W), torch.randn(1, 160), tol=1e-14, max_iter=300)
    assert top.converged and top.steps < 100
    assert float(top.sigma) == pytest.approx(float(torch.linalg.matrix_norm(W.to(DT), 2)), rel=1e-6)


def test_stopping_test_and_normalisation():
    assert converged(torch.tensor([1e-7, 0.0]), torch.tensor([1.0, 0.0]), 1e-6)
    assert not converged(torch.tensor(float("nan")), torch.tensor(1.0), 1e-6)
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0]])
    kept = torch.ones(3, 2)
    assert torch.equal(normalized_or_kept(w, kept, start_dim=1), torch.tensor([[0.6, 0.8], [1, 1], [1, 1]]))


def test_ritz_residuals_of_a_block():
    """Exact singular vectors have zero residual; a mixed one has the residual of its explicit formula."""
    torch.manual_seed(8)
    W = torch.randn(7, 9, dtype=DT)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    mixed = (Vh[0] + Vh[1]) / 2**0.5
    sigmas, residuals = ritz_residuals(lambda q: q @ W.T, torch.stack([Vh[0], Vh[2], mixed]))
    torch.testing.assert_close(sigmas[:2], S[[0, 2]])
    assert float(residuals[:2].max()) < 1e-12
    u = W @ mixed / torch.linalg.vector_norm(W @ mixed)
    assert float(residuals[2]) == pytest.approx(float(torch.linalg.vector_norm(W.T @ u - sigmas[2] * mixed)), rel=1e-12)


# ------------------------------------------------------------------------------- converge() on models
def jacobian_norm(module: nn.Module, shape: tuple[int, ...]) -> float:
    jacobian = torch.func.jacrev(module)(torch.zeros(shape, dtype=DT)).reshape(-1, torch.Size(shape).numel())
    return float(torch.linalg.matrix_norm(jacobian.detach(), 2))


def test_converge_matches_the_exact_product_on_an_mlp():
    """The middle layer has sigma_2 / sigma_1 = 0.999: a stalled-value test stops with sigma off by ~1e-4."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5)).to(DT)
    with torch.no_grad():
        model[2].weight.copy_(with_spectrum([2.0, 1.998, 1.9, 1.5, 1.0, 0.5], 20, 40, seed=7))
    est = lipreg.LipschitzEstimator(model, torch.zeros(1, 30, dtype=DT), dtype=DT)
    exact = 1.0
    for layer in model[::2]:
        exact *= float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
    bound = float(est.converge(tol=1e-6).detach())
    assert bound == pytest.approx(exact, rel=1e-6) and bound <= exact * (1 + 1e-12)


def test_converge_matches_the_jacobian_norms_on_a_cnn():
    torch.manual_seed(6)
    convs = [nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)),
             nn.Sequential(nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3))]
    model = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU()).to(DT).eval()
    for bn in (convs[0][1], convs[1][1]):
        nn.init.uniform_(bn.weight, 0.5, 2.0)
        nn.init.uniform_(bn.running_var, 0.5, 2.0)
    est = lipreg.LipschitzEstimator(model, torch.zeros(1, 2, 8, 8, dtype=DT), dtype=DT)
    exact = jacobian_norm(convs[0], (1, 2, 8, 8)) * jacobian_norm(convs[1], (1, 4, 8, 8))
    bound = float(est.converge(tol=1e-6).detach())
    assert bound == pytest.approx(exact, rel=1e-6) and bound <= exact * (1 + 1e-12)

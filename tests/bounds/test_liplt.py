"""LipLT (method="liplt") against independent references: the recursion written out by hand from float64 SVDs of
the dense products, the brute-force max over activation patterns (which every slope-based certificate must reach),
local Jacobian norms (lower bounds), the AutoLip product (never exceeded), and the warm state."""
from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

import lipreg
from lipreg import BoundPolicy
from lipreg.bounds.liplt import certified_products, unrolled_bound
from lipreg.bounds.seqlip import find_chains
from tests.bounds.references import DT, local_max, mlp, vertex_max, weights


def by_hand(Ws: list[torch.Tensor]) -> float:
    """Eq. (12) for ReLU (alpha = beta = 1/2), three layers, from exact float64 norms of the products."""
    n = lambda M: float(torch.linalg.matrix_norm(M, 2))  # noqa: E731
    W0, W1, W2 = Ws
    L0 = n(W0)
    L1 = 0.5 * n(W1 @ W0) + 0.5 * n(W1) * L0
    return 0.25 * n(W2 @ W1 @ W0) + 0.5 * 0.5 * n(W2 @ W1) * L0 + 0.5 * n(W2) * L1


def test_recursion_matches_the_hand_written_formula():
    Ws = weights(mlp([5, 7, 6, 3], seed=1))
    products = {(j, k): torch.linalg.matrix_norm(_product(Ws, j, k), 2) for k in range(3) for j in range(k + 1)}
    value = unrolled_bound(lambda j, k: products[(j, k)], [(0.0, 1.0), (0.0, 1.0)])
    assert float(value) == pytest.approx(by_hand(Ws), rel=1e-12)


def _product(Ws, j, k):
    P = Ws[j]
    for W in Ws[j + 1:k + 1]:
        P = W @ P
    return P


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("act,lo,hi", [(nn.ReLU, 0.0, 1.0), (lambda: nn.LeakyReLU(0.2), 0.2, 1.0)])
def test_certificate_is_above_the_exact_constant_and_below_autolip(seed, act, lo, hi):
    model = mlp([4, 5, 6, 3], act=act, seed=seed)
    x = torch.randn(2, 4, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, method="liplt", dtype=DT)
    ops = [op.in_float64() for op in est.linear_operators().values()]
    certs = certified_products(ops, BoundPolicy())
    liplt = float(unrolled_bound(lambda j, k: certs[(j, k)], [(lo, hi), (lo, hi)]))
    exact = float(vertex_max(weights(model), lo, hi))
    autolip = float(torch.stack([certs[(i, i)] for i in range(3)]).prod()) * hi ** 2
    assert float(local_max(model, 4, n=100)) <= exact <= liplt <= autolip * (1 + 1e-12)
    assert liplt == pytest.approx(_liplt_reference(weights(model), lo, hi), rel=1e-5)  # 1e-6 per dense norm


def _liplt_reference(Ws, lo, hi):
    a, b = (lo + hi) / 2, (hi - lo) / 2
    n = lambda j, k: float(torch.linalg.matrix_norm(_product(Ws, j, k), 2))  # noqa: E731
    L = [n(0, 0)]
    for k in (1, 2):
        L.append(a ** k * n(0, k) + sum(b * a ** (k - j) * n(j, k) * L[j - 1] for j in range(1, k + 1)))
    return L[-1]


def test_products_without_dense_matrices_fall_back_to_sound_splits():
    model = mlp([4, 6, 6, 3], seed=3)
    x = torch.randn(2, 4, dtype=DT)
    ops = [op.in_float64() for op in lipreg.LipschitzEstimator(model, x, dtype=DT).linear_operators().values()]
    dense, split = certified_products(ops, BoundPolicy()), certified_products(ops, BoundPolicy(dense_entries=0))
    for (j, k), value in dense.items():
        exact = float(torch.linalg.matrix_norm(_product(weights(model), j, k), 2))
        assert exact <= float(value) <= float(split[(j, k)]) * (1 + 1e-12)
        assert float(value) == pytest.approx(exact, rel=1e-5)


def test_thin_products_are_dense_as_the_policy_allows_thin_operators():
    """A product ``40 -> 3`` has 120 entries; with ``dense_entries=64`` it is still formed dense, as a thin operator
    is (``BoundPolicy.dense_node``: smaller side 3, 9 <= 64, 120 <= 16 * 64), so its certificate is its exact norm,
    not the product of its factors' norms."""
    model = mlp([40, 30, 3], seed=5)
    x = torch.randn(2, 40, dtype=DT)
    ops = [op.in_float64() for op in lipreg.LipschitzEstimator(model, x, dtype=DT).linear_operators().values()]
    certs = certified_products(ops, BoundPolicy(dense_entries=64))
    W1, W2 = weights(model)
    exact = float(torch.linalg.matrix_norm(W2 @ W1, 2))
    split = float(certs[(0, 0)] * certs[(1, 1)])
    assert exact <= float(certs[(0, 1)]) == pytest.approx(exact, rel=1e-5)  # 1e-6 per dense norm
    assert exact < 0.9 * split


def test_conv_chain_certificate_against_jacobians():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).to(DT).eval()
    x = torch.randn(2, 1, 5, 5, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, method="liplt", dtype=DT)
    certified = float(est.certified_bound().detach())
    jacobians = [torch.func.jacrev(model)(torch.randn(1, 1, 5, 5, dtype=DT) * 3).reshape(3, 25) for _ in range(50)]
    lower = max(float(torch.linalg.matrix_norm(J, 2)) for J in jacobians)
    autolip = float(lipreg.LipschitzEstimator(model, x, dtype=DT).converge()) * (1 + 1e-6)
    assert lower <= certified <= autolip
    assert "liplt" in est.certificate or "eclipse" in est.certificate


def test_estimate_converges_to_the_recursion_on_exact_norms_and_is_differentiable():
    model = mlp([5, 7, 6, 3], seed=2)
    x = torch.randn(2, 5, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, method="liplt", dtype=DT)
    bound = est()
    bound.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model[0::2].parameters()
               if p.dim() == 2)
    converged = float(est.converge(tol=1e-10).detach())
    assert converged == pytest.approx(min(by_hand(weights(model)), _autolip(model)), rel=1e-6)
    assert not est.certified


def _autolip(model):
    return float(torch.stack([torch.linalg.matrix_norm(W, 2) for W in weights(model)]).prod())


def test_warm_vectors_are_buffers_restored_by_state_dict():
    model = mlp([5, 7, 6, 3], seed=4)
    x = torch.randn(2, 5, dtype=DT)
    first = lipreg.LipschitzEstimator(model, x, method="liplt", dtype=DT)
    for _ in range(5):
        first()
    names = [name for name in first.state_dict() if name.startswith("liplt.")]
    assert len(names) == 6  # the 3 * 4 / 2 products of a three-operator chain
    second = lipreg.LipschitzEstimator(model, x, method="liplt", dtype=DT, seed=1)
    second.load_state_dict(first.state_dict())
    assert float(second().detach()) == float(first().detach())


def test_method_is_accepted_everywhere():
    model = mlp([5, 7, 3], seed=0).float()
    x = torch.randn(2, 5)
    assert "liplt" in typing.get_args(lipreg.options.Method)
    penalty = lipreg.LipschitzPenalty(model, x, method="liplt")
    penalty().backward()
    assert penalty.estimator.liplt is not None
    assert len(find_chains(penalty.estimator.graph)) == 1

"""``lipreg.power_method`` (paper Alg. 2) on its own, against SVDs of explicit matrices."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg
from lipreg.linalg.power import power_iterations

DT = torch.float64


def test_affine_linear_drops_the_bias():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6).to(DT)
    with torch.no_grad():
        layer.bias.mul_(100.0)  # a large offset that must not count
    sigma, v = lipreg.power_method(layer, torch.zeros(1, 8, dtype=DT), n_iter=500)
    assert float(sigma.detach()) == pytest.approx(float(torch.linalg.matrix_norm(layer.weight.detach(), 2)), rel=1e-10)
    assert v.shape == (1, 8) and float(v.norm()) == pytest.approx(1.0, rel=1e-12)
    _, _, vh = torch.linalg.svd(layer.weight.detach())
    assert float((v[0] @ vh[0]).abs()) == pytest.approx(1.0, abs=1e-8)  # the top right singular vector


def test_batch_dimension_is_part_of_the_space():
    """All dimensions form the vector space: a batch of B copies is block diagonal, with the same norm."""
    torch.manual_seed(1)
    weight = torch.randn(5, 7, dtype=DT)
    sigma, _ = lipreg.power_method(lambda x: x @ weight.T, torch.zeros(4, 7, dtype=DT), n_iter=500, affine=False)
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(weight, 2)), rel=1e-10)


def test_convolution_matches_the_dense_matrix():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect").to(DT)
    x = torch.randn(1, 2, 7, 6, dtype=DT)
    sigma, _ = lipreg.power_method(conv, x, n_iter=3000)
    jac = torch.func.jacrev(conv)(x).reshape(-1, x.numel())
    assert float(sigma.detach()) == pytest.approx(float(torch.linalg.matrix_norm(jac.detach(), 2)), rel=1e-4)


def test_gradient_reaches_the_weights():
    """sigma = ||A v|| is differentiable; at convergence its gradient is u_1 v_1^T."""
    torch.manual_seed(3)
    layer = nn.Linear(6, 4, bias=False).to(DT)
    sigma, _ = lipreg.power_method(layer, torch.zeros(1, 6, dtype=DT), n_iter=1000, affine=False)
    sigma.backward()
    u, _, vh = torch.linalg.svd(layer.weight.detach())
    assert torch.allclose(layer.weight.grad, torch.outer(u[:, 0], vh[0]), atol=1e-8)


def test_warm_start_vector_and_below():
    torch.manual_seed(4)
    weight = torch.randn(20, 20, dtype=DT)
    exact = float(torch.linalg.matrix_norm(weight, 2))
    sigma_1, v = lipreg.power_method(lambda x: x @ weight.T, torch.zeros(1, 20, dtype=DT), n_iter=3, affine=False)
    sigma_2, _ = lipreg.power_method(lambda x: x @ weight.T, torch.zeros(1, 20, dtype=DT), n_iter=3, affine=False,
                                     v0=v)
    assert float(sigma_1) <= float(sigma_2) <= exact * (1 + 1e-12)  # from below, and 3 + 3 steps beat 3


def test_zero_and_nan_operators_keep_the_previous_vector():
    v0 = torch.nn.functional.normalize(torch.randn(1, 5, dtype=DT), dim=1)
    assert torch.equal(power_iterations(lambda x: 0 * x, v0, 3), v0)
    assert torch.equal(power_iterations(lambda x: x * float("nan"), v0, 3), v0)

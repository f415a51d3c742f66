"""``est.certified_bound()`` and ``est.layer_bounds(certified=True)`` against independent exact references.

Reference: the largest singular value of the dense Jacobian of each layer's bias-free map (``torch.func.jacrev``,
float64). Both routes are checked: the exact dense norm used for small operators, and the per-operator route
(FFT bound for convolutions, Gram iteration / exact norm for dense layers) forced by a :class:`lipreg.BoundPolicy`
with no dense route for whole operators (``PER_OP``).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg

DT = torch.float64
PER_OP = lipreg.BoundPolicy(dense_entries=0)  # no dense matrix of a whole operator: the ops' own certificates


def exact_norm(layer: nn.Module, x: torch.Tensor) -> float:
    """sigma_1 of the layer's Jacobian at one sample (its linear part: the Jacobian of an affine map)."""
    jac = torch.func.jacrev(lambda v: layer(v.unsqueeze(0)).squeeze(0))(x[0])
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x[0].numel()), 2))


LAYERS = {
    "linear": (lambda: nn.Linear(12, 7), (12,)),
    "conv2d zeros": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 10, 10)),
    "conv2d stride 2": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 9)),
    "conv2d dilation groups": (lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding=2), (4, 9, 9)),
    "conv2d circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
    "conv2d reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 7, 7)),
    "conv2d replicate": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate"), (2, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 5, padding=2), (3, 16)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 5, 5, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
    "avg_pool": (lambda: nn.AvgPool2d(3, stride=2), (2, 9, 9)),
    "batch_norm": (lambda: _batch_norm(), (4, 5, 5)),
}


def _batch_norm() -> nn.Module:
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.2, 3.0)
    bn.weight.data.uniform_(-2.0, 2.0)
    return bn


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = LAYERS[name]
    return factory().to(DT).eval(), torch.randn(2, *shape, dtype=DT)


@pytest.mark.parametrize("policy", [lipreg.BoundPolicy(), PER_OP], ids=["dense", "per-op"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_estimate_below_exact_below_certified(name, policy):
    layer, x = make(name)
    exact = exact_norm(layer, x)
    est = lipreg.LipschitzEstimator(layer, x, dtype=DT, fuse=False, policy=policy)
    estimate = float(est(n_iter=5))
    certified = float(est.certified_bound())
    if est.certified:  # closed forms (batch norm): est() is the certificate itself
        assert estimate >= exact
    else:
        assert estimate <= exact * (1 + 1e-9)
    assert certified >= exact * (1 - 1e-9)
    tight = name in ("linear", "conv2d circular", "batch_norm") or policy.dense_entries > 0
    if tight:  # dense, diagonal and circular stride-1 operators are certified exactly
        assert certified == pytest.approx(exact, rel=1e-5)
    elif name in ("conv2d zeros", "conv1d", "conv3d"):  # zero padding, stride 1: the FFT embedding is tight
        assert certified <= 1.01 * exact


def test_layer_bounds_certified_cover_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
                          nn.Linear(36, 5)).to(DT)
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    est.converge()
    estimates, certified = est.layer_bounds(), est.layer_bounds(certified=True)
    assert estimates.keys() == certified.keys()
    assert exact_norm(model[0], x) <= certified["0"] <= exact_norm(model[0], x) * (1 + 2e-6)  # the 1e-6 margin
    assert certified["2"] == 2.0 and certified["1"] == 1.0  # overlapping 3x3/2 max pool, ReLU
    assert all(certified[k] >= estimates[k] * (1 - 1e-9) for k in estimates)


def test_certified_bound_is_differentiable_only_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 2, 4, 4))
    plain = est.certified_bound()
    assert plain.grad_fn is None and not plain.requires_grad  # no autograd graph kept
    differentiable = est.certified_bound(differentiable=True)
    assert torch.equal(plain, differentiable.detach())
    differentiable.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in (model[0].weight, model[3].weight))


def test_estimates_say_they_are_not_certified():
    """A power-method bound is flagged; a greedy SeqLip certificate falls back to AutoLip's, with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(2, 6)
    autolip = lipreg.LipschitzEstimator(model, x)
    autolip()
    assert not autolip.certified
    greedy = lipreg.LipschitzEstimator(model, x, method="seqlip", search="greedy")
    greedy()
    assert not greedy.certified
    with pytest.warns(UserWarning, match="cannot be certified"):
        fallback = greedy.certified_bound()
    assert float(fallback) == pytest.approx(float(autolip.certified_bound()), rel=1e-6)
    exact = lipreg.LipschitzEstimator(model, x, method="seqlip", search="exact")
    exact()
    assert exact.certified
    assert float(exact.certified_bound()) <= float(autolip.certified_bound()) * (1 + 1e-6)


def test_per_operator_route_on_a_whole_network():
    """Operators too large for a dense matrix: fused segments with reshapes and batch norm are certified as the
    product of their ops' certificates (reshapes count 1), still above the converged estimate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 5)).to(DT).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 1, 8, 8, dtype=DT), dtype=DT, policy=PER_OP)
    estimate = float(est.converge(tol=1e-10).detach())
    certified = float(est.certified_bound().detach())
    assert estimate <= certified <= 1.5 * estimate


def test_a_product_that_underflows_float64_is_rounded_up_not_to_zero():
    """Twelve gains of 1e-30: the true constant 1e-360 is below float64's range, so the product of the certified
    factors underflows to 0 (below the truth); the certificate must be the smallest positive number instead. (Fused,
    the segment's own float64 matrix underflows before any scaling: still open.)"""
    layers = [nn.Linear(2, 2, bias=False) for _ in range(12)]
    for layer in layers:
        layer.weight.data = 1e-30 * torch.eye(2, dtype=DT)
    model = nn.Sequential(*layers).to(DT)
    est = lipreg.LipschitzEstimator(model, torch.zeros(1, 2, dtype=DT), dtype=DT, fuse=False)
    assert float(est.certified_bound()) > 0.0

"""Certificates below the truth (issue 16, classes 3, 6 and 8, and NaN weights), each against an independent
exact reference: the SVD of a float64 ``jacrev`` Jacobian, or of the matrix itself."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lipreg
from lipreg.linalg.certify import dense_spectral_bound, gram_spectral_bound

DT = torch.float64
POLICIES = {"dense": lipreg.BoundPolicy(), "per-op": lipreg.BoundPolicy(dense_entries=0),
            "fft": lipreg.BoundPolicy(dense_entries=0, conv_dense_entries=0)}


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """``||J||_2`` of the model at the sample ``x[:1]`` (float64): the exact constant of a linear model."""
    jac = torch.func.jacrev(lambda v: model(v))(x[:1].to(DT)).detach()
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x[:1].numel()), 2))


def certified(model: nn.Module, x: torch.Tensor, policy: lipreg.BoundPolicy) -> float:
    return float(lipreg.LipschitzEstimator(model, x, dtype=DT, policy=policy).certified_bound().detach())


def _spread(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Gains spread over two orders of magnitude, so a fold on the wrong axis is far below the truth."""
    with torch.no_grad():
        bn.weight.copy_(torch.logspace(-1, 1, bn.num_features))
    return bn


# ------------------------------------------------------------------- class 3: channel gains on the wrong axis
def _unbatched_conv_row_gains() -> tuple[nn.Module, tuple[int, ...]]:
    """Conv2d(1, 7, 3) on a per-sample (1, 9, 9), read by torch as an unbatched (C=1, 9, 9): the output is
    (7, 7, 7), channels on axis 0; BatchNorm1d(7) then scales axis 1 (the rows), not the channels."""
    return nn.Sequential(nn.Conv2d(1, 7, 3), _spread(nn.BatchNorm1d(7))), (9, 9)


def _unbatched_conv_rows_unequal() -> tuple[nn.Module, tuple[int, ...]]:
    """The same with 4 output channels and 7 rows (sizes that differ: the fold failed with a reshape error)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), _spread(nn.BatchNorm1d(7))), (9, 9)


def _unbatched_conv1d_row_scale() -> tuple[nn.Module, tuple[int, ...]]:
    """Conv1d(1, 5, 3) on an unbatched (1, 12) -> (5, 10), times a per-position scale of shape (1, 10)."""
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 5, 3)
            self.register_buffer("scale", torch.logspace(-1, 1, 10).view(1, 10))

        def forward(self, x):
            return self.conv(x) * self.scale
    return Scaled(), (12,)


CLASS_3 = {"BatchNorm1d on rows": _unbatched_conv_row_gains, "unequal sizes": _unbatched_conv_rows_unequal,
           "per-position scale": _unbatched_conv1d_row_scale}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", list(CLASS_3))
def test_channel_gains_of_an_unbatched_convolution(name, policy):
    torch.manual_seed(0)
    model, shape = CLASS_3[name]()
    model = model.to(DT).eval()
    x = torch.randn(1, *shape, dtype=DT)
    exact = jacobian_norm(model, x)
    bound = certified(model, x, POLICIES[policy])
    assert exact <= bound
    if policy == "dense":  # a gain that does not fold sends the node to its dense matrix: exact
        assert bound <= exact * (1 + 1e-5)


# ------------------------------------------------------------------- class 6: padding changed after construction
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_set_after_construction(mode, policy):
    """torch pads a non-zeros mode with ``_reversed_padding_repeated_twice``, fixed at construction: a later
    ``.padding`` is what the module reports, not what it computes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=2, padding_mode=mode).to(DT)
    conv.padding = (1, 1)
    x = torch.randn(1, 2, 7, 7, dtype=DT)
    exact = jacobian_norm(conv, x)
    assert exact <= certified(conv, x, POLICIES[policy]) <= exact * 2.5


# ------------------------------------------------------------------- class 8: underflow of the Frobenius norm
@pytest.mark.parametrize("scale", [1e-160, 1e-300, 1e150, 1e200])
@pytest.mark.parametrize("bound", ["gram0", "gram3", "dense"])
def test_tiny_and_huge_entries(bound, scale):
    W = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(0)) * scale
    exact = float(torch.linalg.matrix_norm(W / scale, 2)) * scale
    value = {"gram0": lambda: gram_spectral_bound(W, n_iter=0), "gram3": lambda: gram_spectral_bound(W, n_iter=3),
             "dense": lambda: dense_spectral_bound(W)}[bound]()
    assert exact <= float(value) <= exact * 3


# ------------------------------------------------------------------- NaN / inf weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_non_finite_weights_warn(bad, policy):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4)).to(DT)
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 2, 6, 6, dtype=DT), dtype=DT, policy=POLICIES[policy])
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bound = est.certified_bound()
    assert not torch.isfinite(bound)
    assert any("non-finite" in str(w.message) for w in caught)

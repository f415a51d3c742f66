"""Crashes the soundness fuzz found (issue 9, fuzz findings N2-N4): each now gives a bound checked against an
exact float64 reference, or a clean :class:`lipreg.UnsupportedOpError` naming the node and the fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg

DT = torch.float64


def jacobian_norm(f, x: torch.Tensor) -> float:
    """``||J_f(x)||_2`` of the per-sample map in float64 (``torch.func.jacrev``)."""
    jac = torch.func.jacrev(lambda v: f(v.unsqueeze(0)).squeeze(0))(x[0].to(DT))
    return float(torch.linalg.matrix_norm(jac.detach().reshape(-1, x[0].numel()), 2))


class PooledSum(nn.Module):
    """``max_pool1d(return_indices=True)[0]`` then a sum over ``dim`` (fuzz N3): a sum of maxes over disjoint
    windows, whose Jacobian norm is ``sqrt(#windows summed)`` at every generic point."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool1d(x, 3, stride=3, padding=1, return_indices=True)[0].sum([self.dim], keepdim=True)


@pytest.mark.parametrize("shape, dim", [((2, 1, 9), 2), ((2, 9), 1), ((2, 1, 9), 1)])
def test_pair_element_fused_with_a_reduction_is_exact(shape: tuple[int, ...], dim: int) -> None:
    model, x = PooledSum(dim), torch.randn(shape, dtype=DT)
    exact = jacobian_norm(model, x)  # disjoint windows: the pool's constant is 1, the map is exactly this
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    assert float(est.certified_bound().detach()) == pytest.approx(exact, rel=1e-5)  # rounded upwards
    assert float(est.certified_bound().detach()) >= exact
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(exact, rel=1e-6)


class PooledBatchNorm(nn.Module):
    """An unbatched ``adaptive_max_pool1d`` (``(B, 6)`` is read as ``(C, L)``) then ``F.batch_norm`` (fuzz N4)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.5)
        self.weight, self.bias = nn.Parameter(torch.randn(5) * 2), nn.Parameter(torch.randn(5))

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, self.mean, self.var, self.weight, self.bias, False, 0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.norm(F.adaptive_max_pool1d(x, (5,), return_indices=True)[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, DT])
def test_batch_norm_after_a_pair_element_is_certified(dtype: torch.dtype) -> None:
    model, x = PooledBatchNorm(), torch.randn(2, 6)
    est = lipreg.LipschitzEstimator(model, x, dtype=dtype)
    ref = model.double()
    bn_exact = jacobian_norm(ref.norm, torch.randn(1, 5, dtype=DT))  # the affine batch norm: its exact norm
    (bn_factor,) = [v for name, v in est.layer_bounds(certified=True).items() if "batch_norm" in name]
    assert bn_factor >= bn_exact
    assert bn_factor == pytest.approx(bn_exact, rel=max(16 * torch.finfo(dtype).eps, 1e-5))  # rounded upwards
    certified = float(est.certified_bound().detach())
    for _ in range(5):
        assert certified >= jacobian_norm(ref, torch.randn(1, 6, dtype=DT))


def test_pool_indices_are_refused_where_used_and_dropped_where_not() -> None:
    class Unpacked(nn.Module):
        def __init__(self, use_indices: bool) -> None:
            super().__init__()
            self.use_indices = use_indices

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, indices = F.max_pool1d(x, 2, return_indices=True)
            return values + indices if self.use_indices else values

    x = torch.randn(2, 1, 8, dtype=DT)
    est = lipreg.LipschitzEstimator(Unpacked(False), x, dtype=DT)
    assert float(est.certified_bound().detach()) == pytest.approx(jacobian_norm(Unpacked(False), x), rel=1e-9)
    with pytest.raises(lipreg.UnsupportedOpError, match="indices"):
        lipreg.LipschitzEstimator(Unpacked(True), x, dtype=DT)


class AvgPool3dHead(nn.Module):
    """``F.avg_pool3d``, which has no bfloat16 kernel on CPU (fuzz N2), between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(F.avg_pool3d(x, 2, stride=2, padding=1))


def test_op_without_a_kernel_in_the_dtype_is_refused_at_construction() -> None:
    x = torch.randn(2, 2, 5, 4)
    torch.manual_seed(0)
    model = AvgPool3dHead()
    try:
        F.avg_pool3d(x.bfloat16(), 2)
    except (RuntimeError, NotImplementedError):
        pass
    else:
        pytest.skip("this torch build has a bfloat16 avg_pool3d kernel on CPU")
    with pytest.raises(lipreg.UnsupportedOpError) as info:
        lipreg.LipschitzEstimator(model, x, dtype=torch.bfloat16)
    message = str(info.value)
    assert "avg_pool3d" in message and "bfloat16" in message and "dtype=torch.float32" in message
    assert "test_crashes.py" in message  # the source line of the op
    est = lipreg.LipschitzEstimator(model, x, dtype=torch.float32)  # the fix the message gives works
    assert float(est.certified_bound().detach()) >= jacobian_norm(model.double(), x.double())

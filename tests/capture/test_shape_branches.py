"""Python branches on shapes (``if g > x.shape[1]:``, as deel-lip's GroupSort has) are followed at the example's
shape; a branch on a tensor's values, the input's or a parameter's, is still refused. Each bound is checked against
float64 Jacobian norms of the model itself."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg
from lipreg.errors import UnsupportedOpError

DT = torch.float64


class GroupSort(nn.Module):
    """deel-lip's ``group_sort``: a branch on the input's size, then a sort of groups (min / max for pairs)."""

    def __init__(self, group_size: int | None) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        if g is None or g > x.shape[1]:
            g = x.shape[1]
        if x.shape[1] % g != 0:
            raise ValueError("the size must be a multiple of the group size")
        groups = x.view(x.shape[0], x.shape[1] // g, g)
        if g == 2:
            return torch.cat([groups.min(2, keepdim=True)[0], groups.max(2, keepdim=True)[0]], 2).view(x.shape)
        return torch.sort(groups, dim=2)[0].reshape(x.shape)


class ScaleIfWide(nn.Module):
    """``3 x`` when the input has more than 4 features (in any of the forms of a size), ``x`` otherwise."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = {"shape": lambda: x.shape[-1], "size": lambda: x.size(1), "numel": lambda: x.numel() // x.size(0),
                "dim": lambda: 5 if x.dim() == 2 else 0}[self.form]()
        if size > 4:
            return 3 * x
        return x


def jacobian_max(model: nn.Module, n_in: int, n: int = 200) -> float:
    torch.manual_seed(1)
    return max(float(torch.linalg.matrix_norm(torch.func.jacrev(model)(3 * torch.randn(1, n_in, dtype=DT))
                                              .reshape(-1, n_in), 2)) for _ in range(n))


@pytest.mark.parametrize("group_size", [2, 3, None])
def test_a_group_sort_with_a_branch_on_the_size_is_bounded(group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), GroupSort(group_size), nn.Linear(6, 3)).to(DT).eval()
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    certified = float(est.certified_bound())
    assert certified >= jacobian_max(model, 4)
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    per_layer = float(torch.linalg.matrix_norm(W1, 2) * torch.linalg.matrix_norm(W2, 2))
    assert certified <= per_layer * (2 ** 0.5 if group_size == 2 else 1.0) * (1 + 1e-4)  # sort: 1; min | max: sqrt 2


@pytest.mark.parametrize("form", ["shape", "size", "numel", "dim"])
@pytest.mark.parametrize("width, constant", [(6, 3.0), (3, 1.0)])
def test_the_branch_taken_is_the_one_at_the_examples_shape(form, width, constant):
    model = ScaleIfWide(form)
    x = torch.randn(2, width, dtype=DT)
    certified = float(lipreg.LipschitzEstimator(model, x, dtype=DT).certified_bound())
    expected = constant if form != "dim" else 3.0
    assert certified == pytest.approx(expected, rel=1e-6) and certified >= jacobian_max(model, width, n=5)


class ValueBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -2 * x


class ParameterBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w.abs().sum() > x.shape[1]:  # a parameter's value beside a shape: still a value
            return 5 * x
        return x


@pytest.mark.parametrize("model", [ValueBranch(), ParameterBranch()], ids=["input value", "parameter value"])
def test_a_branch_on_values_is_still_refused(model):
    with pytest.raises(UnsupportedOpError, match="control flow that depends on tensor values"):
        lipreg.LipschitzEstimator(model, torch.randn(2, 4))

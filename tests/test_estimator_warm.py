"""A fresh estimator is warm (issue 17.5): its first ``est()`` is within 10 % of ``converge()`` on a deep residual
net, where random vectors start orders of magnitude below; the warm vectors are ordinary state (``state_dict``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def deep_residual(depth: int = 12, width: int = 8) -> nn.Module:
    """A ResNet stand-in: a stem, ``depth`` basic blocks with random batch-norm statistics, a linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), *[Block(width) for _ in range(depth)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.uniform_(0.2, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


X = torch.randn(2, 3, 8, 8)


def first_and_converged(**options) -> tuple[float, float]:
    est = lipreg.LipschitzEstimator(deep_residual(), X, **options)
    first = float(est().detach())
    return first, float(est.converge(tol=1e-6).detach())


def test_the_first_estimate_is_within_ten_percent_of_the_converged_one():
    first, converged = first_and_converged()
    assert 0.9 * converged <= first <= converged * (1 + 1e-5)  # still an estimate: from below


def test_random_vectors_start_far_below():
    """What the warm start fixes (the default before it): the same stand-in from random vectors."""
    first, converged = first_and_converged(warm_start=False)
    assert first < 0.5 * converged


def test_the_warm_state_is_restored_by_state_dict():
    warm = lipreg.LipschitzEstimator(deep_residual(), X)
    cold = lipreg.LipschitzEstimator(deep_residual(), X, warm_start=False)
    cold.load_state_dict(warm.state_dict())
    assert torch.equal(cold(), warm())


def test_warm_start_is_checked():
    with pytest.raises(TypeError, match="warm_start"):
        lipreg.LipschitzEstimator(deep_residual(depth=1), X, warm_start=1)


def test_operators_new_after_a_retrace_are_warm_too():
    model = deep_residual()
    est = lipreg.LipschitzEstimator(model, X)
    torch.manual_seed(1)
    model[-1] = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.warns(UserWarning, match="the model changed"):
        first = float(est().detach())
    assert first >= 0.9 * float(est.converge(tol=1e-6).detach())

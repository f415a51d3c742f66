"""Cases a review found where a bound came out below the true Lipschitz constant; each checked against an
independent exact reference (the SVD of the dense Jacobian of a linear model, or brute force over patterns)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import lipreg

DT = torch.float64


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """||J|| at one sample: the exact Lipschitz constant of a linear (affine) model."""
    jac = torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0))(x[0])
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x[0].numel()), 2))


def assert_sound(model: nn.Module, x: torch.Tensor, true: float) -> None:
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    assert float(est.converge(tol=1e-12).detach()) >= true * (1 - 1e-9)
    assert float(est.certified_bound().detach()) >= true


class BroadcastShift(nn.Module):
    """``x[:, None] + p``: every entry of x copied 5 times (norm sqrt 5), not an identity."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1, 5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, None, :] + self.p


class DuelingHead(nn.Module):
    """``V(x) + A(x)`` with V of width 1 broadcast over A's 6 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.v, self.a = nn.Linear(4, 1), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(x) + self.a(x)


class ScaledLinear(nn.Linear):
    """A subclass that changes what the layer computes must not inherit nn.Linear's rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(x)


class SizedTranspose(nn.Module):
    """``output_size`` implies an output padding the module's attribute does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.ConvTranspose1d(1, 1, 3, stride=2, padding=1, bias=False)
        nn.init.ones_(self.c.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x, output_size=[2 * x.shape[-1]])


@pytest.mark.parametrize("factory, shape", [(BroadcastShift, (8,)), (DuelingHead, (4,)),
                                            (lambda: ScaledLinear(5, 3), (5,)), (SizedTranspose, (1, 1))],
                         ids=["broadcast shift", "broadcast sum", "subclass forward", "output_size"])
def test_linear_models_are_bounded_by_their_exact_norm(factory, shape):
    torch.manual_seed(0)
    model = factory().to(DT)
    x = torch.randn(2, *shape, dtype=DT)
    assert_sound(model, x, jacobian_norm(model, x))


@pytest.mark.parametrize("seed", range(10))
def test_certified_exact_seqlip_is_rounded_upwards(seed):
    """float32, a 10 -> 6 -> 3 ReLU net whose every activation pattern is reachable (W1 of full row rank): the
    true constant is max_D ||W2 D W1||, and the certificate must not fall below it by rounding."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    w1, w2 = model[0].weight.double(), model[2].weight.double()
    true = max(float(torch.linalg.matrix_norm(w2 @ torch.diag(torch.tensor(p, dtype=DT)) @ w1, 2))
               for p in itertools.product((0.0, 1.0), repeat=6))
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 10), method="seqlip", search="exact")
    est()
    assert est.certified
    assert float(est.certified_bound().detach()) >= true

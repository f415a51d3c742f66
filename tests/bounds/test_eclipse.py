"""ECLipsE-Fast against independent references: the brute-force max over activation patterns (every slope-based
certificate must reach it, globally and per row), local Jacobian norms, the AutoLip product, and its floating-point
check (a bound below the proposal is refused)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg
from lipreg import BoundPolicy
from lipreg.bounds.eclipse import certified_eclipse, eligible, multipliers, proposals, verified
from tests.bounds.references import DT, local_max, mlp, pair_rows, vertex_max, weights


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("act,lo,hi", [(nn.ReLU, 0.0, 1.0), (lambda: nn.LeakyReLU(0.1), 0.1, 1.0),
                                       (nn.Sigmoid, 0.0, 0.25)])
def test_global_bound_between_the_exact_constant_and_autolip(seed, act, lo, hi):
    model = mlp([4, 5, 6, 3], act=act, seed=seed)
    Ws = weights(model)
    bound = float(certified_eclipse(Ws[:-1], [(lo, hi)] * 2, Ws[-1]))
    exact = float(vertex_max(Ws, lo, hi))
    autolip = float(torch.stack([torch.linalg.matrix_norm(W, 2) for W in Ws]).prod()) * hi ** 2
    assert float(local_max(model, 4, n=100)) <= exact <= bound <= autolip


@pytest.mark.parametrize("seed", range(3))
def test_per_row_bounds_reach_each_rows_exact_constant(seed):
    model = mlp([3, 5, 4, 4], seed=seed)
    Ws = weights(model)
    rows = pair_rows(4) @ Ws[-1]  # the head's pair rows w_i - w_j
    bounds = certified_eclipse(Ws[:-1], [(0.0, 1.0)] * 2, rows, per_row=True)
    exact = vertex_max(Ws[:-1] + [Ws[-1]], 0.0, 1.0, rows=pair_rows(4))
    lower = local_max(model, 3, n=100, rows=pair_rows(4))
    assert bool((lower <= exact + 1e-12).all()) and bool((exact <= bounds).all())
    assert bool((bounds <= torch.linalg.vector_norm(rows, dim=1) * _body_autolip(Ws[:-1])).all())


def _body_autolip(Ws):
    return float(torch.stack([torch.linalg.matrix_norm(W, 2) for W in Ws]).prod())


def test_the_floating_point_check_refuses_a_bound_below_the_proposal():
    Ws = weights(mlp([4, 6, 5, 3], seed=7))
    lams, chol = multipliers(Ws[:-1], [(0.0, 1.0)] * 2)
    guess = float(proposals(chol, Ws[-1][None])[0])
    assert verified(Ws[:-1], [(0.0, 1.0)] * 2, lams, Ws[-1], guess * (1 + 1e-7))
    assert not verified(Ws[:-1], [(0.0, 1.0)] * 2, lams, Ws[-1], guess * (1 - 1e-7))
    assert float(certified_eclipse(Ws[:-1], [(0.0, 1.0)] * 2, Ws[-1])) <= guess * (1 + 1e-6)


def test_a_zero_layer_or_a_negative_slope_gives_no_certificate():
    Ws = weights(mlp([4, 6, 5, 3], seed=7))
    assert certified_eclipse([Ws[0], torch.zeros_like(Ws[1])], [(0.0, 1.0)] * 2, Ws[-1]) is None
    assert certified_eclipse(Ws[:-1], [(0.0, 1.0), (-0.2, 1.1)], Ws[-1]) is None  # GELU-like: a b < 0


def test_eligibility_follows_the_policy():
    assert eligible([64, 256, 256, 10], BoundPolicy())
    assert not eligible([64, 256, 256, 10], BoundPolicy(dense_entries=1000))
    assert not eligible([4000, 10, 10], BoundPolicy())  # the verified matrix would be over 4 dense_entries


def test_estimator_uses_eclipse_when_tighter():
    model = mlp([6, 40, 40, 3], seed=1)
    x = torch.randn(2, 6, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    bound = float(est.certified_bound().detach())
    Ws = weights(model)
    alone = float(certified_eclipse(Ws[:-1], [(0.0, 1.0)] * 2, Ws[-1]))
    assert "eclipse" in est.certificate and bound <= alone * (1 + 1e-9)
    assert bound >= float(local_max(model, 6, n=100))

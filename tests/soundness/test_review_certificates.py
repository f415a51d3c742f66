"""Adversarial review of this round's certificates: every certified number against an independent exact reference.

References: the SVD of a float64 ``torch.func.jacrev`` Jacobian (exact for a linear model), and for piecewise-linear
nets with one hidden layer of ``h <= n_in`` units in general position (all ``2^h`` activation patterns are realised)
the exact constant ``max_D ||W_2 D W_1||`` over the patterns ``D``, brute force; per pair ``max_D ||(e_i - e_j)^T
W_2 D W_1||``. Deeper nets get sampled Jacobians (a lower bound of the truth). A certified value below a reference
(beyond ``1e-9`` relative) is a violation.
"""
from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
import lipreg.bounds.certificates as certificates
import lipreg.margins as margins

DT = torch.float64
TOL = 1e-9
POLICIES = {"dense": lipreg.BoundPolicy(), "per-op": lipreg.BoundPolicy(dense_entries=0),
            "fft": lipreg.BoundPolicy(dense_entries=0, conv_dense_entries=0)}
NO_SEQLIP = lipreg.BoundPolicy(exact_search_units=0)
"""Exact SeqLip off (``search="auto"`` plans greedy searches, never certified): LipLT and ECLipsE are tested."""


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """``||J||_2`` of ``model`` at ``x`` in float64: the exact constant of a linear model."""
    model = model.to(DT)
    jac = torch.func.jacrev(lambda v: model(v))(x.to(DT)).detach()
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2))


def certify(model: nn.Module, x: torch.Tensor, **options) -> tuple[float, float]:
    """``certified_bound()`` and the product of ``layer_bounds(certified=True)``."""
    est = lipreg.LipschitzEstimator(model, x, **options)
    product = 1.0
    for value in est.layer_bounds(certified=True).values():
        product *= value
    return float(est.certified_bound()), product


# ------------------------------------------------------------------- regression: NaN candidates
def test_all_zero_weights_certify_zero_not_nan():
    """Exact SeqLip on all-zero weights gives NaN (0 / 0); the tightest certificate took it (``torch.min``
    propagates NaN), so ``certified_bound()`` was NaN for a constant model and warned of an overflow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.5), nn.Linear(4, 4), nn.LeakyReLU(0.5), nn.Linear(4, 3))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.zero_()
    x = torch.randn(1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bound = float(lipreg.LipschitzEstimator(model, x).certified_bound())
        pairs = lipreg.MarginCertificate(model, x).certified()
    assert bound >= jacobian_norm(model, x) == 0.0
    assert bool((pairs == 0).all())


def test_tightest_skips_nan_candidates_only_where_others_exist():
    nan = float("nan")
    name, best = certificates.tightest({"seqlip": torch.tensor([nan, nan]), "liplt": torch.tensor([2.0, nan])})
    assert name == "liplt" and best[0] == 2.0 and bool(best[1].isnan())

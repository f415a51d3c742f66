"""Property: the converged AutoLip bound is never below a local Jacobian norm, over random small architectures.

Any ``||J_f(x)||_2`` is a lower bound of ``L(f) = sup_x ||J_f(x)||_2`` (Rademacher), so a bound under one of them is
wrong. The local norms come from ``lipreg.metrics.lower_bound`` (power iteration with forward- and reverse-mode
autodiff, then gradient ascent on the inputs), which shares no code with the estimator.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipreg
from lipreg.metrics import lower_bound

DT = torch.float64

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky0.1": lambda: nn.LeakyReLU(0.1),
    "leaky2": lambda: nn.LeakyReLU(2.0),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu2": lambda: nn.ELU(2.0),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(threshold=40.0),  # in float64 the default threshold 20 jumps: refused
    "hardtanh": nn.Hardtanh,
}


class Residual(nn.Module):
    """x + g(x) with g = linear -> activation -> linear."""

    def __init__(self, width: int, act: str) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(width, width), ACTIVATIONS[act](), nn.Linear(width, width))

    def forward(self, x):
        return x + self.g(x)


class Branches(nn.Module):
    """cat(a(x), act(b(x))), with a and b linear."""

    def __init__(self, width: int, act: str, out: tuple[int, int]) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(width, out[0]), nn.Linear(width, out[1]), ACTIVATIONS[act]()

    def forward(self, x):
        return torch.cat([self.a(x), self.act(self.b(x))], dim=1)


def batch_norm(channels: int) -> nn.Module:
    bn = nn.BatchNorm1d(channels)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 2.0)
    bn.weight.data.normal_()
    return bn


widths = st.integers(2, 5)
acts = st.sampled_from(sorted(ACTIVATIONS))
blocks = st.one_of(
    st.tuples(st.just("linear"), widths),
    st.tuples(st.just("act"), acts),
    st.tuples(st.just("residual"), acts),
    st.tuples(st.just("branches"), acts, widths, widths),
    st.tuples(st.just("bn")),
)
convs = st.one_of(
    st.none(),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), acts,
              st.sampled_from(["none", "max", "avg"]), st.integers(2, 3), st.integers(1, 2)),
)


def build(conv, mlp, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A model from its description: an optional Conv1d -> [BN] -> activation -> [pool] stem on (2, 7) inputs,
    then linear, activation, residual, concatenation and batch-norm blocks on vectors, then a linear head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if conv is None:
        in_shape, width = (4,), 4
    else:
        channels, kernel, padding, bn, act, pool, pool_kernel, pool_stride = conv
        in_shape, length = (2, 7), 7 + 2 * padding - kernel + 1
        layers += [nn.Conv1d(2, channels, kernel, padding=padding)] + ([batch_norm(channels)] if bn else [])
        layers.append(ACTIVATIONS[act]())
        if pool != "none":
            layers.append((nn.MaxPool1d if pool == "max" else nn.AvgPool1d)(pool_kernel, pool_stride))
            length = (length - pool_kernel) // pool_stride + 1
        layers.append(nn.Flatten())
        width = channels * length
    for block in mlp:
        if block[0] == "linear":
            layers.append(nn.Linear(width, block[1]))
            width = block[1]
        elif block[0] == "act":
            layers.append(ACTIVATIONS[block[1]]())
        elif block[0] == "residual":
            layers.append(Residual(width, block[1]))
        elif block[0] == "branches":
            layers.append(Branches(width, block[1], (block[2], block[3])))
            width = block[2] + block[3]
        else:
            layers.append(batch_norm(width))
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers).to(DT).eval(), in_shape


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conv=convs, mlp=st.lists(blocks, max_size=4), seed=st.integers(0, 2**16), fuse=st.booleans())
def test_bound_is_never_below_a_local_jacobian_norm(conv, mlp, seed, fuse):
    """The converged estimate, and the certified bound always (it never relies on convergence), are >= the
    largest local Jacobian norm found by gradient ascent (the certificate, the tightest of AutoLip, LipLT, ECLipsE
    and exact SeqLip, may be below AutoLip's converged estimate)."""
    model, in_shape = build(conv, mlp, seed)
    x = 2 * torch.randn(4, *in_shape, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT, fuse=fuse)
    upper = float(est.converge(tol=1e-10).detach())
    certified = float(est.certified_bound().detach())
    lower = float(lower_bound(model, x, ascent_steps=2, lr=0.5, n_iter=10))
    assert upper >= lower * (1 - 1e-6), (upper, lower)
    assert certified >= lower, (certified, lower)

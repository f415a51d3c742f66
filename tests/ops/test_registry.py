"""The rule registry's scope: ``unregister_rule`` and ``registered`` leave the global registry as they found it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg
from lipreg.ops import Activation, Constant, registered, unregister_rule

DT = torch.float64


def rule_of(model: nn.Module, x: torch.Tensor) -> str:
    """How the estimator describes the rule of the model's one nonlinear node."""
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    (node,) = [n for n in est.graph.nodes[1:] if not n.is_linear]
    return node.rule.describe()


def sine() -> nn.Module:
    class Sine(nn.Module):
        def forward(self, x):
            return torch.sin(x)

    return nn.Sequential(nn.Linear(3, 3), Sine()).to(DT)


def test_registered_rule_is_gone_after_the_block():
    x = torch.randn(2, 3, dtype=DT)
    with registered(torch.sin, Activation(-1.0, 1.0)):
        assert rule_of(sine(), x) == "Activation[-1, 1]"
    with pytest.raises(lipreg.UnsupportedOpError, match="no Lipschitz rule for torch.sin"):
        lipreg.LipschitzEstimator(sine(), x)


def test_registered_restores_a_built_in_rule_and_a_refusal():
    x = torch.randn(2, 3, dtype=DT)
    relu = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).to(DT)
    with registered(nn.ReLU, Constant(2.0)):
        assert rule_of(relu, x) == "Constant(2)"
    assert rule_of(relu, x) == "Activation[0, 1]"
    norm = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).to(DT)
    with registered(nn.LayerNorm, 3.0):
        assert rule_of(norm, x) == "Constant(3)"
    with pytest.raises(lipreg.UnsupportedOpError, match="LayerNorm"):
        lipreg.LipschitzEstimator(norm, x)

    class MyNorm(nn.LayerNorm):  # a subclass keeps the refusal of its registered base, as before
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(lipreg.UnsupportedOpError, match="standard deviation"):
        lipreg.LipschitzEstimator(nn.Sequential(nn.Linear(3, 3), MyNorm(3)).to(DT), x)


def test_an_invalid_rule_changes_nothing():
    """A rejected registration leaves the previous rule, refusal included: kept by a subclass even where it
    overrides ``forward`` (which, were the refusal dropped, would be traced through and bounded)."""
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return x

    for bad, error in (("1.0", TypeError), (-1.0, ValueError)):
        with pytest.raises(error):
            lipreg.register_rule(nn.LayerNorm, bad)
        with pytest.raises(lipreg.UnsupportedOpError, match="standard deviation"):
            lipreg.LipschitzEstimator(nn.Sequential(nn.Linear(3, 3), MyNorm(3)), torch.randn(2, 3))


def test_registered_restores_even_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with registered(torch.sin, 1.0):
            raise RuntimeError("inside")
    with pytest.raises(lipreg.UnsupportedOpError, match="no Lipschitz rule"):
        lipreg.LipschitzEstimator(sine(), torch.randn(2, 3, dtype=DT))


def test_unregister_rule():
    x = torch.randn(2, 3, dtype=DT)
    with registered(torch.sin, 1.0):
        unregister_rule(torch.sin)
        with pytest.raises(lipreg.UnsupportedOpError, match="no Lipschitz rule for torch.sin"):
            lipreg.LipschitzEstimator(sine(), x)
    with pytest.raises(KeyError):
        unregister_rule(torch.sin)

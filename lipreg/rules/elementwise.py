"""Elementwise activations with their exact slope intervals ``[a, b]`` (``inf/sup`` of the derivative).

AutoLip uses ``max(|a|, |b|)``; SeqLip uses the interval itself (paper eq. 7-8 need ``a >= 0``).
"""
from __future__ import annotations

import operator
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Activation
from .registry import register_rule


@lru_cache(maxsize=None)
def numeric_slope_range(name: str, approximate: str = "none") -> tuple[float, float]:
    """``[inf f', sup f']`` for GELU / SiLU, whose extreme slopes have no closed form.

    Found on a float64 grid of step 2e-5 over [-12, 12] (both extrema lie near +-1.4 for GELU and +-2.4 for
    SiLU, and f' is flat outside), then widened by 1e-7, far above the grid's O(h^2) error, so the interval
    contains the true one: GELU [-0.1700, 1.1290], SiLU [-0.0998, 1.0998].
    """
    fn: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda x: F.gelu(x, approximate=approximate)) if name == "gelu" else F.silu
    )
    x = torch.linspace(-12.0, 12.0, 1_200_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(fn(x).sum(), x)
    return float(slope.min()) - 1e-7, float(slope.max()) + 1e-7


def _leaky_relu(negative_slope: float) -> Activation:
    return Activation(min(negative_slope, 1.0), max(negative_slope, 1.0))


def _elu(alpha: float) -> Activation:
    """ELU: slope 1 for x > 0, ``alpha * e^x`` in (0, alpha) for x < 0."""
    return Activation(min(0.0, alpha), max(1.0, alpha))


def _gelu(approximate: str) -> Activation:
    return Activation(*numeric_slope_range("gelu", approximate))


UNIT = Activation(0.0, 1.0)  # ReLU, ReLU6, tanh, hardtanh, softplus, clamp: derivative in [0, 1]
_unit_targets = [nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus,
                 F.relu, F.relu6, F.hardtanh, F.softplus, torch.relu, torch.tanh, F.tanh, torch.clamp,
                 "relu", "tanh", "clamp", "clip", torch.clip]
for _target in _unit_targets:
    register_rule(_target, UNIT)

for _target in (torch.abs, operator.abs, "abs", "__abs__"):
    register_rule(_target, Activation(-1.0, 1.0))  # |x|' = sign(x)

for _target in (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"):
    register_rule(_target, Activation(0.0, 0.25))  # sigma' = sigma (1 - sigma) <= 1/4

register_rule(nn.LeakyReLU, lambda info: _leaky_relu(float(info.module.negative_slope)))
register_rule(F.leaky_relu, lambda info: _leaky_relu(float(info.arg(1, "negative_slope", 0.01))))
register_rule(nn.ELU, lambda info: _elu(float(info.module.alpha)))
register_rule(F.elu, lambda info: _elu(float(info.arg(1, "alpha", 1.0))))
register_rule(nn.GELU, lambda info: _gelu(str(info.module.approximate)))
register_rule(F.gelu, lambda info: _gelu(str(info.arg(1, "approximate", "none"))))
for _target in (nn.SiLU, F.silu):
    register_rule(_target, lambda info: Activation(*numeric_slope_range("silu")))

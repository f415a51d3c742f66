"""Elementwise activations with their exact slope intervals ``[a, b]`` (``inf/sup`` of the derivative); the
discontinuous ones (hardshrink, a threshold whose value differs from it) are refused.

AutoLip uses ``max(|a|, |b|)``; SeqLip uses the interval itself (paper eq. 7-8 need ``a >= 0``). Softplus is
accepted only with a threshold whose jump rounds away in the dtype it runs in (:func:`_softplus`).
"""
from __future__ import annotations

import itertools
import math
import operator
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Activation, NodeInfo, Refuse
from .registry import register_rule


_NUMERIC = {"gelu": F.gelu, "silu": F.silu, "mish": F.mish}


@lru_cache(maxsize=None)
def numeric_slope_range(name: str, approximate: str = "none") -> tuple[float, float]:
    """``[inf f', sup f']`` for GELU / SiLU / Mish, whose extreme slopes have no closed form.

    Found on a float64 grid of step 2e-5 over [-12, 12] (the extrema lie near +-1.41 for GELU, +-2.40 for SiLU,
    -2.26 and 1.49 for Mish, and f' is flat outside), then widened by 1e-7, far above the grid's O(h^2) error, so the
    interval contains the true one: GELU [-0.1289, 1.1289], SiLU [-0.0998, 1.0998], Mish [-0.1125, 1.0885].
    """
    fn: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda x: F.gelu(x, approximate=approximate)) if name == "gelu" else _NUMERIC[name]
    )
    x = torch.linspace(-12.0, 12.0, 1_200_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(fn(x).sum(), x)
    return float(slope.min()) - 1e-7, float(slope.max()) + 1e-7


UNIT = Activation(0.0, 1.0)  # ReLU, ReLU6, tanh, hardtanh, softplus, clamp: derivative in [0, 1]


def _leaky_relu(negative_slope: float) -> Activation:
    return Activation(min(negative_slope, 1.0), max(negative_slope, 1.0))


def _elu(alpha: float) -> Activation:
    """ELU: slope 1 for x > 0, ``alpha * e^x`` in (0, alpha) for x < 0."""
    return Activation(min(0.0, alpha), max(1.0, alpha))


def _gelu(approximate: str) -> Activation:
    return Activation(*numeric_slope_range("gelu", approximate))


def softplus_jump(beta: float, threshold: float) -> float:
    """The jump ``log(1 + e^-t) / |beta|`` of torch's softplus at ``x0 = t / beta``, where it switches to ``x``."""
    return math.inf if beta == 0 else math.log1p(math.exp(-threshold)) / abs(beta)


def _rounds_away(jump: float, switch: float, dtype: torch.dtype) -> bool:
    """Whether a jump at ``switch`` is under an eighth of ``eps |switch|``, so under half an ulp of any output
    past the switch (``ulp(x) > eps |x| / 2``): a factor 2 of margin for the rounding of ``beta x`` and of the
    smooth branch."""
    return jump <= abs(switch) * torch.finfo(dtype).eps / 8


def _softplus(info: NodeInfo, beta: float, threshold: float) -> Activation | Refuse:
    """Softplus ``s(x) = log(1 + e^(beta x)) / beta``, slopes ``sigmoid(beta x)`` in ``[0, 1]``, for a threshold
    whose jump rounds away; refused otherwise.

    torch returns ``x`` instead of ``s(x)`` where ``beta x > t``. At ``x0 = t / beta`` the two branches differ by
    ``J = log(1 + e^-t) / |beta| > 0``: as a function of real numbers the op is discontinuous for every finite
    ``t``, so it has no Lipschitz constant, and no jump is small enough to ignore in a certificate. What can be
    certified is the function the floating-point op computes. Past the switch ``s(x) = x + r(x)`` with
    ``0 < r(x) <= J`` and ``|x| > |x0|``; when ``J`` is under half an ulp there in the dtype the op runs in
    (:func:`_rounds_away`), the correctly rounded ``s(x)`` is ``x`` itself, so the thresholded op computes exactly
    what the smooth softplus rounds to, and it is certified as ``s`` (every certificate here bounds the real
    function that floating point rounds). A larger jump is a discontinuity of the computed function itself:
    refused, with its size and the smallest threshold that rounds it away.

    The default ``t = 20`` (``beta = 1``) jumps by ``e^-20 = 2.1e-9``: under the rounding of float32 (which needs
    ``t >= 16``), float16 (8) and bfloat16 (6), so certified there; over that of float64 (which needs ``t >= 35``),
    where a pair of inputs straddling ``x = 20`` a ``1e-12`` apart differs by ``2e-9``: refused in float64.
    """
    dtype = info.node.meta["tensor_meta"].dtype
    jump = softplus_jump(beta, threshold)
    if beta != 0 and _rounds_away(jump, threshold / beta, dtype):
        return UNIT
    smallest = next(t for t in itertools.count(1) if _rounds_away(softplus_jump(1.0, t), t, dtype))
    return Refuse(
        f"softplus(beta={beta:g}, threshold={threshold:g}) returns x where beta x > threshold: at x = threshold / "
        f"beta it jumps by log(1 + e^-threshold) / |beta| = {jump:.3g}, more than {dtype} rounding hides there, so "
        f"it is discontinuous, not Lipschitz. Use threshold >= {smallest} and beta != 0 (in {dtype} the jump then "
        "rounds away and the op is the smooth softplus, slopes in [0, 1])"
    )


_unit_targets = [nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh,
                 F.relu, F.relu6, F.hardtanh, torch.relu, torch.tanh, F.tanh, torch.clamp,
                 "relu", "tanh", "clamp", "clip", torch.clip]
for _target in _unit_targets:
    register_rule(_target, UNIT)
register_rule(nn.Softplus, lambda info: _softplus(info, float(info.module.beta), float(info.module.threshold)))
register_rule(F.softplus, lambda info: _softplus(info, float(info.arg(1, "beta", 1.0)),
                                                 float(info.arg(2, "threshold", 20.0))))

for _target in (torch.abs, operator.abs, "abs", "__abs__"):
    register_rule(_target, Activation(-1.0, 1.0))  # |x|' = sign(x)

for _target in (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"):
    register_rule(_target, Activation(0.0, 0.25))  # sigma' = sigma (1 - sigma) <= 1/4

# hardsigmoid(x) = relu6(x + 3) / 6: slope 1/6 on (-3, 3), 0 outside. Taken as float32's 1/6 (0.1666666716...),
# above 1/6: torch's backward multiplies by that constant, so the derivative autograd reports (what a Jacobian
# lower bound reads) stays under the bound too.
for _target in (nn.Hardsigmoid, F.hardsigmoid):
    register_rule(_target, Activation(0.0, float(torch.tensor(1.0 / 6.0, dtype=torch.float32))))
# hardswish(x) = x relu6(x + 3) / 6: slope 0 below -3, (2x + 3) / 6 in (-1/2, 3/2) on (-3, 3), 1 above 3.
for _target in (nn.Hardswish, F.hardswish):
    register_rule(_target, Activation(-0.5, 1.5))

register_rule(nn.LeakyReLU, lambda info: _leaky_relu(float(info.module.negative_slope)))
register_rule(F.leaky_relu, lambda info: _leaky_relu(float(info.arg(1, "negative_slope", 0.01))))
register_rule(nn.ELU, lambda info: _elu(float(info.module.alpha)))
register_rule(F.elu, lambda info: _elu(float(info.arg(1, "alpha", 1.0))))
register_rule(nn.GELU, lambda info: _gelu(str(info.module.approximate)))
register_rule(F.gelu, lambda info: _gelu(str(info.arg(1, "approximate", "none"))))
for _target in (nn.SiLU, F.silu):
    register_rule(_target, lambda info: Activation(*numeric_slope_range("silu")))
for _target in (nn.Mish, F.mish):
    register_rule(_target, lambda info: Activation(*numeric_slope_range("mish")))

# logsigmoid' = sigmoid(-x), tanhshrink' = tanh(x)^2, softshrink' in {0, 1}: in [0, 1]
for _target in (nn.LogSigmoid, F.logsigmoid, nn.Tanhshrink, F.tanhshrink, nn.Softshrink,
                F.softshrink):
    register_rule(_target, UNIT)
# SELU: scale for x > 0, scale alpha e^x in (0, scale alpha] for x <= 0 (torch's constants, the product rounded up)
_SELU_SCALE, _SELU_ALPHA = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
for _target in (nn.SELU, F.selu, torch.selu):
    register_rule(_target, Activation(0.0, math.nextafter(_SELU_SCALE * _SELU_ALPHA, math.inf)))


def _threshold(threshold: float, value: float) -> Activation | Refuse:
    """``x if x > threshold else value``: continuous (slopes in [0, 1]) only when ``value == threshold``."""
    if value == threshold:
        return UNIT
    return Refuse(f"threshold(x, {threshold:g}, {value:g}) jumps by {abs(threshold - value):g} at x = {threshold:g}: "
                  "it is not continuous, so not Lipschitz (use value == threshold, or relu)")


def _hardshrink(lambd: float) -> Activation | Refuse:
    """``x if |x| > lambd else 0`` jumps by ``lambd`` at ``+-lambd``; the identity when ``lambd = 0``."""
    if lambd == 0:
        return UNIT
    return Refuse(f"hardshrink(lambd={lambd:g}) jumps by {lambd:g} at x = +-{lambd:g}: it is not continuous, so not "
                  "Lipschitz (softshrink is its continuous form)")


register_rule(nn.Threshold, lambda info: _threshold(float(info.module.threshold), float(info.module.value)))
for _target in (F.threshold, torch.threshold):
    register_rule(_target, lambda info: _threshold(float(info.arg(1, "threshold")), float(info.arg(2, "value"))))
register_rule(nn.Hardshrink, lambda info: _hardshrink(float(info.module.lambd)))
for _target in (F.hardshrink, torch.hardshrink, "hardshrink"):
    register_rule(_target, lambda info: _hardshrink(float(info.arg(1, "lambd", 0.5))))

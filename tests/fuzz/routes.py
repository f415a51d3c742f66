"""Whole architectures aimed at the certificate routes (:mod:`lipreg.linalg.routes`, :mod:`lipreg.linalg.certify`,
:mod:`lipreg.bounds`): convolutions on small maps (1x1 to 8x8, every padding mode, grouped and depthwise, strided
1x1), chains of 1x1 convolutions with batch norms or gains between (the channel-product route), thin linear heads
after pooling (the dense route), and MLPs small enough for ECLipsE-Fast and exact SeqLip, ending in class logits
(the margin check of :mod:`.margins`). :func:`route_plan` draws one for :func:`tests.fuzz.arch.draw_case`."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .net import Builder, Shape, Step, call

Plan = tuple[Shape, list[Step], list[str]]
_ACTS: list[tuple[str, Any]] = [("ReLU", nn.ReLU), ("LeakyReLU(0.1)", lambda: nn.LeakyReLU(0.1)), ("Tanh", nn.Tanh),
                                ("Sigmoid", nn.Sigmoid), ("Softplus", nn.Softplus), ("GELU", nn.GELU),
                                ("ELU(2)", lambda: nn.ELU(2.0)), ("Hardswish", nn.Hardswish), ("SELU", nn.SELU)]


def _act(b: Builder) -> tuple[Step, str]:
    name, factory = b.pick(_ACTS)
    m = factory()
    b.note("route act", type(m))
    return call(b.add(m)), name


def _conv(b: Builder, s: Shape, k: int, stride: int, padding: Any, mode: str, groups: int, cout: int,
          dilation: int = 1) -> tuple[Step, Shape, str] | None:
    """A 2-d convolution (module) on ``s``, or None when its output would be empty or its padding too wide."""
    span = dilation * (k - 1) + 1
    pad = (span - 1) // 2 if padding == "same" else padding
    if mode == "reflect" and pad >= min(s[1:]) or mode == "circular" and pad > min(s[1:]):
        return None
    out = tuple(n if padding == "same" else (n + 2 * pad - span) // stride + 1 for n in s[1:])
    if min(out) < 1 or cout * math.prod(out) > 200:
        return None
    conv = nn.Conv2d(s[0], cout, k, stride, padding, dilation, groups, bias=b.chance(0.6), padding_mode=mode)
    b.note("route conv", nn.Conv2d)
    return call(b.add(conv)), (cout, *out), f"Conv2d({s[0]},{cout},k{k},s{stride},p{padding},d{dilation},g{groups},{mode})"


def small_map_convs(b: Builder) -> Plan:
    """One or two convolutions on a 1x1 to 8x8 map, every padding mode, grouped or depthwise, an activation between."""
    s0, _, steps, descs = _small_map_convs(b)
    return s0, steps, descs


def _small_map_convs(b: Builder) -> tuple[Shape, Shape, list[Step], list[str]]:
    """:func:`small_map_convs` with the output shape."""
    c = b.rng.randint(1, 3)
    s0 = s = (c, b.rng.randint(1, 8), b.rng.randint(1, 8))
    steps, descs = [], []
    for layer in range(b.rng.randint(1, 2)):
        for _attempt in range(10):
            k = b.rng.randint(1, 3)
            stride = b.pick([1, 1, 2])
            groups = b.pick([g for g in (1, s[0]) if s[0] % g == 0])
            cout = groups * b.pick([1, 1, 2])
            padding = b.pick([0, 1, 2, "same"] if stride == 1 else [0, 1, 2])
            drawn = _conv(b, s, k, stride, padding, b.pick(["zeros", "reflect", "replicate", "circular"]), groups,
                          cout, b.pick([1, 1, 2]) if k > 1 else 1)
            if drawn is not None:
                break
        else:
            break
        if layer:
            act, name = _act(b)
            steps.append(act)
            descs.append(name)
        steps.append(drawn[0])
        descs.append(drawn[2])
        s = drawn[1]
    return s0, s, steps, descs


def pointwise_chain(b: Builder) -> Plan:
    """1x1 convolutions (stride 1 or 2, zero padding or none, groups) with batch norms, ``F.batch_norm`` or
    per-channel gains between: one fused node whose norm is that of the product of channel matrices."""
    c = b.rng.randint(1, 4)
    s0 = s = (c, b.rng.randint(1, 6), b.rng.randint(1, 6))
    steps, descs = [], []
    for _ in range(b.rng.randint(2, 3)):
        groups = b.pick([g for g in (1, 2) if s[0] % g == 0])
        drawn = _conv(b, s, 1, b.pick([1, 2]), b.pick([0, 0, 1]), "zeros", groups, groups * b.rng.randint(1, 3))
        if drawn is None:
            break
        steps.append(drawn[0])
        descs.append(drawn[2])
        s = drawn[1]
        between = b.pick(["bn", "F.batch_norm", "gain", "none"])
        if between == "bn":
            bn = nn.BatchNorm2d(s[0])
            with torch.no_grad():
                bn.running_var.uniform_(0.05, 2.0)
                bn.running_mean.normal_()
                bn.weight.normal_(0, 2)
            b.note("route 1x1 chain", nn.BatchNorm2d)
            steps.append(call(b.add(bn)))
        elif between == "F.batch_norm":
            mean, var, w = b.add(torch.randn(s[0])), b.add(torch.rand(s[0]) + 0.1), b.add(2 * torch.randn(s[0]))
            b.note("route 1x1 chain", F.batch_norm)
            steps.append(lambda net, h, m=mean, v=var, g=w: F.batch_norm(h, getattr(net, m), getattr(net, v),
                                                                        getattr(net, g), None, False, 0.1, 1e-5))
        elif between == "gain":
            g = b.add(2 * torch.randn(s[0], 1, 1))
            b.note("route 1x1 chain", "mul")
            steps.append(lambda net, h, g=g: h * getattr(net, g))
        if between != "none":
            descs.append(between)
    if b.chance(0.3):
        act, name = _act(b)
        steps.append(act)
        descs.append(name)
    return s0, steps, descs


def pooled_head(b: Builder) -> Plan:
    """Convolution -> activation -> global pooling -> flatten -> a thin ``Linear(C, classes)`` (-> act -> Linear)."""
    s0, s, steps, descs = _small_map_convs(b)
    channels = s[0]
    act, name = _act(b)
    pool = b.pick(["AdaptiveAvgPool2d(1)", "mean(2,3)", "AdaptiveMaxPool2d(1)", "amax(2,3)"])
    pooled: dict[str, Step] = {"AdaptiveAvgPool2d(1)": call(b.add(nn.AdaptiveAvgPool2d(1))),
                               "mean(2,3)": lambda net, h: h.mean((2, 3)),
                               "AdaptiveMaxPool2d(1)": call(b.add(nn.AdaptiveMaxPool2d(1))),
                               "amax(2,3)": lambda net, h: h.amax((2, 3))}
    b.note("route pooled head", nn.Linear)
    steps += [act, pooled[pool], lambda net, h: h.flatten(1)]
    descs += [name, pool, "flatten"]
    width = channels
    if b.chance(0.3):
        hidden = b.rng.randint(2, 6)
        act2, name2 = _act(b)
        steps += [call(b.add(nn.Linear(width, hidden))), act2]
        descs += [f"Linear({width},{hidden})", name2]
        width = hidden
    classes = b.rng.randint(2, 5)
    steps.append(call(b.add(nn.Linear(width, classes))))
    descs.append(f"Linear({width},{classes})")
    return s0, steps, descs


def mlp(b: Builder) -> Plan:
    """``Linear -> act -> ... -> Linear(classes)``, widths 1-8: within ECLipsE-Fast's and exact SeqLip's reach."""
    widths = [b.rng.randint(1, 8) for _ in range(b.rng.randint(2, 4))] + [b.rng.randint(2, 5)]
    steps, descs = [], []
    same = b.chance(0.5)  # one activation throughout, or one per layer
    act_name, factory = b.pick(_ACTS)
    for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            if not same:
                act_name, factory = b.pick(_ACTS)
            m = factory()
            b.note("route act", type(m))
            steps.append(call(b.add(m)))
            descs.append(act_name)
        layer = nn.Linear(fin, fout, bias=b.chance(0.7))
        if b.chance(0.2):
            with torch.no_grad():
                layer.weight.mul_(b.pick([0.01, 30.0]))
        b.note("route mlp", nn.Linear)
        steps.append(call(b.add(layer)))
        descs.append(f"Linear({fin},{fout})")
    return (widths[0],), steps, descs


ROUTES = [(small_map_convs, 1.0), (pointwise_chain, 1.0), (pooled_head, 1.0), (mlp, 2.0)]


def route_plan(b: Builder) -> Plan:
    routes, weights = zip(*ROUTES)
    return b.rng.choices(routes, weights)[0](b)


"""Max pooling: ``L = sqrt(max_j #{windows containing input j})``; maxima and minima over dimensions
(``amax``, ``torch.max(x, dim)``), and of two tensors (``torch.maximum``), as its special cases; sorting
(``torch.sort``, ``topk`` along a per-sample axis: GroupSort / MaxMin activations), ``L = 1``.

Each output is the max of its window, so ``|y_w(x) - y_w(x')| <= max_{j in w} |x_j - x'_j|`` and
``||y(x) - y(x')||^2 <= sum_w ||x - x'||_{inf, w}^2 <= (max_j n_j) ||x - x'||^2``; a single spike on the most
covered input attains it. Non-overlapping windows give 1; AlexNet's 3x3 stride-2 pools give sqrt(4) = 2.
Windows are products of per-dimension intervals, so the count is the product of per-dimension counts.

An ``n``-d pool pools the last ``n`` dimensions of its input, whatever comes before them: torch takes a
``(C, *spatial)`` input as unbatched, so ``MaxPool2d`` on ``(B, H, W)`` pools each ``H x W`` plane. The pooled
dimensions are therefore read from the end of the shape, with ``n`` fixed by the op, never as ``shape[2:]``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Activation, Constant, NodeInfo, Refuse, Rule
from .registry import register_rule


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def max_cover_1d(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """The most windows of a 1-D max pool (torch's output-size rule, ceil mode included) that contain one input."""
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * padding - span
    n_out = (-(-numerator // stride) if ceil_mode else numerator // stride) + 1
    if ceil_mode and (n_out - 1) * stride >= size + padding:
        n_out -= 1  # torch drops a last window that would start in the right padding
    counts = [0] * size
    for w in range(n_out):
        for j in range(kernel):
            i = w * stride - padding + j * dilation
            if 0 <= i < size:
                counts[i] += 1
    return max(counts)


def max_cover_adaptive_1d(size: int, out: int) -> int:
    """The most windows of a 1-D adaptive pool containing one input: windows ``[floor(i n/o), ceil((i+1) n/o))``."""
    counts = [0] * size
    for i in range(out):
        for j in range(i * size // out, -(-(i + 1) * size // out)):
            counts[j] += 1
    return max(counts)


def _max_pool(info: NodeInfo, n: int) -> Constant:
    """An ``n``-d max pool (module or functional form) on the last ``n`` dimensions of its input."""
    spatial = info.in_shapes[0][-n:]
    if info.module is not None:
        m = info.module
        kernel, stride, padding, dilation, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
    else:
        kernel = info.arg(1, "kernel_size")
        stride = info.arg(2, "stride", None) or kernel
        padding, dilation = info.arg(3, "padding", 0), info.arg(4, "dilation", 1)
        ceil = info.arg(5, "ceil_mode", False)
    params = zip(spatial, _tuple(kernel, n), _tuple(stride or kernel, n), _tuple(padding, n), _tuple(dilation, n))
    cover = math.prod(max_cover_1d(s, k, st, p, d, bool(ceil)) for s, k, st, p, d in params)
    return Constant(math.sqrt(cover))


def _adaptive_max_pool(info: NodeInfo, n: int) -> Constant:
    """An ``n``-d adaptive max pool: its windows are fixed by the last ``n`` input and output sizes."""
    pairs = zip(info.in_shapes[0][-n:], info.out_shape[-n:])
    cover = math.prod(max_cover_adaptive_1d(s, o) for s, o in pairs)
    return Constant(math.sqrt(cover))


def _extremum(info: NodeInfo) -> Rule:
    """``max`` / ``min`` / ``amax`` / ``amin`` / ``maximum`` / ``minimum`` / ``fmax`` / ``fmin`` in all their forms.

    Over dimensions (``x.amax(dim)``, ``torch.max(x, dim)``'s values, ``x.max()``) each input lies in one
    window: a max pool covering each input once, ``L = 1``. Against a constant (``torch.maximum(x, c)``), an
    elementwise function with slopes in ``{0, 1}`` (its copies counted by the broadcast guard when ``c`` enlarges
    ``x``). Of two input-dependent tensors of the output's shape, ``|max(a, b) - max(a', b')| <= max(|a - a'|,
    |b - b'|)`` entrywise: ``L = 1`` jointly; broadcast, an entry of the smaller one is compared with several of
    the other, so the joint constant counts copies: refused with the fix."""
    if len(info.x_inputs) == 2:
        if info.in_shapes[0] == info.in_shapes[1] == info.out_shape:
            return Constant(1.0)
        return Refuse(f"{info.name} takes the elementwise extremum of two input-dependent tensors of different shapes "
                      f"{tuple(info.in_shapes[0])} and {tuple(info.in_shapes[1])}: expand both to the output's shape "
                      "first (x.expand(...)), whose copies lipreg counts")
    if info.out_shape.numel() < info.in_shapes[0].numel():
        return Constant(1.0)
    return Activation(0.0, 1.0)


def _order_statistics(info: NodeInfo) -> Rule:
    """``torch.sort(x, dim)`` / ``topk(x, k, dim)``: their values (the indices are integers, refused by capture) sort
    each slice along ``dim``, and sorting is non-expansive in L2: with ``x^`` the sorted ``x``, ``<x^, y^> >= <x, y>``
    (rearrangement inequality) and ``||x^|| = ||x||``, so ``||x^ - y^||^2 = ||x||^2 + ||y||^2 - 2 <x^, y^> <=
    ||x - y||^2``; slices are disjoint, and ``topk`` keeps some entries of the sorted slice (a coordinate
    projection): ``L = 1`` (GroupSort, MaxMin and FullSort activations). Sorting along axis 0 (``msort``, ``dim=0``)
    sorts the samples of a batch against each other: refused."""
    target = info.node.target
    name = target if isinstance(target, str) else target.__name__
    dim = None if name == "msort" else info.arg(2 if name == "topk" else 1, "dim", -1)
    if dim is None or dim % len(info.in_shapes[0]) == 0:
        return Refuse(f"{info.name} sorts along axis 0, the batch axis: it would compare the samples of a batch with "
                      "each other, while lipreg bounds the map of one sample. Sort along a per-sample axis "
                      "(torch.sort(x, dim=1), x.topk(k, dim=-1))")
    return Constant(1.0)


# return_indices=True dispatches F.max_pool*d to F.max_pool*d_with_indices (same arguments); the values are the
# first element of the returned pair.
_MAX_POOLS = {1: (nn.MaxPool1d, F.max_pool1d, F.max_pool1d_with_indices),
              2: (nn.MaxPool2d, F.max_pool2d, F.max_pool2d_with_indices),
              3: (nn.MaxPool3d, F.max_pool3d, F.max_pool3d_with_indices)}
_ADAPTIVE_MAX_POOLS = {1: (nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices),
                       2: (nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices),
                       3: (nn.AdaptiveMaxPool3d, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)}
for _n, _targets in _MAX_POOLS.items():
    for _target in _targets:
        register_rule(_target, partial(_max_pool, n=_n))
for _n, _targets in _ADAPTIVE_MAX_POOLS.items():
    for _target in _targets:
        register_rule(_target, partial(_adaptive_max_pool, n=_n))
for _target in (torch.max, torch.min, torch.amax, torch.amin, torch.maximum, torch.minimum, torch.fmax, torch.fmin,
                "max", "min", "amax", "amin", "maximum", "minimum", "fmax", "fmin"):
    register_rule(_target, _extremum)
for _target in (torch.sort, torch.msort, torch.topk, "sort", "msort", "topk"):
    register_rule(_target, _order_statistics)

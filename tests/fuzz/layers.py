"""Fuzz generators of linear layers, normalisation, padding and pooling, and modules whose call differs from
their class's (hooks, subclasses, spectral norm, quantization-aware training).

A generator ``g(builder, shape, preserve)`` draws one op for the per-sample ``shape`` (keeping it when
``preserve``) and returns ``(step, new_shape, description)``, or None when it does not apply.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .net import Builder, Shape, Step, TenfoldConv2d, call, times_ten_hook, times_ten_pre_hook


# ---------------------------------------------------------------------------------------------- linear ops
def g_linear(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    fin = s[-1]
    fout = fin if preserve else b.rng.randint(1, 9)
    bias = b.chance(0.7)
    if b.chance(0.5):
        name = b.add(nn.Linear(fin, fout, bias=bias))
        b.note("Linear", nn.Linear)
        return call(name), s[:-1] + (fout,), f"Linear({fin},{fout})"
    w = b.add(torch.randn(fout, fin) / math.sqrt(fin), parameter=True)
    bn = b.add(torch.randn(fout), parameter=True) if bias else None
    b.note("F.linear", F.linear)
    step = lambda net, h: F.linear(h, getattr(net, w), None if bn is None else getattr(net, bn))
    return step, s[:-1] + (fout,), f"F.linear({fin},{fout})"


def g_conv(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    d = len(s) - 1
    if d not in (1, 2, 3):
        return None
    cin = s[0]
    k = min(b.rng.randint(1, 3), *s[1:])
    stride = 1 if preserve else b.pick([1, 1, 2])
    dilation = 1 if preserve or k == 1 else b.pick([1, 1, 2])
    groups = b.pick([g for g in (1, 2, 3) if cin % g == 0])
    cout = cin if preserve else groups * b.rng.randint(1, 3)
    mode = b.pick(["zeros", "zeros", "reflect", "replicate", "circular"])
    span = dilation * (k - 1) + 1
    if preserve:
        padding: Any = "same"
    else:
        padding = b.pick(["valid", b.rng.randint(0, (k - 1) // 2 + 1)] + (["same"] if stride == 1 else []))
    pad_amount = (span - 1) if padding == "same" else (0 if padding == "valid" else padding)
    if mode != "zeros" and pad_amount >= min(s[1:]):
        mode = "zeros"
    out = [((n + 2 * (padding if isinstance(padding, int) else 0) - span) // stride + 1) if padding != "same" else n
           for n in s[1:]]
    if min(out) < 1:
        return None
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
    desc = f"Conv{d}d({cin},{cout},k{k},s{stride},p{padding},d{dilation},g{groups},{mode})"
    if b.chance(0.7) or mode != "zeros":
        name = b.add(cls(cin, cout, k, stride, padding, dilation, groups, bias=b.chance(0.6), padding_mode=mode))
        b.note("Conv", cls)
        return call(name), (cout, *out), desc
    fn = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    w = b.add(torch.randn(cout, cin // groups, *([k] * d)) / math.sqrt(cin * k ** d / groups), parameter=True)
    b.note("F.conv", fn)
    return (lambda net, h: fn(h, getattr(net, w), None, stride, padding, dilation, groups)), (cout, *out), "F." + desc


def g_conv_transpose(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    d = len(s) - 1
    if d not in (1, 2, 3):
        return None
    cin = s[0]
    k = b.rng.randint(1, 3) if not preserve else b.pick([1, 3])
    stride = 1 if preserve else b.pick([1, 2])
    padding = (k - 1) // 2 if preserve else b.rng.randint(0, (k - 1) // 2)
    output_padding = 0 if stride == 1 or preserve else b.rng.randint(0, stride - 1)
    groups = b.pick([g for g in (1, 2) if cin % g == 0])
    cout = cin if preserve else groups * b.rng.randint(1, 2)
    out = tuple((n - 1) * stride - 2 * padding + k + output_padding for n in s[1:])
    if min(out) < 1 or math.prod(out) > 400:
        return None
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1]
    desc = f"ConvTranspose{d}d({cin},{cout},k{k},s{stride},p{padding},op{output_padding},g{groups})"
    form = b.pick(["module", "module", "output_size", "functional"])
    if form == "functional":
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
        w = b.add(torch.randn(cin, cout // groups, *([k] * d)) / math.sqrt(cin * k ** d), parameter=True)
        b.note("F.conv_transpose", fn)
        return (lambda net, h: fn(h, getattr(net, w), None, stride, padding, output_padding, groups)), (cout, *out), \
            "F." + desc
    name = b.add(cls(cin, cout, k, stride, padding, output_padding if form == "module" else 0, groups))
    b.note("ConvTranspose", cls)
    if form == "output_size":
        return (lambda net, h: getattr(net, name)(h, output_size=list(out))), (cout, *out), desc + " output_size"
    return call(name), (cout, *out), desc


def g_batch_norm(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if len(s) > 4:
        return None
    c = s[0]
    mean, var = torch.randn(c), torch.rand(c) * 4 + b.pick([1e-3, 0.05, 0.5])
    weight, bias, eps = torch.randn(c) * 2, torch.randn(c), b.pick([1e-5, 1e-3, 0.1])
    if b.chance(0.3):
        rm, rv, w, bb = b.add(mean), b.add(var), b.add(weight, parameter=True), b.add(bias, parameter=True)
        b.note("F.batch_norm", F.batch_norm)
        return (lambda net, h: F.batch_norm(h, getattr(net, rm), getattr(net, rv), getattr(net, w), getattr(net, bb),
                                            False, 0.1, eps)), s, f"F.batch_norm({c},eps={eps})"
    cls = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[len(s) - 1]
    track = not b.chance(0.05)
    affine = b.chance(0.8)
    bn = cls(c, eps=eps, affine=affine, track_running_stats=track)
    if track:
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    b.note("BatchNorm" if track else "BatchNorm(no stats)", cls)
    return call(b.add(bn)), s, f"{cls.__name__}({c},eps={eps},affine={affine},track={track})"


def g_pad(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if preserve or len(s) > 4:
        return None
    d = min(len(s) - 1, 3) if len(s) > 1 else 1
    pads = [b.rng.randint(0, 2) for _ in range(2 * d)]
    mode = b.pick(["constant", "reflect", "replicate", "circular"])
    spatial = s[-d:]
    if mode != "constant" and (len(s) == 1 and mode != "reflect" or any(p >= n for p, n in zip(pads, sum(((n, n) for n in reversed(spatial)), ())))):
        mode = "constant"
    out = list(s)
    for i in range(d):
        out[len(s) - 1 - i] += pads[2 * i] + pads[2 * i + 1]
    if b.chance(0.5) or mode == "constant" and d == 3:
        value = b.pick([0.0, 1.5])
        b.note("F.pad", F.pad)
        return (lambda net, h: F.pad(h, pads, mode=mode, value=value) if mode == "constant"
                else F.pad(h, pads, mode=mode)), tuple(out), f"F.pad({pads},{mode})"
    classes = {"constant": (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d), "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
               "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
               "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)}
    cls = classes[mode][d - 1]
    if len(s) == 1 and mode != "constant":
        return None  # 1-d padding of (B, F) needs an unbatched (C, W) reading: fine for F.pad only
    b.note("Pad", cls)
    return call(b.add(cls(tuple(pads)))), tuple(out), f"{cls.__name__}({pads})"


def _pool_dims(b: Builder, s: Shape, preserve: bool) -> tuple[bool, int, Shape] | None:
    """A pool's draw of its input layout: ``(unbatched, n pooled dims, their sizes)``, or ``None`` when it cannot
    apply (a shape-preserving step is asked for, or the rank fits no 1-3d pool)."""
    if preserve:
        return None
    unbatched = b.chance(0.3)
    d = len(s) if unbatched else len(s) - 1
    if d not in (1, 2, 3):
        return None
    return unbatched, d, s[-d:]


def g_avg_pool(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    dims = _pool_dims(b, s, preserve)
    if dims is None:
        return None
    unbatched, d, spatial = dims
    if b.chance(0.3):
        out = tuple(b.rng.randint(1, n) for n in spatial)
        cls = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[d - 1]
        fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[d - 1]
        b.note("AdaptiveAvgPool" + (" unbatched" if unbatched else ""), cls, fn)
        if b.chance(0.5):
            return call(b.add(cls(out))), s[:-d] + out, f"{cls.__name__}({out}){' unbatched' if unbatched else ''}"
        return (lambda net, h: fn(h, out)), s[:-d] + out, f"F.adaptive_avg_pool{d}d({out})"
    k = min(b.rng.randint(1, 3), *spatial)
    stride = b.rng.randint(1, k)
    padding = b.rng.randint(0, k // 2)
    ceil = b.chance(0.3)
    include = b.chance(0.7)
    divisor = b.pick([None, None, None, 2, -1, 0.5]) if d > 1 else None
    if isinstance(divisor, float):
        divisor = None
    cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[d - 1]
    kwargs: dict[str, Any] = dict(stride=stride, padding=padding, ceil_mode=ceil, count_include_pad=include)
    if divisor is not None:
        kwargs["divisor_override"] = divisor
    probe = cls(k, **kwargs)(torch.zeros((2,) + s))
    out = tuple(probe.shape[1:])
    desc = f"AvgPool{d}d(k{k},{kwargs}){' unbatched' if unbatched else ''}"
    if b.chance(0.5):
        b.note("AvgPool" + (" divisor" if divisor is not None else "") + (" unbatched" if unbatched else ""), cls)
        return call(b.add(cls(k, **kwargs))), out, desc
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
    b.note("F.avg_pool" + (" divisor" if divisor is not None else ""), fn)
    return (lambda net, h: fn(h, k, **kwargs)), out, "F." + desc


def g_mean_sum(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if preserve or len(s) < 2 and b.chance(0.5):
        return None
    dims = sorted(b.rng.sample(range(1, len(s) + 1), b.rng.randint(1, len(s))))
    keep = b.chance(0.5)
    op = b.pick(["mean", "sum"])
    out = tuple(1 if i + 1 in dims else n for i, n in enumerate(s)) if keep else \
        tuple(n for i, n in enumerate(s) if i + 1 not in dims)
    if not out:
        out, keep = tuple(1 for _ in s), True
    if b.chance(0.5):
        fn = torch.mean if op == "mean" else torch.sum
        b.note("mean/sum", fn)
        return (lambda net, h: fn(h, dim=dims, keepdim=keep)), out, f"torch.{op}(dim={dims},keepdim={keep})"
    b.note("mean/sum", op)
    return (lambda net, h: getattr(h, op)(dims, keepdim=keep)), out, f".{op}({dims},keepdim={keep})"


def g_max_pool(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    dims = _pool_dims(b, s, preserve)
    if dims is None:
        return None
    unbatched, d, spatial = dims
    tag = " unbatched" if unbatched else ""
    if b.chance(0.3):
        out = tuple(b.rng.randint(1, n) for n in spatial)
        cls = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)[d - 1]
        fn = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[d - 1]
        indices = b.chance(0.3)
        b.note("AdaptiveMaxPool" + tag, cls, fn)
        if b.chance(0.5):
            return call(b.add(cls(out, return_indices=indices)), 0 if indices else None), s[:-d] + out, \
                f"{cls.__name__}({out},indices={indices}){tag}"
        return (lambda net, h: fn(h, out, return_indices=indices)[0] if indices else fn(h, out)), s[:-d] + out, \
            f"F.adaptive_max_pool{d}d({out}){tag}"
    k = min(b.rng.randint(1, 3), *spatial)
    stride = b.rng.randint(1, k)
    padding = b.rng.randint(0, k // 2)
    dilation = b.pick([1, 1, 2]) if all(2 * (k - 1) + 1 <= n + 2 * padding for n in spatial) else 1
    ceil = b.chance(0.3)
    indices = b.chance(0.2)
    cls = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[d - 1]
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil)
    out = tuple(cls(k, **kwargs)(torch.zeros((2,) + s)).shape[1:])
    desc = f"MaxPool{d}d(k{k},{kwargs},indices={indices}){tag}"
    if b.chance(0.5):
        b.note("MaxPool" + tag, cls)
        return call(b.add(cls(k, return_indices=indices, **kwargs)), 0 if indices else None), out, desc
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
    b.note("F.max_pool" + tag, fn)
    return (lambda net, h: fn(h, k, return_indices=indices, **kwargs)[0] if indices else fn(h, k, **kwargs)), out, \
        "F." + desc


def g_hooked(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """A module whose call is changed by a hook, a spectral-norm pre-hook or parametrization."""
    fin = s[-1]
    form = b.pick(["forward_hook", "pre_hook", "benign_hook", "spectral_norm", "parametrized"])
    m: nn.Module = nn.Linear(fin, fin) if b.chance(0.7) or len(s) < 2 else nn.ReLU()
    if form == "forward_hook":
        m.register_forward_hook(times_ten_hook)
    elif form == "pre_hook":
        m.register_forward_pre_hook(times_ten_pre_hook)
    elif form == "benign_hook":
        m.register_forward_hook(lambda module, inputs, output: None)
    elif form == "spectral_norm" and isinstance(m, nn.Linear):
        m = nn.utils.spectral_norm(m)
        m(torch.randn((4,) + s))  # a training step: the pre-hook stores the normalised weight
        with torch.no_grad():
            m.weight_orig.add_(3 * torch.randn_like(m.weight_orig))  # an optimizer step: the next call recomputes
    elif isinstance(m, nn.Linear):
        m = nn.utils.parametrizations.spectral_norm(m)
    b.note("hook:" + form, type(m))
    return call(b.add(m)), s, f"{type(m).__name__}+{form}"


def g_big_operator(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """A convolution or average pool on an input too large for the dense route (its rule's certified norm)."""
    if len(s) != 3:
        return None
    if b.chance(0.5):
        stride = b.pick([1, 2])
        conv = nn.Conv2d(s[0], s[0], 3, stride=stride, padding=1, padding_mode=b.pick(["zeros", "circular"]))
        b.note("big conv", nn.Conv2d)
        out = (s[0],) + tuple((n - 1) // stride + 1 for n in s[1:])
        return call(b.add(conv)), out, f"Conv2d({s[0]},{s[0]},k3,s{stride},p1,{conv.padding_mode})"
    divisor = b.pick([None, 2, -1])
    pool = nn.AvgPool2d(3, 2, 1, divisor_override=divisor)
    b.note("big avg pool" + (" divisor" if divisor else ""), nn.AvgPool2d)
    return call(b.add(pool)), (s[0],) + tuple((n - 1) // 2 + 1 for n in s[1:]), f"AvgPool2d(3,2,1,divisor={divisor})"


def g_tenfold_conv(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if len(s) != 3:
        return None
    b.note("conv subclass", nn.Conv2d)
    return call(b.add(TenfoldConv2d(s[0], s[0], 3, padding=1))), s, "TenfoldConv2d (overrides _conv_forward)"


def g_qat(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """Quantization-aware modules (fake quantization: a step function), observers frozen after calibration."""
    from torch.ao.nn import intrinsic, qat
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig
    qconfig = get_default_qat_qconfig("fbgemm")
    if len(s) == 3 and b.chance(0.5):
        m: nn.Module = intrinsic.qat.ConvBn2d(s[0], s[0], 3, padding=1, qconfig=qconfig)
        with torch.no_grad():
            m.bn.running_var.uniform_(0.01, 0.1)
    else:
        m = qat.Linear(s[-1], s[-1], qconfig=qconfig)
    m(torch.randn((16,) + s) * 2)
    m.apply(disable_observer)
    b.float32_reference = True
    b.note("qat", type(m))
    return call(b.add(m)), s, f"{type(m).__module__}.{type(m).__qualname__}"


def g_cancel(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``Linear(n, n) -> Linear(n, 1)`` whose product nearly cancels (``||W2|| ||W1|| / ||W2 W1||`` ~ 1e6)."""
    if preserve or len(s) != 1:
        return None
    n = s[0]
    first, second = nn.Linear(n, n), nn.Linear(n, 1)
    with torch.no_grad():
        w2 = second.weight.double()
        w1 = first.weight.double()
        w1 -= w2.T @ (w2 @ w1) / (w2 @ w2.T) * (1 - 1e-6)
        first.weight.copy_(w1)
    a, c = b.add(first), b.add(second)
    b.note("cancelling chain", nn.Linear)
    return (lambda net, h: getattr(net, c)(getattr(net, a)(h))), (1,), f"cancelling Linear({n},{n})->Linear({n},1)"

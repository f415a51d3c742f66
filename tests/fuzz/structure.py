"""Fuzz generators of the structural ops with closed-form rules: parts of splits, resampling (``F.interpolate`` /
``nn.Upsample``, every mode), padding with a fill, channel and pixel shuffles, flips, rolls, copies (``expand``,
``repeat``), ``addcmul`` with constant tensors, extrema (``amax``, ``torch.max(x, dim)``, ``maximum``) and
torchvision-style stochastic depth. Same protocol as :mod:`.layers`."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipreg.ops.split import split_part

from .net import Builder, Shape, Step, call


# -------------------------------------------------------------------------------------------- split parts
def g_split_part(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """One part (or two parts combined) of ``split`` / ``chunk`` / ``unbind`` / ``tensor_split`` /
    ``split_with_sizes`` / ``hsplit`` / ``dsplit`` along a per-sample axis, function or method form."""
    if preserve:
        return None
    axis = b.rng.randrange(len(s))
    dim, n = axis + 1, s[axis]
    if n < 2:
        return None
    cut = b.rng.randint(1, n - 1)
    op = b.pick(["split", "chunk"] + (["unbind"] if len(s) > 1 else []) + ["tensor_split", "tensor_split sections", "split_with_sizes"]
                + (["hsplit"] if dim == 1 else []) + (["dsplit"] if dim == 2 and len(s) >= 2 else []))
    method = b.chance(0.5)
    calls: dict[str, tuple[Any, Callable[[Tensor], tuple[Tensor, ...]], list[Shape]]] = {
        "split": (torch.split, lambda h: (h.split(cut, dim) if method else torch.split(h, cut, dim)),
                  _sizes(s, axis, [cut] * (n // cut) + ([n % cut] if n % cut else []))),
        "chunk": (torch.chunk, lambda h: (h.chunk(2, dim) if method else torch.chunk(h, 2, dim)),
                  _sizes(s, axis, [(n + 1) // 2, n - (n + 1) // 2])),
        "unbind": (torch.unbind, lambda h: (h.unbind(dim) if method else torch.unbind(h, dim)),
                   [s[:axis] + s[axis + 1:]] * n),
        "tensor_split": (torch.tensor_split, lambda h: (h.tensor_split([cut], dim) if method
                                                        else torch.tensor_split(h, [cut], dim=dim)),
                         _sizes(s, axis, [cut, n - cut])),
        "tensor_split sections": (torch.tensor_split, lambda h: (h.tensor_split(2, dim) if method
                                                                 else torch.tensor_split(h, 2, dim)),
                                  _sizes(s, axis, [(n + 1) // 2, n // 2])),
        "split_with_sizes": (torch.split_with_sizes, lambda h: (h.split_with_sizes([cut, n - cut], dim) if method
                                                                else torch.split_with_sizes(h, [cut, n - cut], dim)),
                             _sizes(s, axis, [cut, n - cut])),
        "hsplit": (torch.hsplit, lambda h: (h.hsplit([cut]) if method else torch.hsplit(h, [cut])),
                   _sizes(s, axis, [cut, n - cut])),
        "dsplit": (torch.dsplit, lambda h: (h.dsplit([cut]) if method else torch.dsplit(h, [cut])),
                   _sizes(s, axis, [cut, n - cut])),
    }
    target, split, shapes = calls[op]
    b.note("split part", target if not method else op.split()[0], split_part)
    i = b.rng.randrange(len(shapes))
    form = f"{'h.' if method else 'torch.'}{op.split()[0]}(dim={dim})"
    same = [j for j, shape in enumerate(shapes) if shape == shapes[i] and j != i]
    if same and b.chance(0.5):  # two parts of one split, combined: a + b (norm sqrt 2) or cat
        j = b.pick(same)
        combine = b.pick(["add", "sub", "cat"])
        if combine == "cat":
            out = (2 * shapes[i][0],) + shapes[i][1:] if shapes[i] else None
            if out is None:
                return None
            return (lambda net, h: torch.cat([split(h)[j], split(h)[i]], 1)), out, f"cat({form}[{j}], [{i}])"
        sign = operator.add if combine == "add" else operator.sub

        def pair(net: nn.Module, h: Tensor) -> Tensor:
            parts = split(h)
            return sign(parts[i], parts[j])
        return pair, shapes[i], f"{form}[{i}] {'+' if combine == 'add' else '-'} [{j}]"
    if not shapes[i]:
        return None
    if op == "chunk" and b.chance(0.3):  # a, b = h.chunk(2, dim): both names bound, one used
        def unpacked(net: nn.Module, h: Tensor) -> Tensor:
            first, second = split(h)
            return second if i else first
        return unpacked, shapes[i], f"a, b = {form}; {'b' if i else 'a'}"
    return (lambda net, h: split(h)[i]), shapes[i], f"{form}[{i}]"


def _sizes(s: Shape, axis: int, sizes: list[int]) -> list[Shape]:
    return [s[:axis] + (k,) + s[axis + 1:] for k in sizes]


# -------------------------------------------------------------------------------------------- resampling
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def g_resample(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``F.interpolate`` / ``nn.Upsample`` on the spatial axes of ``(C, *spatial)``: every mode, by scale (one
    number or one per axis, ``recompute_scale_factor``) or by size, ``align_corners`` both ways, ``antialias``."""
    d = len(s) - 1
    if preserve or d not in (1, 2, 3):
        return None
    modes = ["nearest", "nearest-exact", _LINEAR_MODES[d], "area"] + (["bicubic"] if d == 2 else [])
    mode = b.pick(modes)
    spatial = s[1:]
    if b.chance(0.5):
        size = tuple(b.rng.randint(1, 2 * n + 1) for n in spatial)
        scale: Any = None
    else:
        size = None
        scale = b.pick([2.0, 1.5, 0.5, 3.0, 0.75]) if b.chance(0.5) else tuple(b.pick([2.0, 1.5, 0.6, 1.0])
                                                                              for _ in spatial)
    corners = b.pick([True, False]) if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    recompute = b.pick([None, True, False]) if scale is not None else None
    antialias = mode in ("bilinear", "bicubic") and b.chance(0.3)
    kwargs: dict[str, Any] = dict(size=size, scale_factor=scale, mode=mode, align_corners=corners)
    try:
        out = tuple(F.interpolate(torch.zeros((1,) + s), recompute_scale_factor=recompute, antialias=antialias,
                                  **kwargs).shape[1:])
    except (RuntimeError, ValueError):
        return None
    if math.prod(out) > 200 or min(out) < 1:
        return None
    desc = f"{mode},size={size},scale={scale},align_corners={corners}"
    if b.chance(0.4) and not antialias:
        module = nn.Upsample(size=size, scale_factor=scale, mode=mode, align_corners=corners,
                             recompute_scale_factor=recompute)
        b.note(f"resample:{mode}", nn.Upsample)
        return call(b.add(module)), out, f"Upsample({desc},recompute={recompute})"
    b.note(f"resample:{mode}", F.interpolate)
    return (lambda net, h: F.interpolate(h, recompute_scale_factor=recompute, antialias=antialias, **kwargs)), out, \
        f"F.interpolate({desc},recompute={recompute},antialias={antialias})"


# -------------------------------------------------------------------------------------------- padding
_PAD_MODULES = {"reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
                "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
                "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)}


def g_pad_fill(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """Padding of the last 1-3 axes of ``(C, *spatial)`` (or of ``(C, L)`` read unbatched): constant with a
    nonzero fill (``nn.ConstantPadNd``, ``F.pad(value=)``, ``torch.constant_pad_nd``, negative amounts crop),
    reflect, replicate, circular, module and functional forms."""
    if preserve or len(s) < 2 or len(s) > 4:
        return None
    mode = b.pick(["constant", "reflect", "replicate", "circular"])
    d = b.rng.randint(1, len(s) - 1) if mode == "constant" else len(s) - 1  # torch pads (B, C, *d axes) only
    spatial = s[-d:][::-1]  # the order of F.pad's amounts: last axis first
    low = -1 if mode == "constant" else 0
    pads = [b.rng.randint(low, 2) for _ in range(2 * d)]
    limit = {"reflect": lambda n: n - 1, "circular": lambda n: n}.get(mode, lambda n: 99)
    if any(p > limit(spatial[k // 2]) for k, p in enumerate(pads)):
        return None
    out = list(s)
    for k in range(d):
        out[len(s) - 1 - k] += pads[2 * k] + pads[2 * k + 1]
    if min(out) < 1:
        return None
    value = b.pick([1.5, -2.0, 0.0])
    tag = f"{mode},{pads}" + (f",value={value}" if mode == "constant" else "")
    form = b.pick(["module", "F.pad", "torch._C._nn.pad"] + (["constant_pad_nd"] if mode == "constant" else []))
    if form == "module" and not (mode == "constant" and min(pads) < 0):
        cls = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)[d - 1] if mode == "constant" else \
            _PAD_MODULES[mode][d - 1]
        module = cls(tuple(pads), value) if mode == "constant" else cls(tuple(pads))
        b.note(f"pad:{mode}", cls)
        return call(b.add(module)), tuple(out), f"{cls.__name__}({tag})"
    if form == "constant_pad_nd":
        b.note(f"pad:{mode}", torch.constant_pad_nd)
        return (lambda net, h: torch.constant_pad_nd(h, pads, value)), tuple(out), f"torch.constant_pad_nd({tag})"
    if form == "torch._C._nn.pad":  # what F.pad calls
        b.note(f"pad:{mode}", torch._C._nn.pad)
        return (lambda net, h: torch._C._nn.pad(h, pads, mode, value if mode == "constant" else None)), tuple(out), \
            f"torch._C._nn.pad({tag})"
    b.note(f"pad:{mode}", F.pad)
    if mode == "constant":
        return (lambda net, h: F.pad(h, pads, value=value)), tuple(out), f"F.pad({tag})"
    return (lambda net, h: F.pad(h, pads, mode=mode)), tuple(out), f"F.pad({tag})"


# -------------------------------------------------------------------------------------------- permutations
def g_shuffle(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``channel_shuffle`` (module, ``F.``, ``torch.``, ``torch.native_``), ``pixel_shuffle`` /
    ``pixel_unshuffle`` (module and functional)."""
    if len(s) < 2:
        return None
    c = s[0]
    kind = b.pick(["channel", "channel", "pixel", "unpixel"] if len(s) == 3 else ["channel"])
    if kind == "channel":
        groups = [g for g in range(2, c + 1) if c % g == 0]
        if not groups:
            return None
        g = b.pick(groups)
        target = b.pick([nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle])
        b.note("shuffle:channel", target)
        if target is nn.ChannelShuffle:
            return call(b.add(nn.ChannelShuffle(g))), s, f"ChannelShuffle({g})"
        return (lambda net, h: target(h, g)), s, f"{target.__name__}({g})"
    if preserve:
        return None
    if kind == "pixel" and not any(c % (r * r) == 0 for r in (2, 3)):  # unshuffle, then shuffle back
        r = b.pick([r for r in (2, 3) if s[1] % r == 0 and s[2] % r == 0] or [1])
        module = b.add(nn.PixelShuffle(r))
        b.note("shuffle:pixel", nn.PixelShuffle, F.pixel_unshuffle)
        return (lambda net, h: getattr(net, module)(F.pixel_unshuffle(h, r))), s, \
            f"PixelShuffle({r})(pixel_unshuffle({r}))"
    if kind == "pixel":
        r = b.pick([r for r in (2, 3) if c % (r * r) == 0])
        out = (c // (r * r), s[1] * r, s[2] * r)
        module, function = nn.PixelShuffle, b.pick([F.pixel_shuffle, torch.pixel_shuffle])
    else:
        r = b.pick([r for r in (2, 3) if s[1] % r == 0 and s[2] % r == 0] or [1])
        out = (c * r * r, s[1] // r, s[2] // r)
        module, function = nn.PixelUnshuffle, b.pick([F.pixel_unshuffle, torch.pixel_unshuffle])
    if math.prod(out) > 200:
        return None
    if b.chance(0.5):
        b.note(f"shuffle:{kind}", module)
        return call(b.add(module(r))), out, f"{module.__name__}({r})"
    b.note(f"shuffle:{kind}", function)
    return (lambda net, h: function(h, r)), out, f"{function.__name__}({r})"


def g_flip_roll(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if not s:
        return None
    dims = sorted(b.rng.sample(range(1, len(s) + 1), b.rng.randint(1, len(s))))
    if b.chance(0.5):
        target = b.pick([torch.flip, "flip"])
        b.note("flip/roll", target)
        return (lambda net, h: torch.flip(h, dims) if target is torch.flip else h.flip(dims)), s, f"flip({dims})"
    shifts = [b.rng.randint(-3, 3) for _ in dims]
    target = b.pick([torch.roll, "roll"])
    b.note("flip/roll", target)
    return (lambda net, h: torch.roll(h, shifts, dims) if target is torch.roll else h.roll(shifts, dims)), s, \
        f"roll({shifts},{dims})"


def g_copies(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``h[:, None].expand(-1, k, ...)``, ``broadcast_to``, ``repeat`` on per-sample axes (``sqrt(k)`` copies), or an
    ``expand`` of a size-1 axis."""
    if not s:
        return None
    if preserve:
        return None
    k = b.rng.randint(2, 3)
    if math.prod(s) * k > 200:
        return None
    form = b.pick(["expand", "broadcast_to", "repeat", "expand axis"])
    if form == "repeat":
        reps = [1] * len(s)
        reps[b.rng.randrange(len(s))] = k
        out = tuple(n * r for n, r in zip(s, reps))
        b.note("copies", "repeat")
        return (lambda net, h: h.repeat(1, *reps)), out, f".repeat(1,{reps})"
    if form == "expand axis" and 1 in s:
        axis = s.index(1)
        out = s[:axis] + (k,) + s[axis + 1:]
        b.note("copies", "expand")
        return (lambda net, h: h.expand(-1, *out)), out, f".expand(-1,{out})"
    out = (k, *s)
    if form == "broadcast_to":
        target = b.pick([torch.broadcast_to, "broadcast_to"])
        b.note("copies", target)
        return (lambda net, h: torch.broadcast_to(h[:, None], (h.shape[0], *out)) if target is torch.broadcast_to
                else h[:, None].broadcast_to((h.shape[0], *out))), out, "broadcast_to(h[:, None], (B,k,...))"
    b.note("copies", "expand")
    return (lambda net, h: h.unsqueeze(1).expand(-1, k, *s)), out, f"h[:, None].expand(-1,{k},...)"


# ---------------------------------------------------------------------------------- addcmul and extrema
def g_addcmul(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``addcmul`` with constant tensors: ``x`` in ``input`` (a shift), in one factor (ResMLP's affine layer), and
    the refused forms (``x`` in both factors, or in ``input`` and a factor)."""
    if not s:
        return None
    c1, c2 = b.add(torch.randn(*s)), b.add(2 * torch.randn(s[-1]))  # a full tensor and one broadcast on the last axis
    value = b.pick([1.0, -0.5, 3.0])
    form = b.pick(["input", "factor", "factor", "method", "both factors", "input and factor"])
    target = "addcmul" if form == "method" else torch.addcmul
    b.note("addcmul" + (" refused form" if "and" in form or "both" in form else ""), target)
    fns: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
        "input": lambda net, h: torch.addcmul(h, getattr(net, c1), getattr(net, c2), value=value),
        "factor": lambda net, h: torch.addcmul(getattr(net, c1), getattr(net, c2), h, value=value),
        "method": lambda net, h: getattr(net, c1).addcmul(h, getattr(net, c2), value=value),
        "both factors": lambda net, h: torch.addcmul(getattr(net, c1), h, h),
        "input and factor": lambda net, h: torch.addcmul(h, h, getattr(net, c2)),
    }
    return fns[form], s, f"addcmul({form}, value={value})"


def g_extremum(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """Extrema over per-sample axes (``amax`` / ``amin``, ``torch.max(x, dim)`` values, method forms) and
    elementwise ones against a constant or between two branches of ``h`` (``maximum``, ``minimum``, ``fmax``,
    ``fmin``, ``torch.max(a, b)``), broadcasting included."""
    if not s:
        return None
    kind = b.pick(["reduce", "reduce", "constant", "two", "broadcast"])
    if kind == "reduce" and not preserve:
        dim = b.rng.randint(1, len(s))
        keep = b.chance(0.5)
        out = s[:dim - 1] + ((1,) if keep else ()) + s[dim:]
        if not out:
            return None
        name = b.pick(["amax", "amin", "max values", "min [0]", "max method", "min method"])
        fn: Callable[[Tensor], Tensor] = {
            "amax": lambda h: torch.amax(h, dim, keepdim=keep), "amin": lambda h: h.amin(dim, keepdim=keep),
            "max values": lambda h: torch.max(h, dim, keepdim=keep).values,
            "min [0]": lambda h: torch.min(h, dim, keep)[0], "max method": lambda h: h.max(dim, keepdim=keep)[0],
            "min method": lambda h: h.min(dim=dim, keepdim=keep).values}[name]
        target = {"amax": torch.amax, "amin": "amin", "max values": torch.max, "min [0]": torch.min,
                  "max method": "max", "min method": "min"}[name]
        b.note("extremum:reduce", target)
        return (lambda net, h: fn(h)), out, f"{name}(dim={dim},keepdim={keep})"
    pairs = [(torch.maximum, torch.maximum), (torch.minimum, torch.minimum), (torch.fmax, torch.fmax),
             (torch.fmin, torch.fmin), (torch.max, torch.max), (torch.min, torch.min), ("maximum", Tensor.maximum),
             ("minimum", Tensor.minimum)]
    target, fn2 = b.pick(pairs)
    tname = getattr(target, "__name__", target)
    if kind == "two":  # both input-dependent, same shape: jointly 1-Lipschitz
        scale = b.pick([2.0, -1.0, 0.5])
        b.note("extremum:two", target)
        return (lambda net, h: fn2(h, scale * h + 1.0)), s, f"{tname}(h, {scale} h + 1)"
    if kind == "broadcast" and not preserve:
        k = b.rng.randint(2, 3)
        c = b.add(torch.randn(k, *s))
        b.note("extremum:broadcast", target)
        return (lambda net, h: fn2(h.unsqueeze(1), getattr(net, c))), (k, *s), f"{tname}(h[:, None], const{(k, *s)})"
    c = b.add(torch.randn(*s))
    b.note("extremum:constant", target)
    if b.chance(0.3) and not isinstance(target, str):
        return (lambda net, h: fn2(getattr(net, c), h)), s, f"{tname}(const{s}, h)"
    return (lambda net, h: fn2(h, getattr(net, c))), s, f"{tname}(h, const{s})"


# ---------------------------------------------------------------------------------------- stochastic depth
def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision's ``stochastic_depth`` (``torchvision.ops.stochastic_depth``), without torchvision: the
    identity when not ``training`` or ``p = 0``, else a random row or batch mask scaled by ``1 / (1 - p)``."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(1 - p)
    return input * noise.div_(1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"  # the qualified name lipreg's rule is keyed on
torch.fx.wrap("stochastic_depth")  # as torchvision does: a leaf of the trace


def g_stochastic_depth(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``h + stochastic_depth(branch(h), p, mode, self.training)`` (eval: the identity), or with ``p = 0``, or
    always on (``training=True``, refused)."""
    p, mode = b.pick([0.2, 0.0]), b.pick(["row", "batch"])
    form = b.pick(["self.training", "self.training", "p", "on"])
    b.note("stochastic depth" + (" on" if form == "on" and p > 0 else ""), stochastic_depth.__module__ + ".stochastic_depth")
    if form == "on":
        return (lambda net, h: stochastic_depth(h, p, mode, True)), s, f"stochastic_depth({p},{mode},training=True)"
    if form == "p":
        return (lambda net, h: stochastic_depth(h, 0.0, mode)), s, f"stochastic_depth(0,{mode})"
    return (lambda net, h: stochastic_depth(h, p, mode, net.training)), s, \
        f"stochastic_depth({p},{mode},training=self.training)"


def g_sort(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """Sorts along a per-sample axis: GroupSort (groups of 2 or more along an axis, ascending or descending: the
    MaxMin / GroupSort activations; also behind a Python branch on the size, as deel-lip writes it) and ``topk``
    values. ``msort`` sorts along axis 0, the batch axis, so it is not drawn."""
    if not s:
        return None
    dim = b.rng.randint(1, len(s))
    size = s[dim - 1]
    groups = [g for g in (2, 3, 4) if size % g == 0 and g < size]
    kind = b.pick(["group", "group", "branch", "full", "topk"])
    descending = b.chance(0.3)
    if kind in ("group", "branch") and groups:
        g = b.pick(groups)

        def group_sort(h: Tensor) -> Tensor:
            return h.unflatten(dim, (size // g, g)).sort(dim=dim + 1, descending=descending).values.flatten(dim, dim + 1)

        if kind == "branch":  # deel-lip's form: a Python branch on the size, followed at the example's shape
            b.note("sort:shape branch", "sort")
            return (lambda net, h: group_sort(h) if h.shape[dim] % g == 0 and h.dim() > dim else 2 * h), s, \
                f"groupsort if shape[{dim}] % {g} == 0"
        b.note("sort:group", "sort")
        return (lambda net, h: group_sort(h)), s, f"groupsort(dim={dim}, g={g}, desc={descending})"
    if kind == "topk" and not preserve and size > 1:
        k = b.rng.randint(1, size - 1)
        out = s[:dim - 1] + (k,) + s[dim:]
        b.note("sort:topk", torch.topk)
        return (lambda net, h: torch.topk(h, k, dim=dim).values), out, f"topk(k={k}, dim={dim})"
    b.note("sort:full", torch.sort)
    return (lambda net, h: torch.sort(h, dim=dim, descending=descending)[0]), s, f"sort(dim={dim}, desc={descending})"

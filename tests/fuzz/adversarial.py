"""Fuzz generators of the adversarial patterns of issue 16: ordinary code whose computation differs from what a
layer's class, its public attributes or the traced graph say. Same protocol as :mod:`.layers`; each kind is named
after its class in issue 16 (``16.<class> <pattern>``), so the report counts each class apart.

* 16.1 instance overrides: ``m.forward = ...`` / ``m._conv_forward = ...`` set on a built-in layer's instance
  (before the estimator is built here; after it, by :func:`late_override`);
* 16.2 bit casts: ``x.view(torch.int32)`` (a round trip, the bits read as numbers, or the exponent raised by
  one: ``2 x``; the reference runs in float32);
* 16.3 a convolution run on an unbatched ``(C, ...)`` tensor, next to per-row / per-column / ``BatchNorm1d`` gains
  (:func:`unbatched_block`; the case then has one sample and its reference runs sample by sample);
* 16.4 changes after the estimator is built: ``Sequential.append`` / ``add_module`` / ``ModuleList.append``
  (the container generator's mutations), a private attribute or a dict entry read in forward then changed, and
  dtype changes (:func:`dtype_change`);
* 16.5 a parameter read into Python with ``.item()`` / ``.tolist()`` in forward (then changed by an optimizer step);
* 16.6 a reflect / replicate / circular convolution whose ``.padding`` was set after construction.

A generator registers its after-build changes with :meth:`Builder.add_mutation`; :func:`tests.fuzz.arch.draw_case`
draws one of them.
"""
from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .net import Builder, Shape, Step, call


def _scaled(module: nn.Module, factor: float) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)
    return module


# ------------------------------------------------------------------------------------- 16.1 instance overrides
def _tenfold_forward(self: nn.Module, x: Tensor) -> Tensor:
    return 10 * type(self).forward(self, x)


def _same_forward(self: nn.Module, x: Tensor) -> Tensor:  # what a hooking library installs: the class's call
    return type(self).forward(self, x)


def _tenfold_conv_forward(self: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return type(self)._conv_forward(self, x, 10 * weight, bias)


def override(module: nn.Module, form: str) -> str:
    """Set an instance-level override on ``module`` (bound with ``MethodType``: a deep copy rebinds it)."""
    if form == "_conv_forward":
        module._conv_forward = types.MethodType(_tenfold_conv_forward, module)
        return "._conv_forward = 10 w"
    module.forward = types.MethodType(_tenfold_forward if form == "forward" else _same_forward, module)
    return ".forward = 10 * forward" if form == "forward" else ".forward = the class's forward"


def g_instance_override(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if len(s) == 3 and b.chance(0.5):
        m: nn.Module = nn.Conv2d(s[0], s[0], 3, padding=1)
        form = b.pick(["forward", "_conv_forward", "same"])
    else:
        m = nn.Linear(s[-1], s[-1])
        form = b.pick(["forward", "same"])
    desc = override(m, form)
    b.note("16.1 instance override", type(m))
    return call(b.add(m)), s, f"{type(m).__name__}{desc}"


def late_override(b: Builder) -> Any:
    """An after-build mutation: an instance override set on a Linear / Conv2d child already traced."""
    names = [n for n, m in b.net.named_children() if type(m) in (nn.Linear, nn.Conv2d) and "forward" not in vars(m)]
    if not names:
        return None
    name = b.pick(names)
    form = b.pick(["forward", "_conv_forward"]) if isinstance(getattr(b.net, name), nn.Conv2d) else "forward"

    def mutate(net: nn.Module) -> str:
        return f"net.{name}" + override(getattr(net, name), form)
    return mutate


# ---------------------------------------------------------------------------------------------- 16.2 bit casts
def g_bitcast(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """A float32 bit cast (the dtypes fixed when the model is written, as fx sees them): the reference then runs in
    float32, the dtype whose bits the model reads."""
    form = b.pick(["round trip", "bits as numbers", "exponent + 1"])
    b.float32_reference = True
    b.note("16.2 bit cast", "view")
    if form == "round trip":
        return (lambda net, h: h.view(torch.int32).view(torch.float32)), s, "x.view(int32).view(float32)"
    if form == "exponent + 1":  # 2x on normal numbers: a shift of the bits, a doubling of the value
        return (lambda net, h: (h.view(torch.int32) + 2 ** 23).view(torch.float32)), s, \
            "(x.view(int32) + 2^23).view(float32)"
    scale = torch.finfo(torch.float32).eps / 256
    return (lambda net, h: h.view(torch.int32).to(torch.float32) * scale), s, "x.view(int32).to(float32) * eps / 256"


# ----------------------------------------------------------------------------------- 16.3 unbatched convolutions
def unbatched_block(b: Builder, s: Shape) -> tuple[Step, Shape, str] | None:
    """``h[0]`` (one sample, unbatched) -> a convolution on ``(C, ...)`` -> gains on axis 0 or 1 -> ``unsqueeze(0)``.
    The gain's size may equal the other axis's (a BatchNorm1d(L) next to L channels) to tempt a channel fold."""
    if len(s) not in (2, 3):
        return None
    d = len(s) - 1
    cin, k = s[0], min(b.rng.randint(1, 3), *s[1:])
    spatial = tuple(n - k + 1 for n in s[1:])
    cout = spatial[0] if b.chance(0.5) else b.rng.randint(1, 4)
    if b.chance(0.7):
        name = b.add((nn.Conv1d, nn.Conv2d)[d - 1](cin, cout, k, bias=b.chance(0.5)))
        conv: Step = call(name)
        conv_desc = f"Conv{d}d({cin},{cout},k{k})"
    else:
        w = b.add(torch.randn(cout, cin, *([k] * d)) / math.sqrt(cin * k ** d), parameter=True)
        fn = (F.conv1d, F.conv2d)[d - 1]
        conv = lambda net, h: fn(h, getattr(net, w))
        conv_desc = f"F.conv{d}d({cin},{cout},k{k})"
    gain_step, gain_desc = _axis_gain(b, (cout, *spatial))
    pick = b.pick([(lambda net, h: h[0], "h[0]"), (lambda net, h: h.squeeze(0), "h.squeeze(0)")])
    b.note("16.3 unbatched conv", (nn.Conv1d, nn.Conv2d)[d - 1])
    one = pick[0]
    step = lambda net, h: gain_step(net, conv(net, one(net, h))).unsqueeze(0)
    return step, (cout, *spatial), f"[{pick[1]} -> {conv_desc} on (C, ...) -> {gain_desc} -> unsqueeze(0)]"


def _axis_gain(b: Builder, out: Shape) -> tuple[Step, str]:
    """Gains of an unbatched ``(C, L, ...)`` output: per row (axis 0, the real channels), per column (axis 1),
    or a ``BatchNorm1d(L)`` reading ``(C, L)`` as ``(N, features)``."""
    form = b.pick(["row", "column", "batch norm"] if len(out) == 2 else ["row", "column"])
    if form == "batch norm":
        bn = nn.BatchNorm1d(out[1])
        with torch.no_grad():
            bn.running_var.uniform_(0.01, 0.5)
            bn.weight.copy_(2 * torch.randn(out[1]))
        return call(b.add(bn)), f"BatchNorm1d({out[1]})"
    size = out[0] if form == "row" else out[1]
    g = b.add(2 * torch.randn(size), parameter=True)
    if form == "row":
        return (lambda net, h: h * getattr(net, g).view(-1, *([1] * (len(out) - 1)))), f"per-row gains({size})"
    tail = [1] * (len(out) - 2)
    return (lambda net, h: h * getattr(net, g).view(-1, *tail)), f"per-column gains({size})"


# ------------------------------------------------------------------------------- 16.4 container edits after build
def g_container(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """A ``Sequential`` or a looped ``ModuleList`` of shape-keeping Linears; after build, one more layer (8x)."""
    n = s[-1]
    kind = b.pick(["Sequential", "ModuleList"])
    layers = [nn.Linear(n, n) for _ in range(b.rng.randint(1, 2))]
    container: nn.Module = nn.Sequential(*layers) if kind == "Sequential" else nn.ModuleList(layers)
    name = b.add(container)
    edit = b.pick(["append", "add_module"] if kind == "Sequential" else ["append"])

    def mutate(net: nn.Module) -> str:
        extra = _scaled(nn.Linear(n, n), 8.0)
        target = getattr(net, name)
        if edit == "append":
            target.append(extra)
        else:
            target.add_module("extra", extra)
        return f"net.{name}.{edit}(Linear({n},{n}) with 8x weights)"
    b.add_mutation("16.4 container edit", mutate)
    b.note("16.4 container", type(container))
    if kind == "Sequential":
        return call(name), s, f"Sequential({len(layers)} x Linear({n},{n}))"

    def looped(net: nn.Module, h: Tensor) -> Tensor:
        for layer in getattr(net, name):
            h = layer(h)
        return h
    return looped, s, f"for m in ModuleList({len(layers)} x Linear({n},{n})): h = m(h)"


def g_python_attribute(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``h * net._temperature`` (a private float attribute) or ``h * net.cfg["scale"]`` (a dict entry): Python
    values fx bakes into the graph; after build, the attribute is reassigned or the dict mutated in place."""
    value, slot = b.rng.uniform(0.5, 2.0), f"_t{b.count}"
    b.count += 1
    form = b.pick(["private attribute", "dict entry"])
    if form == "private attribute":
        setattr(b.net, slot, value)
        read = lambda net: getattr(net, slot)

        def mutate(net: nn.Module) -> str:
            setattr(net, slot, 8 * getattr(net, slot))
            return f"net.{slot} *= 8"
    else:
        setattr(b.net, slot, {"scale": value})
        read = lambda net: getattr(net, slot)["scale"]

        def mutate(net: nn.Module) -> str:
            getattr(net, slot)["scale"] *= 8
            return f"net.{slot}['scale'] *= 8 (the dict mutated in place)"
    b.add_mutation("16.4 Python attribute changed", mutate)
    b.note("16.4 Python attribute", form)
    desc = f"h * net.{slot}" if form == "private attribute" else f"h * net.{slot}['scale']"
    return (lambda net, h: h * read(net)), s, desc


def dtype_change(b: Builder) -> Any:
    """An after-build mutation: the model's dtype changes (``double()``, ``.to(torch.bfloat16)``)."""
    to = b.pick([torch.float64, torch.bfloat16])

    def mutate(net: nn.Module) -> str:
        net.to(to)
        return f"model.to({to})"
    return mutate


# ---------------------------------------------------------------------------------------- 16.5 Python reads
def g_item(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``h * c.item()`` (or ``.tolist()``) for a scalar parameter ``c``; after build, an optimizer step ``c *= 8``."""
    c = b.add(torch.tensor(b.rng.uniform(0.5, 2.0)), parameter=True)
    form = b.pick(["item", "tolist"])

    def mutate(net: nn.Module) -> str:
        with torch.no_grad():
            getattr(net, c).mul_(8)
        return f"net.{c} *= 8 (an optimizer step)"
    b.add_mutation("16.5 item read, then changed", mutate)
    b.note("16.5 item read", form)
    return (lambda net, h: h * getattr(getattr(net, c), form)()), s, f"h * c.{form}()"


# ---------------------------------------------------------------------------------- 16.6 padding set after init
def g_padding_after_init(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """A padded convolution whose public ``.padding`` is changed after construction: torch pads non-zero modes
    with the private ``_reversed_padding_repeated_twice`` set at construction, zeros mode with ``.padding``."""
    d = len(s) - 1
    if d not in (1, 2) or min(s[1:]) < 3:
        return None
    cin, mode = s[0], b.pick(["reflect", "replicate", "circular", "zeros"])
    first, later = b.pick([(1, 0), (0, 1), (1, 2)])
    conv = (nn.Conv1d, nn.Conv2d)[d - 1](cin, cin, 3, padding=first, padding_mode=mode)
    conv.padding = (later,) * d
    try:
        with torch.no_grad():
            out = tuple(conv(torch.zeros((1,) + s)).shape[1:])
    except RuntimeError:  # the new padding does not fit the input
        return None
    if preserve and out != s:
        return None
    b.note("16.6 padding after init", type(conv))
    return call(b.add(conv)), out, f"Conv{d}d(k3,padding={first},{mode}); .padding = {later}"

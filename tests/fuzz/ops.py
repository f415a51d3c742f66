"""Fuzz generators of activations (and their in-place forms), reshapes, dropout, arithmetic with constants,
indexing and refused ops. Same protocol as :mod:`.layers`."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .net import Builder, Shape, Step, call


# ----------------------------------------------------------------------------------------------- activations
def _activation(b: Builder) -> tuple[str, list[tuple[Any, Callable[[Tensor], Tensor]]], Callable[[], nn.Module] | None]:
    """An activation with drawn parameters: its kind, functional/method forms ``(target, fn)`` and module factory."""
    name = b.pick(["relu", "relu6", "tanh", "hardtanh", "softplus", "sigmoid", "leaky_relu", "elu", "gelu", "silu",
                   "abs", "clamp", "hardswish", "hardsigmoid", "mish", "selu", "logsigmoid", "tanhshrink",
                   "softshrink", "threshold", "hardshrink"])
    if name in _MORE or name in ("softshrink", "threshold", "hardshrink"):
        return _more_activation(b, name)
    if name == "relu":
        return name, [(F.relu, F.relu), (torch.relu, torch.relu), ("relu", lambda h: h.relu())], nn.ReLU
    if name == "relu6":
        return name, [(F.relu6, F.relu6)], nn.ReLU6
    if name == "tanh":
        return name, [(torch.tanh, torch.tanh), (F.tanh, F.tanh), ("tanh", lambda h: h.tanh())], nn.Tanh
    if name == "hardtanh":
        lo, hi = b.pick([(-1.0, 1.0), (-0.5, 2.0)])
        return f"hardtanh({lo},{hi})", [(F.hardtanh, lambda h: F.hardtanh(h, lo, hi))], lambda: nn.Hardtanh(lo, hi)
    if name == "softplus":
        beta, threshold = b.pick([1.0, 0.5, 2.0]), b.pick([20.0, 20.0, 5.0, 1.0, 0.0])
        return f"softplus(beta={beta},threshold={threshold})", \
            [(F.softplus, lambda h: F.softplus(h, beta, threshold))], lambda: nn.Softplus(beta, threshold)
    if name == "sigmoid":
        return name, [(torch.sigmoid, torch.sigmoid), (F.sigmoid, F.sigmoid), ("sigmoid", lambda h: h.sigmoid())], \
            nn.Sigmoid
    if name == "leaky_relu":
        slope = b.pick([0.01, 0.2, 3.0, -0.5])
        return f"leaky_relu({slope})", [(F.leaky_relu, lambda h: F.leaky_relu(h, slope))], lambda: nn.LeakyReLU(slope)
    if name == "elu":
        alpha = b.pick([0.5, 1.0, 2.5])
        return f"elu({alpha})", [(F.elu, lambda h: F.elu(h, alpha))], lambda: nn.ELU(alpha)
    if name == "gelu":
        approximate = b.pick(["none", "tanh"])
        return f"gelu({approximate})", [(F.gelu, lambda h: F.gelu(h, approximate=approximate))], \
            lambda: nn.GELU(approximate)
    if name == "silu":
        return name, [(F.silu, F.silu)], nn.SiLU
    if name == "abs":
        return name, [(torch.abs, torch.abs), (operator.abs, abs), ("abs", lambda h: h.abs()),
                      ("__abs__", lambda h: h.__abs__())], None
    lo, hi = b.pick([(-0.5, 0.5), (0.0, None), (None, 1.0)])
    return f"clamp({lo},{hi})", [(torch.clamp, lambda h: torch.clamp(h, lo, hi)), ("clamp", lambda h: h.clamp(lo, hi)),
                                 ("clip", lambda h: h.clip(lo, hi)), (torch.clip, lambda h: torch.clip(h, lo, hi))], None


_MORE = {  # name: (module, functional forms)
    "hardswish": (nn.Hardswish, [(F.hardswish, F.hardswish)]),
    "hardsigmoid": (nn.Hardsigmoid, [(F.hardsigmoid, F.hardsigmoid)]),
    "mish": (nn.Mish, [(F.mish, F.mish)]),
    "selu": (nn.SELU, [(F.selu, F.selu), (torch.selu, torch.selu)]),
    "logsigmoid": (nn.LogSigmoid, [(F.logsigmoid, F.logsigmoid)]),
    "tanhshrink": (nn.Tanhshrink, [(F.tanhshrink, F.tanhshrink)]),
}


def _more_activation(b: Builder, name: str) -> tuple[str, list[tuple[Any, Callable[[Tensor], Tensor]]],
                                                     Callable[[], nn.Module] | None]:
    """The activations of :data:`_MORE`, softshrink, and the continuous (accepted) and discontinuous (refused)
    forms of threshold and hardshrink."""
    if name in _MORE:
        module, forms = _MORE[name]
        return name, forms, module
    if name == "softshrink":
        lambd = b.pick([0.5, 0.0, 2.0])
        return f"softshrink({lambd})", [(F.softshrink, lambda h: F.softshrink(h, lambd))], lambda: nn.Softshrink(lambd)
    if name == "threshold":
        t, v = b.pick([(0.5, 0.5), (-1.0, -1.0), (0.5, 0.0)])
        return f"threshold({t},{v})", [(F.threshold, lambda h: F.threshold(h, t, v)),
                                        (torch.threshold, lambda h: torch.threshold(h, t, v))], \
            lambda: nn.Threshold(t, v)
    lambd = b.pick([0.0, 0.5])
    return f"hardshrink({lambd})", [(F.hardshrink, lambda h: F.hardshrink(h, lambd)),
                                    (torch.hardshrink, lambda h: torch.hardshrink(h, lambd)),
                                    ("hardshrink", lambda h: h.hardshrink(lambd))], lambda: nn.Hardshrink(lambd)


def g_activation(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    kind, forms, module = _activation(b)
    if module is not None and b.chance(0.5):
        m = module()
        b.note("act:" + kind.split("(")[0], type(m))
        return call(b.add(m)), s, type(m).__name__ + kind[len(kind.split("(")[0]):]
    target, fn = b.pick(forms)
    b.note("act:" + kind.split("(")[0], target)
    return (lambda net, h: fn(h)), s, f"{getattr(target, '__name__', target)}:{kind}"


_INPLACE = [  # (description, target, in-place call, slope of the map)
    ("ReLU(inplace)", nn.ReLU, lambda: nn.ReLU(inplace=True)),
    ("LeakyReLU(5,inplace)", nn.LeakyReLU, lambda: nn.LeakyReLU(5.0, inplace=True)),
    ("ELU(2,inplace)", nn.ELU, lambda: nn.ELU(2.0, inplace=True)),
    ("Hardtanh(inplace)", nn.Hardtanh, lambda: nn.Hardtanh(inplace=True)),
]
_INPLACE_FN = [
    ("F.relu(inplace)", F.relu, lambda h: F.relu(h, inplace=True)),
    ("F.leaky_relu(5,inplace)", F.leaky_relu, lambda h: F.leaky_relu(h, 5.0, inplace=True)),
    ("F.elu(2,inplace)", F.elu, lambda h: F.elu(h, 2.0, inplace=True)),
    (".relu_()", "relu_", lambda h: h.relu_()),
    (".clamp_(-1,1)", "clamp_", lambda h: h.clamp_(-1.0, 1.0)),
    (".mul_(4)", "mul_", lambda h: h.mul_(4.0)),
    ("h *= 4", operator.imul, lambda h: operator.imul(h, 4.0)),
    ("h += 1", operator.iadd, lambda h: operator.iadd(h, 1.0)),
]


def g_inplace(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """An in-place op on an intermediate tensor: its result used, discarded (read through the alias), or both."""
    if not b.fresh:
        return None
    if b.chance(0.4):
        desc, target, factory = b.pick(_INPLACE)
        name = b.add(factory())
        fn: Callable[[Any, Tensor], Tensor] = lambda net, h: getattr(net, name)(h)
    else:
        desc, target, inplace = b.pick(_INPLACE_FN)
        fn = lambda net, h: inplace(h)
    pattern = b.pick(["use", "discard", "alias_sum"])
    b.note("inplace" if pattern == "use" else "inplace alias", target)
    if pattern == "use":
        return fn, s, desc
    if pattern == "discard":
        def discard(net: nn.Module, h: Tensor) -> Tensor:
            fn(net, h)
            return h
        return discard, s, desc + " [result discarded, alias read]"

    def alias_sum(net: nn.Module, h: Tensor) -> Tensor:
        alias = h
        return alias + fn(net, h)
    return alias_sum, s, desc + " [alias + result]"


# ------------------------------------------------------------------------------------ structure and arithmetic
def g_reshape(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    n = math.prod(s)
    options = ["contiguous", "clone", "detach"]
    if not preserve:
        options += ["flatten", "unsqueeze"] + (["permute", "transpose", "movedim"] if len(s) >= 2 else []) + \
            (["unflatten"] if len(s) == 1 and n % 2 == 0 else []) + (["squeeze"] if 1 in s else [])
    op = b.pick(options)
    if op in ("contiguous", "clone", "detach"):
        b.note("reshape", op)
        return (lambda net, h: getattr(h, op)()), s, f".{op}()"
    if op == "flatten":
        form, target, fn = b.pick([
            ("torch.flatten", torch.flatten, lambda h: torch.flatten(h, 1)), (".flatten", "flatten", lambda h: h.flatten(1)),
            (".view", "view", lambda h: h.view(h.size(0), -1)), (".reshape", "reshape", lambda h: h.reshape(h.shape[0], -1)),
            ("torch.reshape", torch.reshape, lambda h: torch.reshape(h, (-1, n))), ("nn.Flatten", nn.Flatten, None)])
        b.note("reshape", target)
        if fn is None:
            return call(b.add(nn.Flatten())), (n,), form
        return (lambda net, h: fn(h)), (n,), form
    if op == "unflatten":
        shape = (2, n // 2)
        form, target, fn = b.pick([(".unflatten", "unflatten", lambda h: h.unflatten(1, shape)),
                                   ("nn.Unflatten", nn.Unflatten, None), (".view", "view", lambda h: h.view(-1, *shape))])
        b.note("reshape", target)
        if fn is None:
            return call(b.add(nn.Unflatten(1, shape))), shape, form
        return (lambda net, h: fn(h)), shape, form
    if op == "unsqueeze":
        target = b.pick([torch.unsqueeze, "unsqueeze"])
        b.note("reshape", target)
        if target == "unsqueeze":
            return (lambda net, h: h.unsqueeze(1)), (1, *s), ".unsqueeze(1)"
        return (lambda net, h: torch.unsqueeze(h, -1)), (*s, 1), "torch.unsqueeze(-1)"
    if op == "squeeze":
        dim = s.index(1) + 1
        target = b.pick([torch.squeeze, "squeeze"])
        b.note("reshape", target)
        out = s[:dim - 1] + s[dim:]
        if not out:
            return None
        return (lambda net, h: torch.squeeze(h, dim) if target is torch.squeeze else h.squeeze(dim)), out, f"squeeze({dim})"
    perm = list(range(1, len(s) + 1))
    b.rng.shuffle(perm)
    out = tuple(s[p - 1] for p in perm)
    if op == "permute":
        target = b.pick([torch.permute, "permute"])
        b.note("reshape", target)
        full = [0] + perm
        return (lambda net, h: torch.permute(h, full) if target is torch.permute else h.permute(*full)), out, \
            f"permute({full})"
    if op == "transpose":
        target = b.pick([torch.transpose, "transpose"])
        b.note("reshape", target)
        out = (s[1], s[0]) + s[2:]
        return (lambda net, h: torch.transpose(h, 1, 2) if target is torch.transpose else h.transpose(1, 2)), out, \
            "transpose(1,2)"
    target = b.pick([torch.movedim, "movedim"])
    b.note("reshape", target)
    out = s[1:] + s[:1]
    return (lambda net, h: torch.movedim(h, 1, -1) if target is torch.movedim else h.movedim(1, -1)), out, "movedim(1,-1)"


def g_dropout(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    cls = b.pick([nn.Identity, nn.Dropout, nn.AlphaDropout] + [[nn.Dropout1d], [nn.Dropout2d], [nn.Dropout3d], []][
        min(len(s), 5) - 2 if len(s) in (2, 3, 4) else 3])
    if b.chance(0.5):
        b.note("dropout", cls)
        return call(b.add(cls() if cls is nn.Identity else cls(0.3))), s, cls.__name__
    form = b.pick(["eval", "eval", "default", "on"])
    if form == "eval":
        fn = b.pick([F.dropout] + [[F.dropout1d], [F.dropout2d], [F.dropout3d], []][
            len(s) - 2 if len(s) in (2, 3, 4) else 3])
        b.note("dropout", fn)
        return (lambda net, h: fn(h, 0.3, training=False)), s, f"{fn.__name__}(training=False)"
    b.note("dropout always on", F.dropout)
    if form == "default":
        return (lambda net, h: F.dropout(h, 0.5)), s, "F.dropout(0.5) (training defaults to True)"
    return (lambda net, h: F.dropout(h, 0.5, training=True)), s, "F.dropout(0.5, training=True)"


def _constant(b: Builder, s: Shape, broadcast: bool) -> tuple[Any, Shape, str]:
    """A scalar, a same-shape tensor, or (``broadcast``) a tensor that copies ``h[:, None]`` k times."""
    if broadcast:
        k = b.rng.randint(2, 4)
        return torch.randn(k, *s) + 2 * torch.sign(torch.randn(k, *s)), (k, *s), f"tensor{(k, *s)} broadcast"
    if b.chance(0.4):
        value = b.pick([3.0, -0.5, 0.25, -2.0])
        return value, s, str(value)
    return torch.randn(*s) + 2 * torch.sign(torch.randn(*s)), s, f"tensor{s}"


def g_arith(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    broadcast = not preserve and b.chance(0.25)
    value, out, cdesc = _constant(b, s, broadcast)
    raw = isinstance(value, Tensor) and b.chance(0.2)  # a tensor held by the code, not the model: fx must
    name = b.add(value) if isinstance(value, Tensor) and not raw else None  # keep it without touching the model
    get = (lambda net: getattr(net, name)) if name is not None else (lambda net: value)
    cdesc += " (raw constant)" if raw else ""
    prep = (lambda h: h.unsqueeze(1)) if broadcast else (lambda h: h)
    op = b.pick(["neg", "add", "sub", "rsub", "mul", "rmul", "div", "mul_kw", "div_kw", "add_alpha", "matmul",
                 "div_floor"])
    forms: dict[str, list[tuple[Any, Callable[[Tensor, Any], Tensor]]]] = {
        "neg": [(operator.neg, lambda h, c: -h), (torch.neg, lambda h, c: torch.neg(h)), ("neg", lambda h, c: h.neg()),
                ("__neg__", lambda h, c: h.__neg__())],
        "add": [(operator.add, lambda h, c: h + c), (torch.add, lambda h, c: torch.add(h, c)),
                ("add", lambda h, c: h.add(c)), ("__radd__", lambda h, c: c + h)],
        "sub": [(operator.sub, lambda h, c: h - c), (torch.sub, lambda h, c: torch.sub(h, c)), ("sub", lambda h, c: h.sub(c))],
        "rsub": [("__rsub__", lambda h, c: c - h)],
        "mul": [(operator.mul, lambda h, c: h * c), (torch.mul, lambda h, c: torch.mul(h, c)), ("mul", lambda h, c: h.mul(c))],
        "rmul": [("__rmul__", lambda h, c: c * h)],
        "div": [(operator.truediv, lambda h, c: h / c), (torch.div, lambda h, c: torch.div(h, c)),
                ("div", lambda h, c: h.div(c))],
        "mul_kw": [(torch.mul, lambda h, c: torch.mul(input=h, other=c))],
        "div_kw": [(torch.div, lambda h, c: torch.div(input=h, other=c))],
        "add_alpha": [(torch.add, lambda h, c: torch.add(h, c, alpha=-3.0)), (torch.sub, lambda h, c: torch.sub(h, c, alpha=2.0))],
        "div_floor": [(torch.div, lambda h, c: torch.div(h, c, rounding_mode="floor"))],
    }
    if op == "matmul":
        fout = s[-1] if preserve else b.rng.randint(1, 8)
        w = b.add(torch.randn(s[-1], fout) / math.sqrt(s[-1]))
        target, fn = b.pick([(operator.matmul, lambda h, c: h @ c), (torch.matmul, lambda h, c: torch.matmul(h, c)),
                             ("matmul", lambda h, c: h.matmul(c))])
        b.note("matmul", target)
        return (lambda net, h: fn(h, getattr(net, w))), s[:-1] + (fout,), f"matmul(const {s[-1]}x{fout})"
    if op in ("rsub", "rmul") and not isinstance(value, (int, float)) and not broadcast:
        op = op[1:]
    target, fn = b.pick(forms[op])
    b.note("arith:" + op + (" broadcast" if broadcast else ""), target)
    return (lambda net, h: fn(prep(h), get(net))), out, f"{op}({cdesc}) via {getattr(target, '__name__', target)}"


def g_clamp_tensor(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``clamp`` with tensor bounds, possibly broadcasting ``h`` to a larger shape."""
    broadcast = not preserve and b.chance(0.6)
    t, out, cdesc = _constant(b, s, broadcast)
    if not isinstance(t, Tensor):
        t = torch.full(s, t)
    name = b.add(t * 0.3)
    prep = (lambda h: h.unsqueeze(1)) if broadcast else (lambda h: h)
    target, fn = b.pick([(torch.clamp, lambda h, c: torch.clamp(h, min=c)), ("clamp", lambda h, c: h.clamp(max=c)),
                         (torch.clip, lambda h, c: torch.clip(h, min=c))])
    b.note("clamp tensor" + (" broadcast" if broadcast else ""), target)
    return (lambda net, h: fn(prep(h), getattr(net, name))), out, f"clamp({cdesc}) via {getattr(target, '__name__', target)}"


def g_getitem(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if preserve:
        return None
    n = s[0]
    kind = b.pick(["slice", "step", "ellipsis", "none", "advanced"])
    b.note("getitem" + (" advanced" if kind == "advanced" else ""), operator.getitem)
    if kind == "slice" and n > 1:
        return (lambda net, h: h[:, 1:]), (n - 1,) + s[1:], "h[:, 1:]"
    if kind == "step":
        return (lambda net, h: h[:, ::2]), ((n + 1) // 2,) + s[1:], "h[:, ::2]"
    if kind == "ellipsis" and s[-1] > 1:
        return (lambda net, h: h[..., :-1]), s[:-1] + (s[-1] - 1,), "h[..., :-1]"
    if kind == "advanced":
        idx = b.add(torch.tensor([b.rng.randrange(n) for _ in range(b.rng.randint(1, 2 * n))]))
        return (lambda net, h: h[:, getattr(net, idx)]), (len(getattr(b.net, idx)),) + s[1:], "h[:, idx with repeats]"
    return (lambda net, h: h[:, None]), (1,) + s, "h[:, None]"


REFUSED_KINDS = ["layer_norm", "group_norm", "instance_norm", "attention", "exp", "pow", "square", "product", "div_x"]


def g_refused(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """An op that lipreg must refuse (not globally Lipschitz)."""
    kind = b.pick(REFUSED_KINDS)
    if kind == "layer_norm":
        if b.chance(0.5):
            b.note("refused", nn.LayerNorm)
            return call(b.add(nn.LayerNorm(s[-1]))), s, "LayerNorm"
        b.note("refused", F.layer_norm)
        return (lambda net, h: F.layer_norm(h, s[-1:])), s, "F.layer_norm"
    if kind == "group_norm" and len(s) >= 2:
        if b.chance(0.5):
            b.note("refused", nn.GroupNorm)
            return call(b.add(nn.GroupNorm(1, s[0]))), s, "GroupNorm"
        b.note("refused", F.group_norm)
        return (lambda net, h: F.group_norm(h, 1)), s, "F.group_norm"
    if kind == "instance_norm" and 2 <= len(s) <= 4:
        cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[len(s) - 2]
        b.note("refused", cls)
        return call(b.add(cls(s[0]))), s, cls.__name__
    if kind == "attention" and len(s) == 2:
        if b.chance(0.5):
            b.note("refused", nn.MultiheadAttention)
            name = b.add(nn.MultiheadAttention(s[-1], 1, batch_first=True))
            return (lambda net, h: getattr(net, name)(h, h, h)[0]), s, "MultiheadAttention"
        b.note("refused", F.scaled_dot_product_attention)
        return (lambda net, h: F.scaled_dot_product_attention(h, h, h)), s, "F.scaled_dot_product_attention"
    forms = {"exp": [(torch.exp, torch.exp), ("exp", lambda h: h.exp())],
             "pow": [(torch.pow, lambda h: torch.pow(h, 2)), ("pow", lambda h: h.pow(2)), (operator.pow, lambda h: h ** 2)],
             "square": [(torch.square, torch.square), ("square", lambda h: h.square())],
             "product": [(operator.mul, lambda h: h * h)], "div_x": [(operator.truediv, lambda h: 1.0 / (h.abs() + 1))]}
    target, fn = b.pick(forms.get(kind, forms["exp"]))
    b.note("refused", target)
    return (lambda net, h: fn(h)), s, f"{getattr(target, '__name__', target)}"

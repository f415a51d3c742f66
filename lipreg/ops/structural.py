"""Structure and arithmetic: reshapes, permutations (transposes, flips, rolls, channel and pixel shuffles), copies
(``expand``, ``repeat``), dropout (and eval-mode stochastic depth), identity, slicing, add/sub/neg, products and
quotients by constants (``addcmul`` included), concatenation."""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .base import Call, Concat, LinearOp, NodeInfo, Refuse, Rule, Sum, display_name
from .registry import register_rule


class UnitNorm(LinearOp):
    """A linear op of norm exactly 1 applied as is: reshapes, permutations, basic slicing, ``contiguous``."""

    isometry = True

    def __init__(self) -> None:
        super().__init__(homogeneous=True)


class Reshape(UnitNorm):
    """A reshape that keeps the order of the entries (``view``, ``flatten``, ``squeeze``...): a bijection of the
    coordinates, ``A^T = A^{-1}``, the reshape back to the input's shape."""

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return v.reshape(info.out_shape)

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return u.reshape(info.in_shapes[0])


class Identity(UnitNorm):
    """``v -> v``: ``nn.Identity``, and dropout, which is the identity at evaluation (the function bounded)."""

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return v

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return u


class SignedIdentity(UnitNorm):
    """``x -> +-x + c``: an addition of a constant (``sign = 1``), ``c - x`` or ``-x`` (``sign = -1``)."""

    def __init__(self, sign: int) -> None:
        super().__init__()
        self.sign = sign

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return v if self.sign > 0 else -v

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return self.apply(info, call, u)


class Scale(LinearOp):
    """``x * c`` or ``x / c`` with ``c`` a constant (number or broadcast tensor): the diagonal map
    ``diag(c)`` (or ``diag(1/c)``), norm ``max |c|`` (or ``max 1/|c|``) when ``c`` does not enlarge the shape.
    ``names`` is the op's signature, ``factor`` a number multiplying ``c``, and ``homogeneous=False`` marks an op
    that adds a constant too (``addcmul``)."""

    def __init__(self, constant_position: int, reciprocal: bool, names: tuple[str, ...] = ("input", "other"),
                 factor: float = 1.0, homogeneous: bool = True) -> None:
        super().__init__(homogeneous=homogeneous)
        self.constant_position = constant_position  # in the signature ``names``
        self.reciprocal = reciprocal
        self.names, self.factor = names, factor

    def multiplier(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor | None:
        if info.in_shapes[0] != info.out_shape:
            return None  # c broadcasts x to a larger shape: not diagonal, leave it to the power method
        position = self.constant_position
        c = torch.as_tensor(call.arg_value(position, self.names[position]), dtype=dtype, device=call.device)
        return self.factor / c if self.reciprocal else self.factor * c

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor | None:
        m = self.multiplier(info, call, dtype)
        return None if m is None else m.abs().max()

    def has_adjoint(self, info: NodeInfo) -> bool:
        """Diagonal (its own adjoint) when ``c`` does not enlarge the shape; a broadcast goes to autograd."""
        return info.in_shapes[0] == info.out_shape

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return self.apply(info, call, u)


_PRODUCT = (
    "the product of two input-dependent tensors ({op}) is not globally Lipschitz: its partial derivatives grow "
    "with the inputs. Bound the product on a bounded domain and register that constant if you need it"
)


_BINARY = ("input", "other")
"""The signature of the binary ops (``torch.add(input, other, alpha=1)``, ``x.mul(other)``, ``a / b``): where an
argument sits, whether it is passed by position or by keyword."""


def _x_positions(info: NodeInfo) -> list[int]:
    return info.x_positions(_BINARY)


class AlphaSum(Sum):
    """``a + alpha b`` or ``a - alpha b`` (``torch.add``/``torch.sub``): coefficient 1 on ``input``, ``alpha``
    on ``other``, in the order of ``x_inputs`` (keyword calls may list ``other`` first)."""

    def coefficients(self, info: NodeInfo) -> list[float]:
        alpha = float(info.arg(2, "alpha", 1))
        positions = _x_positions(info)
        if len(positions) != len(info.x_inputs):  # an argument outside (input, other): the larger coefficient
            return [max(1.0, abs(alpha))] * len(info.x_inputs)
        return [1.0 if position == 0 else alpha for position in positions]


def _shift(info: NodeInfo, sign: int) -> Rule:
    """``+-x + c`` is the identity up to sign, unless ``c`` broadcasts ``x`` to a larger shape (each entry
    copied ``k`` times: norm ``sqrt(k)``) or ``alpha != 1``: then the generic affine rule."""
    if info.arg(2, "alpha", 1) != 1 or info.in_shapes[0] != info.out_shape:
        return LinearOp()
    return SignedIdentity(sign)


def _add(info: NodeInfo) -> Rule:
    return AlphaSum() if len(info.x_inputs) == 2 else _shift(info, 1)


def _sub(info: NodeInfo) -> Rule:
    if len(info.x_inputs) == 2:
        return AlphaSum()
    return _shift(info, 1 if _x_positions(info) == [0] else -1)


def _mul(info: NodeInfo) -> Rule:
    if len(info.x_inputs) == 2:
        return Refuse(_PRODUCT.format(op=info.name))
    positions = _x_positions(info)
    if len(positions) != 1:  # x passed outside (input, other): the generic linear rule
        return LinearOp(homogeneous=True)
    return Scale(constant_position=1 - positions[0], reciprocal=False)


def _div(info: NodeInfo) -> Rule:
    if _x_positions(info) != [0]:
        return Refuse(
            f"division by an input-dependent tensor ({info.name}) is not globally Lipschitz (1/x is unbounded near 0)"
        )
    if info.node.kwargs.get("rounding_mode") is not None:
        return Refuse(f"division with rounding_mode={info.node.kwargs['rounding_mode']!r} ({info.name}) jumps at "
                      "every integer: it is not continuous, so not Lipschitz")
    return Scale(constant_position=1, reciprocal=True)


_ADDCMUL = ("input", "tensor1", "tensor2")


def _addcmul(info: NodeInfo) -> Rule:
    """``input + value * tensor1 * tensor2`` (``torch.addcmul``, ``x.addcmul``). With ``x`` in ``input`` only, a
    shift of ``x`` (:func:`_shift`); in one factor only, the diagonal map ``x -> value * c * x`` plus a constant
    (the affine layers of ResMLP-style models, ``addcmul(beta, alpha, x)``); in both factors, a product, refused.
    In ``input`` and a factor, refused with the rewrite whose parts have rules."""
    positions = info.x_positions(_ADDCMUL)
    value = info.arg(3, "value", 1)
    if len(info.x_inputs) == 1 and positions == [0]:
        return SignedIdentity(1) if info.in_shapes[0] == info.out_shape else LinearOp()
    if len(info.x_inputs) == 1 and positions in ([1], [2]):
        return Scale(constant_position=3 - positions[0], reciprocal=False, names=_ADDCMUL, factor=value,
                     homogeneous=False)
    if sorted(positions) == [1, 2]:
        return Refuse(_PRODUCT.format(op=info.name))
    return Refuse(f"{info.name} adds an input-dependent tensor to a product with another (addcmul(a, b, c) with a and "
                  "b or c input-dependent): write it as a + value * (b * c), whose parts lipreg bounds")


def _matmul(info: NodeInfo) -> Rule:
    if len(info.x_inputs) == 2:
        return Refuse(_PRODUCT.format(op=info.name) + " (attention-like x @ x^T products are refused)")
    return LinearOp(homogeneous=True)


def _tuple_element(info: NodeInfo, index: Any, elements: Sequence[Any]) -> Rule:
    """``op(x)[i]`` for an op returning a tuple (``max_pool*d_with_indices``: ``(values, indices)``). The op's rule
    bounds its first tensor, which is the value the graph carries for the op: element 0 is that tensor itself,
    the identity. Any other element (the argmax indices) is integer-valued and jumps where the argmax changes:
    not Lipschitz, refused where it is used (an unused one, as ``values, _ = ...`` leaves, is dropped)."""
    in_range = isinstance(index, int) and -len(elements) <= index < len(elements)
    if in_range and (index % len(elements) == 0 or not info.node.users):  # no users: dropped with the dead code
        return Identity()
    producer = display_name(info.x_inputs[0])
    return Refuse(f"{info.name} takes element {index!r} of the tuple returned by {producer}; only its first element"
                  " (the pooled values) is a Lipschitz function of the input: the indices are integers that jump "
                  "where the argmax changes")


def _getitem(info: NodeInfo) -> Rule:
    """Basic indexing (ints, slices, None, ...) selects distinct entries: norm 1 unless empty. Advanced
    indexing may repeat entries (norm up to sqrt(repeats)): left to the power method. Indexing the tuple an
    op returns is :func:`_tuple_element`."""
    index = info.arg(1, "idx")
    elements = info.x_inputs[0].meta.get("tensor_meta")
    if isinstance(elements, (tuple, list)) and not isinstance(elements, TensorMetadata):
        return _tuple_element(info, index, elements)
    parts = index if isinstance(index, tuple) else (index,)
    if all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts):
        return UnitNorm()
    return LinearOp(homogeneous=True)


_DISTINCT_SIZES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def _permutation(info: NodeInfo) -> Rule:
    """A transpose, ``permute``, ``movedim`` or ``t`` (and ``x.T`` / ``x.mT``): a permutation of the entries, norm 1,
    as long as the batch axis stays first. One that moves it (``x.T`` of a ``(B, F)`` tensor) mixes the samples of a
    batch: lipreg bounds the map of one sample, so it is refused with the fix. Where axis 0 goes is read by applying
    the op to an empty meta tensor whose axes have distinct sizes."""
    ndim = len(info.in_shapes[0])
    if ndim > len(_DISTINCT_SIZES):
        return UnitNorm()
    probe = torch.empty(_DISTINCT_SIZES[:ndim], device="meta")
    target = info.node.target
    args = fx.node.map_arg(info.node.args[1:], lambda n: info.static_values.get(n, n))
    kwargs = fx.node.map_arg(info.node.kwargs, lambda n: info.static_values.get(n, n))
    if info.node.op == "call_function" and target is getattr:
        moved = getattr(probe, args[0])
    elif isinstance(target, str):
        moved = getattr(probe, target)(*args, **kwargs)
    else:
        moved = target(probe, *args, **kwargs)
    if moved.shape[:1] == probe.shape[:1]:
        return UnitNorm()
    return Refuse(f"{info.name} moves the batch axis (axis 0 of its input) to another position: lipreg bounds the "
                  "map of one sample, whose batch axis stays first, and a model that moves it mixes the samples of a "
                  "batch. Permute only the per-sample axes (x.transpose(1, 2), x.permute(0, 2, 1), "
                  "x.flatten(1).unsqueeze(-1) for a column per sample)")


_ATTRIBUTES: dict[str, Rule | Callable[[NodeInfo], Rule]] = {"T": _permutation, "mT": _permutation,
                                                              "data": Identity()}
"""Attributes of a tensor that are linear maps of it: transposes (permutations) and ``data`` (its values)."""


def _attribute(info: NodeInfo) -> Rule:
    """``getattr`` on an input-dependent value: ``.values`` / ``.indices`` of the named tuple an op returns
    (``torch.max(x, dim)``) are its elements 0 and 1 (:func:`_tuple_element`); ``x.T``, ``x.mT`` and ``x.data``
    are in :data:`_ATTRIBUTES`; any other attribute is refused."""
    name = info.arg(1, "name")
    elements = info.x_inputs[0].meta.get("tensor_meta")
    if name in ("values", "indices") and isinstance(elements, tuple) and not isinstance(elements, TensorMetadata):
        return _tuple_element(info, 0 if name == "values" else 1, elements)
    if name in _ATTRIBUTES:
        rule = _ATTRIBUTES[name]
        return rule if isinstance(rule, Rule) else rule(info)
    return Refuse(f"{info.name} reads the attribute {name!r} of an input-dependent tensor, which lipreg has no rule "
                  "for: compute it with a tensor op instead")


class FirstOnly(Sum):
    """An op whose value is its first argument's, converted: the other input-dependent arguments give only their
    dtype or device (``y.type_as(x)``, ``y.to(x)``), coefficient 0."""

    def coefficients(self, info: NodeInfo) -> list[float]:
        return [1.0 if position == 0 else 0.0 for position in info.x_positions(("self", "other"))]


def _conversion(info: NodeInfo) -> Rule:
    """A conversion between floating dtypes or devices (``x.float()``, ``x.to(y)``...): the identity on the real
    values it rounds. A cast to an integer dtype is refused by capture, as every integer-valued result is."""
    return Identity() if len(info.x_inputs) == 1 else FirstOnly()


def _view(info: NodeInfo) -> Rule:
    """``x.view(*shape)`` is a reshape; ``x.view(dtype)`` reinterprets the bits of each entry as another dtype (an
    integer, or a float of another width): a discontinuous function of the values, refused."""
    arguments = fx.node.map_arg([*info.node.args[1:], *info.node.kwargs.values()],
                                lambda n: info.static_values.get(n, n))  # x.view(y.dtype): the traced value
    if any(isinstance(a, torch.dtype) for a in arguments):
        return Refuse(f"{info.name} views the bits of the input as another dtype (Tensor.view(dtype)): the values it "
                      "gives jump as the input's bits change, so they are no Lipschitz function of the input. Use "
                      "x.view(shape) for a reshape, or x.to(dtype) for a conversion of the values")
    return Reshape()


def _stochastic_depth(info: NodeInfo) -> Rule:
    """torchvision's ``stochastic_depth(input, p, mode, training=True)`` (named, not imported): it returns
    ``input`` itself when ``training`` is false (the traced eval mode passes ``self.training``) or ``p = 0``;
    otherwise it multiplies by a fresh random mask scaled by ``1 / (1 - p)``: random, refused."""
    training, p = info.arg(3, "training", True), info.arg(1, "p")
    if training is False or p == 0:
        return Identity()
    return Refuse(f"stochastic depth is active (training={training!r}, p={p}) in the function bounded: each call "
                  "drops the input at random and scales it by 1/(1-p), so the output is random, not a function of the "
                  "input. Pass training=self.training (the identity in eval mode)")


class Shuffle(UnitNorm):
    """A permutation of the entries (``channel_shuffle``, ``pixel_shuffle``, ``pixel_unshuffle``): norm exactly 1;
    its adjoint is the inverse permutation, ``inverse(u, *arguments)``. It is computed by the op itself, or by
    ``forward(v, *forward_arguments)`` when given (``native_channel_shuffle`` has no autograd derivative, which
    the power method and Lanczos need where a node has no explicit adjoint)."""

    def __init__(self, inverse: Any, arguments: tuple[Any, ...], forward: Any = None,
                 forward_arguments: tuple[Any, ...] = ()) -> None:
        super().__init__()
        self.inverse, self.arguments = inverse, arguments
        self.forward, self.forward_arguments = forward, forward_arguments

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        if self.forward is None:
            return super().apply(info, call, v)
        return self.forward(v, *self.forward_arguments)

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return self.inverse(u, *self.arguments)


def _channel_shuffle(info: NodeInfo, groups: int) -> Shuffle:
    """Channel shuffle with ``g`` groups reads the channels as a ``g x C/g`` matrix and transposes it: the inverse
    is the shuffle with ``C/g`` groups (torch takes the channels on axis 1 whatever the rank)."""
    channels = info.in_shapes[0][1]
    return Shuffle(F.channel_shuffle, (channels // groups,), forward=F.channel_shuffle, forward_arguments=(groups,))


class Copies(LinearOp):
    """``expand`` / ``broadcast_to`` / ``repeat``: every entry copied the same number ``k = n_out / n_in`` of
    times, so ``A^T A = k I`` and the norm is ``sqrt(k)`` exactly."""

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        copies = info.out_shape.numel() / info.in_shapes[0].numel()
        return torch.full((), copies, dtype=dtype, device=call.device).sqrt()  # a fill: no host-to-device copy


def _dropout(info: NodeInfo) -> Rule:
    """Functional dropout: the identity when inactive (``training=False``, which ``training=self.training`` is in
    the traced eval mode) or when ``p = 0``. Active, every call draws a fresh random mask and scales what it keeps
    by ``1 / (1 - p)``: the output is random, not a function of the input. ``F.dropout`` and ``F.dropout1d/2d/3d``
    default to ``training=True``; ``torch.dropout(input, p, train)`` and its kin take every argument."""
    try:
        flag, default = "training", inspect.signature(info.node.target).parameters["training"].default
    except ValueError:  # a builtin (torch.dropout...): no signature, no defaults
        flag, default = "train", None
    training, p = info.arg(2, flag, default), info.arg(1, "p", 0.5)
    if training is False or p == 0:
        return Identity()
    return Refuse(
        f"the dropout is active ({flag}={training!r}, p={p}) in the function bounded (the model in eval mode): "
        f"each call multiplies by a fresh random mask scaled by 1/(1-p), so the output is random, not a function of "
        f"the input, and no Lipschitz constant holds for it. Pass {flag}=self.training (the identity in eval mode), "
        "or use an nn.Dropout module"
    )


register_rule("view", _view)
for _target in ("reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "unflatten", torch.flatten,
                torch.reshape, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten):
    register_rule(_target, Reshape())
for _target in ("permute", "transpose", "t", "movedim", torch.permute, torch.transpose, torch.movedim):
    register_rule(_target, _permutation)
for _target in ("flip", torch.flip, "roll", torch.roll):
    register_rule(_target, UnitNorm())
for _target in ("expand", "broadcast_to", torch.broadcast_to, "repeat"):
    register_rule(_target, Copies())
for _target in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout, "clone", "detach"):
    register_rule(_target, Identity())
for _target in ("to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda"):
    register_rule(_target, _conversion)
for _target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout):
    register_rule(_target, _dropout)
for _target in (operator.neg, torch.neg, "neg", "__neg__"):
    register_rule(_target, SignedIdentity(-1))
for _target in (operator.add, operator.iadd, torch.add, "add", "__add__", "__radd__"):
    register_rule(_target, _add)
for _target in (operator.sub, operator.isub, torch.sub, "sub", "__sub__", "__rsub__"):
    register_rule(_target, _sub)
for _target in (operator.mul, operator.imul, torch.mul, "mul", "__mul__", "__rmul__"):
    register_rule(_target, _mul)
for _target in (operator.truediv, torch.div, "div", "__truediv__"):
    register_rule(_target, _div)
for _target in (operator.matmul, torch.matmul, "matmul", "__matmul__"):
    register_rule(_target, _matmul)
register_rule(operator.getitem, _getitem)
register_rule(getattr, _attribute)
for _target in (torch.addcmul, "addcmul"):
    register_rule(_target, _addcmul)
register_rule("torchvision.ops.stochastic_depth.stochastic_depth", _stochastic_depth)
register_rule(nn.ChannelShuffle, lambda info: _channel_shuffle(info, int(info.module.groups)))
for _target in (F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle):
    register_rule(_target, lambda info: _channel_shuffle(info, int(info.arg(1, "groups"))))
register_rule(nn.PixelShuffle, lambda info: Shuffle(F.pixel_unshuffle, (int(info.module.upscale_factor),)))
register_rule(nn.PixelUnshuffle, lambda info: Shuffle(F.pixel_shuffle, (int(info.module.downscale_factor),)))
for _target in (F.pixel_shuffle, torch.pixel_shuffle):
    register_rule(_target, lambda info: Shuffle(F.pixel_unshuffle, (int(info.arg(1, "upscale_factor")),)))
for _target in (F.pixel_unshuffle, torch.pixel_unshuffle):
    register_rule(_target, lambda info: Shuffle(F.pixel_shuffle, (int(info.arg(1, "downscale_factor")),)))
for _target in (torch.cat, torch.concat, torch.stack):
    register_rule(_target, Concat())

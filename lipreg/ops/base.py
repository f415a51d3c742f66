"""The rule kinds: how one op of the graph acts on Lipschitz constants.

AutoLip (paper Alg. 1) needs, for each node ``f(a_1..a_k)``, the sup of its partial Jacobian norms ``L_i(f)``.
The kinds below say how those are obtained:

* :class:`LinearOp`: ``f(x) = A x + b``; ``L(f) = sigma_1(A)`` by the power method (Alg. 2) or a closed form.
  Consecutive linear ops are fused into one operator before the norm is taken.
* :class:`Activation`: elementwise with slopes in ``[a, b]``; ``L = max(|a|, |b|)``. SeqLip uses the interval.
  On an op that broadcasts its input to a larger output it becomes a :class:`Constant` (:func:`broadcast_guard`).
* :class:`Constant`: any op with a known Lipschitz constant ``c`` (max pooling, user rules).
* :class:`Sum`: ``f = sum_i c_i a_i`` of input-dependent tensors; ``L = sum_i |c_i| L(a_i)``.
* :class:`Concat`: ``f = cat(a_1..a_k)``; ``L = sqrt(sum_i L(a_i)^2)`` (the parts are orthogonal blocks).
* :class:`Refuse`: an op that is not globally Lipschitz, or needs a stated bound: capture fails with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Protocol

import torch
from torch import Tensor, fx, nn

from ..linalg.maps import OneSignMap, WeightedMap


def raw_argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument at position ``index``, else keyword ``name``, else ``default`` (fx nodes left in)."""
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def argument_positions(node: fx.Node, names: tuple[str, ...], wanted: list[fx.Node]) -> list[int]:
    """The position in the signature ``names`` of each node of ``wanted`` (in ``wanted``'s order, repeats
    included) among the call's arguments, whether passed by position or by keyword (``torch.mul(input=x,
    other=c)``: ``x`` at 0). A node passed in no named slot is left out."""
    slots = [raw_argument(node, i, name, None) for i, name in enumerate(names)]
    positions: list[int] = []
    for target in wanted:
        free = [i for i, slot in enumerate(slots) if slot is target and i not in positions]
        positions.extend(free[:1])
    return positions


def display_name(node: fx.Node) -> str:
    """How messages and layer tables name a node: a module call by its qualified path (``features.0``); any
    other op by fx's node name, prefixed with the path of the module whose ``forward`` made the call
    (``block.relu_1``), read from fx's ``nn_module_stack``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("",))[0] if stack else ""
    return f"{path}.{node.name}" if path else node.name


@dataclass(eq=False)
class NodeInfo:
    """What a rule may look at: the fx node, its module (for ``call_module``), which arguments depend on the
    input, the per-sample shapes (batch of one) and the traced values of non-tensor arguments."""

    node: fx.Node
    module: nn.Module | None
    x_inputs: list[fx.Node]
    in_shapes: list[torch.Size]
    out_shape: torch.Size
    static_values: Mapping[fx.Node, Any] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        """The node's name in messages (:func:`display_name`)."""
        return display_name(self.node)

    def x_positions(self, names: tuple[str, ...]) -> list[int]:
        """The signature position (in ``names``) of each input-dependent argument, in ``x_inputs`` order."""
        return argument_positions(self.node, names, self.x_inputs)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The call argument at position ``index`` or keyword ``name``, with fx nodes of non-tensor values
        (``x.size(0)``...) replaced by their traced value."""
        return fx.node.map_arg(raw_argument(self.node, index, name, default),
                               lambda n: self.static_values.get(n, n))


class Call(Protocol):
    """Evaluates one node for a rule: input-dependent arguments from a mapping, constants from the model."""

    device: torch.device  # where the model's tensors are

    def __call__(self, x_values: Mapping[fx.Node, Tensor]) -> Tensor:
        """The node's op applied with its input-dependent arguments replaced by ``x_values``."""

    def arg_value(self, index: int, name: str, default: Any = None) -> Any:
        """A constant argument's current value (a model tensor keeps its autograd history)."""

    def memo(self, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, a value of the model's constants, computed once per evaluation for use without grad:
        under grad it is computed afresh (so each use has its own autograd history) and kept; without grad the
        value kept is reused (the adjoint reuses the gains its forward computed)."""


class Rule:
    """Base class of every rule. ``describe`` is used in layer tables and errors."""

    def describe(self) -> str:
        return type(self).__name__


class LinearOp(Rule):
    """An affine op ``x -> A x + b`` in its (single) input-dependent argument.

    :meth:`apply` must return ``A v`` (the bias dropped). The default evaluates the op on ``v`` and, unless
    ``homogeneous``, subtracts its value at 0 (one extra evaluation): right for any affine op.
    :meth:`adjoint` returns ``A^T u`` where the rule knows it in closed form (:meth:`has_adjoint`): ``W^T`` of a
    linear layer, the transposed convolution of a convolution, a diagonal op itself, the inverse of a reshape;
    elsewhere the operator takes ``A^T u`` from autograd (one backward pass of :meth:`apply`).
    ``isometry`` marks reshapes and the like, whose norm is exactly 1; :meth:`closed_form_norm` may give the
    exact norm without iterations (batch norm, scalar multiplication).
    """

    isometry: bool = False

    def __init__(self, homogeneous: bool = False) -> None:
        self.homogeneous = homogeneous

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        (x,) = info.x_inputs
        out = call({x: v})
        if self.homogeneous:
            return out
        return out - call({x: torch.zeros_like(v)})

    def has_adjoint(self, info: NodeInfo) -> bool:
        """Whether :meth:`adjoint` is implemented for this call."""
        return False

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        """``A^T u`` for ``u`` shaped like the output (batch of one), exactly, for inputs of shape
        ``info.in_shapes[0]``."""
        raise NotImplementedError(f"{self.describe()} has no explicit adjoint")

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor | None:
        return None

    def multiplier(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor | None:
        """For a diagonal op ``v -> m * v`` (same shape in and out), ``m`` broadcastable to ``(1, *shape)``."""
        return None

    def structure(self, info: NodeInfo, call: Call) -> WeightedMap | OneSignMap | None:
        """What the certificates need to know of this op beyond :meth:`multiplier` and :meth:`closed_form_norm`
        (its weight and geometry, or that its entries have one sign); the certificate itself is decided in
        :mod:`lipreg.linalg.certify`."""
        return None


class Activation(Rule):
    """An elementwise function whose derivative lies in ``[a, b]`` everywhere; Lipschitz constant ``max(|a|, |b|)``."""

    def __init__(self, a: float, b: float) -> None:
        if a > b:
            raise ValueError(f"slope interval [{a}, {b}] is empty")
        self.a, self.b = float(a), float(b)

    def slopes(self, info: NodeInfo) -> tuple[float, float]:
        return self.a, self.b

    def describe(self) -> str:
        return f"Activation[{self.a:g}, {self.b:g}]"


class Constant(Rule):
    """An op with a known Lipschitz constant in its input-dependent arguments (taken jointly)."""

    def __init__(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"a Lipschitz constant must be >= 0, got {value}")
        self.value = float(value)

    def constant(self, info: NodeInfo) -> float:
        return self.value

    def describe(self) -> str:
        return f"Constant({self.value:g})"


class Sum(Rule):
    """``f = sum_i c_i a_i`` over input-dependent tensors: ``L(f) <= sum_i |c_i| L(a_i)``."""

    def coefficients(self, info: NodeInfo) -> list[float]:
        return [1.0] * len(info.x_inputs)


class Concat(Rule):
    """``f = cat(a_1..a_k)``: ``||f(x)-f(y)||^2 = sum_i ||a_i(x)-a_i(y)||^2``, so ``L(f) <= sqrt(sum_i L(a_i)^2)``."""


class Refuse(Rule):
    """An op lipreg must not bound silently; capture raises :class:`UnsupportedOpError` with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def broadcast_guard(info: NodeInfo, rule: Rule) -> Rule:
    """An :class:`Activation` rule on a one-input op whose output is larger than its input
    (``torch.clamp(x, min=t)`` with ``t`` broadcasting ``x``) becomes a :class:`Constant`: each entry of ``x`` is
    copied ``k = n_out / n_in`` times before the elementwise function, so the Jacobian is ``D E`` with ``D``
    diagonal (slopes in ``[a, b]``) and ``E`` the copy matrix, ``E^T E = k I``: ``||D E|| <= sqrt(k) max(|a|, |b|)``,
    attained when every slope can be the extreme one at once (``clamp``). An output smaller than the input means
    the op is not elementwise at all: refused. Any other rule is returned as it is."""
    if not isinstance(rule, Activation) or len(info.x_inputs) != 1 or info.in_shapes[0] == info.out_shape:
        return rule
    n_in, n_out = info.in_shapes[0].numel(), info.out_shape.numel()
    if n_out < n_in:
        return Refuse(f"its rule {rule.describe()} is elementwise, but it maps {n_in} entries to {n_out}: register "
                      "a rule for what the op computes")
    a, b = rule.slopes(info)
    return Constant(math.sqrt(n_out / n_in) * max(abs(a), abs(b)))

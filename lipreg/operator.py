"""``LinearOperator``: the linear part ``A`` of one (fused) linear node of the graph, as a map on one sample.

A linear node of :class:`~lipreg.capture.graph.LipGraph` stands for a segment of affine ops (conv -> batch norm ->
flatten...). Its operator is ``A = A_m ... A_1``, the ops' linear parts (biases dropped), acting on one sample of
per-sample shape ``in_shape``; vectors carry a leading batch dimension of 1, blocks of vectors one of ``k``.
Everything the bounds need from a node goes through this class:

* ``matvec(v) = A v`` and ``rmatvec(u) = A^T u``: the chain of the ops' explicit adjoints in reverse order
  (``W^T``, transposed convolutions, diagonals, inverse reshapes) when every op has one
  (:meth:`~lipreg.ops.LinearOp.adjoint`), else one autograd backward of ``A``; ``gram(v) = A^T A v``
  (paper Alg. 2), ``matmat`` on blocks;
* ``dense()``, the ``n_out x n_in`` matrix, built from the smaller side;
* ``closed_form_norm()``, the exact norm when the ops know it (isometries, a single diagonal op);
* ``certified_norm()``, a guaranteed upper bound on ``sigma_1(A)``, from float64 weights, rounded upwards: the
  rules describe the ops (:meth:`LinearOperator.facts`), :mod:`lipreg.linalg.certify` decides everything else.

The constants (weights, buffers, what is computed from them) are read from the model once per evaluation
(:func:`linear_operators`), with their autograd history, so ``||A v||`` is differentiable w.r.t. the weights.
They are computed by :class:`_Evaluator`, an ``fx.Interpreter`` over the traced graph that runs the constant
nodes on demand and the rules' node calls with the input-dependent arguments given. The operators, their
evaluator and the rules' calls are fixed by the graph: built once per (graph, dtype, device), and each
evaluation starts by emptying the evaluator's values.
"""
from __future__ import annotations

import operator as _operator
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import Tensor, fx

from .capture.graph import LipGraph, LipNode
from .errors import UnsupportedOpError
from .linalg.certify import MissingCertificate, OpFacts, certified_node_norm, dense_matrix
from .linalg.power import gram_step
from .ops.base import display_name, raw_argument
from .ops.structural import Identity, SignedIdentity
from .policy import BoundPolicy

_POINTWISE_ISOMETRIES = (Identity, SignedIdentity)  # v -> +-v: a diagonal op's gains fold across them


class LinearOperator:
    """``A`` of one (fused) linear node (see the module docstring), evaluated in ``dtype`` on ``device``.

    Public for typing; built only by :meth:`lipreg.LipschitzEstimator.linear_operators` (its parts are internal)."""

    def __init__(self) -> None:
        raise TypeError("LinearOperator is not built directly: use LipschitzEstimator(model, x).linear_operators(), "
                        "which gives the operator of every linear node by name")

    @classmethod
    def _of(cls, node: LipNode, evaluator: _Evaluator) -> LinearOperator:
        """The operator of ``node``, its constants computed by ``evaluator``."""
        self = cls.__new__(cls)
        self._init(node, evaluator)
        return self

    def _init(self, node: LipNode, evaluator: _Evaluator) -> None:
        self.node = node
        self._evaluator = evaluator
        self._steps = [(info, rule, evaluator.call(info.node)) for info, rule in zip(node.ops, node.rules)]
        self.explicit_adjoint = all(rule.has_adjoint(info) for info, rule in zip(node.ops, node.rules))
        """Whether :meth:`rmatvec` chains the ops' explicit adjoints (else it takes one autograd backward)."""

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def dtype(self) -> torch.dtype:
        return self._evaluator.dtype

    @property
    def device(self) -> torch.device:
        return self._evaluator.device

    @property
    def in_shape(self) -> torch.Size:
        """The shape of a vector ``v`` (batch of one): ``(1, *per-sample input shape)``."""
        return self.node.in_shape

    @property
    def out_shape(self) -> torch.Size:
        return self.node.out_shape

    # ------------------------------------------------------------ actions
    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape :attr:`in_shape`, differentiable w.r.t. ``v`` and the weights."""
        for info, rule, call in self._steps:
            v = rule.apply(info, call, v)
        return v

    def rmatvec(self, u: Tensor) -> Tensor:
        """``A^T u`` for ``u`` of shape :attr:`out_shape` (no grad to the weights): ``A_1^T ... A_m^T u`` from the
        ops' explicit adjoints when :attr:`explicit_adjoint`, else one backward pass of :meth:`matvec`."""
        if self.explicit_adjoint:
            with torch.no_grad():
                for info, rule, call in reversed(self._steps):
                    u = rule.adjoint(info, call, u)
            return u
        with torch.enable_grad():
            probe = torch.zeros(self.in_shape, dtype=u.dtype, device=u.device, requires_grad=True)
            (at_u,) = torch.autograd.grad(self.matvec(probe), probe, u)
        return at_u

    def gram(self, v: Tensor) -> Tensor:
        """``A^T A v`` (paper Alg. 2), with no grad to the weights: :meth:`rmatvec` of :meth:`matvec` with explicit
        adjoints, else one forward and one backward pass."""
        if self.explicit_adjoint:
            with torch.no_grad():
                return self.rmatvec(self.matvec(v))
        return gram_step(self.matvec, v)

    def matmat(self, vs: Tensor) -> Tensor:
        """:meth:`matvec` on a block ``(k, *in_shape[1:])`` -> ``(k, *out_shape[1:])``.

        The graph was traced on one sample, so sizes read from the input (``x.view(x.size(0), -1)``) are 1:
        ``torch.func.vmap`` maps the one-sample function over the block instead of feeding a batch of k.
        """
        return torch.func.vmap(lambda v: self.matvec(v.unsqueeze(0)).squeeze(0))(vs)

    def dense(self) -> Tensor:
        """The matrix ``A`` (``n_out x n_in``), from its action on the identity basis of the smaller side."""
        return dense_matrix(self.matmat, self.in_shape[1:], self.device, self.dtype)

    # ------------------------------------------------------------ norms
    def closed_form_norm(self) -> Tensor | None:
        """The exact norm without iterations, when there is one: isometries (reshapes, dropout...) drop out,
        and a single remaining op may know its norm (batch norm, scaling)."""
        rest = [(info, rule) for info, rule in zip(self.node.ops, self.node.rules) if not rule.isometry]
        if not rest:
            return torch.ones((), dtype=self.dtype, device=self.device)
        if len(rest) != 1:
            return None
        info, rule = rest[0]
        norm = rule.closed_form_norm(info, self._evaluator.call(info.node), self.dtype)
        return None if norm is None else norm.to(self.device)

    def certified_norm(self, policy: BoundPolicy = BoundPolicy()) -> Tensor:
        """A guaranteed upper bound on ``sigma_1(A)`` in float64, differentiable, computed from the weights in
        float64 whatever :attr:`dtype`: the ops' rules describe them (:meth:`facts`), and every decision (route,
        folding of gains, rounding) is taken by :func:`lipreg.linalg.certify.certified_node_norm`."""
        if self.dtype != torch.float64:
            return self.in_float64().certified_norm(policy)
        try:
            return certified_node_norm(self.facts(), self.in_shape.numel(), self.out_shape.numel(), self.dense,
                                       policy, self.device)
        except MissingCertificate as missing:
            op = missing.op
            raise UnsupportedOpError(
                f"no certified norm for {op.name!r} and its operator is too large to form "
                f"({self.in_shape.numel()} x {self.out_shape.numel()}): give its rule a closed_form_norm or a "
                "structure, or use the estimate est() (not a certificate)"
            ) from None

    def facts(self) -> list[OpFacts]:
        """What each op's rule says of it, for the certificate (:class:`lipreg.linalg.certify.OpFacts`)."""
        return [OpFacts(name=f"{rule.describe()} at node {info.name}", in_shape=info.in_shapes[0],
                        out_shape=info.out_shape, isometry=rule.isometry,
                        pointwise=isinstance(rule, _POINTWISE_ISOMETRIES),
                        multiplier=rule.multiplier(info, call, self.dtype),
                        closed_form=rule.closed_form_norm(info, call, self.dtype),
                        structure=rule.structure(info, call))
                for info, rule, call in self._steps]

    def in_float64(self) -> LinearOperator:
        """The same operator evaluated from the weights in float64 (for certificates)."""
        return linear_operators(self._evaluator.lip_graph, torch.float64, self.device)[self.node]

    def check_kernels(self) -> None:
        """Apply every op once, as the bounds will: an op whose kernel does not exist in this dtype and device
        (``avg_pool3d`` in bfloat16 on CPU) is refused now, with its node and the fix. An op that fails in float64
        too is not a dtype matter: its own error is raised."""
        reference = self.in_float64()._evaluator
        with torch.no_grad():
            v = torch.zeros(self.in_shape, dtype=self.dtype, device=self.device)
            for info, rule, call in self._steps:
                try:
                    v = rule.apply(info, call, v)
                except Exception as err:
                    rule.apply(info, reference.call(info.node), v.to(torch.float64))  # raises if not dtype
                    raise UnsupportedOpError(
                        f"{self._evaluator.lip_graph.locate(info.node)} cannot be computed in {self.dtype} on "
                        f"{self.device}: {type(err).__name__}: {err}. Build the estimator with dtype=torch.float32 "
                        "(or torch.float64); certified_bound() is computed in float64 whatever the dtype"
                    ) from err

    def __repr__(self) -> str:
        return (f"LinearOperator({self.name!r}, in_shape={tuple(self.in_shape[1:])}, "
                f"out_shape={tuple(self.out_shape[1:])}, dtype={self.dtype})")


Operators = Mapping[LipNode, "LinearOperator"]
"""The operators of one evaluation, by node (what :func:`linear_operators` returns)."""


def linear_operators(graph: LipGraph, dtype: torch.dtype, device: torch.device) -> dict[LipNode, LinearOperator]:
    """The operator of every linear node, sharing one fresh read of the model's constants (for one bound).
    The evaluator and operators are fixed by the graph: built on the first call for a (dtype, device), kept in
    ``graph.derived``."""
    built = graph.derived.setdefault(linear_operators, {})
    key = (dtype, torch.device(device))
    if key not in built:
        evaluator = _Evaluator(graph, dtype, key[1])
        built[key] = evaluator, {node: LinearOperator._of(node, evaluator) for node in graph.linear_nodes()}
    evaluator, operators = built[key]
    evaluator.reset()  # a fresh read of the model's constants
    return dict(operators)


class _Evaluator(fx.Interpreter):
    """The traced graph as an interpreter for the operators' node calls, in ``dtype`` on ``device``.

    Constant nodes (parameters and buffers, what the graph computes from them alone) are run on demand by
    :meth:`constant` and kept in ``env`` until the next evaluation: parameters and buffers are read from the
    model now (so they carry autograd history), floating tensors cast to ``dtype``, non-tensor values as traced.
    :meth:`run_call` runs one node with its input-dependent arguments given (the rules' :class:`lipreg.ops.Call`);
    a module whose floating parameters or buffers are of another dtype runs on them cast, through
    ``torch.func.functional_call``.
    """

    def __init__(self, graph: LipGraph, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(graph.graph_module, garbage_collect_values=False)
        self.lip_graph = graph
        self.dtype = dtype
        self.device = device
        self._calls: dict[fx.Node, _NodeCall] = {}
        self.memos: dict[tuple[fx.Node, Hashable], Tensor] = {}

    def reset(self) -> None:
        """Forget every value: the next use reads the model's constants again."""
        self.env.clear()
        self.memos.clear()

    def call(self, node: fx.Node) -> _NodeCall:
        """The :class:`lipreg.ops.Call` of ``node`` (one per node)."""
        if node not in self._calls:
            self._calls[node] = _NodeCall(node, self)
        return self._calls[node]

    def constant(self, node: fx.Node) -> Any:
        """The value of a node that does not depend on the input, computed once per evaluation."""
        graph = self.lip_graph
        if node in graph.static_values:
            return graph.static_values[node]
        if node in self.env:
            return self.env[node]
        if node in graph.depends:
            raise UnsupportedOpError(f"node {display_name(node)!r} depends on the input where a constant was expected")
        result = self.run_node(node)
        if isinstance(result, Tensor) and result.is_floating_point():
            result = result.to(self.dtype)
        self.env[node] = result
        return result

    def run_call(self, node: fx.Node, x_values: Mapping[fx.Node, Tensor]) -> Any:
        """``node`` applied with its input-dependent arguments replaced by ``x_values``, constants by their value."""
        lookup = lambda n: x_values[n] if n in x_values else self.constant(n)  # noqa: E731
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lookup)
        return getattr(self, node.op)(node.target, args, kwargs)

    # ----------------------------------------------------- fx.Interpreter hooks
    def map_nodes_to_values(self, args: Any, n: fx.Node) -> Any:
        """A constant node's arguments: constants themselves, computed on demand."""
        return fx.node.map_arg(args, self.constant)

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Read now from the model, except the constants only the ``GraphModule`` holds (``_tensor_constant0``)."""
        graph = self.lip_graph
        owner = graph.graph_module if target in graph.tracer_constants else graph.root
        return _operator.attrgetter(target)(owner)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.submodules[target]
        cast = {name: t.to(self.dtype) for name, t in [*module.named_parameters(), *module.named_buffers()]
                if t.is_floating_point() and t.dtype != self.dtype}
        if cast:
            return torch.func.functional_call(module, cast, args, kwargs)
        return module(*args, **kwargs)


class _NodeCall:
    """:class:`lipreg.ops.Call` for one node of an :class:`_Evaluator`."""

    __slots__ = ("node", "evaluator", "device")

    def __init__(self, node: fx.Node, evaluator: _Evaluator) -> None:
        self.node = node
        self.evaluator = evaluator
        self.device = evaluator.device

    def __call__(self, x_values: Mapping[fx.Node, Tensor]) -> Tensor:
        return self.evaluator.run_call(self.node, x_values)

    def arg_value(self, index: int, name: str, default: Any = None) -> Any:
        return fx.node.map_arg(raw_argument(self.node, index, name, default), self.evaluator.constant)

    def memo(self, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        memos, key = self.evaluator.memos, (self.node, key)
        if torch.is_grad_enabled() or key not in memos:
            memos[key] = compute()
        return memos[key]

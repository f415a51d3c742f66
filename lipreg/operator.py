"""``LinearOperator``: the linear part ``A`` of one (fused) linear node of the graph, as a map on one sample.

A linear node of :class:`~lipreg.capture.graph.LipGraph` stands for a segment of affine ops (conv -> batch norm ->
flatten...). Its operator is ``A = A_m ... A_1``, the ops' linear parts (biases dropped), acting on one sample of
per-sample shape ``in_shape``; vectors carry a leading batch dimension of 1, blocks of vectors one of ``k``.
Everything the bounds need from a node goes through this class:

* ``matvec(v) = A v`` and ``rmatvec(u) = A^T u`` (through autograd: one backward of ``A``), ``gram(v) = A^T A v``
  (one forward and one backward, paper Alg. 2), ``matmat`` / ``rmatmat`` on blocks;
* ``dense()``, the ``n_out x n_in`` matrix, built from the smaller side;
* ``closed_form_norm()``, the exact norm when the ops know it (isometries, a single diagonal op);
* ``certified_norm()``, a guaranteed upper bound on ``sigma_1(A)``, from float64 weights, rounded upwards.

The constants (weights, buffers, what is computed from them) are read from the model once per evaluation
(:func:`linear_operators`), with their autograd history, so ``||A v||`` is differentiable w.r.t. the weights.
"""
from __future__ import annotations

import operator as _operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from .capture.graph import LipGraph, LipNode
from .errors import UnsupportedOpError
from .linalg.certify import arithmetic_margin, certified_cast, dense_matrix, dense_spectral_bound
from .ops import NodeInfo, Rule
from .ops.base import display_name, raw_argument
from .ops.linear import WeightedOp
from .ops.structural import Identity, SignedIdentity
from .policy import BoundPolicy

_CLOSED_FORM_MARGIN = arithmetic_margin(8)
"""Closed forms (``max_c |gamma_c| / sqrt(var_c + eps)``, ``max |c|``) take a few correctly rounded float64 steps."""
_POINTWISE_ISOMETRIES = (Identity, SignedIdentity)  # v -> +-v: a diagonal op's gains fold across them


class LinearOperator:
    """``A`` of one (fused) linear node (see the module docstring), evaluated in ``dtype`` on ``device``."""

    def __init__(self, node: LipNode, constants: _Constants) -> None:
        self.node = node
        self._constants = constants

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def dtype(self) -> torch.dtype:
        return self._constants.dtype

    @property
    def device(self) -> torch.device:
        return self._constants.device

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
        for info, rule in zip(self.node.ops, self.node.rules):
            v = rule.apply(info, _NodeCall(info.node, self._constants), v)
        return v

    def rmatvec(self, u: Tensor) -> Tensor:
        """``A^T u`` for ``u`` of shape :attr:`out_shape`, by one backward pass of :meth:`matvec` (no grad to the
        weights)."""
        with torch.enable_grad():
            probe = torch.zeros(self.in_shape, dtype=u.dtype, device=u.device, requires_grad=True)
            (at_u,) = torch.autograd.grad(self.matvec(probe), probe, u)
        return at_u

    def gram(self, v: Tensor) -> Tensor:
        """``A^T A v`` from one forward and one backward pass (paper Alg. 2), with no grad to the weights."""
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            av = self.matvec(v)
            (ata_v,) = torch.autograd.grad(av, v, grad_outputs=av.detach())
        return ata_v

    def matmat(self, vs: Tensor) -> Tensor:
        """:meth:`matvec` on a block ``(k, *in_shape[1:])`` -> ``(k, *out_shape[1:])``.

        The graph was traced on one sample, so sizes read from the input (``x.view(x.size(0), -1)``) are 1:
        ``torch.func.vmap`` maps the one-sample function over the block instead of feeding a batch of k.
        """
        return torch.func.vmap(lambda v: self.matvec(v.unsqueeze(0)).squeeze(0))(vs)

    def rmatmat(self, us: Tensor) -> Tensor:
        """:meth:`rmatvec` on a block ``(k, *out_shape[1:])`` -> ``(k, *in_shape[1:])``; differentiable w.r.t. the
        weights when grad is enabled."""
        track_weights = torch.is_grad_enabled()
        with torch.enable_grad():
            probe = torch.zeros(self.in_shape, dtype=us.dtype, device=us.device, requires_grad=True)
            (rows,) = torch.autograd.grad(self.matvec(probe), probe, us.unsqueeze(1), is_grads_batched=True,
                                          create_graph=track_weights)
        return rows.squeeze(1)

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
        norm = rule.closed_form_norm(info, _NodeCall(info.node, self._constants), self.dtype)
        return None if norm is None else norm.to(self.device)

    def certified_norm(self, policy: BoundPolicy = BoundPolicy()) -> Tensor:
        """A guaranteed upper bound on ``sigma_1(A)`` in float64, differentiable: the tightest available of its
        closed form; the exact norm of its dense matrix when small (``n_in n_out <= policy.dense_entries``; built
        from the weight when the node is one weighted op, see :meth:`_is_one_weighted_op`); the product of the
        certified norms of its ops (sub-multiplicativity), where each weighted op (linear,
        convolution) absorbs the per-channel diagonal ops next to it (eval batch norm, scales) into its weight
        before its FFT / Gram certificate. Computed from the weights in float64 whatever :attr:`dtype`."""
        if self.dtype != torch.float64:
            return self.in_float64().certified_norm(policy)
        closed = self.closed_form_norm()
        if closed is not None:
            return certified_cast(closed.to(torch.float64), torch.float64, _CLOSED_FORM_MARGIN)
        entries = self.in_shape.numel() * self.out_shape.numel()
        small = entries <= policy.dense_entries
        exact_max_dim = policy.exact_eig_max_dim(self.device.type)
        if small and not (self._is_one_weighted_op() and entries <= policy.conv_dense_entries):
            return dense_spectral_bound(self.dense(), exact_max_dim=exact_max_dim)
        norms = self._segment_norms(policy)
        if small and len(norms) > 1:  # a diagonal op's gains did not fold: the dense matrix is tighter
            return dense_spectral_bound(self.dense(), exact_max_dim=exact_max_dim)
        return torch.stack(norms).prod()

    def _is_one_weighted_op(self) -> bool:
        """Whether the node is one weighted op with only diagonal ops and reshapes (numel kept) around it: then
        its certificate, gains folded in, is that of the whole node, exact when small, and cheaper to get from the
        weight (:mod:`lipreg.linalg.conv`) than the dense matrix through :meth:`matmat`."""
        ops = list(zip(self.node.ops, self.node.rules))
        if sum(isinstance(rule, WeightedOp) for _, rule in ops) != 1:
            return False
        return all(isinstance(rule, WeightedOp)
                   or (rule.isometry and info.in_shapes[0].numel() == info.out_shape.numel())
                   or rule.multiplier(info, _NodeCall(info.node, self._constants), self.dtype) is not None
                   for info, rule in ops)

    def in_float64(self) -> LinearOperator:
        """The same operator evaluated from the weights in float64 (for certificates)."""
        return LinearOperator(self.node, _Constants(self._constants.graph, torch.float64, self.device))

    def check_kernels(self) -> None:
        """Apply every op once, as the bounds will: an op whose kernel does not exist in this dtype and device
        (``avg_pool3d`` in bfloat16 on CPU) is refused now, with its node and the fix. An op that fails in float64
        too is not a dtype matter: its own error is raised."""
        reference = _Constants(self._constants.graph, torch.float64, self.device)
        with torch.no_grad():
            v = torch.zeros(self.in_shape, dtype=self.dtype, device=self.device)
            for info, rule in zip(self.node.ops, self.node.rules):
                try:
                    v = rule.apply(info, _NodeCall(info.node, self._constants), v)
                except Exception as err:
                    rule.apply(info, _NodeCall(info.node, reference), v.to(torch.float64))  # raises if not dtype
                    raise UnsupportedOpError(
                        f"{self._constants.graph.locate(info.node)} cannot be computed in {self.dtype} on "
                        f"{self.device}: {type(err).__name__}: {err}. Build the estimator with dtype=torch.float32 "
                        "(or torch.float64); certified_bound() is computed in float64 whatever the dtype"
                    ) from err

    def _segment_norms(self, policy: BoundPolicy) -> list[Tensor]:
        """Certified norms (float64) whose product bounds the node: one per weighted op, with the diagonal ops
        around it folded in (:class:`~lipreg.ops.linear.WeightedOp`), and one per remaining non-isometric op."""
        ops = list(zip(self.node.ops, self.node.rules))
        calls = [_NodeCall(info.node, self._constants) for info, _ in ops]
        multipliers = [rule.multiplier(info, call, self.dtype) for (info, rule), call in zip(ops, calls)]
        folded: set[int] = set()
        norms = []
        for k, (info, rule) in enumerate(ops):
            if not isinstance(rule, WeightedOp):
                continue
            before = _fold(rule, ops, multipliers, range(k - 1, -1, -1), info.in_shapes[0], folded)
            after = _fold(rule, ops, multipliers, range(k + 1, len(ops)), info.out_shape, folded)
            norms.append(rule.folded_norm(info, self.dtype, before, after, policy))
            folded.add(k)
        for k, ((info, rule), call) in enumerate(zip(ops, calls)):
            if k in folded or rule.isometry:
                continue
            norm = rule.certified_norm(info, call, self.dtype)
            if norm is None:
                raise UnsupportedOpError(
                    f"no certified norm for {rule.describe()} at node {info.name!r} and its operator is too "
                    f"large to form ({self.in_shape.numel()} x {self.out_shape.numel()}): give the rule a "
                    "certified_norm, or use the estimate est() (not a certificate)"
                )
            norms.append(certified_cast(norm.to(self.device, torch.float64), torch.float64))
        return norms

    def __repr__(self) -> str:
        return (f"LinearOperator({self.name!r}, in_shape={tuple(self.in_shape[1:])}, "
                f"out_shape={tuple(self.out_shape[1:])}, dtype={self.dtype})")


def linear_operators(graph: LipGraph, dtype: torch.dtype, device: torch.device) -> dict[LipNode, LinearOperator]:
    """The operator of every linear node, sharing one fresh read of the model's constants (for one bound)."""
    constants = _Constants(graph, dtype, device)
    return {node: LinearOperator(node, constants) for node in graph.linear_nodes()}


def _fold(rule: WeightedOp, ops: list[tuple[NodeInfo, Rule]], multipliers: list[Tensor | None],
          order: range, shape: torch.Size, folded: set[int]) -> Tensor | None:
    """The per-channel gains of the diagonal ops met walking ``order`` away from a weighted op (across pointwise
    identities, up to the first other op), marked ``folded``; ``None`` if there are none."""
    gains, taken = None, []
    for k in order:
        other = ops[k][1]
        if isinstance(other, _POINTWISE_ISOMETRIES):
            continue
        m = multipliers[k]
        g = None if m is None or k in folded else rule.channel_gains(m, shape)
        if g is None:
            break
        gains, taken = (g if gains is None else gains * g), [*taken, k]
    folded.update(taken)
    return gains


class _Constants:
    """Values of the constant nodes for one evaluation: parameters and buffers read from the model now (so they
    carry autograd history), floating tensors cast to ``dtype``, non-tensors as traced."""

    def __init__(self, graph: LipGraph, dtype: torch.dtype, device: torch.device) -> None:
        self.graph = graph
        self.dtype = dtype
        self.device = device
        self.cache: dict[fx.Node, Any] = {}

    def value(self, node: fx.Node) -> Any:
        if node in self.graph.static_values:
            return self.graph.static_values[node]
        if node in self.graph.depends:
            raise UnsupportedOpError(f"node {display_name(node)!r} depends on the input where a constant was expected")
        if node not in self.cache:
            self.cache[node] = self._evaluate(node)
        return self.cache[node]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":  # read now from the model, but for the constants only the GraphModule holds
            owner = self.graph.graph_module if node.target in self.graph.tracer_constants else self.graph.root
            result = _operator.attrgetter(node.target)(owner)
        else:
            result = _run_node(node, self.graph.modules, self.value)
        if isinstance(result, Tensor) and result.is_floating_point():
            result = result.to(self.dtype)
        return result


class _NodeCall:
    """:class:`lipreg.ops.Call` for one node: input-dependent arguments from a mapping, constants from the model."""

    def __init__(self, node: fx.Node, constants: _Constants) -> None:
        self.node = node
        self.constants = constants
        self.device = constants.device

    def __call__(self, x_values: Mapping[fx.Node, Tensor]) -> Tensor:
        lookup = lambda n: x_values[n] if n in x_values else self.constants.value(n)  # noqa: E731
        if self.node.op == "call_module":  # its own floating parameters and buffers in the dtype too
            module = self.constants.graph.modules[self.node.target]
            dtype = self.constants.dtype
            cast = {name: t.to(dtype) for name, t in [*module.named_parameters(), *module.named_buffers()]
                    if t.is_floating_point() and t.dtype != dtype}
            if cast:
                args, kwargs = fx.node.map_arg((self.node.args, self.node.kwargs), lookup)
                return torch.func.functional_call(module, cast, args, kwargs)
        return _run_node(self.node, self.constants.graph.modules, lookup)

    def arg_value(self, index: int, name: str, default: Any = None) -> Any:
        return fx.node.map_arg(raw_argument(self.node, index, name, default), self.constants.value)


def _run_node(node: fx.Node, modules: Mapping[str, nn.Module], value: Callable[[fx.Node], Any]) -> Any:
    """Execute one ``call_module`` / ``call_method`` / ``call_function`` node, its argument nodes read by ``value``."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)

"""Graph capture: ``torch.fx`` trace of any ``nn.Module`` -> a DAG of typed nodes, one rule each.

The user's model is neither modified nor copied: the fx ``GraphModule`` shares the model's submodules and
parameters, and every bound is recomputed from them, so gradients reach the model's own parameters.

The model is traced in eval mode (:mod:`lipreg.capture.trace`: ``if self.training:`` branches and
``training=self.training`` flags take their eval values; every flag is restored afterwards). Shapes and
non-tensor values (``x.size(0)``...) are recorded by running the graph once on one sample in eval mode (an
``fx.Interpreter``, as ``ShapeProp``). Every node that depends on the input is resolved to a rule through the
registry (:mod:`lipreg.ops`); consecutive linear nodes with no nonlinearity between them (conv -> batch norm,
conv -> avg pool -> flatten -> linear) are then *fused* into one :class:`LipNode`, whose operator norm is taken as
a whole: ``||A_2 A_1|| <= ||A_2|| ||A_1||``, and one power method instead of two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import REGISTER_HINT, UnsupportedOpError
from ..ops import Activation, Concat, LinearOp, NodeInfo, Refuse, Rule, describe_target, rule_factory
from ..ops.base import broadcast_guard, display_name
from ..ops.split import inline_split_parts
from .effects import check_hooks, check_traced_function, resolve_in_place, storages
from .fingerprint import ModelFingerprint
from .source import node_location, source_line
from .trace import eval_mode, reads_metadata, trace


@dataclass(eq=False)
class LipNode:
    """A node of the reduced DAG: the input, a (fused) linear operator, or a nonlinear op with its rule."""

    name: str
    rule: Rule | None  # None for the input
    inputs: list[LipNode]
    ops: list[NodeInfo] = field(default_factory=list)  # the fx nodes it stands for (several when fused)
    rules: list[Rule] = field(default_factory=list)  # one per op

    @property
    def is_linear(self) -> bool:
        return isinstance(self.rule, LinearOp)

    @property
    def in_shape(self) -> torch.Size:
        return self.ops[0].in_shapes[0]

    @property
    def out_shape(self) -> torch.Size:
        return self.ops[-1].out_shape


def _holds_tensor(value: Any) -> bool:
    """Whether a node's value is or contains a tensor (a tuple from ``chunk``, attention's ``(out, weights)``...)."""
    found: list[bool] = []
    fx.node.map_aggregate(value, lambda v: found.append(isinstance(v, Tensor)))
    return any(found)


def _tensor_metas(meta: Any) -> Iterator[TensorMetadata]:
    if isinstance(meta, TensorMetadata):  # a NamedTuple itself: test it first
        yield meta
    elif isinstance(meta, (tuple, list)):
        for item in meta:
            yield from _tensor_metas(item)


def _shape(node: fx.Node) -> torch.Size:
    """A node's per-sample output shape; for a node returning several tensors, the first one's."""
    return next(_tensor_metas(node.meta["tensor_meta"])).shape


class _ValueProp(fx.Interpreter):
    """Runs the graph once, recording each node's tensor metadata (``node.meta["tensor_meta"]``, as fx's
    ``ShapeProp``, which also prints the traceback of a failure), the value of every node that holds no tensor
    (sizes, shapes, flags), and the storages of every node that does (nodes sharing one alias each other)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.static_values: dict[fx.Node, Any] = {}
        self.storages: dict[fx.Node, frozenset[int]] = {}  # of every node returning tensors, to find aliases
        self.current: fx.Node | None = None  # the node being run, to say which one failed
        self._alive: list[Any] = []  # every value, so that no storage address is reused during the run
        self.extra_traceback = False  # the error names the node and its source line itself

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        if _holds_tensor(result):
            n.meta["tensor_meta"] = fx.node.map_aggregate(
                result, lambda v: _extract_tensor_metadata(v) if isinstance(v, Tensor) else v)
            self.storages[n] = storages(result)
            self._alive.append(result)
        else:
            self.static_values[n] = result
        return result


def _refusal(node: fx.Node, module: nn.Module | None, static_values: Mapping[fx.Node, Any]) -> str | None:
    """Why the node's rule refuses its op, asked with the shapes known so far (none for its output), or ``None``
    when it has no rule, accepts the op, or cannot decide without shapes."""
    factory = rule_factory(node, module)
    if factory is None:
        return None
    inputs = [n for n in node.all_input_nodes if "tensor_meta" in n.meta]
    info = NodeInfo(node=node, module=module, x_inputs=inputs, in_shapes=[_shape(n) for n in inputs],
                    out_shape=torch.Size(), static_values=static_values)
    try:
        rule = factory(info)
    except Exception:  # noqa: BLE001  (a rule that needs the output shape: no reason to give)
        return None
    return rule.reason if isinstance(rule, Refuse) else None


def _x_args(node: fx.Node, depends: set[fx.Node]) -> list[fx.Node]:
    """The input-dependent arguments of a node, in argument order, repeated as often as they occur."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n in depends else None)
    return found


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter or buffer."""
    return next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)


_REFUSED, _MISUSED, _MISSING = range(3)
"""Blockers by how surely they block: an op whose rule refuses it (a product of input-dependent tensors,
normalisation, attention) cannot be bounded whatever the user registers; a rule of the wrong kind is the user's
to fix; an op without a rule may be Lipschitz, and is named after the others."""


_LISTED = 10  # other blockers named in a refusal


@dataclass
class _Blocker:
    """Why one node stops the model from being bounded: ``kind`` (:data:`_REFUSED`...), the message, the fix."""

    kind: int
    message: str
    hint: str = ""


def _raise_blockers(blockers: list[_Blocker]) -> None:
    """Refuse the model for its surest blocker (the first in graph order among the surest kind), with its fix,
    and name the other nodes that block it too."""
    if not blockers:
        return
    first = min(blockers, key=lambda b: b.kind)  # min keeps the first of equal kinds
    others = [b.message for b in blockers if b is not first]
    message = first.message + (f"\n{first.hint}" if first.hint else "")
    if others:
        listed = others[:_LISTED] + ([f"... and {len(others) - _LISTED} more"] if len(others) > _LISTED else [])
        message += "\nOther ops that block this model too:\n" + "\n".join(f"  - {m}" for m in listed)
    raise UnsupportedOpError(message)


def _integer_guard(info: NodeInfo, rule: Rule) -> Rule:
    """An input-dependent op whose result is used and holds integers or booleans (``x.sum(1, dtype=torch.int64)``,
    a cast, a comparison) is piecewise constant in the input: it jumps, so it is refused whatever its rule."""
    dtype = next(_tensor_metas(info.node.meta["tensor_meta"])).dtype
    if dtype.is_floating_point or dtype.is_complex or not info.node.users:
        return rule
    return Refuse(f"its result is of dtype {dtype}: integer or boolean values of the input are piecewise constant, "
                  "they jump, so no Lipschitz constant holds for them. Keep the computation in floating point (no "
                  "integer dtype= or cast on an input-dependent tensor)")


class LipGraph:
    """The traced model: fx graph, shapes, rules and the reduced (fused) DAG of :class:`LipNode`.

    ``nodes`` is in topological order, starts with the input and ends with the output node.
    """

    def __init__(self, model: nn.Module, example_input: Tensor, fuse: bool = True,
                 concrete_args: dict[str, Any] | None = None) -> None:
        if not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a tensor with a batch dimension, got {type(example_input)!r}")
        self.model = model
        with eval_mode(model):  # the function bounded is the eval-mode one: `if self.training` branches too
            self.root, self.graph_module, self.tracer_constants, reads = trace(model, concrete_args,
                                                                               example_input[:1].detach())
        inline_split_parts(self.graph_module)  # x.chunk(2)[i] -> one node per part: a tensor, not a tuple
        self.fingerprint = ModelFingerprint(self.root, self.graph_module, reads)
        self.modules = dict(self.graph_module.named_modules())
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(
                f"lipreg bounds a model of one tensor input; this forward takes {[p.name for p in placeholders]}. "
                "Fix the other arguments with LipschitzEstimator(..., concrete_args={'name': value})."
            )
        self.input_node = placeholders[0]
        # kept: a rebuild after the model changed runs it again; a copy: an in-place op must not write into the user's
        self.sample = example_input[:1].detach().clone()
        self._traced_dtype = _floating_dtype(model)
        with eval_mode(model), torch.no_grad():
            prop = _ValueProp(self.graph_module)
            try:
                prop.run(self.sample)
            except Exception as err:  # the model itself fails on the example: say where and why
                raise self._run_failure(prop, err) from err
        self.static_values = prop.static_values
        self.input_shape = self.sample.shape
        self._check_effects(prop.storages)
        self._refuse_state_read_into_python()
        self.infos = self._resolve()
        self._check_function(self.sample, concrete_args)
        self.nodes = self._build(fuse)
        self.derived: dict[Any, Any] = {}
        """What other modules build once from this graph (the operators of :mod:`lipreg.operator`), by builder."""

    def stale(self) -> str | None:
        """What changed in the model since it was traced (a replaced submodule, a changed hyper-parameter...),
        or ``None`` while the graph still describes it."""
        return self.fingerprint.change(self.root)

    def current_sample(self) -> Tensor:
        """The example to trace the model again with: on the model's device now, and in its floating dtype now
        when it had the model's dtype when traced (``model.double()`` after the build)."""
        device = next((t.device for t in (*self.model.parameters(), *self.model.buffers())), self.sample.device)
        dtype = _floating_dtype(self.model)
        follows = self.sample.dtype == self._traced_dtype and dtype is not None
        return self.sample.to(device=device, dtype=dtype if follows else self.sample.dtype)

    def _run_failure(self, prop: _ValueProp, err: Exception) -> UnsupportedOpError:
        """The error for a model that fails on its example: the rule's refusal of the failing op when it has one
        (batch norm on batch statistics fails on one (1, C) sample before its rule is asked), else the cause."""
        node = prop.current
        module = self.modules.get(node.target) if node.op == "call_module" else None
        target = describe_target(node, module)
        reason = _refusal(node, module, prop.static_values)
        where, cause = node_location(node, target), f"{type(err).__name__}: {err}"
        if reason is not None:
            return UnsupportedOpError(f"{target} cannot be bounded, used by {where}: {reason}. Running the traced "
                                      f"model on one sample already fails there: {cause}")
        return UnsupportedOpError(f"running the traced model (in eval mode) on one sample of shape "
                                  f"{tuple(self.sample.shape)} failed at {where}: {cause}")

    # ---------------------------------------------------------------- capture
    def locate(self, node: fx.Node) -> str:
        """Where a node of this graph is, for messages (:func:`~lipreg.capture.source.node_location`, its op
        described)."""
        target = describe_target(node, self.modules.get(node.target)) if node.op.startswith("call") else node.target
        return node_location(node, str(target))

    def _check_effects(self, aliases: Mapping[fx.Node, frozenset[int]]) -> None:
        """What fx does not record and the rules would miss (:mod:`lipreg.capture.effects`): hooks are refused; reads after
        an in-place write are rerouted to the writer, or refused when they go through another alias."""
        check_hooks(self.model, self.graph_module)
        resolve_in_place(self.graph_module, aliases, self.locate)

    def _check_function(self, sample: Tensor, concrete_args: dict[str, Any] | None) -> None:
        """The graph, read as dataflow, computes the model (in eval mode) on the example and a perturbation."""
        with eval_mode(self.model), torch.no_grad():
            check_traced_function(self.graph_module, lambda x: self.model(x, **(concrete_args or {})), sample)

    def _refuse_state_read_into_python(self) -> None:
        """Refuse a node that turns the values of a parameter or buffer (or of a tensor computed from them) into a
        Python value (``w.item()``, ``w.tolist()``, ``w.numpy()``): the graph would hold the value it had when the
        model was traced, while every bound reads the weights anew at each evaluation. Metadata (``w.shape``,
        ``w.dtype``) is no value, and tensors the forward creates itself (``_tensor_constant0``) are constants."""
        state: dict[fx.Node, list[str]] = {}  # node -> the parameters and buffers its value is computed from
        on_input = {self.input_node}  # an input-dependent read is refused by _resolve, with its own reason
        for node in self.graph_module.graph.nodes:
            if node in self.static_values and reads_metadata(node):
                continue  # metadata, not values
            if any(n in on_input for n in node.all_input_nodes):
                on_input.add(node)
            if node.op == "get_attr" and str(node.target) not in self.tracer_constants:
                state[node] = [str(node.target)]
            elif node.op == "call_module":
                state[node] = [f"{node.target}.{name}" for name, _ in self.modules[node.target].named_parameters()]
            else:
                sources = [name for n in node.all_input_nodes if n in state for name in state[n]]
                if sources:
                    state[node] = list(dict.fromkeys(sources))
            if node in self.static_values and node in state and node not in on_input:
                raise UnsupportedOpError(
                    f"{self.locate(node)} reads the values of {', '.join(state[node][:3])} into Python: the graph "
                    "would keep the value it had when the model was traced, while the weights are read anew at "
                    "every evaluation, so the bound would miss every later update. Keep it a tensor (x * self.w "
                    "instead of x * self.w.item()), or make it a plain Python attribute set outside forward."
                )

    def _resolve(self) -> dict[fx.Node, tuple[NodeInfo, Rule]]:
        depends = {self.input_node}
        infos: dict[fx.Node, tuple[NodeInfo, Rule]] = {}
        blockers: list[_Blocker] = []
        for node in self.graph_module.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node in self.static_values:
                if _x_args(node, depends) and not reads_metadata(node):
                    raise UnsupportedOpError(
                        f"node {display_name(node)!r} ({node.op} {node.target}) at {source_line(node)} reads the "
                        "values of an input-dependent tensor into Python: the bound would take them for constants. "
                        "Keep them as tensors (x * s instead of x * s.item()) so that their dependence on x is seen."
                    )
                continue
            x_inputs = _x_args(node, depends)
            if not x_inputs:
                continue  # a constant: a parameter, or computed from parameters only
            depends.add(node)
            info = NodeInfo(
                node=node,
                module=self.modules.get(node.target) if node.op == "call_module" else None,
                x_inputs=x_inputs,
                in_shapes=[_shape(n) for n in x_inputs],
                out_shape=_shape(node),
                static_values=self.static_values,
            )
            infos[node] = (info, self._rule_for(info, blockers))
        _raise_blockers(blockers)
        self.depends = depends
        return infos

    def _rule_for(self, info: NodeInfo, blockers: list[_Blocker]) -> Rule:
        """The node's rule; an op that cannot be bounded is added to ``blockers`` (and a placeholder
        :class:`Refuse` returned), so that every node is seen before the model is refused."""
        node, module = info.node, info.module
        target = describe_target(node, module)
        factory = rule_factory(node, module)
        where = node_location(node, target)
        if factory is None:
            blockers.append(_Blocker(_MISSING, f"lipreg has no Lipschitz rule for {target}, used by {where}.",
                                     REGISTER_HINT.format(target=target)))
            return Refuse("no rule")
        rule = broadcast_guard(info, factory(info))  # an elementwise rule on an op that broadcasts its input
        if not isinstance(rule, Refuse):
            rule = _integer_guard(info, rule)
        if isinstance(rule, Refuse):
            blockers.append(_Blocker(_REFUSED, f"{target} cannot be bounded, used by {where}: {rule.reason}."))
        elif isinstance(rule, (LinearOp, Activation)) and len(info.x_inputs) != 1:
            blockers.append(_Blocker(_MISUSED, (
                f"{where} has {len(info.x_inputs)} input-dependent arguments, but its rule ({rule.describe()}) takes "
                "exactly one: register a Constant (Lipschitz in all of them jointly), a Sum or a Concat rule "
                "instead.")))
        return rule

    def _build(self, fuse: bool) -> list[LipNode]:
        """The reduced DAG; a linear node joins its producer's segment when that producer is linear and feeds
        nothing else that depends on the input."""
        source = LipNode(self.input_node.name, None, [])
        producer: dict[fx.Node, LipNode] = {self.input_node: source}
        nodes = [source]
        output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        for node, (info, rule) in self.infos.items():
            parents = [producer[x] for x in info.x_inputs]
            if isinstance(rule, LinearOp):
                parent = parents[0]
                users = [u for u in info.x_inputs[0].users if u in self.depends or u is output]
                if fuse and parent.is_linear and parent.ops[-1].node is info.x_inputs[0] and len(users) == 1:
                    parent.ops.append(info)
                    parent.rules.append(rule)
                    parent.name = f"{parent.name}+{display_name(node)}"
                    producer[node] = parent
                    continue
            lip_node = LipNode(display_name(node), rule, parents, [info], [rule])
            producer[node] = lip_node
            nodes.append(lip_node)
        outputs = [producer[x] for x in _x_args(output, self.depends)]
        if not outputs:
            raise UnsupportedOpError("the model's output does not depend on its input")
        if len(outputs) > 1:  # several outputs are bounded jointly, as their concatenation
            nodes.append(LipNode("output", Concat(), outputs))
        # keep the output's ancestors only (then the output is last): a branch the output does not use (an unused
        # head, a tensor whose size only is read) bounds nothing
        live = {nodes[-1] if len(outputs) > 1 else outputs[0]}
        for lip_node in reversed(nodes):
            if lip_node in live:
                live.update(lip_node.inputs)
        return [n for n in nodes if n in live]

    @property
    def output(self) -> LipNode:
        return self.nodes[-1]

    def linear_nodes(self) -> list[LipNode]:
        return [n for n in self.nodes if n.is_linear]



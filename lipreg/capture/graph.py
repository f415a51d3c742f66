"""Graph capture: ``torch.fx`` trace of any ``nn.Module`` -> a DAG of typed nodes, one rule each.

The user's model is neither modified nor copied: the fx ``GraphModule`` shares the model's submodules and
parameters, and every bound is recomputed from them, so gradients reach the model's own parameters.

The model is traced in eval mode (``if self.training:`` branches and ``training=self.training`` flags take their
eval values; every flag is restored afterwards). Shapes and non-tensor values (``x.size(0)``...) are recorded by
running the graph once on one sample in eval mode (an ``fx.Interpreter``, as ``ShapeProp``). Every node that
depends on the input is resolved to a rule through the registry (:mod:`lipreg.ops`); consecutive linear nodes
with no nonlinearity between them (conv -> batch norm, conv -> avg pool -> flatten -> linear) are then *fused* into
one :class:`LipNode`, whose operator norm is taken as a whole: ``||A_2 A_1|| <= ||A_2|| ||A_1||``, and one power
method instead of two.
"""
from __future__ import annotations

import operator
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from .effects import check_hooks, check_traced_function, resolve_in_place, storages
from ..errors import REGISTER_HINT, UnsupportedOpError
from .fingerprint import ModelFingerprint
from ..ops.base import broadcast_guard, display_name
from ..ops import (Activation, Concat, LinearOp, NodeInfo, Refuse, Rule, describe_target, is_registered_module,
                    rule_factory)


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


class _Tracer(fx.Tracer):
    """Keeps ``torch.nn`` modules and every module class with a registered rule whole; records source lines."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_module(m) or super().is_leaf_module(m, module_qualified_name)


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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(file)) + os.sep for file in (torch.__file__, __file__))
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)(?:\n {4}(?P<code>[^\n]*))?')


def source_line(node: fx.Node) -> str:
    """Where the user's code created an fx node (``File "model.py", line 12, in forward`` and the code): the
    innermost frame of the stack fx recorded that lies outside torch (module calls, the tracer) and lipreg."""
    frames = [f for f in _FRAME.finditer(node.stack_trace or "")
              if not os.path.abspath(f["file"]).startswith(_LIBRARY_DIRS)]
    if not frames:
        return "(source line unknown)"
    frame = frames[-1]
    code = f", `{frame['code'].strip()}`" if frame["code"] else ""
    return f'File "{frame["file"]}", line {frame["line"]}, in {frame["function"]}{code}'


_SHAPE_QUERIES = {"size", "dim", "ndimension", "numel", "nelement", "shape", "ndim", "dtype", "device", "is_cuda",
                  "is_floating_point", "is_complex", "is_contiguous", "requires_grad"}


def _reads_shape(node: fx.Node) -> bool:
    """Whether a non-tensor node reads only the metadata of its tensor argument (``x.size(0)``, ``x.shape``)."""
    if node.op == "call_method":
        return node.target in _SHAPE_QUERIES
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_QUERIES
    return node.op == "call_function" and node.target is torch.numel


def _where(node: fx.Node, target: str) -> str:
    return f"node {display_name(node)!r} ({node.op} {target}) at {source_line(node)}"


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
            self.root, self.graph_module, self.tracer_constants = _trace(model, concrete_args)
        self.fingerprint = ModelFingerprint(self.root, self.graph_module)
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
        with eval_mode(model), torch.no_grad():
            prop = _ValueProp(self.graph_module)
            try:
                prop.run(self.sample)
            except Exception as err:  # the model itself fails on the example: say where and why
                raise self._run_failure(prop, err) from err
        self.static_values = prop.static_values
        self.input_shape = self.sample.shape
        self._check_effects(prop.storages)
        self.infos = self._resolve()
        self._check_function(self.sample, concrete_args)
        self.nodes = self._build(fuse)

    def stale(self) -> str | None:
        """What changed in the model since it was traced (a replaced submodule, a changed hyper-parameter...),
        or ``None`` while the graph still describes it."""
        return self.fingerprint.change(self.root)

    def _run_failure(self, prop: _ValueProp, err: Exception) -> UnsupportedOpError:
        """The error for a model that fails on its example: the rule's refusal of the failing op when it has one
        (batch norm on batch statistics fails on one (1, C) sample before its rule is asked), else the cause."""
        node = prop.current
        module = self.modules.get(node.target) if node.op == "call_module" else None
        target = describe_target(node, module)
        reason = _refusal(node, module, prop.static_values)
        where, cause = _where(node, target), f"{type(err).__name__}: {err}"
        if reason is not None:
            return UnsupportedOpError(f"{target} cannot be bounded, used by {where}: {reason}. Running the traced "
                                      f"model on one sample already fails there: {cause}")
        return UnsupportedOpError(f"running the traced model (in eval mode) on one sample of shape "
                                  f"{tuple(self.sample.shape)} failed at {where}: {cause}")

    # ---------------------------------------------------------------- capture
    def locate(self, node: fx.Node) -> str:
        """Where a node of this graph is, for messages (:func:`_where` with its op described)."""
        return _where(node, describe_target(node, self.modules.get(node.target)) if node.op.startswith("call")
                      else str(node.target))

    def _check_effects(self, aliases: Mapping[fx.Node, frozenset[int]]) -> None:
        """What fx does not record and the rules would miss (:mod:`lipreg.capture.effects`): hooks are refused; reads after
        an in-place write are rerouted to the writer, or refused when they go through another alias."""
        check_hooks(self.model, self.graph_module)
        resolve_in_place(self.graph_module, aliases, self.locate)

    def _check_function(self, sample: Tensor, concrete_args: dict[str, Any] | None) -> None:
        """The graph, read as dataflow, computes the model (in eval mode) on the example and a perturbation."""
        with eval_mode(self.model), torch.no_grad():
            check_traced_function(self.graph_module, lambda x: self.model(x, **(concrete_args or {})), sample)

    def _resolve(self) -> dict[fx.Node, tuple[NodeInfo, Rule]]:
        depends = {self.input_node}
        infos: dict[fx.Node, tuple[NodeInfo, Rule]] = {}
        for node in self.graph_module.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node in self.static_values:
                if _x_args(node, depends) and not _reads_shape(node):
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
            infos[node] = (info, self._rule_for(info))
        self.depends = depends
        return infos

    def _rule_for(self, info: NodeInfo) -> Rule:
        node, module = info.node, info.module
        target = describe_target(node, module)
        factory = rule_factory(node, module)
        where = _where(node, target)
        if factory is None:
            raise UnsupportedOpError(
                f"lipreg has no Lipschitz rule for {target}, used by {where}.\n" + REGISTER_HINT.format(target=target)
            )
        rule = broadcast_guard(info, factory(info))  # an elementwise rule on an op that broadcasts its input
        if isinstance(rule, Refuse):
            raise UnsupportedOpError(f"{target} cannot be bounded, used by {where}: {rule.reason}.")
        if isinstance(rule, (LinearOp, Activation)) and len(info.x_inputs) != 1:
            raise UnsupportedOpError(
                f"{where} has {len(info.x_inputs)} input-dependent arguments, but its rule ({rule.describe()}) takes "
                "exactly one: register a Constant (Lipschitz in all of them jointly), a Sum or a Concat rule instead."
            )
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


class _Whole(nn.Module):
    """A holder for a model whose own class has a rule (a bare ``nn.Conv2d``...): fx always traces through its
    root, so the model is traced as the single leaf ``model`` of this holder and keeps its rule."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> tuple[nn.Module, fx.GraphModule, set[str]]:
    """The module traced (the model, or a :class:`_Whole` holding it), its ``GraphModule``, and the names of the
    constants the tracer stowed on the root (``_tensor_constant0`` for a tensor created in ``forward``): those are
    kept by the ``GraphModule`` only, and the user's model is left as it was."""
    _refuse_wrappers(model)
    tracer = _Tracer()
    root = _Whole(model) if is_registered_module(model) and not concrete_args else model
    own_attributes = set(vars(root))
    try:
        try:
            graph = tracer.trace(root, concrete_args=concrete_args)
        except Exception as err:
            raise UnsupportedOpError(
                f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}\n"
                "fx traces symbolically, so Python control flow that depends on tensor values (if x.sum() > 0, "
                "loops over x.shape read as tensors...) cannot be traced. Make the branch static, pass "
                "concrete_args={'flag': True} for plain bool/int arguments, or wrap the offending submodule in a "
                "class with a registered rule (lipreg.register_rule(MyBlock, ...)) so it is kept whole."
            ) from err
        if concrete_args:
            _drop_guarded_placeholders(graph, set(concrete_args))
        return root, fx.GraphModule(root, graph), set(vars(root)) - own_attributes
    finally:
        for name in set(vars(root)) - own_attributes:
            delattr(root, name)


def _wrapper_advice(module: nn.Module) -> str | None:
    """What to pass instead of a wrapper fx cannot trace (its forward is not the model's Python code)."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return f"{type(module).__name__} only dispatches to the model it wraps: pass its `.module`"
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded by torch.compile: no compiled module without it
    if dynamo is not None and isinstance(module, dynamo.OptimizedModule):
        return ("torch.compile returns a compiled wrapper, not Python code fx can trace: pass the module given to "
                "torch.compile, its `._orig_mod` (the bound is the same: compilation does not change the function)")
    if isinstance(module, torch.jit.ScriptModule):
        return ("A TorchScript module (torch.jit.script / torch.jit.trace) runs compiled code fx cannot trace: "
                "pass the original eager nn.Module that was scripted or traced")
    return None


def _refuse_wrappers(model: nn.Module) -> None:
    """Refuse a model that is, or holds, a wrapper of another module (DataParallel, torch.compile, TorchScript)."""
    for path, module in model.named_modules():
        advice = _wrapper_advice(module)
        if advice is not None:
            what = f"its submodule {path!r}" if path else "the model itself"
            raise UnsupportedOpError(f"lipreg cannot trace this model: {what} is a wrapper "
                                     f"({type(module).__module__}.{type(module).__qualname__}). {advice}.")


_GUARDS = (operator.eq, torch._assert, fx._symbolic_trace._assert_is_none)


def _drop_guarded_placeholders(graph: fx.Graph, names: set[str]) -> None:
    """fx keeps a placeholder ``name_1`` for each concrete argument ``name``, used only by a guard that checks, when
    the graph is called, that the argument still has the traced value (``torch._assert(name_1 == True)``); the
    traced code holds the value itself. Drop placeholder and guard, so the graph's one input is the tensor."""
    for node in list(graph.nodes):
        if node.op != "placeholder" or str(node.target).rsplit("_", 1)[0] not in names:
            continue
        closure, frontier = [node], [node]
        while frontier:
            frontier = [user for n in frontier for user in n.users]
            closure.extend(frontier)
        if all(n.op == "call_function" and n.target in _GUARDS for n in closure[1:]):
            for dead in sorted(set(closure), key=list(graph.nodes).index, reverse=True):
                graph.erase_node(dead)


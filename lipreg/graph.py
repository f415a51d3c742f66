"""Graph capture: ``torch.fx`` trace of any ``nn.Module`` -> a DAG of typed nodes, one rule each.

The user's model is neither modified nor copied: the fx ``GraphModule`` shares the model's submodules and
parameters, and every bound is recomputed from them, so gradients reach the model's own parameters.

Shapes and non-tensor values (``x.size(0)``...) are recorded by running the graph once on one sample in eval
mode (``torch.fx.passes.shape_prop.ShapeProp``). Every node that depends on the input is resolved to a rule
through the registry (:mod:`lipreg.rules`); consecutive linear nodes with no nonlinearity between them
(conv -> batch norm, conv -> avg pool -> flatten -> linear) are then *fused* into one :class:`LipNode`,
whose operator norm is taken as a whole: ``||A_2 A_1|| <= ||A_2|| ||A_1||``, and one power method instead of two.
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import REGISTER_HINT, UnsupportedOpError
from .rules import Concat, LinearOp, NodeInfo, Refuse, Rule, describe_target, is_registered_module, rule_factory


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


class _ValueProp(ShapeProp):
    """ShapeProp that also keeps the value of every node that is not a tensor (sizes, shapes, flags)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.static_values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if not isinstance(result, Tensor):
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


def source_line(node: fx.Node) -> str:
    """The user's source line that created an fx node, when fx recorded it."""
    frames = (node.stack_trace or "").strip().split("\n  File ")
    user = [f for f in frames if "/torch/" not in f.split(",")[0]]
    return ("File " + user[-1].strip().removeprefix("File ")) if user and user[-1] else "(source line unknown)"


def display_name(node: fx.Node) -> str:
    """A module's qualified name (``features.0``) for module calls, fx's node name otherwise."""
    return str(node.target) if node.op == "call_module" else node.name


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
        self.graph_module = _trace(model, concrete_args)
        self.modules = dict(self.graph_module.named_modules())
        sample = example_input[:1].detach()
        with eval_mode(model), torch.no_grad():
            prop = _ValueProp(self.graph_module)
            try:
                prop.propagate(sample)
            except Exception as err:  # the model itself fails on the example: say where
                raise UnsupportedOpError(
                    f"running the traced model on one sample of shape {tuple(sample.shape)} failed: {err}"
                ) from err
        self.static_values = prop.static_values
        self.input_shape = sample.shape
        self.infos = self._resolve()
        self.nodes = self._build(fuse)

    # ---------------------------------------------------------------- capture
    def _resolve(self) -> dict[fx.Node, tuple[NodeInfo, Rule]]:
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(
                f"lipreg bounds a model of one tensor input; this forward takes {[p.name for p in placeholders]}. "
                "Fix the other arguments with LipschitzEstimator(..., concrete_args={'name': value})."
            )
        self.input_node = placeholders[0]
        depends = {self.input_node}
        infos: dict[fx.Node, tuple[NodeInfo, Rule]] = {}
        for node in self.graph_module.graph.nodes:
            if node.op in ("placeholder", "output") or node in self.static_values:
                continue
            x_inputs = _x_args(node, depends)
            if not x_inputs:
                continue  # a constant: a parameter, or computed from parameters only
            depends.add(node)
            info = NodeInfo(
                node=node,
                module=self.modules.get(node.target) if node.op == "call_module" else None,
                x_inputs=x_inputs,
                in_shapes=[n.meta["tensor_meta"].shape for n in x_inputs],
                out_shape=node.meta["tensor_meta"].shape,
                static_values=self.static_values,
            )
            infos[node] = (info, self._rule_for(info))
        self.depends = depends
        return infos

    def _rule_for(self, info: NodeInfo) -> Rule:
        node, module = info.node, info.module
        target = describe_target(node, module)
        factory = rule_factory(node, module)
        where = f"node {node.name!r} ({node.op} {target}) at {source_line(node)}"
        if factory is None:
            raise UnsupportedOpError(
                f"lipreg has no Lipschitz rule for {target}, used by {where}.\n" + REGISTER_HINT.format(target=target)
            )
        rule = factory(info)
        if isinstance(rule, Refuse):
            raise UnsupportedOpError(f"{target} cannot be bounded, used by {where}: {rule.reason}.")
        if isinstance(rule, LinearOp) and len(info.x_inputs) != 1:
            raise UnsupportedOpError(
                f"{where} is registered as a linear op but has {len(info.x_inputs)} input-dependent arguments; "
                "a LinearOp rule takes exactly one (register a Sum or Concat rule instead)."
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
        return nodes

    @property
    def output(self) -> LipNode:
        return self.nodes[-1]

    def linear_nodes(self) -> list[LipNode]:
        return [n for n in self.nodes if n.is_linear]

    def closed_form_norm(self, node: LipNode, env: "ConstantEnv") -> Tensor | None:
        """The exact norm of a linear node without iterations, when it has one: unit-norm ops (reshapes,
        dropout...) drop out, and a single remaining op may know its norm (batch norm, scaling)."""
        rest = [(info, rule) for info, rule in zip(node.ops, node.rules) if not rule.isometry]
        if not rest:
            return torch.ones((), dtype=env.dtype)
        if len(rest) != 1:
            return None
        info, rule = rest[0]
        return rule.closed_form_norm(info, _NodeCall(info.node, env), env.dtype)

    def constant_env(self, dtype: torch.dtype) -> "ConstantEnv":
        """A fresh evaluator of constant nodes (parameters and what is computed from them), for one bound."""
        return ConstantEnv(self, dtype)

    def apply_linear(self, node: LipNode, v: Tensor, env: "ConstantEnv") -> Tensor:
        """The linear part of a (fused) linear node applied to ``v`` of shape ``(batch, *in_shape[1:])``."""
        for info, rule in zip(node.ops, node.rules):
            v = rule.apply(info, _NodeCall(info.node, env), v)
        return v


class ConstantEnv:
    """Values of the constant nodes for one evaluation: parameters and buffers read from the model now (so they
    carry autograd history), floating tensors cast to the estimator's dtype, non-tensors as traced."""

    def __init__(self, graph: LipGraph, dtype: torch.dtype) -> None:
        self.graph = graph
        self.dtype = dtype
        self.cache: dict[fx.Node, Any] = {}

    def value(self, node: fx.Node) -> Any:
        if node in self.graph.static_values:
            return self.graph.static_values[node]
        if node in self.graph.depends:
            raise UnsupportedOpError(f"node {node.name!r} depends on the input where a constant was expected")
        if node not in self.cache:
            self.cache[node] = self._evaluate(node)
        return self.cache[node]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            result = operator.attrgetter(node.target)(self.graph.model)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.value)
            if node.op == "call_module":
                result = self.graph.modules[node.target](*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                result = node.target(*args, **kwargs)
        if isinstance(result, Tensor) and result.is_floating_point():
            result = result.to(self.dtype)
        return result


class _NodeCall:
    """:class:`lipreg.rules.Call` for one node: input-dependent arguments from a mapping, constants from the env."""

    def __init__(self, node: fx.Node, env: ConstantEnv) -> None:
        self.node = node
        self.env = env

    def __call__(self, x_values: Mapping[fx.Node, Tensor]) -> Tensor:
        lookup = lambda n: x_values[n] if n in x_values else self.env.value(n)  # noqa: E731
        args, kwargs = fx.node.map_arg((self.node.args, self.node.kwargs), lookup)
        node = self.node
        if node.op == "call_module":
            return self.env.graph.modules[node.target](*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def arg_value(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.node.args):
            value = self.node.args[index]
        else:
            value = self.node.kwargs.get(name, default)
        return fx.node.map_arg(value, self.env.value)


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}\n"
            "fx traces symbolically, so Python control flow that depends on tensor values (if x.sum() > 0, "
            "loops over x.shape read as tensors...) cannot be traced. Make the branch static, pass "
            "concrete_args={'flag': True} for plain bool/int arguments, or wrap the offending submodule in a "
            "class with a registered rule (lipreg.register_rule(MyBlock, ...)) so it is kept whole."
        ) from err
    return fx.GraphModule(tracer.root, graph)


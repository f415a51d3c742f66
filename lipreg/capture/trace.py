"""Tracing a model with ``torch.fx``, in eval mode, with lipreg's leaf modules.

Every ``torch.nn`` module and every module class with a registered rule is kept whole (a leaf of the graph). A
model whose own class has a rule is traced inside a holder (:class:`_Whole`). Wrappers whose ``forward`` is not
the model's Python code (DataParallel, ``torch.compile``, TorchScript) are refused with what to pass instead, and
the guards fx adds for ``concrete_args`` are dropped so that the graph has one tensor input.

A module whose instance shadows a method of its class (``module.forward = ...``, ``module._conv_forward = ...``, as
accelerate's hooks do), or whose torch class had a method replaced from outside torch, no longer computes what its
class's rule bounds: it is traced through, so the graph records what the instance really calls. Every attribute a traced ``forward`` reads from a module is recorded
(:class:`_Tracer`), for the fingerprint of :mod:`lipreg.capture.fingerprint`.
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, fx, nn

from ..errors import UnsupportedOpError
from ..ops import is_registered_module
from .source import user_frame

BOOKKEEPING = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
"""``nn.Module``'s own instance attributes (parameters, buffers, children, hooks, the ``training`` flag, the
``Module.compile`` cache): what they hold is compared on its own, or changes no value the forward computes."""

Reads = dict[int, set[str]]
"""The attribute names read from each module (by ``id``) while its ``forward`` was traced."""


def shadowed_methods(module: nn.Module) -> list[str]:
    """The instance attributes of ``module`` that shadow a method (or property) of its class: ``forward``,
    ``_conv_forward``... set on the instance. Dunder names are looked up on the class by Python, never shadowed;
    the class's own method bound to this instance (Lightning's forward redirection leaves
    ``module.forward = module.forward``) shadows nothing."""
    cls = type(module)
    shadows = []
    for name, value in vars(module).items():
        if name in BOOKKEEPING or name.startswith("__"):
            continue
        original = inspect.getattr_static(cls, name, None)
        if not _is_method(original):
            continue
        if getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is original:
            continue
        shadows.append(name)
    return shadows


def patched_methods(cls: type) -> list[str]:
    """The methods of torch's own layer classes in ``cls``'s MRO (``nn.Conv2d``, ``_ConvNd``..., not ``nn.Module``)
    defined outside torch: a class-level monkeypatch (``nn.Conv2d._conv_forward = ...``), which the class's rule
    does not know."""
    return [f"{klass.__qualname__}.{name}" for klass in cls.__mro__
            if klass not in (nn.Module, object) and klass.__module__.startswith("torch.")
            for name, value in vars(klass).items() if _defined_outside_torch(value)]


def _defined_outside_torch(value: Any) -> bool:
    function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    return inspect.isfunction(function) and not function.__module__.startswith("torch")


def _is_method(value: Any) -> bool:
    return callable(value) or isinstance(value, (property, classmethod, staticmethod))


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


class _Tracer(fx.Tracer):
    """Keeps ``torch.nn`` modules and every module class with a registered rule whole; records source lines, and
    the attributes read from every module while the root's ``forward`` runs (:attr:`reads`): ``nn.Module``'s
    ``__getattribute__`` is patched for the trace, as fx patches ``__getattr__`` and ``__call__``."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True  # a buffer read in forward is a graph node, as a parameter is
        self.reads: Reads = {}
        self._recording = False

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        reads, read = self.reads, object.__getattribute__
        proxies: dict[str, fx.Proxy] = {}

        def __getattribute__(module: nn.Module, name: str) -> Any:
            value = read(module, name)
            if not self._recording:
                return value
            reads.setdefault(id(module), set()).add(name)
            if type(value) is Tensor and name in read(module, "__dict__") and value in self.tensor_attrs:
                # a plain tensor attribute, as fx proxies parameters and buffers: its reads are graph nodes (a
                # `.item()` of it is seen), read anew at every evaluation
                path = self.tensor_attrs[value]
                if path not in proxies:
                    proxies[path] = self.create_proxy("get_attr", path, (), {})
                return proxies[path]
            return value

        nn.Module.__getattribute__ = __getattribute__  # type: ignore[method-assign]
        try:
            return super().trace(root, concrete_args)
        finally:
            del nn.Module.__getattribute__

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, Any]:
        """The root's forward, recording reads while it runs (not while fx collects the model's tensors)."""
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        @functools.wraps(fn)
        def recorded(*inputs: Any) -> Any:
            self._recording = True
            try:
                return fn(*inputs)
            finally:
                self._recording = False

        return recorded, args

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if any(shadowed_methods(s) or patched_methods(type(s)) for s in m.modules()):
            return False  # its rule bounds its classes' own computation
        return is_registered_module(m) or super().is_leaf_module(m, module_qualified_name)


SIZE_QUERIES = frozenset({"size", "dim", "ndimension", "numel", "nelement", "shape", "ndim"})
"""Tensor methods and attributes that read a tensor's sizes."""

METADATA_QUERIES = SIZE_QUERIES | {"dtype", "device", "is_cuda", "is_floating_point", "is_complex", "is_contiguous",
                                   "requires_grad", "stride", "element_size", "layout", "get_device", "is_sparse"}
"""... and the rest of its metadata: none of them reads the tensor's values."""


def reads_metadata(node: fx.Node, queries: frozenset[str] = METADATA_QUERIES) -> bool:
    """Whether a node reads only the metadata (``queries``) of its tensor argument (``x.size(0)``, ``x.shape``,
    ``torch.numel(x)``)."""
    if node.op == "call_method":
        return node.target in queries
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in queries
    return node.op == "call_function" and node.target is torch.numel


def _shape_only(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node``'s value is computed from sizes alone (``x.shape``, ``x.size(1)``, ``x.dim()`` and Python
    arithmetic on them), never from the values of a tensor, the input's or a parameter's."""
    if node not in memo:
        if reads_metadata(node, SIZE_QUERIES):
            memo[node] = True
        elif node.op != "call_function" or not node.all_input_nodes:
            memo[node] = False  # the input, a parameter, a module's output, or a constant created by forward
        else:
            memo[node] = all(_shape_only(parent, memo) for parent in node.all_input_nodes)
    return memo[node]


class _ShapeTracer(_Tracer):
    """:class:`_Tracer` that also follows Python branches on shapes (``if group_size > x.shape[1]:``), as deel-lip's
    GroupSort has: such a condition is evaluated on the one-sample example the graph is traced for (the shape
    every bound of lipreg is computed at), by running the graph traced so far. Only a condition computed from shape
    metadata alone is decided; one that reads a tensor's values (the input's or a parameter's) still fails, as a
    function of the values would be frozen at the example's."""

    def __init__(self, sample: Tensor) -> None:
        super().__init__()
        self._sample = sample
        self._memo: dict[fx.Node, bool] = {}

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not _shape_only(obj.node, self._memo):
            return super().to_bool(obj)
        try:
            value = self._evaluate(obj.node)
        except Exception:  # the prefix does not run alone (other inputs, concrete_args): fx's own error
            return super().to_bool(obj)
        return bool(value)

    def _evaluate(self, node: fx.Node) -> Any:
        """``node``'s value on the example: the graph traced so far, cut at ``node``, run with the module methods fx
        and :class:`_Tracer` patch for the trace restored (no proxy, no recorded read)."""
        graph = fx.Graph()
        values: dict[fx.Node, fx.Node] = {}
        for n in self.graph.nodes:
            values[n] = graph.node_copy(n, lambda parent: values[parent])
            if n is node:
                break
        graph.output(values[node])
        patched = nn.Module.__call__, nn.Module.__getattr__
        recording, self._recording = self._recording, False
        nn.Module.__call__ = fx._symbolic_trace._orig_module_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = fx._symbolic_trace._orig_module_getattr  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                return fx.Interpreter(fx.GraphModule(self.root, graph)).run(self._sample)
        finally:
            nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]
            self._recording = recording


class _Whole(nn.Module):
    """A holder for a model whose own class has a rule (a bare ``nn.Conv2d``...), or whose instance shadows a
    method: fx always traces through its root, with the forward of the root's class, so the model is traced as the
    submodule ``model`` of this holder: a leaf that keeps its rule, or traced through what the instance calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def trace(model: nn.Module, concrete_args: dict[str, Any] | None, sample: Tensor | None = None
          ) -> tuple[nn.Module, fx.GraphModule, set[str], Reads]:
    """The module traced (the model, or a :class:`_Whole` holding it), its ``GraphModule``, the names of the
    constants the tracer stowed on the root (``_tensor_constant0`` for a tensor created in ``forward``): those are
    kept by the ``GraphModule`` only, and the user's model is left as it was; and the attributes each module's
    traced ``forward`` read (:attr:`_Tracer.reads`). With the one-sample ``sample`` the graph is for, branches on
    shapes are followed (:class:`_ShapeTracer`)."""
    _refuse_wrappers(model)
    tracer = _Tracer() if sample is None else _ShapeTracer(sample)
    overridden = "forward" in shadowed_methods(model)  # fx traces a root with its class's forward
    if overridden and concrete_args:
        raise UnsupportedOpError(
            f"the model ({type(model).__name__}) has `forward` set on the instance, shadowing its class's "
            "forward, and concrete_args were given: lipreg can follow an instance override only for a forward of "
            "one tensor argument. Fix the other arguments in a wrapper module, or remove the override."
        )
    root = _Whole(model) if (is_registered_module(model) or overridden) and not concrete_args else model
    own_attributes = set(vars(root))
    try:
        try:
            graph = tracer.trace(root, concrete_args=concrete_args)
        except Exception as err:
            raise _trace_failure(model, err) from err
        if concrete_args:
            _drop_guarded_placeholders(graph, set(concrete_args))
        return root, fx.GraphModule(root, graph), set(vars(root)) - own_attributes, tracer.reads
    finally:
        for name in set(vars(root)) - own_attributes:
            delattr(root, name)


_PYTHON_NUMBER = re.compile(r"(float|int|complex)\(\) argument .*'Proxy'|'Proxy' object cannot be interpreted as an")


def _trace_failure(model: nn.Module, err: Exception) -> UnsupportedOpError:
    """The error for a forward fx cannot trace: where (the user's line, the module whose forward it is) and why."""
    where = user_frame(err.__traceback__, model)
    cause = f"{type(err).__name__}: {err}"
    if isinstance(err, TypeError) and _PYTHON_NUMBER.search(str(err)):  # float(t), int(t), range(t)... of a tensor
        return UnsupportedOpError(
            f"{where} reads a tensor's value into a Python number ({cause}). A parameter or buffer read this way "
            "would be frozen at its value when the model was traced, and an input-dependent one is not Lipschitz "
            "in the input: keep it a tensor (x * self.scale instead of x * float(self.scale)), or make it a plain "
            "Python attribute set outside forward."
        )
    return UnsupportedOpError(
        f"torch.fx could not trace {type(model).__name__} at {where}: {cause}\n"
        "fx traces symbolically, so Python control flow that depends on tensor values (if x.sum() > 0, "
        "if self.weight.norm() > 1...) cannot be traced (branches on shapes, if x.shape[1] > 4, are followed at the "
        "example's shape). Make the branch static, pass "
        "concrete_args={'flag': True} for plain bool/int arguments, or wrap the offending submodule in a "
        "class with a registered rule (lipreg.register_rule(MyBlock, ...)) so it is kept whole."
    )


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

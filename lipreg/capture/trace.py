"""Tracing a model with ``torch.fx``, in eval mode, with lipreg's leaf modules.

Every ``torch.nn`` module and every module class with a registered rule is kept whole (a leaf of the graph). A
model whose own class has a rule is traced inside a holder (:class:`_Whole`). Wrappers whose ``forward`` is not
the model's Python code (DataParallel, ``torch.compile``, TorchScript) are refused with what to pass instead, and
the guards fx adds for ``concrete_args`` are dropped so that the graph has one tensor input.
"""
from __future__ import annotations

import operator
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, fx, nn

from ..errors import UnsupportedOpError
from ..ops import is_registered_module


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
    """Keeps ``torch.nn`` modules and every module class with a registered rule whole; records source lines."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_module(m) or super().is_leaf_module(m, module_qualified_name)


class _Whole(nn.Module):
    """A holder for a model whose own class has a rule (a bare ``nn.Conv2d``...): fx always traces through its
    root, so the model is traced as the single leaf ``model`` of this holder and keeps its rule."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> tuple[nn.Module, fx.GraphModule, set[str]]:
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

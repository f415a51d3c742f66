"""Capture checks: the traced graph, read as the dataflow the rules bound, must be the function the model computes.

``torch.fx`` records calls, not their effects. What escapes it is refused here, never bounded wrongly:

* forward hooks and pre-hooks (per module or global): a rule bounds a module's own computation, and fx bypasses the
  hooks of the modules it traces through. Old-style ``torch.nn.utils.spectral_norm`` is such a pre-hook;
* in-place writes: an op that writes ``h`` in place (``h.relu_()``, ``nn.LeakyReLU(inplace=True)(h)``) computes
  its out-of-place op, bounded as such, and later reads of ``h`` are rerouted to its output; a later read through
  another alias (a view of ``h`` taken before the write) is refused;
* whatever else makes the graph differ from the model: ``h += x`` (fx records ``h + x``), random ops, state. The
  model and the graph, each op given its own copy of its arguments, are run in eval mode on the example and on a
  random perturbation of it; any difference is refused.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules import module as module_lib
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import UnsupportedOpError

Where = Callable[[fx.Node], str]  # "node 'h' (call_module torch.nn.Linear) at File ..., line 12" for messages


def storages(value: Any) -> frozenset[int]:
    """The addresses of the storages a node's value uses (two values share one iff one may alias the other)."""
    return frozenset(t.untyped_storage().data_ptr() for t in tree_leaves(value)
                     if isinstance(t, Tensor) and t.numel() > 0)


# ------------------------------------------------------------------------------------------------------ hooks
_REPARAMETRISING = {
    SpectralNorm: "the old-style torch.nn.utils.spectral_norm, a forward pre-hook that recomputes `weight` from "
                  "`weight_orig` at each call (the weight a rule reads lags behind); use "
                  "torch.nn.utils.parametrizations.spectral_norm, whose weight is recomputed on every access",
    WeightNorm: "the old-style torch.nn.utils.weight_norm, a forward pre-hook that recomputes `weight` at each call; "
                "use torch.nn.utils.parametrizations.weight_norm, whose weight is recomputed on every access",
}


def _hook_name(hook: Any) -> str:
    """A hook's name and where it is defined (``scale at model.py:12``)."""
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    code = getattr(hook, "__code__", None)
    return f"{name} at {code.co_filename}:{code.co_firstlineno}" if code is not None else name


def used_modules(model: nn.Module, graph_module: fx.GraphModule) -> Iterator[tuple[str, nn.Module]]:
    """Every module the traced forward runs: the model, the leaves fx kept whole, and the modules it traced through
    (from each node's ``nn_module_stack`` and the owners of the parameters it reads), with their qualified paths."""
    by_path = dict(model.named_modules(remove_duplicate=False))
    seen: set[int] = set()
    for node in graph_module.graph.nodes:
        paths = [entry[0] for entry in node.meta.get("nn_module_stack", {}).values()]
        if node.op in ("call_module", "get_attr"):
            paths.append(str(node.target))
        prefixes = {""} | {".".join(p.split(".")[:k]) for p in paths for k in range(1, p.count(".") + 2)}
        found = [(p, by_path[p]) for p in sorted(prefixes) if p in by_path]
        if node.op == "call_module":  # the model itself, when fx keeps it whole inside a holder
            found.append((str(node.target), graph_module.get_submodule(str(node.target))))
        for path, module in found:
            if id(module) not in seen:
                seen.add(id(module))
                yield ("" if module is model else path), module


def _records_only(hook: Any) -> bool:
    """Whether a global hook is torch's own :class:`torch.utils.module_tracker.ModuleTracker`'s (which FLOP counters
    and Lightning's model summary install for one forward): it records which module runs and returns ``None``."""
    from torch.utils.module_tracker import ModuleTracker

    return isinstance(getattr(hook, "__self__", None), ModuleTracker)


def check_hooks(model: nn.Module, graph_module: fx.GraphModule) -> None:
    """Refuse forward hooks and pre-hooks on any module the forward runs, and global ones: they may change a
    module's input or output, and no rule bounds them."""
    global_hooks = [hook for hook in (*module_lib._global_forward_pre_hooks.values(),
                                      *module_lib._global_forward_hooks.values()) if not _records_only(hook)]
    if global_hooks:
        raise UnsupportedOpError(
            f"global forward hooks are registered ({', '.join(map(_hook_name, global_hooks))}, by "
            "torch.nn.modules.module.register_module_forward_hook / _pre_hook): they run at every module call and "
            "may change its input or output, which no rule bounds. Remove them (handle.remove()) while you bound "
            "the model."
        )
    for path, module in used_modules(model, graph_module):
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if not hooks:
            continue
        name = f"module {path!r}" if path else "the model"
        where = f"{name} ({type(module).__module__}.{type(module).__qualname__})"
        special = next((why for hook in hooks for kind, why in _REPARAMETRISING.items() if isinstance(hook, kind)),
                       None)
        if special is not None:
            raise UnsupportedOpError(f"{where} uses {special}.")
        raise UnsupportedOpError(
            f"{where} has forward hooks or pre-hooks ({', '.join(map(_hook_name, hooks))}): a hook may change the "
            "module's input or output, which its rule does not see, and fx skips the hooks of the modules it traces "
            "through. Remove them (handle.remove()) while you bound the model, or move what they compute into a "
            "module's forward."
        )


# --------------------------------------------------------------------------------------------------- in-place
# `x += y` and friends: operator.iadd -> operator.add, and the tensor methods behind them (__iadd__ -> __add__)
_OPERATORS = ("add", "and", "floordiv", "lshift", "mod", "mul", "matmul", "or", "pow", "rshift", "sub", "truediv",
              "xor")
_INPLACE_OPERATORS = {getattr(operator, f"__i{name}__"): getattr(operator, f"__{name}__") for name in _OPERATORS}
_INPLACE_DUNDERS = {f"__i{name}__": f"__{name}__" for name in _OPERATORS}
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_"}  # methods ending in _ that leave the data alone


def _is_in_place_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES


def out_of_place(node: fx.Node) -> Any:
    """The out-of-place op of an in-place method or function node, when torch has one (``relu_`` -> ``relu``,
    ``__iadd__`` -> ``__add__``, ``operator.iadd`` -> ``operator.add``, ``F.relu_`` -> ``F.relu``), else ``None``."""
    target = node.target
    if node.op == "call_method":
        name = _INPLACE_DUNDERS.get(target, target[:-1] if _is_in_place_name(target) else None)
        return name if name is not None and hasattr(Tensor, name) else None
    if target in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[target]
    name = getattr(target, "__name__", "")
    for namespace in (F, torch):
        if _is_in_place_name(name) and getattr(namespace, name, None) is target:
            return getattr(namespace, name[:-1], None)
    return None


def _inplace_flag(node: fx.Node) -> inspect.BoundArguments | None:
    """The call's arguments bound to its signature when it passes ``inplace=True`` (``F.leaky_relu(h, 5., True)``)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature, or a call the signature does not fit
        return None
    return bound if bound.arguments.get("inplace") is True else None


def written_argument(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    """The node whose tensor ``node`` writes in place: a module with ``inplace=True``, a call with ``inplace=True``
    or ``out=``, an in-place method or function (``relu_``, ``__iadd__``, ``fill_``, ``F.relu_``, ``operator.iadd``)."""
    if node.op == "call_module":
        writes = modules[str(node.target)].__dict__.get("inplace") is True
    elif node.op == "call_method":
        writes = node.target in _INPLACE_DUNDERS or _is_in_place_name(node.target)
    elif node.op == "call_function" and isinstance(node.kwargs.get("out"), fx.Node):
        return node.kwargs["out"]
    else:
        writes = node.op == "call_function" and (out_of_place(node) is not None or _inplace_flag(node) is not None)
    written = node.args[0] if writes and node.args else None
    return written if isinstance(written, fx.Node) else None


def _functionalise(node: fx.Node) -> None:
    """Rewrite an in-place call as its out-of-place op (same arguments, same value), so that evaluating the graph
    (rules, constants, power iterations) never writes into a tensor. A module's ``inplace`` is left as it is:
    the rules of such modules (activations, dropout) never call them."""
    replacement = out_of_place(node)
    if replacement is not None:
        node.target = replacement
    elif node.op == "call_function" and "out" in node.kwargs:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
    elif node.op == "call_function" and (bound := _inplace_flag(node)) is not None:
        bound.arguments["inplace"] = False
        node.args, node.kwargs = bound.args, bound.kwargs


def resolve_in_place(graph_module: fx.GraphModule, values: Mapping[fx.Node, frozenset[int]], where: Where) -> None:
    """Make the graph's dataflow follow in-place writes, or refuse.

    An op that writes node ``h``'s tensor in place and returns it (``h.relu_()``, ``act(h)`` with ``inplace=True``)
    leaves, for fx, every later op reading ``h`` with the value from before. Those reads are rerouted to the
    writer's output, which is the value they see, and the writer becomes its out-of-place op. A later read through
    another alias of the storage, computed before the write (a view ``g = h.view(...)``, the tensor ``h`` is a view
    of), cannot be rerouted: refused.
    ``values`` holds the storages of every node that returned a tensor; a reader that returns none
    (``h.size(0)``) reads no values (a reader that turns them into numbers is refused when rules are resolved).
    """
    nodes = list(graph_module.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    modules = dict(graph_module.named_modules())
    for node in nodes:
        written = written_argument(node, modules)
        shared = values.get(written, frozenset()) if written is not None else frozenset()
        if not shared:
            continue
        later = nodes[order[node] + 1:]
        returns_written = values.get(node) == shared  # in-place ops return the tensor they wrote
        if returns_written:
            for reader in later:
                reader.replace_input_with(written, node)
        for reader in later:
            stale = [a for a in reader.all_input_nodes
                     if order[a] < order[node] and values.get(a, frozenset()) & shared]
            if stale and (reader.op == "output" or reader in values):
                raise UnsupportedOpError(
                    f"{where(node)} writes in place into a tensor that {where(reader)} reads afterwards through "
                    f"another name, the output of {where(stale[0])} (a view of the tensor written, or the tensor it "
                    "is a view of): fx records the dataflow, not the write, so the bound would take that read for "
                    "the value from before the write. Write the op out of place: inplace=False, y = f(h) instead of "
                    "h.f_(), h = h + x instead of h += x."
                )
        if returns_written:
            _functionalise(node)
    graph_module.recompile()


# ---------------------------------------------------------------------------------------------- cross-check
class _Dataflow(fx.Interpreter):
    """Runs the graph as the rules read it: each op gets its own copy of its tensor arguments, so a write in place
    reaches only the ops that take the writing node's output."""

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_module", "call_method", "call_function"):
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v,
                                    self.fetch_args_kwargs_from_env(n))
            return getattr(self, n.op)(n.target, args, kwargs)


def _difference(graph_out: Any, model_out: Any) -> str | None:
    """How two outputs differ beyond rounding, or ``None`` when they agree."""
    ours, theirs = tree_leaves(graph_out), tree_leaves(model_out)
    if len(ours) != len(theirs):
        return f"{len(ours)} outputs against the model's {len(theirs)}"
    for a, b in zip(ours, theirs):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            if a != b:
                return f"{a!r} against the model's {b!r}"
            continue
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} against the model's {tuple(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return "different values"
            continue
        a64, b64 = a.double(), b.double()
        finite = torch.isfinite(b64)  # where the model's own output is NaN / inf (NaN weights), nothing to compare
        if not torch.isfinite(a64[finite]).all():
            return "non-finite values where the model's are finite"
        if not finite.any():
            continue
        tol = max(1e-5, 4 * torch.finfo(b.dtype).eps)
        gap, scale = float((a64 - b64)[finite].abs().max()), float(b64[finite].abs().max())
        if not gap <= tol * max(scale, 1e-30):
            return f"max difference {gap:.3g} on outputs of size {scale:.3g}"
    return None


def check_traced_function(graph_module: fx.GraphModule, model: Callable[[Tensor], Any], sample: Tensor) -> None:
    """Refuse a graph that, read as dataflow, does not compute the model: run both on ``sample`` and on a random
    perturbation of it (call in eval mode, without grad)."""
    inputs = [sample]
    if sample.is_floating_point():
        generator = torch.Generator(device=sample.device).manual_seed(0)
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
        inputs.append(sample + noise * (float(sample.abs().max()) or 1.0))
    for k, x in enumerate(inputs):
        difference = _difference(_Dataflow(graph_module).run(x.clone()), model(x.clone()))
        if difference is not None:
            which = "the example input" if k == 0 else "a random perturbation of the example input"
            raise UnsupportedOpError(
                f"the traced graph does not compute what the model computes on {which} ({difference}): the forward "
                "does something torch.fx does not record, so no bound of the graph bounds the model. The usual "
                "causes: an in-place update read through another name (h += x or h.add_(x) while another variable "
                "still holds h: fx records h + x), a random op (torch.rand*, dropout with training=True), or state "
                "that changes from call to call. Write updates out of place (h = h + x) and make the eval-mode "
                "forward a deterministic function of its input."
            )

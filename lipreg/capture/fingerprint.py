"""A fingerprint of everything a traced graph read from the model, to tell when the model changed under its estimator.

The graph, its rules and their constants are read from the model once, when it is traced: a submodule replaced or
appended (``model[2] = ...``, ``Sequential.append``, ``add_module``), a hyper-parameter changed
(``LeakyReLU.negative_slope``, a private ``self._temperature`` read in ``forward``, an entry of a dict attribute
changed in place), a method shadowed on the instance (``module.forward = ...``), a tensor of another shape or
dtype (``model.double()``) or a hook added would leave the graph describing a model that no longer exists.

For every module the graph uses (module calls with their submodules, every module whose ``forward`` was traced
through, from fx's ``nn_module_stack``, their parents, and every module an attribute was read from while tracing)
the fingerprint records, by aspect:

* its attributes: of a module fx kept whole (whose ``forward`` its rule reads), every instance attribute; of a
  module traced through, every attribute its ``forward`` read (:attr:`lipreg.capture.trace._Tracer.reads`; one
  not set on the instance by its class's value) and its public ones. Plain values and the contents of
  containers (tuples, lists, dicts, sets) by value, tensors by shape and dtype, other objects by identity;
* the instance attributes that shadow a method of its class (:func:`~lipreg.capture.trace.shadowed_methods`);
* its children, by name and identity; the names, shapes and dtypes of its tensors; its hooks;

and the shape and dtype of every tensor the graph reads with ``get_attr``, and the global hooks. Tensor values
are not part of it: they are read anew at every evaluation. Devices are not either: the estimator follows the
model's device itself.
"""
from __future__ import annotations

import dataclasses
import operator
import types
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules import module as _module_globals

from .trace import BOOKKEEPING, Reads, shadowed_methods

_PLAIN = (bool, int, float, complex, str, type(None), torch.dtype, torch.device)
_DEPTH = 8  # containers nested deeper than this are compared by identity
_MODULE_NAMES = frozenset(dir(nn.Module))  # read by fx and nn.Module itself on every module


class _Absent:
    """An attribute read while tracing that the instance did not have (a class default, a method)."""

    def __repr__(self) -> str:
        return "(not set on the instance)"


ABSENT = _Absent()


class _Same:
    """Compares equal to a ``_Same`` of the very same object (identity, not ``==``: arrays, mutable objects)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __repr__(self) -> str:
        return repr(self.obj) if self.obj is ABSENT else f"<{type(self.obj).__name__} object at {id(self.obj):#x}>"


def _data_object(value: Any) -> bool:
    """A plain record of values (``SimpleNamespace``, a dataclass instance): compared by its attributes."""
    return isinstance(value, types.SimpleNamespace) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def _items(value: Any) -> Any:
    """The entries of a container or record compared by content: dict and record items, others' elements."""
    if isinstance(value, dict):
        return value.items()
    return vars(value).items() if _data_object(value) else value


def _frozen(value: Any, deep: bool = True, depth: int = 0) -> Any:
    """A value as the fingerprint compares it: plain values as they are, tensors by shape and dtype, tuples by
    their contents; with ``deep``, mutable containers (lists, dicts, sets) and records by their contents too;
    other objects by identity."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if depth >= _DEPTH:
        return _Same(value)
    if isinstance(value, tuple):  # torch.Size included
        return tuple(_frozen(item, deep, depth + 1) for item in value)
    if deep and isinstance(value, (set, frozenset)):
        return frozenset(_frozen(item, deep, depth + 1) for item in value)
    if deep and isinstance(value, list):
        return [_frozen(item, deep, depth + 1) for item in value]
    if deep and isinstance(value, dict):
        return {key: _frozen(item, deep, depth + 1) for key, item in value.items()}
    if deep and _data_object(value):
        return (type(value), {key: _frozen(item, deep, depth + 1) for key, item in vars(value).items()})
    return _Same(value)


def _mutable(value: Any, depth: int = 0) -> bool:
    """Whether a value may change in place (a list, dict, set or record, or a tuple holding one): only those need
    their contents compared on the fast path; a tuple of plain values is compared by identity."""
    if isinstance(value, (list, dict, set)) or _data_object(value):
        return True
    return isinstance(value, tuple) and depth < _DEPTH and any(_mutable(item, depth + 1) for item in value)


def _leaves(value: Any, out: list[Any], depth: int = 0) -> None:
    """The objects inside a container or record, uncopied, for the identity comparison of the fast path."""
    if depth < _DEPTH and (isinstance(value, (tuple, list, dict, set, frozenset)) or _data_object(value)):
        items = list(_items(value))
        out.append(len(items))
        for item in items:
            _leaves(item, out, depth + 1)
    else:
        out.append(value)


class _ModuleEntry:
    """One used module: which of its attributes the graph depends on (``whole``: all of them)."""

    __slots__ = ("path", "module", "whole", "names", "read", "calls", "traced", "containers", "class_names")

    def __init__(self, path: str, module: nn.Module, whole: bool, read: set[str]) -> None:
        self.path, self.module = path, module
        self.whole = whole
        self.traced = frozenset(vars(module))
        self.read = frozenset(read) - BOOKKEEPING - _MODULE_NAMES
        self.calls = frozenset(read) | {"forward"}  # methods it may run: a shadow of another one changes nothing
        public = {name for name in vars(module) if name[0] != "_"}
        self.names = sorted(self.read | public - BOOKKEEPING)
        self.containers = [name for name in self._attribute_names()
                           if self._deep(name) and _mutable(vars(module).get(name))]
        held = {*vars(module), *module._parameters, *module._buffers, *module._modules}
        self.class_names = sorted(self.read - held)  # read from the class: a default value, a helper method

    def _deep(self, name: str) -> bool:
        """Whether an attribute's contents are compared (what the forward read), or only its identity (a public
        attribute of a module traced through that its forward did not read: a list of logged outputs...)."""
        return self.whole or name in self.read

    def _attribute_names(self) -> list[str]:
        """Those of :attr:`names`; of a module kept whole, every instance attribute but a function added since
        (a callback: its class's code cannot read it; one that shadows a method is an aspect of its own)."""
        if not self.whole:
            return self.names
        values = vars(self.module)
        return [name for name in values if name not in BOOKKEEPING
                and (name in self.traced or not callable(values[name]))]

    def state(self) -> dict[str, Any]:
        """What of the module the graph depends on, by aspect (the first differing aspect names the change). Its
        tensors are compared by name, shape and dtype whatever their kind: a parameter turned into a plain tensor
        attribute of the same shape (``torch.func``-style calls) changes nothing the graph relies on."""
        module, values = self.module, vars(self.module)
        attributes = {name: _static(module, values, name) for name in self._attribute_names()}
        state = {name: _frozen(value, self._deep(name)) for name, value in attributes.items()
                 if not isinstance(value, Tensor)}
        tensors = {**module._parameters, **module._buffers,
                   **{name: value for name, value in attributes.items() if isinstance(value, Tensor)}}
        state["class"] = type(module)
        state["methods set on the instance"] = tuple((name, _Same(values[name])) for name in shadowed_methods(module)
                                                     if self.whole or name in self.calls)
        state["children"] = tuple((name, _Same(child)) for name, child in module._modules.items())
        state["tensors"] = tuple(sorted((name, None if t is None else _frozen(t)) for name, t in tensors.items()))
        state["hooks"] = (tuple(module._forward_pre_hooks), tuple(module._forward_hooks))
        return state

    def raw(self) -> tuple[Any, ...] | list[Any]:
        """The objects :meth:`state` reads, uncopied, with the shape and dtype of every tensor (``.double()``
        converts a parameter in place), the class attributes read (a default changed on the class) and the
        contents of container attributes (mutated in place): unchanged
        objects compare by identity, which is cheap. A private attribute or the ``training`` flag that changes
        only costs one full comparison (which ignores them)."""
        module = self.module
        values = module.__dict__
        tensors = (*module._parameters.values(), *module._buffers.values())
        raw = (tuple(values.values()), tensors, tuple(module._modules.values()), tuple(module._forward_pre_hooks),
               tuple(module._forward_hooks), tuple([(t.dtype, t.shape) for t in tensors if t is not None]))
        if self.class_names:
            raw += tuple(_static(module, values, name) for name in self.class_names)
        if not self.containers:
            return raw
        out = list(raw)
        for name in self.containers:
            _leaves(values.get(name), out)
        return out


def _static(module: nn.Module, values: dict[str, Any], name: str) -> Any:
    """The attribute ``name`` as Python finds it, without running descriptors: the instance's own, else the nearest
    class's (a class default, a method), else :data:`ABSENT` (a parameter or child, compared on their own)."""
    if name in values:
        return values[name]
    return next((vars(cls)[name] for cls in type(module).__mro__ if name in vars(cls)), ABSENT)


def _global_hooks() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The forward (pre-)hooks registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    return tuple(_module_globals._global_forward_pre_hooks), tuple(_module_globals._global_forward_hooks)


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return ["", *(".".join(parts[:k]) for k in range(1, len(parts) + 1))]


def _used_modules(root: nn.Module, graph_module: fx.GraphModule, reads: Reads) -> list[tuple[str, bool, set[str]]]:
    """Every module the graph uses, as ``(path, kept whole, attributes read)``, with every module on the way to
    it from the root; parents first."""
    by_id = {id(m): path for path, m in root.named_modules()}
    read = {by_id[key]: names for key, names in reads.items() if key in by_id}
    paths, whole = set(read), set()
    for node in graph_module.graph.nodes:
        paths.update(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
        if node.op == "call_module":  # a leaf runs its submodules too
            whole.update(path for path, _ in root.get_submodule(node.target).named_modules(prefix=node.target))
    paths = {prefix for path in paths | whole for prefix in _prefixes(path)}
    return [(path, path in whole, read.get(path, set()))
            for path in sorted(paths, key=lambda path: (path.count("."), path))]


class ModelFingerprint:
    """The fingerprint of ``root`` as ``graph_module`` uses it; :meth:`change` compares the model now to it.

    The check runs on every ``est()`` call, so it has a fast path: the objects the fingerprint reads, and every
    used module's children (the same children all the way down: every path still leads to the same module), are
    compared to those seen last, by identity first. Only when one differs (a reassigned attribute, a new
    parameter object, a converted dtype, a container's new entry) are the values compared as the fingerprint
    defines them; if those still agree, the objects seen become the new reference.
    """

    def __init__(self, root: nn.Module, graph_module: fx.GraphModule, reads: Reads) -> None:
        self.entries = [_ModuleEntry(path, _resolve(root, path), whole, read)
                        for path, whole, read in _used_modules(root, graph_module, reads)]
        self.tensor_paths = sorted({str(n.target) for n in graph_module.graph.nodes if n.op == "get_attr"
                                    and _resolve(root, str(n.target)) is not None})
        self.states = [entry.state() for entry in self.entries]
        self.tensors = [_frozen(_resolve(root, path)) for path in self.tensor_paths]
        self._seen = self._raw_now(root)

    def _raw_now(self, root: nn.Module) -> list[Any]:
        tensors = [_resolve(root, path) for path in self.tensor_paths]
        return [*(entry.raw() for entry in self.entries), *tensors,
                tuple((t.dtype, t.shape) for t in tensors if isinstance(t, Tensor)), _global_hooks()]

    def change(self, root: nn.Module) -> str | None:
        """The first difference between the model now and the fingerprint, in words, or ``None``."""
        seen = self._raw_now(root)
        try:
            if seen == self._seen:
                return None
        except Exception:  # noqa: BLE001  (a reassigned tensor or array: `==` is elementwise; compared below)
            pass
        change = self._difference(root)
        if change is None:
            self._seen = seen
        return change

    def _difference(self, root: nn.Module) -> str | None:
        for entry in self.entries:  # a replaced module first: it is the cause of its parent's changed children
            new, old = _resolve(root, entry.path), entry.module
            if new is None:
                return f"{_name(entry.path)} ({type(old).__name__}) no longer exists"
            if new is not old:
                return f"{_name(entry.path)} is another object now ({type(new).__name__}, was {type(old).__name__})"
        for entry, old_state in zip(self.entries, self.states):
            new = entry.module
            new_state = entry.state()
            for aspect in dict.fromkeys([*old_state, *new_state]):
                if old_state.get(aspect, ABSENT) != new_state.get(aspect, ABSENT):
                    return (f"{_name(entry.path)} ({type(new).__name__}): {aspect} changed from "
                            f"{old_state.get(aspect, ABSENT)!r} to {new_state.get(aspect, ABSENT)!r}")
        for path, old in zip(self.tensor_paths, self.tensors):
            new = _frozen(_resolve(root, path))
            if old != new:
                return f"{path} changed from {old!r} to {new!r}"
        if self._seen[-1] != _global_hooks():
            return "global forward hooks were registered or removed (nn.modules.module.register_module_forward_hook)"
        return None


def _name(path: str) -> str:
    return f"submodule {path!r}" if path else "the model itself"


def _resolve(root: nn.Module, path: str) -> Any:
    """The attribute at a dotted path (``features.0``), or ``None`` if it no longer exists."""
    try:
        return operator.attrgetter(path)(root) if path else root
    except AttributeError:
        return None

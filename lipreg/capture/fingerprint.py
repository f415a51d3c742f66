"""A fingerprint of the modules a traced graph uses, to tell when the model changed under its estimator.

The graph, its rules and their constants are read from the model once, when it is traced: a submodule replaced
afterwards (``model[2] = nn.Linear(...)``), a hyper-parameter changed (``LeakyReLU.negative_slope``, a
convolution's ``stride``), a parameter of another shape or a hook added would leave the graph describing a model
that no longer exists. The fingerprint records, for every module the graph uses (module calls with their
submodules, and every module whose ``forward`` was traced through, from fx's ``nn_module_stack``): the module
object itself, its class, its public plain attributes (numbers, strings, tuples; other objects by identity), the
names and shapes of its tensors (parameters, buffers, tensor attributes), and its hooks; and the shape of every
tensor the graph reads with ``get_attr``. Tensor values are not part of it: they are read anew at every
evaluation. The private attributes (``_reversed_padding_repeated_twice``...) derive from the public ones.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules import module as _module_globals

_PLAIN = (bool, int, float, complex, str, type(None), torch.dtype)


class _Same:
    """Compares equal to a ``_Same`` of the very same object (identity, not ``==``: arrays, mutable objects)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} object at {id(self.obj):#x}>"


def _frozen(value: Any) -> Any:
    """A value as the fingerprint compares it: plain values as they are, tensors by shape, others by identity."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, tuple):  # torch.Size included
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Tensor):
        return ("tensor of shape", tuple(value.shape))
    return _Same(value)


def _state(module: nn.Module) -> dict[str, Any]:
    """What of one module the graph depends on, by aspect (the first differing aspect names the change). Its
    tensors are compared by name and shape whatever their kind: a parameter turned into a plain tensor
    attribute of the same shape (``torch.func``-style calls) changes nothing the graph relies on."""
    public = {name: value for name, value in vars(module).items() if name[0] != "_" and name != "training"}
    state = {name: _frozen(value) for name, value in public.items() if not isinstance(value, Tensor)}
    tensors = {**module._parameters, **module._buffers,
               **{name: value for name, value in public.items() if isinstance(value, Tensor)}}
    state["class"] = type(module)
    state["tensor shapes"] = tuple(sorted((name, None if t is None else tuple(t.shape)) for name, t in tensors.items()))
    state["hooks"] = (tuple(module._forward_pre_hooks), tuple(module._forward_hooks))
    return state


def _global_hooks() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The forward (pre-)hooks registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    return tuple(_module_globals._global_forward_pre_hooks), tuple(_module_globals._global_forward_hooks)


def _used_module_paths(root: nn.Module, graph_module: fx.GraphModule) -> list[str]:
    """Every module the graph uses, with every module on the way to it from the root."""
    paths = {""}  # the root's forward was traced
    for node in graph_module.graph.nodes:
        paths.update(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
        if node.op == "call_module":  # a leaf runs its submodules too
            paths.update(path for path, _ in root.get_submodule(node.target).named_modules(prefix=node.target))
    paths.update(path.rsplit(".", 1)[0] for path in list(paths) if "." in path)
    return sorted(paths, key=lambda path: (path.count("."), path))  # parents first


def _raw(module: nn.Module) -> tuple[Any, ...]:
    """The objects :func:`_state` reads, uncopied, and the module's children: unchanged objects compare by
    identity, which is cheap. A private attribute or the ``training`` flag that changes only costs one full
    comparison (which ignores them)."""
    return (tuple(vars(module).values()), tuple(module._parameters.values()), tuple(module._buffers.values()),
            tuple(module._modules.values()), tuple(module._forward_pre_hooks), tuple(module._forward_hooks))


class ModelFingerprint:
    """The fingerprint of ``root`` as ``graph_module`` uses it; :meth:`change` compares the model now to it.

    The check runs on every ``est()`` call, so it has a fast path: the objects the fingerprint reads, and every
    used module's children (the same children all the way down: every path still leads to the same module), are
    compared to those seen last, by identity first. Only when one differs (a reassigned attribute, a new
    parameter object) are the values compared as the fingerprint defines them; if those still agree, the objects
    seen become the new reference.
    """

    def __init__(self, root: nn.Module, graph_module: fx.GraphModule) -> None:
        self.paths = _used_module_paths(root, graph_module)
        self.tensor_paths = sorted({str(n.target) for n in graph_module.graph.nodes if n.op == "get_attr"
                                    and _resolve(root, str(n.target)) is not None})
        self.modules = [_resolve(root, path) for path in self.paths]
        self.states = [_state(m) for m in self.modules]
        self.tensors = [_frozen(_resolve(root, path)) for path in self.tensor_paths]
        self._seen = self._raw_now(root)

    def _raw_now(self, root: nn.Module) -> list[Any]:
        return [*(_raw(m) for m in self.modules), *(_resolve(root, path) for path in self.tensor_paths),
                _global_hooks()]

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
        for path, old, old_state in zip(self.paths, self.modules, self.states):
            new = _resolve(root, path)
            if new is None:
                return f"{_name(path)} ({type(old).__name__}) no longer exists"
            if new is not old:
                return f"{_name(path)} is another object now ({type(new).__name__}, was {type(old).__name__})"
            new_state = _state(new)
            added = [a for a in new_state if a not in old_state and not _is_function(new_state[a])]
            for aspect in [*old_state, *added]:
                if old_state.get(aspect) != new_state.get(aspect):
                    return (f"{_name(path)} ({type(new).__name__}): {aspect} changed from {old_state.get(aspect)!r} "
                            f"to {new_state.get(aspect)!r}")
        for path, old in zip(self.tensor_paths, self.tensors):
            new = _frozen(_resolve(root, path))
            if old != new:
                return f"{path} changed from {old!r} to {new!r}"
        if self._seen[-1] != _global_hooks():
            return "global forward hooks were registered or removed (nn.modules.module.register_module_forward_hook)"
        return None


def _is_function(frozen: Any) -> bool:
    """A function set on the instance after tracing (a callback shadowing ``training_step``) is no attribute the
    traced forward could have read: it is not a change."""
    return isinstance(frozen, _Same) and callable(frozen.obj)


def _name(path: str) -> str:
    return f"submodule {path!r}" if path else "the model itself"


def _resolve(root: nn.Module, path: str) -> Any:
    """The attribute at a dotted path (``features.0``), or ``None`` if it no longer exists."""
    try:
        return operator.attrgetter(path)(root) if path else root
    except AttributeError:
        return None

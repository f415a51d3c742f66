"""Parts of a split: ``split`` / ``chunk`` / ``unbind`` / ``tensor_split`` (functions or methods) return a tuple
of tensors, and the graph takes its elements with ``getitem``.

A tuple has no place in a chain of linear operators (whose values are tensors), so capture rewrites each element
taken, ``split(x, ...)[i]``, as one node :func:`split_part` (:func:`inline_split_parts`),
whose rule is :class:`SplitPart`: the part is a selection of distinct entries of ``x``, norm 1 (0 if empty), so
consecutive linear ops fuse across it. A tuple used otherwise (passed whole to another
op) is refused with what to write instead.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx

from .base import Call, NodeInfo, Refuse
from .registry import register_rule
from .structural import UnitNorm

_SPLITS = {"split": torch.split, "chunk": torch.chunk, "unbind": torch.unbind, "tensor_split": torch.tensor_split,
           "split_with_sizes": torch.split_with_sizes, "hsplit": torch.hsplit, "vsplit": torch.vsplit,
           "dsplit": torch.dsplit}
"""The split ops by name, as functions; each is also a ``Tensor`` method of that name."""


def split_part(op: str, method: bool, index: int, tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Element ``index`` of the tuple that ``tensor.<op>(*args, **kwargs)`` (``method``) or ``torch.<op>(tensor,
    *args, **kwargs)`` returns: the call as written, keyword names included."""
    parts = getattr(tensor, op)(*args, **kwargs) if method else _SPLITS[op](tensor, *args, **kwargs)
    return parts[index]


def _split_name(node: fx.Node) -> str | None:
    """The name of the split a node calls (method or function), or ``None``."""
    if node.op == "call_method" and node.target in _SPLITS:
        return str(node.target)
    if node.op == "call_function":
        return next((name for name, function in _SPLITS.items() if node.target is function), None)
    return None


def inline_split_parts(module: fx.GraphModule) -> None:
    """Rewrite every ``split(x, ...)[i]`` whose tuple is only indexed by integers into ``split_part(op, i, x,
    ...)``, keeping the split's source location; the split and its ``getitem`` nodes are removed."""
    graph = module.graph
    for node in list(graph.nodes):
        name = _split_name(node)
        if name is None or not node.args or not node.users:
            continue
        if not all(user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)
                   for user in node.users):
            continue
        for user in list(node.users):
            index = user.args[1]
            with graph.inserting_before(user):
                part = graph.create_node("call_function", split_part,
                                         (name, node.op == "call_method", index, *node.args), dict(node.kwargs),
                                         name=f"{node.name}_{str(index).replace('-', 'm')}")
            part.meta = {**node.meta}
            user.replace_all_uses_with(part)
            graph.erase_node(user)
        graph.erase_node(node)
    module.recompile()


class SplitPart(UnitNorm):
    """``split_part``: a selection of entries, ``v -> v[S]``; its adjoint puts ``u`` back in place in zeros (the
    same call on a zero tensor returns a view of it, written through)."""

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        op, method, index, _, *args = (info.arg(i, "") for i in range(len(info.node.args)))
        kwargs = {name: info.arg(len(info.node.args), name) for name in info.node.kwargs}
        out = torch.zeros(info.in_shapes[0], dtype=u.dtype, device=u.device)
        split_part(op, method, index, out, *args, **kwargs).copy_(u)
        return out


def _whole_split(info: NodeInfo) -> Refuse:
    return Refuse(f"{info.name} returns a tuple that is used whole; lipreg bounds the parts of a split that are "
                  "taken by index (a, b = x.chunk(2, dim=1), or x.split(sizes)[i]): unpack it, then use the parts")


register_rule(split_part, SplitPart())
for _name, _function in _SPLITS.items():
    register_rule(_name, _whole_split)
    register_rule(_function, _whole_split)

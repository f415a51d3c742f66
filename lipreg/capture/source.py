"""Where the user's code is: the source line that created an fx node, for error messages.

fx records the Python stack of every node it creates (``record_stack_traces``); the frame shown is the innermost
one outside torch and lipreg, the user's own line. The same library directories tell which frames a warning
should skip to point at the user's call (:data:`LIBRARY_DIRS`).
"""
from __future__ import annotations

import linecache
import os
import re
from types import TracebackType

import torch
from torch import fx, nn

from ..ops.base import display_name

LIBRARY_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)
"""The directories of torch and of the lipreg package: frames in them are not the user's."""
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)(?:\n {4}(?P<code>[^\n]*))?')


def source_line(node: fx.Node) -> str:
    """Where the user's code created an fx node (``File "model.py", line 12, in forward`` and the code): the
    innermost frame of the stack fx recorded that lies outside torch (module calls, the tracer) and lipreg."""
    frames = [f for f in _FRAME.finditer(node.stack_trace or "")
              if not os.path.abspath(f["file"]).startswith(LIBRARY_DIRS)]
    if not frames:
        return "(source line unknown)"
    frame = frames[-1]
    code = f", `{frame['code'].strip()}`" if frame["code"] else ""
    return f'File "{frame["file"]}", line {frame["line"]}, in {frame["function"]}{code}'


def node_location(node: fx.Node, target: str) -> str:
    """A node in messages: its name, op, target and source line."""
    return f"node {display_name(node)!r} ({node.op} {target}) at {source_line(node)}"


def user_frame(tb: TracebackType | None, model: nn.Module) -> str:
    """Where in the user's code an exception raised while tracing ``model`` came from: the innermost frame
    outside torch and lipreg, with the module whose method it runs (``module 'block.0' (Linear), File ...``)."""
    frames = []
    while tb is not None:
        if not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(LIBRARY_DIRS):
            frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    if not frames:
        return "(source line unknown)"
    frame, line = frames[-1]
    code = linecache.getline(frame.f_code.co_filename, line).strip()
    where = f'File "{frame.f_code.co_filename}", line {line}, in {frame.f_code.co_name}' + (f", `{code}`" if code else "")
    paths = {id(m): p for p, m in model.named_modules()}
    owners = [f.f_locals.get("self") for f, _ in reversed(frames)]  # the innermost method of a module of the model
    owner = next((o for o in owners if isinstance(o, nn.Module) and id(o) in paths), None)
    if owner is None:
        return where
    path = paths[id(owner)]
    return f"{f'module {path!r}' if path else 'the model'} ({type(owner).__name__}), {where}"

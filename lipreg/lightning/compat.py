"""Lightning's two namespaces, ``lightning.pytorch`` and ``pytorch_lightning``.

The two packages install side by side and their classes are distinct objects; the trainer of each checks its
callbacks by class. :func:`callback_bases` gives the ``Callback`` class of every installed namespace, so one
callback class derived from all of them is a proper callback under either trainer.
"""
from __future__ import annotations

import importlib
import importlib.util

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` base class of each installed Lightning namespace (at least one)."""
    bases = [importlib.import_module(f"{name}.callbacks").Callback for name in NAMESPACES
             if importlib.util.find_spec(name.split(".")[0]) is not None]
    if not bases:
        raise ImportError("lipreg.LipschitzCallback needs Lightning: pip install lightning (or pytorch-lightning)")
    return tuple(bases)


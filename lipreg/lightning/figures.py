"""The figures lipreg draws: the linear layers' factors (a bar chart) and the certified accuracy against the radius.

Bare matplotlib ``Figure`` objects (no pyplot: nothing global, such as the user's backend, is touched); ``None``
without matplotlib, an optional dependency. :func:`log_figure` hands one to every TensorBoard logger (IMAGES tab).
The accuracy-vs-radius figure is the one both the callback (each validation epoch) and ``experiments/estimate.py
--curve`` draw.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..metrics import certified_accuracy_curve
from .tensorboard import summary_writer


def log_figure(loggers: Sequence[Any], tag: str, draw: Callable[[], Any | None], step: int) -> None:
    """The figure ``draw()`` (drawn once, only if a logger can show it; ``None``: nothing to show) added under
    ``tag`` to every TensorBoard logger (their IMAGES tab). Call it on rank 0 only."""
    writers = [w for w in map(summary_writer, loggers) if w is not None]
    fig = draw() if writers else None
    for writer in writers if fig is not None else ():
        writer.add_figure(tag, fig, global_step=step, close=False)


def _figure(width: float, height: float) -> Any | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height))


def layer_chart(layers: Mapping[str, float]) -> Any | None:
    """A bar chart of each layer's factor (log scale), in the order given, each bar labelled with its value."""
    fig = _figure(max(4.0, 0.6 * len(layers)), 3.2)
    if fig is None:
        return None
    ax = fig.add_subplot()
    bars = ax.bar(range(len(layers)), list(layers.values()))
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(layers)), list(layers), rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("Lipschitz factor")
    fig.tight_layout()
    return fig


def radius_curve(radii: Mapping[str, Tensor], max_radius: float, points: int = 41) -> Any | None:
    """The certified accuracy against the L2 radius on ``[0, max_radius]``, one line per certificate
    (``{"global": radii, "pairwise": radii}``: each sample's certified radius,
    :func:`~lipreg.metrics.certified_radius`); ``None`` without matplotlib or without samples."""
    radii = {kind: r for kind, r in radii.items() if len(r)}
    fig = _figure(4.5, 3.2) if radii else None
    if fig is None:
        return None
    grid = torch.linspace(0.0, max_radius, points, dtype=torch.float64)
    ax = fig.add_subplot()
    for kind, r in radii.items():
        ax.plot(grid.tolist(), certified_accuracy_curve(r, grid).tolist(), label=kind)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig

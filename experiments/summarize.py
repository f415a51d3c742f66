#!/usr/bin/env python
"""Gather the runs of a Hydra multirun into ``summary.csv`` and ``summary.png`` (in that directory).

    python experiments/summarize.py MULTIRUN_DIR [--out DIR] [--bound lipschitz/autolip_certified]

Every run directory under ``MULTIRUN_DIR`` that holds a ``metrics.json`` (written by ``experiments/train.py``)
is one row: its overrides (from ``.hydra/overrides.yaml``, one column per overridden key and the whole list in
``overrides``), then its final metrics (accuracy, AutoLip estimate and certificate, SeqLip, lower bound,
certified accuracy at each radius, wall time). The plot has one point per run: the Lipschitz bound (x, log
scale) against the test accuracy (left) and the certified test accuracy (right), each point labelled with
its overrides.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["collect", "write_csv", "plot", "main"]

FIRST = ["test/acc", "val/acc", "lipschitz/autolip", "lipschitz/autolip_certified", "lipschitz/seqlip_greedy",
         "lipschitz/seqlip_exact", "lipschitz/lower", "lipschitz/upper_over_lower"]


def _job_sort_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else math.inf for p in path.parts) + (str(path),)


def collect(multirun_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per run: ``run`` (its path relative to ``multirun_dir``), ``overrides``, the overridden keys and
    every numeric metric of its ``metrics.json``."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    rows = []
    for metrics_file in sorted(root.rglob("metrics.json"), key=lambda p: _job_sort_key(p.parent.relative_to(root))):
        run_dir = metrics_file.parent
        record = json.loads(metrics_file.read_text())
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        overrides = [str(o) for o in overrides or [] if not str(o).startswith(("hydra.", "hydra/"))]
        row: dict[str, Any] = {"run": str(run_dir.relative_to(root)) or ".", "overrides": " ".join(overrides)}
        for override in overrides:
            key, _, value = override.lstrip("+~").partition("=")
            row[key] = value
        row.update({k: v for k, v in record.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if "objective" in record:
            row["objective"] = record["objective"]
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    head = ["run", "overrides"]
    override_keys = [k for k in keys if k not in head and "/" not in k
                     and k not in ("objective", "objective_value", "wall_time_s")]
    certified = [k for k in keys if "certified_acc@" in k]
    certified.sort(key=lambda k: (0 if k.startswith("test/") else 1 if k.startswith("val/") else 2, k))
    first = [k for k in FIRST if k in keys] + certified
    rest = [k for k in keys if k not in head + override_keys + first]
    return head + override_keys + first + rest


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> list[str]:
    columns = _columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return columns


def _varying_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The overridden keys whose value differs between runs (what a sweep swept)."""
    keys: list[str] = []
    for row in rows:
        for override in row["overrides"].split():
            key = override.lstrip("+~").partition("=")[0]
            if key not in keys:
                keys.append(key)
    return [k for k in keys if len({str(r.get(k, "")) for r in rows}) > 1]


def _label(row: dict[str, Any], keys: list[str]) -> str:
    """``penalty_weight=0.01 model=mlp``: the swept values of a run (last component of each key)."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={row.get(k, '')}" for k in keys) or row["run"]


def _bound_key(rows: list[dict[str, Any]], wanted: str | None) -> str:
    for key in ([wanted] if wanted else []) + ["lipschitz/autolip_certified", "lipschitz/autolip"]:
        if any(key in r for r in rows):
            return key
    raise KeyError("no Lipschitz bound in the runs' metrics.json")


def plot(rows: list[dict[str, Any]], path: str | Path, bound_key: str | None = None, split: str = "test") -> None:
    """Bound (x, log) vs accuracy (left) and certified accuracy at each radius (right), one point per run.

    Each run has one colour in both panels and is labelled with its job number; the legend maps job numbers
    to the swept values (up to 24 runs). With several radii, the marker tells the radius.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    key = _bound_key(rows, bound_key)
    radii = sorted({k.split("@", 1)[1] for r in rows for k in r if k.startswith(f"{split}/certified_acc@")},
                   key=float)
    pts = [r for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
    xs = [r[key] for r in pts]
    varying = _varying_keys(pts)
    legend = 0 < len(pts) <= 24
    fig, (ax_acc, ax_cert) = plt.subplots(1, 2, figsize=(13.5 if legend else 11, 4.8), sharex=True)
    colors = plt.get_cmap("tab10" if len(pts) <= 10 else "tab20")
    markers = "osD^v<>"
    for n, (r, x) in enumerate(zip(pts, xs)):
        color = colors(n % colors.N)
        y = r.get(f"{split}/acc", math.nan)
        ax_acc.scatter([x], [y], color=color, zorder=3, label=f"{r['run']}: {_label(r, varying)}")
        ax_acc.annotate(r["run"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for i, eps in enumerate(radii):
            y = r.get(f"{split}/certified_acc@{eps}", math.nan)
            ax_cert.scatter([x], [y], color=color, marker=markers[i % len(markers)], zorder=3)
            ax_cert.annotate(r["run"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, ylabel in ((ax_acc, f"{split} accuracy"), (ax_cert, f"certified {split} accuracy (L2)")):
        ax.set_xscale("log")
        if xs:
            ax.set_xlim(min(xs) / 1.25, max(xs) * 1.6)
        span = max(xs) / min(xs) if xs else 1.0
        if span < 4:  # well under a decade: a label on every tick
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            if span < 1000:
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(f"Lipschitz bound ({key.split('/', 1)[1]})")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, which="both", alpha=0.3)
    ax_acc.set_title("accuracy vs Lipschitz bound")
    if len(radii) == 1:
        ax_cert.set_title(f"certified accuracy at eps = {radii[0]} vs Lipschitz bound")
    else:
        ax_cert.set_title("certified accuracy vs Lipschitz bound")
        handles = [Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=f"eps = {e}")
                   for i, e in enumerate(radii)]
        if handles:
            ax_cert.legend(handles=handles, loc="lower left", fontsize=8)
    if legend:
        fig.legend(loc="center right", fontsize=7, title="run: swept values", title_fontsize=8, frameon=False)
    fig.suptitle(f"{len(pts)} runs", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8 if legend else 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    shown = [c for c in columns if c != "overrides"][:12]
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in shown] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)]
    print("  ".join(c.ljust(w) for c, w in zip(shown, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a multirun directory of experiments/train.py (e.g. multirun/DATE/TIME)")
    parser.add_argument("--out", default=None, help="where to write summary.csv / summary.png (default: MULTIRUN_DIR)")
    parser.add_argument("--bound", default=None,
                        help="metric on the x axis (default lipschitz/autolip_certified, else lipschitz/autolip)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split of the plotted accuracies")
    args = parser.parse_args(argv)
    rows = collect(args.multirun_dir)
    if not rows:
        print(f"no metrics.json under {args.multirun_dir}", file=sys.stderr)
        return 1
    out = Path(args.out or args.multirun_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = write_csv(rows, out / "summary.csv")
    plot(rows, out / "summary.png", args.bound, args.split)
    _print_table(rows, columns)
    print(f"\n{len(rows)} runs -> {out / 'summary.csv'}, {out / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Gather the runs of a Hydra multirun into ``summary.csv`` and ``summary.png`` (in that directory).

    python experiments/summarize.py MULTIRUN_DIR [--out DIR] [--bound lipschitz/autolip_certified]

Every run directory under ``MULTIRUN_DIR`` that holds a ``metrics.json`` (written by ``experiments/train.py``)
is one row: its overrides (from ``.hydra/overrides.yaml``, one column per overridden key and the whole list in
``overrides``), then its final metrics (accuracy, AutoLip estimate and certificate, SeqLip, lower bound,
certified accuracy at each radius, wall time). The plot has one point per run: the Lipschitz bound (x, log
scale) against the test accuracy (left) and the certified test accuracy (right), the legend naming each run's
swept values. A job directory without ``metrics.json`` (a failed job) is reported, and makes the exit status 1.
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

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python experiments/summarize.py` puts experiments/ on the path, not the root
    sys.path.insert(0, str(_ROOT))

from experiments.runtime import short_value  # noqa: E402
from lipreg import keys as metric_keys  # noqa: E402

__all__ = ["collect", "failed_jobs", "write_csv", "plot", "main"]

FIRST = [metric_keys.accuracy("test"), metric_keys.accuracy("val"), metric_keys.bound("autolip"),
         metric_keys.certified("autolip"), metric_keys.bound("seqlip_greedy"), metric_keys.bound("seqlip_exact"),
         metric_keys.LOWER, metric_keys.UPPER_OVER_LOWER]
BOUNDS = [metric_keys.certified("autolip"), metric_keys.bound("autolip")]
"""The x axis of the plot when ``--bound`` is not given: the first of these the runs have."""


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
    certified = [k for k in keys if f"{metric_keys.CERTIFIED_ACC}@" in k]
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
    """``penalty_weight=0.01 model=mlp``: the swept values of a run (last component of each key, 4 digits)."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={short_value(str(row.get(k, '')))}" for k in keys) or row["run"]


def _bound_key(rows: list[dict[str, Any]], wanted: str | None) -> str:
    for key in ([wanted] if wanted else []) + BOUNDS:
        if any(key in r for r in rows):
            return key
    raise KeyError("no Lipschitz bound in the runs' metrics.json")


def _radii(rows: list[dict[str, Any]], split: str) -> list[str]:
    """The radii of the runs' global certified accuracies on ``split``, as written in their keys, in order."""
    found = {radius for r in rows for k in r if (radius := metric_keys.certified_radius_of(k, split)) is not None}
    return sorted(found, key=float)


def _log_ticks(ax, lo: float, hi: float) -> None:
    """Labelled ticks across ``[lo, hi]`` on a log axis: 1-2-5 per decade over a wide span, else about six
    evenly spaced round values (a log axis under a decade would show one or two labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

    if hi / lo >= 10:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi / lo < 1000 else (1.0,)))
    else:
        ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def plot(rows: list[dict[str, Any]], path: str | Path, bound_key: str | None = None, split: str = "test") -> None:
    """Bound (x, log) vs accuracy (left) and certified accuracy at each radius (right), one point per run.

    Each run has one colour and one marker shape in both panels, and the legend maps them to the job number and
    its swept values (up to 24 runs; more runs are plotted unlabelled: summary.csv names them). No text is
    drawn next to the points, so close points never merge their labels. With several radii, the right panel
    joins a run's points by a line, from the smallest radius (highest accuracy) to the largest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _bound_key(rows, bound_key)
    radii = _radii(rows, split)
    pts = [r for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
    xs = [r[key] for r in pts]
    varying = _varying_keys(pts)
    legend = 0 < len(pts) <= 24
    fig, (ax_acc, ax_cert) = plt.subplots(1, 2, figsize=(13.5 if legend else 11, 4.8), sharex=True)
    colors, markers = plt.get_cmap("tab10"), "osD^v<>P"
    for n, (r, x) in enumerate(zip(pts, xs)):
        style = {"color": colors(n % 10), "marker": markers[(n // 10) % len(markers)], "zorder": 3}
        ax_acc.scatter([x], [r.get(metric_keys.accuracy(split), math.nan)],
                       label=f"{r['run']}: {_label(r, varying)}", **style)
        ys = [r.get(metric_keys.certified_acc(eps, split), math.nan) for eps in radii]
        ax_cert.plot([x] * len(ys), ys, linestyle="-" if len(ys) > 1 else "", linewidth=0.8, **style)
    for ax, ylabel in ((ax_acc, f"{split} accuracy"), (ax_cert, f"certified {split} accuracy (L2)")):
        ax.set_xscale("log")
        if xs:
            lo, hi = min(xs) / 1.15, max(xs) * 1.15
            ax.set_xlim(lo, hi)
            _log_ticks(ax, lo, hi)
        ax.set_xlabel(f"Lipschitz bound ({key.split('/', 1)[1]})")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, which="major", alpha=0.3)
    ax_acc.set_title("accuracy vs Lipschitz bound")
    eps_text = radii[0] if len(radii) == 1 else f"{radii[0]} (top) to {radii[-1]} (bottom)" if radii else "?"
    ax_cert.set_title(f"certified accuracy at eps = {eps_text}", fontsize=10)
    if legend:
        fig.legend(loc="center right", fontsize=7, title="run: swept values", title_fontsize=8, frameon=False)
    fig.suptitle(f"{len(pts)} runs", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8 if legend else 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], bound_key: str, split: str) -> list[str]:
    """The console table: the run, its swept values, then one column per key metric (each metric once)."""
    varying = _varying_keys(rows)
    radii = _radii(rows, split)
    columns = [("run", "run")] + [(k, k.rsplit(".", 1)[-1]) for k in varying] + [
        (metric_keys.accuracy(split), "acc"),
        (bound_key, "L certified" if "certified" in bound_key else "L estimate"), (metric_keys.LOWER, "L lower"),
    ] + [(metric_keys.certified_acc(e, split), f"cert acc@{e}") for e in radii]
    columns = [(k, h) for k, h in columns if any(k in r for r in rows)]
    cells = [[f"{r[k]:.4g}" if isinstance(r.get(k), float) else short_value(str(r.get(k, ""))) for k, _ in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    return ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))] + [
        "  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]


def failed_jobs(multirun_dir: str | Path) -> list[dict[str, str]]:
    """The job directories (they hold ``.hydra/``) without a ``metrics.json``: jobs that failed (or still run),
    with their overrides and the last error line of their ``train.log`` when it has one."""
    root = Path(multirun_dir)
    failed = []
    for hydra_dir in sorted(root.rglob(".hydra"), key=lambda p: _job_sort_key(p.parent.relative_to(root))):
        run_dir = hydra_dir.parent
        if (run_dir / "metrics.json").is_file():
            continue
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        log_file = run_dir / "train.log"
        errors = [line for line in (log_file.read_text(errors="replace").splitlines() if log_file.is_file() else [])
                  if "[ERROR]" in line or "Error" in line]
        failed.append({"run": str(run_dir.relative_to(root)) or ".", "overrides": " ".join(map(str, overrides or [])),
                       "reason": errors[-1].strip() if errors else f"no metrics.json (see {log_file.name})"})
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a multirun directory of experiments/train.py (e.g. multirun/DATE/TIME)")
    parser.add_argument("--out", default=None, help="where to write summary.csv / summary.png (default: MULTIRUN_DIR)")
    parser.add_argument("--bound", default=None,
                        help=f"metric on the x axis (default {BOUNDS[0]}, else {BOUNDS[1]})")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split of the plotted accuracies")
    args = parser.parse_args(argv)
    rows = collect(args.multirun_dir)
    failed = failed_jobs(args.multirun_dir)
    for job in failed:
        print(f"job {job['run']} failed ({job['overrides'] or 'no overrides'}): {job['reason']}", file=sys.stderr)
    if not rows:
        print(f"no metrics.json under {args.multirun_dir}", file=sys.stderr)
        return 1
    out = Path(args.out or args.multirun_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "summary.csv")
    plot(rows, out / "summary.png", args.bound, args.split)
    print("\n".join(_table(rows, _bound_key(rows, args.bound), args.split)))
    print(f"\n{len(rows)} runs" + (f", {len(failed)} failed (not in the summary)" if failed else "")
          + f" -> {out / 'summary.csv'}, {out / 'summary.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The report of an end-of-run evaluation (:func:`experiments.estimate.evaluate_bounds`) as text: one formatter
for ``experiments/estimate.py``'s report and ``experiments/train.py``'s run summary, so a number reads the same in
both (``  <label> <value>  <note>``, ``n/a`` with the reason when it could not be computed)."""
from __future__ import annotations

from typing import Any, Sequence

from lipreg import keys, options

REPORTED_SEARCHES: tuple[options.Search, ...] = ("greedy", "exact")
"""The SeqLip searches ``experiments/estimate.py`` runs (of :data:`lipreg.options.Search`), reported first."""

LABEL_WIDTH, VALUE_WIDTH = 30, 10
"""The columns of a report row: ``  <label> <value>  <note>``."""


def report_rows(report: dict[str, Any], splits: Sequence[str], radii: Sequence[float],
                metrics: dict[str, float] | None = None) -> list[str]:
    """The rows of an end-of-run evaluation (:func:`experiments.estimate.evaluate_bounds`): accuracy, bounds,
    certified accuracy per radius, on ``splits`` (the first one's rows carry the notes). ``metrics`` (default
    ``report["metrics"]``) may add what the run logged; a number missing from it with a reason in
    ``report["errors"]`` is ``n/a`` with that reason, one with neither is left out."""
    m = report["metrics"] if metrics is None else metrics
    errors, certified_by = report.get("errors", {}), report.get("certified_by") or "?"
    lines: list[str] = []

    def row(label: str, key: str, note: str = "") -> None:
        if key in m:
            lines.append(f"  {label:<{LABEL_WIDTH}} {m[key]:>{VALUE_WIDTH}.4g}  {note}".rstrip())
        elif key in errors:
            lines.append(f"  {label:<{LABEL_WIDTH}} {'n/a':>{VALUE_WIDTH}}  ({errors[key]})")

    for split in splits:
        row(f"{split} accuracy", keys.accuracy(split))
    row("AutoLip estimate", keys.bound("autolip"), "converged power method (from below)")
    row("certified bound", keys.certified("autolip"), "guaranteed upper bound, tightest certificate")
    for search in dict.fromkeys((*REPORTED_SEARCHES, *options.SEARCHES)):
        row(f"SeqLip ({search})", keys.bound(f"seqlip_{search}"))
        row(f"SeqLip ({search}) certified", keys.certified(f"seqlip_{search}"), "guaranteed upper bound")
    lower_split = report.get("lower_split")
    row("lower bound", keys.LOWER, "max local Jacobian norm" + (f" on {lower_split} inputs" if lower_split else ""))
    row("certified / lower", keys.UPPER_OVER_LOWER, "tightest certificate / lower bound")
    for eps in radii:
        for i, split in enumerate(splits):
            row(f"{split} certified acc @ eps={eps:g}", keys.certified_acc(eps, split),
                "" if i else f"L2 radius, {certified_by} certificate")
            row(f"{split} pairwise cert. @ eps={eps:g}", keys.certified_acc(eps, split, pairwise=True),
                "" if i else "per-pair margins, tightest per pair")
    return lines


def format_report(report: dict[str, Any], splits: Sequence[str], radii: Sequence[float]) -> str:
    """The per-layer table, then :func:`report_rows`."""
    lines = ["Per-layer factors (AutoLip, converged; the bound combines them along the graph):",
             f"  {'node':<40} {'factor':>12}"]
    lines += [f"  {name:<40} {value:>12.5g}" for name, value in report["layers"].items()]
    lines += ["", "Lipschitz constant (L2 -> L2, logits) and accuracy:", *report_rows(report, splits, radii)]
    return "\n".join(lines)

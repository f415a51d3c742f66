"""Issue 11: the cost of ``import lipreg`` against ``import torch``, each in a fresh interpreter.

Every statement runs in its own subprocess, interleaved with the others, several rounds; the median wall time is
kept and the ratios to ``import torch`` are printed. Goal: ``import lipreg`` <= 1.3x ``import torch`` (the Lightning
and metrics layers load on first use). Run: ``python -m benchmarks.import_time [rounds]``.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATEMENTS = {
    "import torch": "import torch",
    "import lipreg": "import lipreg",
    "lipreg.LipschitzCallback": "import lipreg; lipreg.LipschitzCallback",
}
GOAL = 1.3


def wall_time(statement: str) -> float:
    """Seconds to start a fresh interpreter and run ``statement`` (this source tree's lipreg first on the path)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, env=env)
    return time.perf_counter() - start


def main(rounds: int = 7) -> None:
    wall_time("import torch")  # warm the file cache once
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(rounds):
        for name, statement in STATEMENTS.items():
            times[name].append(wall_time(statement))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["import torch"]
    print(f"{'statement':28s} {'median s':>9s} {'x import torch':>15s}   ({rounds} interleaved rounds)")
    for name, median in medians.items():
        print(f"{name:28s} {median:9.2f} {median / base:15.2f}")
    ratio = medians["import lipreg"] / base
    print(f"import lipreg / import torch = {ratio:.2f} (goal <= {GOAL}): {'met' if ratio <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

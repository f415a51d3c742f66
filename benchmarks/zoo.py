"""Issue 17: lipreg on networks nobody here wrote, torchvision's classification zoo, as a new user would run it.

Per model (eval mode, one thread, no weights, seeded random init; input 3x32x32 unless ``name@size``): the outcome
(bounded, or refused with the first line of the message), the time of ``est()`` + its backward, of ``converge()``
and of ``certified_bound()`` in training steps (forward + backward of the model on a batch of 32), the time to
build the estimator, certified / converged, the first ``est()`` after construction / converged, and the peak
memory beyond the model and a training step (RSS). Times are CPU time of the model's process (one thread: steadier
than wall time on a shared machine). Each model runs in its own process, killed after ``--timeout`` seconds, so one
slow model does not block the rest; its record keeps the phases it finished.

Needs the ``zoo`` extra, installed without its dependencies (torchvision's wheel pins its own torch build):
``pip install --no-deps torchvision==0.28.0``. On a CPU-only machine that wheel's ``import torchvision`` fails on
two ``torch.library.register_fake("torchvision::...")`` calls; :func:`import_torchvision` skips those registrations
(the model definitions need none of its C++ ops). The lipreg measured is the one Python imports: run it against
another checkout with ``PYTHONPATH=/path/to/checkout python benchmarks/zoo.py`` (the file imports nothing else of
this repository). Results: one JSON line per model in ``benchmarks/results/zoo.jsonl``; the markdown table on
stdout (``--table FILE`` prints the table of a results file).

Run: ``python -m benchmarks.zoo`` (one model per family at 32, and resnet18/50, mobilenet_v2, alexnet at 224),
``--all`` (every classification model at 32 too), ``--models resnet18 resnet50@224``, ``--size 64``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

BATCH = 32
SIZES = {"inception_v3": 75}
"""Inputs smaller than 75x75 do not fit inception_v3's stem."""
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "regnet_y_400mf", "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "shufflenet_v2_x1_0",
            "squeezenet1_0", "squeezenet1_1", "swin_t", "vgg11", "vgg11_bn", "vgg16", "vit_b_16", "wide_resnet50_2"]
LARGE = ["resnet18@224", "resnet50@224", "mobilenet_v2@224", "alexnet@224"]
RESULTS = Path(__file__).resolve().parent / "results" / "zoo.jsonl"
Record = dict[str, Any]


def import_torchvision() -> Any:
    """``import torchvision``, skipping its ``torch.library.register_fake("torchvision::...")`` registrations
    (they fail where its C++ ops are not loaded, as with the CUDA wheel on a CPU-only machine)."""
    register_fake = torch.library.register_fake

    def skip_torchvision(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return None if args else (lambda fn: fn)  # as a decorator, or called with the function
        return register_fake(op, *args, **kwargs)

    torch.library.register_fake = skip_torchvision
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision


def parse_spec(spec: str, size: int) -> tuple[str, int]:
    """``"name"`` or ``"name@size"`` -> ``(name, size)``; ``SIZES`` overrides the default size."""
    name, _, given = spec.partition("@")
    return name, int(given) if given else SIZES.get(name, size)


def first_line(error: BaseException) -> str:
    """The exception's type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_cpu_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median CPU seconds of ``fn`` over ``repeat`` calls (after none: the callers warm up as they need)."""
    samples = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return statistics.median(samples)


@contextmanager
def phase(record: Record, name: str, emit: Callable[[Record], None]) -> Iterator[None]:
    """Mark ``record`` as inside ``name`` and emit it (what a timeout reports), emit it again when the phase ends."""
    record["phase"] = name
    emit(record)
    yield
    record["phase"] = None
    emit(record)


def measure(model: nn.Module, size: int, emit: Callable[[Record], None], tol: float = 1e-4,
            build_only: bool = False) -> Record:
    """Every figure of one model (eval mode) on a ``BATCH`` x 3 x ``size`` x ``size`` input, emitting the record
    as each phase starts and ends (a process killed mid-way keeps what it measured); ``build_only`` stops once the
    estimator is built (outcome ``built``: which models are refused, fast)."""
    import lipreg

    record: Record = {"outcome": None, "phase": None}
    model.eval()
    x = torch.randn(BATCH, 3, size, size)
    y = torch.randint(0, 10, (BATCH,))

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    with phase(record, "training step", emit):
        try:
            train_step()
        except Exception as error:  # the model's own forward (an input too small for it)
            record["outcome"] = f"n/a: {first_line(error)}"
            return record
        record["step_s"] = median_cpu_time(train_step)
        base_rss = peak_rss_mib()
    with phase(record, "build", emit):
        start = time.process_time()
        try:
            est = lipreg.LipschitzEstimator(model, x[:1])
        except Exception as error:
            record["outcome"] = f"refused: {first_line(error)}"
            return record
        record["build_steps"] = (time.process_time() - start) / record["step_s"]
    if build_only:
        record["outcome"] = "built"
        return record
    with phase(record, "est", emit):
        record["first_est"] = float(est().detach())

        def est_backward() -> None:
            model.zero_grad(set_to_none=True)
            est().backward()

        record["est_steps"] = median_cpu_time(est_backward) / record["step_s"]
    with phase(record, "converge", emit):
        start = time.process_time()
        record["converged"] = float(est.converge(tol=tol).detach())
        record["converge_steps"] = (time.process_time() - start) / record["step_s"]
    with phase(record, "certify", emit):
        start = time.process_time()
        try:
            record["certified"] = float(est.certified_bound().detach())
        except Exception as error:
            record["outcome"] = f"refused at certify: {first_line(error)}"
            return record
        finally:
            record["certify_steps"] = (time.process_time() - start) / record["step_s"]
            record["peak_mib"] = max(0.0, peak_rss_mib() - base_rss)
    bad = [key for key in ("first_est", "converged", "certified") if not math.isfinite(record[key])]
    record["outcome"] = "bounded" if not bad else f"bounded, not finite: {', '.join(bad)}"
    return record


def run_one(name: str, size: int, tol: float, build_only: bool = False) -> Record:
    """One torchvision model in this process (seeded, one thread), its record emitted on stdout as JSON lines."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torchvision = import_torchvision()
    import lipreg

    header = {"model": name, "size": size, "lipreg": str(Path(lipreg.__file__).parent.parent),
              "torch": torch.__version__, "torchvision": torchvision.__version__}

    def emit(record: Record) -> None:
        print(json.dumps({**header, **record}), flush=True)

    model = torchvision.models.get_model(name, weights=None)
    record = measure(model, size, emit, tol, build_only)
    emit(record)  # with its outcome
    return record


def run_isolated(spec: str, size: int, timeout: float, tol: float, build_only: bool = False) -> Record:
    """:func:`run_one` in a child process killed after ``timeout`` seconds: the last record it emitted, with
    the outcome a timeout or a crash gives it."""
    name, size = parse_spec(spec, size)
    command = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--size", str(size), "--tol", str(tol),
               *(["--build-only"] if build_only else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        stdout, stderr, crashed = done.stdout, done.stderr, done.returncode != 0
    except subprocess.TimeoutExpired as expired:
        stdout, stderr, crashed = _text(expired.stdout), "", False
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    record = records[-1] if records else {"model": name, "size": size, "outcome": None, "phase": "import"}
    if record.get("outcome") is None:
        tail = stderr.strip().splitlines()[-1:] if crashed else []
        cause = f"crashed ({tail[0]})" if tail else f"timeout after {timeout:.0f} s"
        record["outcome"] = f"{cause} in {record.get('phase') or 'start'}"
    return record


def _text(output: bytes | str | None) -> str:
    return output.decode() if isinstance(output, bytes) else output or ""


def ratio(record: Record, top: str, bottom: str) -> float | None:
    a, b = record.get(top), record.get(bottom)
    return a / b if a is not None and b else None


def cell(value: float | None, digits: int = 2) -> str:
    if value is None:
        return ""
    if not math.isfinite(value) or value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return f"{value:.1e}"


OUTCOME_WIDTH = 160
"""Characters of an outcome in the table (the JSON record keeps it whole)."""
COLUMNS = ["model (input)", "outcome", "est()+bwd", "build", "converge()", "certified_bound()",
           "certified / converged", "first est() / converged", "peak MiB"]


def table(records: Iterable[Record]) -> str:
    """The markdown table of the records: times in training steps (forward + backward, batch 32)."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        outcome = r.get("outcome") or ""
        outcome = outcome if len(outcome) <= OUTCOME_WIDTH else outcome[:OUTCOME_WIDTH - 1] + "…"
        cells = [f"{r['model']} ({r['size']})", outcome.replace("|", "/"), cell(r.get("est_steps")),
                 cell(r.get("build_steps"), 1), cell(r.get("converge_steps"), 1), cell(r.get("certify_steps"), 1),
                 cell(ratio(r, "certified", "converged")), cell(ratio(r, "first_est", "converged")),
                 cell(r.get("peak_mib"), 0)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="names, or name@size (default: one per family, and 224s)")
    parser.add_argument("--all", action="store_true", help="every torchvision classification model at --size")
    parser.add_argument("--size", type=int, default=32, help="input side where a spec gives none")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--tol", type=float, default=1e-4, help="converge()'s tolerance")
    parser.add_argument("--build-only", action="store_true", help="stop once the estimator is built (refusals)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines, one per model (appended)")
    parser.add_argument("--table", type=Path, help="only print the table of this results file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process of run_isolated
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.size, args.tol, args.build_only)
        return
    if args.table:
        print(table(json.loads(line) for line in args.table.read_text().splitlines() if line.strip()))
        return
    specs = args.models or (import_torchvision().models.list_models(module=import_torchvision().models)
                            if args.all else FAMILIES + LARGE)
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        record = run_isolated(spec, args.size, args.timeout, args.tol, args.build_only)
        records.append(record)
        with args.out.open("a") as file:
            file.write(json.dumps(record) + "\n")
        print(table([record]).splitlines()[-1], flush=True)
    print(table(records))


if __name__ == "__main__":
    main()

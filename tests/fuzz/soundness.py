"""Soundness fuzz: every number lipreg calls certified, on random architectures, against a float64 lower bound.

For each architecture of :func:`tests.fuzz.arch.draw_case` (every registered op kind, module and
functional forms, residual and concatenation structure, in-place variants, hooks, float32/float64/bfloat16
estimators, and the adversarial patterns of issue 16 in :mod:`tests.fuzz.adversarial`, counted per class) it checks,
against the independent lower bounds of :mod:`tests.fuzz.reference`:

* ``certified_bound()`` (the tightest certificate: AutoLip, exact SeqLip, LipLT, ECLipsE-Fast) built with
  ``method="autolip"``, ``"seqlip"`` (``search="exact"``) and ``"liplt"``, whole model;
* ``layer_bounds(certified=True)`` per node: linear nodes against the exact norm of their dense float64
  Jacobian, activation and pooling constants against the node's own lower bound;
* ``est()`` whenever ``est.certified`` is True;
* ``MarginCertificate(...).certified()`` per pair of classes, for a quarter of the cases returning logits and every
  case aimed at a certificate route (:mod:`tests.fuzz.routes`), against float64 Jacobian pair norms
  (:mod:`tests.fuzz.margins`);
* that building an estimator leaves the model's attributes alone, and that ``CertifiedRobustAccuracy`` does not
  take an estimate for a certificate unless told.

When the case changes the model after the estimators were built (``Case.mutate``), the checks run on the kept
estimators against the model as it is then: a retrace (with a warning) passes, a stale bound is a violation, a
refusal of the changed model must be an ``UnsupportedOpError``, and a kept estimator that still certifies a model
that a fresh estimator refuses (Softplus's threshold jump after ``model.double()``) is a violation. A case whose model drops the batch axis
(``Case.per_sample``) has its reference run sample by sample.

A violation is a certified value below ``lower * (1 - 1e-9)``: a certificate must be >= the truth, and the
lower bounds are exact up to float64 rounding (finite pairs carry their rounding error). A
``lipreg.UnsupportedOpError`` is a clean refusal; any other exception is a crash.

    python -m tests.fuzz.soundness --n 1000 --seed 0 --threads 1
    python -m tests.fuzz.soundness --seed 0 --case 17     # one case, with its description
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lipreg
from lipreg.metrics import CertifiedRobustAccuracy
from lipreg.ops.registry import _RULES, qualified_name

from . import margins
from .arch import Case, describe, draw_case
from .reference import chain_fn, forward_values, jacobian_norm, lower_bound

RTOL = 1e-9
RTOL_FLOAT32_REFERENCE = 1e-5  # fake-quantized models are evaluated in float32 (no float64 kernel)
SMOOTH = ("act:tanh", "act:sigmoid", "act:gelu", "act:silu", "act:elu", "act:softplus", "act:mish", "act:selu",
          "act:logsigmoid", "act:tanhshrink", "route act")
ISSUE16 = "16."  # the kinds of the adversarial patterns of issue 16 (:mod:`tests.fuzz.adversarial`)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}


@dataclass
class Finding:
    """A violation (certified < lower bound) or a crash (an exception other than a clean refusal)."""

    case: int
    kind: str  # "violation" or "crash"
    where: str
    detail: str
    reproducer: str

    def line(self) -> str:
        return f"[{self.kind}] case {self.case} {self.where}: {self.detail} | {self.reproducer}"


@dataclass
class Report:
    """The fuzz result: counts overall and per op kind, and every finding."""

    n: int = 0
    seed: int = 0
    refusals: int = 0
    findings: list[Finding] = field(default_factory=list)
    per_kind: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    drawn_targets: set[Any] = field(default_factory=set)
    case_kinds: dict[int, set[str]] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time: the cost on a quiet machine, whatever the load

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "violation"]

    @property
    def crashes(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "crash"]

    def undrawn_targets(self) -> list[str]:
        """Registered rule targets that no architecture used."""
        seen = set()
        for target in self.drawn_targets:
            if isinstance(target, type):
                seen.update(c for c in target.__mro__ if c in _RULES)
            else:
                seen.add(target)
        return sorted(qualified_name(t) or str(t) for t in _RULES if t not in seen)

    def summary(self) -> str:
        cases_with = lambda kind: len({f.case for f in self.findings if f.kind == kind})
        lines = [f"fuzz_soundness seed={self.seed}: {self.n} architectures in {self.seconds:.1f} s "
                 f"({self.cpu_seconds:.1f} s CPU)",
                 f"  violations: {len(self.violations)} (in {cases_with('violation')} architectures)",
                 f"  clean refusals: {self.refusals} architectures",
                 f"  crashes: {len(self.crashes)} (in {cases_with('crash')} architectures)",
                 f"  registered targets never drawn: {self.undrawn_targets()}",
                 f"  {'op kind':32s} {'archs':>6s} {'viol.':>6s} {'refused':>8s} {'crash':>6s}"]
        for kind, c in sorted(self.per_kind.items()):
            lines.append(f"  {kind:32s} {c['cases']:6d} {c['violation']:6d} {c['refused']:8d} {c['crash']:6d}")
        lines.append(f"  issue-16 classes (architectures drawing each; violation and crash counts are architectures):")
        for kind, c in sorted(self.per_kind.items()):
            if kind.startswith(ISSUE16):
                lines.append(f"  {kind:40s} archs {c['cases']:4d}  violations {c['violation']:4d}  refused "
                             f"{c['refused']:4d}  crashes {c['crash']:4d}")
        return "\n".join(lines + [f.line() for f in self.findings])


def _is_refusal(err: BaseException) -> bool:
    return isinstance(err, lipreg.UnsupportedOpError)


def _fingerprint(model: nn.Module) -> set[str]:
    """The attribute names of every module (parameters, buffers, submodules and plain attributes)."""
    return {f"{name}.{attr}" for name, m in model.named_modules() for attr in
            list(vars(m)) + list(m._parameters) + list(m._buffers) + list(m._modules)}


class CaseRun:
    """Checks one architecture; collects its findings."""

    def __init__(self, case: Case, seed: int, metric_check: bool = True) -> None:
        self.case = case
        self.metric_check = metric_check  # one API check, made on the first uncertified est() of a run
        self.findings: list[Finding] = []
        self.refused = False
        self.config = f"dtype={DTYPE_NAMES[case.dtype]} fuse={case.fuse}"
        self.reproducer = f"--seed {seed} --case {case.index}: {case.description}"
        self.metric_checked = False
        self._lower: float | None = None
        self.fresh_refusal: str | None = None  # after a change: why a fresh estimator of the model refuses it
        self.reference: nn.Module | None = None

    # ---------------------------------------------------------------------------------------- outcomes
    def crash(self, where: str, err: BaseException) -> None:
        message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        self.findings.append(Finding(self.case.index, "crash", f"{where} ({self.config})",
                                     f"{type(err).__name__}: {message}", self.reproducer))

    def compare(self, where: str, certified: float, lower: float, rtol: float = RTOL) -> None:
        if not certified >= lower * (1 - rtol):
            self.findings.append(Finding(self.case.index, "violation", f"{where} ({self.config})",
                                         f"certified {certified:.9g} < lower {lower:.9g} (ratio {certified / lower:.6g})",
                                         self.reproducer))

    # ----------------------------------------------------------------------------------- the reference
    @property
    def ref_dtype(self) -> torch.dtype:
        return torch.float32 if self.case.float32_reference else torch.float64

    @property
    def rtol(self) -> float:
        return RTOL_FLOAT32_REFERENCE if self.case.float32_reference else RTOL

    def lower(self) -> float:
        """The whole model's lower bound (computed once, on the model as it is then)."""
        if self._lower is None:
            ref = copy.deepcopy(self.case.model).to(self.ref_dtype).eval()
            smooth = any(k in self.case.kinds for k in SMOOTH)
            fb = _vmapped(lambda v: ref(v.unsqueeze(0)).squeeze(0)) if self.case.per_sample else ref
            self._lower = lower_bound(fb, self.case.x.shape[1:], self.ref_dtype, smooth)
        return self._lower

    # ----------------------------------------------------------------------------------------- checks
    def build(self, method: str) -> lipreg.LipschitzEstimator | None:
        options = {"search": "exact"} if method == "seqlip" else {}
        try:
            return lipreg.LipschitzEstimator(self.case.model, self.case.x, method=method, dtype=self.case.dtype,
                                             fuse=self.case.fuse, **options)
        except Exception as err:  # noqa: BLE001 (every exception is classified)
            if _is_refusal(err):
                self.refused = True
            elif not (isinstance(err, ValueError) and "out of reach" in str(err)):  # exact search too wide: skip
                self.crash(f"{method} build", err)
            return None

    def refusal_now(self) -> str | None:
        """Why a fresh estimator of the model as it is now is refused, or None: a kept estimator that still certifies
        what lipreg refuses after a change is stale. The example is cast to the dtype of the model's tensors (or
        kept as it is) where the model runs on it; no verdict where it runs on neither."""
        model, x = self.case.model, self.case.x
        tensors = [*model.parameters(), *model.buffers()]
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), x.dtype)
        example = next((e for e in (x.to(dtype), x) if _runs(model, e)), None)
        if example is None:
            return None
        try:
            lipreg.LipschitzEstimator(model, example, dtype=self.case.dtype, fuse=self.case.fuse)
        except Exception as err:  # noqa: BLE001 (only a clean refusal is a verdict on the changed model)
            return str(err).strip().splitlines()[0][:160] if _is_refusal(err) else None
        return None

    def check_estimator(self, method: str, est: lipreg.LipschitzEstimator) -> None:
        try:
            certified = float(est.certified_bound().detach())
        except Exception as err:  # noqa: BLE001
            self.refused |= _is_refusal(err)
            if not _is_refusal(err):
                self.crash(f"{method} certified_bound()", err)
            return
        if self.fresh_refusal is not None:
            self.findings.append(Finding(self.case.index, "violation", f"{method} certified_bound() after the change "
                                         f"({self.config})", f"certified {certified:.6g} for a model that a fresh "
                                         f"estimator refuses: {self.fresh_refusal}", self.reproducer))
        lower = self.lower()
        self.compare(f"{method} certified_bound()", certified, lower, self.rtol)
        try:
            value = float(est().detach())
        except Exception as err:  # noqa: BLE001
            if not _is_refusal(err):
                self.crash(f"{method} est()", err)
            return
        if est.certified:
            self.compare(f"{method} est() with est.certified=True", value, lower, self.rtol)
        elif method == "autolip" and self.metric_check:
            self.check_metric(value)

    def check_metric(self, estimate: float) -> None:
        """An estimate passed without ``certified=`` must not be scored as a certificate (issue 9, class 11)."""
        self.metric_checked = True
        logits = torch.randn(4, 3)
        metric = CertifiedRobustAccuracy(eps=(0.0,))
        try:
            metric.update(logits, torch.zeros(4, dtype=torch.long), estimate)
        except (TypeError, ValueError):
            return
        if any(key.startswith("certified_acc") for key in metric.compute()):
            self.findings.append(Finding(self.case.index, "violation", "CertifiedRobustAccuracy.update",
                                         "an est() with est.certified=False was scored as certified (no certified= "
                                         "argument needed)", self.reproducer))

    def check_layers(self, est: lipreg.LipschitzEstimator) -> None:
        try:
            bounds = est.layer_bounds(certified=True)
        except Exception as err:  # noqa: BLE001
            self.refused |= _is_refusal(err)
            if not _is_refusal(err):
                self.crash("layer_bounds(certified=True)", err)
            return
        gm = copy.deepcopy(est.graph.graph_module).to(self.ref_dtype).eval()
        values = forward_values(gm, self.case.x[:1].to(self.ref_dtype))
        fx_nodes = {n.name: n for n in gm.graph.nodes}
        for node in est.graph.nodes[1:]:
            if node.name not in bounds or len(node.inputs) != 1 or not node.ops:
                continue
            nodes = [fx_nodes[info.node.name] for info in node.ops]
            source = fx_nodes[node.ops[0].x_inputs[0].name]
            f = chain_fn(gm, nodes, source, values)
            v0, out = values[source], values[nodes[-1]]
            if not isinstance(v0, torch.Tensor):
                continue  # the values half of a (values, indices) pair: checked as part of the whole model
            if not v0.is_floating_point() or isinstance(out, torch.Tensor) and not out.is_floating_point():
                continue  # a bit cast's integer side: no Jacobian; checked as part of the whole model
            if node.is_linear:
                lower = jacobian_norm(f, v0, affine=True)
            else:
                lower = lower_bound(_vmapped(f), v0.shape, self.ref_dtype, smooth=False)
            self.compare(f"layer {node.name!r} [{node.rule.describe()}] layer_bounds(certified=True)",
                         bounds[node.name], lower, self.rtol)

    def run(self) -> None:
        before = _fingerprint(self.case.model)
        estimators = {m: self.build(m) for m in ("autolip", "seqlip", "liplt")}
        if _fingerprint(self.case.model) != before:
            added = sorted(_fingerprint(self.case.model) - before)
            self.findings.append(Finding(self.case.index, "violation", "LipschitzEstimator(...)",
                                         f"the model was modified: added {added[:4]}", self.reproducer))
        if self.case.mutate is not None:
            self.reproducer += f" ; after the estimators were built: {self.case.mutate(self.case.model)}"
            self.fresh_refusal = self.refusal_now()
        for method, est in estimators.items():
            if est is not None:
                self.guard(f"{method} checks", self.check_estimator, method, est)
        if estimators["autolip"] is not None and self.case.mutate is None:
            self.guard("layer checks", self.check_layers, estimators["autolip"])
        if self.case.margin is not None and self.case.mutate is None and not self.case.per_sample:
            self.guard("margin checks", margins.check, self, self.case.margin)

    def guard(self, where: str, fn: Any, *args: Any) -> None:
        """Run a check; an exception raised by the reference itself is reported as a crash of the fuzz."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            self.crash(f"{where} (reference)", err)


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            model(x.clone())
    except Exception:  # noqa: BLE001 (a dtype mismatch, most often)
        return False
    return True


def _vmapped(f: Any) -> Any:
    """A batch version of a one-sample function: vmap, or a loop where vmap does not apply."""
    def fb(xs: torch.Tensor) -> torch.Tensor:
        try:
            return torch.func.vmap(f)(xs)
        except Exception:  # noqa: BLE001 (vmap lacks some ops' batching rules)
            return torch.stack([f(x) for x in xs])
    return fb


def run(n: int = 1000, seed: int = 0, start: int = 0, verbose: bool = False) -> Report:
    """Draw and check architectures ``start .. start + n - 1`` of run ``seed``."""
    report = Report(n=n, seed=seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    metric_checked = False
    for index in range(start, start + n):
        case = draw_case(seed, index)
        check = CaseRun(case, seed, metric_check=not metric_checked)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check.run()
        report.findings += check.findings
        metric_checked |= check.metric_checked
        report.refusals += check.refused
        report.drawn_targets |= case.targets
        report.case_kinds[index] = case.kinds
        for kind in case.kinds:
            counter = report.per_kind[kind]
            counter["cases"] += 1
            counter["refused"] += check.refused
            for outcome in ("violation", "crash"):
                counter[outcome] += any(f.kind == outcome for f in check.findings)
        if verbose:
            print(f"case {index}: {case.description} ({check.config}) -> "
                  f"{len(check.findings)} findings, refused={check.refused}", flush=True)
    report.seconds, report.cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    return report


def _violations(case: Case, seed: int) -> list[Finding]:
    check = CaseRun(case, seed, metric_check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check.run()
    return [f for f in check.findings if f.kind == "violation"]


def _variant(case: Case, steps: list[int], dtype: torch.dtype) -> Case | None:
    """The case with only the top-level ``steps`` kept, estimated in ``dtype``; None if that model fails."""
    model = copy.deepcopy(case.model)
    model.steps = [model.steps[i] for i in steps]
    x = case.x.clone()
    if dtype == torch.float64 and not case.float32_reference:
        model, x = model.double(), x.double()
    try:
        model(x.clone())
    except Exception:  # noqa: BLE001 (the shapes no longer chain)
        return None
    descriptions = [case.steps[i] for i in steps]
    description = describe(tuple(case.x.shape[1:]), descriptions)
    return dataclasses.replace(case, model=model, x=x, dtype=dtype, description=description, steps=descriptions)


def minimize(case: Case, seed: int) -> tuple[Case, list[Finding]]:
    """Drop top-level steps, then try float64 estimation, while a violation remains: a smaller reproducer."""
    findings = _violations(case, seed)
    kept = list(range(len(case.steps)))
    for i in list(kept):
        trial = _variant(case, [k for k in kept if k != i], case.dtype)
        found = _violations(trial, seed) if trial is not None and len(kept) > 1 else []
        if found:
            kept.remove(i)
            findings = found
    best = _variant(case, kept, case.dtype) or case
    if case.dtype != torch.float64:
        trial = _variant(case, kept, torch.float64)
        found = _violations(trial, seed) if trial is not None else []
        if found:
            best, findings = trial, found
    return best, findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of architectures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--case", type=int, default=None, help="re-run this one case, verbosely")
    parser.add_argument("--minimize", action="store_true", help="shrink each violating architecture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(1, args.seed, start=args.case, verbose=True) if args.case is not None else run(args.n, args.seed)
    print(report.summary())
    if args.minimize:
        for index in sorted({f.case for f in report.violations if f.where != "CertifiedRobustAccuracy.update"}):
            case, findings = minimize(draw_case(args.seed, index), args.seed)
            stale = " (the model then changed: stale estimator)" if case.mutate is not None else ""
            print(f"minimal case {index} (dtype={DTYPE_NAMES[case.dtype]} fuse={case.fuse}): {case.description}{stale}: "
                  f"{findings[0].where}: {findings[0].detail}" if findings else f"case {index}: no longer violates")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Bound a trained network from a run directory: per-layer table, AutoLip, SeqLip, lower bound, certified accuracy.

    python experiments/estimate.py RUN_DIR [--split test] [--radii 0.1 0.3] [--n-iter 500] [--json out.json]

``RUN_DIR`` is any directory written by ``experiments/train.py`` (a single run, or one job of a multirun):
the network is rebuilt from the run's ``.hydra/config.yaml`` (``model`` and ``data`` groups), its weights are
loaded from the newest ``*.ckpt`` under the run directory (or ``--ckpt``), and it is bounded in eval mode:

* the per-layer table (``est.layer_bounds()`` after convergence: each fused linear operator's ``||A v||``,
  each activation's slope bound);
* AutoLip: the converged estimate (power method, from below) and ``est.certified_bound()`` (a guarantee);
* SeqLip (paper eq. 8): greedy search, and exact search when every activation layer is small enough
  (``--exact-max-units``, the exact search is exponential in a layer's width);
* the empirical lower bound (``lipreg.metrics.lower_bound``: the largest local Jacobian norm over test
  inputs, with gradient ascent on the inputs), so the true constant lies in ``[lower, certified]``;
* the certified accuracy on the split at each radius: correct predictions whose margin exceeds
  ``sqrt(2) * L * eps`` with ``L`` the smallest *certified* bound available; and, when the network ends in a
  linear layer, per pair (GloRo): ``z_y - z_j > ||w_y - w_j|| L(body) eps`` for every ``j``, with the certified
  AutoLip bound of the body (``lipreg.margins.MarginCertificate``);
* ``--curve PNG``: the certified accuracy against the radius (pairwise and global) on the split, drawn from the
  radii of the reported accuracies by the callback's figure.

:func:`evaluate_bounds` is also what ``experiments/train.py`` runs on the final weights of every run, and its run
summary prints the same rows (:mod:`experiments.report`).

Checkpoints are loaded with ``torch.load(weights_only=True)``: a checkpoint is a pickle, and this loads only
tensors and plain containers, never code. A checkpoint that needs more is refused (Lightning's own
``Trainer.fit(ckpt_path=...)`` is given ``weights_only=True`` too by ``experiments/train.py``). Errors (no
run directory, another model's checkpoint, an op lipreg cannot bound) are one ``error:`` line; ``--traceback``
shows the whole stack.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python experiments/estimate.py` puts experiments/ on the path, not the root
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from experiments.report import REPORTED_SEARCHES, format_report  # noqa: E402
from lipreg import options  # noqa: E402

__all__ = ["evaluate_bounds", "find_checkpoint", "load_checkpoint", "load_weights", "load_run", "format_report",
           "main", "save_radius_curve"]

# ------------------------------------------------------------------------------------------ helpers
def _split_tensors(datamodule: Any, split: str) -> tuple[Tensor, Tensor]:
    dataset = getattr(datamodule, f"{split}_set", None)
    if dataset is None:
        datamodule.setup("test" if split == "test" else "fit")
        dataset = getattr(datamodule, f"{split}_set")
    x, y = dataset.tensors[:2]
    return x, y


@torch.no_grad()
def _logits(net: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    device = next(net.parameters()).device
    return torch.cat([net(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


_ACTIVATION_FUNCTIONS = {"relu", "tanh", "sigmoid", "gelu", "silu", "elu", "leaky_relu", "softplus", "hardtanh"}


def _widest_activation(net: nn.Module, example: Tensor) -> int:
    """The widest activation layer (units per example): exact SeqLip is exponential in it.

    Found on the ``torch.fx`` graph (as lipreg sees the network), so functional activations
    (``torch.relu`` in residual blocks) count too.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(net)
    ShapeProp(gm).propagate(example[:1])
    modules = dict(gm.named_modules())
    widest = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            kind = type(modules[node.target]).__name__.lower()
            is_activation = any(name.replace("_", "") == kind for name in _ACTIVATION_FUNCTIONS)
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            is_activation = name.rstrip("_") in _ACTIVATION_FUNCTIONS
        else:
            is_activation = False
        meta = node.meta.get("tensor_meta")
        if is_activation and meta is not None and hasattr(meta, "shape"):
            widest = max(widest, int(torch.Size(meta.shape[1:]).numel()))
    return widest


def _try(what: str, fn, errors: dict[str, str]):
    """Run one optional piece of the report; a failure inside lipreg is reported, not fatal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return fn()
    except Exception as e:  # noqa: BLE001 - a report line, not a crash
        errors[what] = f"{type(e).__name__}: {e}"
        return None


# ------------------------------------------------------------------------------------------ the report
def evaluate_bounds(
    net: nn.Module,
    datamodule: Any,
    splits: Iterable[str] = ("test",),
    radii: Sequence[float] = options.ROBUST_EPS,
    n_iter: int = options.EVAL_N_ITER,
    seqlip: Iterable[str] = (),
    seqlip_options: dict[str, Any] | None = None,
    exact_max_units: int = 20,
    lower_bound_samples: int = 128,
    lower_bound_ascent_steps: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Bound ``net`` (put in eval mode) and score it on ``splits`` of ``datamodule``.

    Returns a dict with ``metrics`` (flat ``name -> float``: ``lipschitz/autolip``,
    ``lipschitz/autolip_certified``, ``lipschitz/seqlip_<search>`` [and ``..._certified`` when exact],
    ``lipschitz/lower``, ``lipschitz/upper_over_lower``, ``<split>/acc``, ``<split>/certified_acc@<eps>``),
    ``layers`` (``est.layer_bounds()`` of the converged AutoLip estimator), ``certified_by`` (which bound the
    certified accuracy used), ``lower_split`` (the split the lower bound ran on), ``errors`` (what could not be
    computed, and why) and ``certified_radii`` (``split -> {"global": radii, "pairwise": radii}``, each sample's
    certified radius as a tensor, for :func:`save_radius_curve`; not JSON). ``progress`` shows a bar (on stderr)
    that names the step running.

    The lower bound and the certified accuracies are the callback's validation passes (``LowerBoundPass``,
    ``CertifiedAccuracyPass`` of :mod:`lipreg.lightning`) over whole splits: one code path for the numbers of a
    run's end and of its validation epochs (their tensors become floats here, for ``metrics.json``).
    """
    from tqdm.auto import tqdm

    import lipreg
    from lipreg import keys
    from lipreg.lightning.certified_accuracy import CertifiedAccuracyPass

    net.eval()
    splits, seqlip = list(splits), list(seqlip)
    bar = tqdm(total=4 + len(seqlip), disable=not progress, file=sys.stderr, leave=False,
               bar_format="{desc:<34} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")

    started: list[str] = []

    def step(desc: str) -> None:  # the previous step is done; name this one
        if started:
            bar.update()
        started.append(desc)
        bar.set_description_str(desc)

    data = {split: _split_tensors(datamodule, split) for split in splits}
    example = data[splits[0]][0][:1]
    metrics: dict[str, float] = {}
    errors: dict[str, str] = {}
    torch.manual_seed(seed)

    # AutoLip: converged estimate (from below) and certificate
    step("AutoLip: power method")
    est = lipreg.LipschitzEstimator(net, example, method="autolip")
    metrics[keys.bound("autolip")] = float(est.converge(max_iter=n_iter).detach())
    layers = est.layer_bounds()
    step("AutoLip: certified bound")
    certified = _try(keys.certified("autolip"), lambda: float(est.certified_bound()), errors)
    if certified is not None:
        metrics[keys.certified("autolip")] = certified
    certificates = {est.certificate or "AutoLip": certified} if certified is not None else {}  # the tightest one

    # SeqLip
    for search in seqlip:
        step(f"SeqLip ({search})")
        key = keys.bound(f"seqlip_{search}")
        if search == "exact":
            units = _widest_activation(net, example)
            if units > exact_max_units:
                errors[key] = (f"skipped: exact SeqLip is exponential in a layer's width and the widest activation "
                               f"layer has {units} units > exact_max_units={exact_max_units}")
                continue
        options = {**(seqlip_options or {}), "search": search}

        def run_seqlip(options: dict[str, Any] = options) -> tuple[float, float | None]:
            seq = lipreg.LipschitzEstimator(net, example, method="seqlip", **options)
            value = float(seq.converge(max_iter=n_iter).detach())
            # only an exact search on full SVDs certifies SeqLip (else certified_bound() falls back to AutoLip)
            cert = float(seq.certified_bound().detach()) if search == "exact" else None
            return value, cert

        result = _try(key, run_seqlip, errors)
        if result is not None:
            metrics[key] = result[0]
            if result[1] is not None:
                metrics[keys.certified(f"seqlip_{search}")] = result[1]
                certificates[f"SeqLip ({search})"] = result[1]

    # the end-of-run evaluation: the callback's two passes (lipreg.lightning), over whole splits
    step("lower bound")  # on the first split's inputs, against the tightest certificate
    upper = min(certificates.values(), default=metrics[keys.bound("autolip")])
    bracket = _try(keys.LOWER, lambda: _lower_bound(net, data[splits[0]][0][:lower_bound_samples],
                                                    lower_bound_ascent_steps, upper), errors)
    metrics.update({name: float(value) for name, value in (bracket or {}).items()})

    step("certified accuracy")  # from the tightest certificate, and per pair with a linear head
    certified_by, bound = (min(certificates.items(), key=lambda kv: kv[1]) if certificates else (None, math.nan))
    pairwise = _try("pairwise", lambda: _pair_constants(net, example), errors) if certified_by else None
    radii_by_split: dict[str, dict[str, Tensor]] = {}
    for split, (x, y) in data.items():
        logits = _logits(net, x)
        metrics[keys.accuracy(split)] = float((logits.argmax(dim=1) == y).float().mean())
        if certified_by is not None:
            robust = CertifiedAccuracyPass(bound, pairwise, radii)
            robust.update(logits, y)
            metrics.update({name: float(value) for name, value in robust.compute(split).items()})
            radii_by_split[split] = robust.radii()
    bar.update()
    bar.close()
    return {"metrics": metrics, "layers": layers, "certified_by": certified_by, "lower_split": splits[0],
            "errors": errors, "certified_radii": radii_by_split}


def _lower_bound(net: nn.Module, x: Tensor, ascent_steps: int, upper: float) -> dict[str, Tensor]:
    """``lipschitz/lower`` and ``lipschitz/upper_over_lower`` on the inputs ``x`` (the callback's pass, one batch)."""
    from lipreg.lightning.lower_bound import LowerBoundPass

    lower = LowerBoundPass(net, batches=1, ascent_steps=ascent_steps)
    lower.update(x, 0)
    return lower.compute(upper)


def _pair_constants(net: nn.Module, example: Tensor) -> Tensor:
    """Certified GloRo constants ``||w_y - w_j|| L(body)`` (``(C, C)``), when ``net`` ends in a linear layer."""
    from lipreg.lightning.certified_accuracy import pair_certificate

    certificate = pair_certificate(net, example)
    if certificate is None:
        raise ValueError("the network does not end in a linear layer: no per-pair certificate")
    return certificate.certified()


def save_radius_curve(radii: Mapping[str, Tensor], path: str | Path, max_radius: float = 1.5) -> None:
    """PNG of the certified accuracy against the L2 radius, one line per certificate (``report["certified_radii"]
    [split]`` of :func:`evaluate_bounds`: global and, with a linear head, pairwise): the callback's figure,
    :func:`lipreg.lightning.figures.radius_curve`, on the radii of the reported accuracies."""
    from lipreg.lightning.figures import radius_curve

    if not radii:
        raise ValueError("--curve: no certified bound, so no certified radius to draw")
    fig = radius_curve(radii, max_radius, points=61)
    if fig is None:
        raise ValueError("--curve needs matplotlib (pip install 'lipreg[experiments]')")
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ run dirs
def find_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of a run: ``last.ckpt`` if there is one, else the newest ``*.ckpt`` under ``run_dir``."""
    run_dir = Path(run_dir)
    ckpts = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(f"no *.ckpt under {run_dir} (was the run trained with checkpoint=false?)")
    last = [p for p in ckpts if p.name == "last.ckpt"]
    return last[-1] if last else ckpts[-1]


def load_run(run_dir: str | Path, ckpt: str | Path | None = None):
    """``(cfg, datamodule, net, ckpt_path)`` of a run directory written by ``experiments/train.py``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {run_dir} is not a run directory of experiments/train.py "
                                "(for a multirun, pass one job's directory, e.g. MULTIRUN_DIR/0)")
    cfg = OmegaConf.load(config_file)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    ckpt_path = Path(ckpt) if ckpt is not None else find_checkpoint(run_dir)
    load_weights(net, load_checkpoint(ckpt_path), ckpt_path, f"{cfg.model._target_} of {config_file}")
    net.eval()
    return cfg, datamodule, net, ckpt_path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded with ``weights_only=True`` (tensors and plain containers, never code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        reason = f" ({found[0].split(' was not')[0]})" if found else ""
        raise ValueError(f"{path} holds more than tensors and plain containers, so torch.load(weights_only=True) "
                         f"refuses it{reason}; a checkpoint is a pickle: load it otherwise only if you trust its "
                         "source") from None
    except (EOFError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint of experiments/train.py (no 'state_dict')")
    return checkpoint


def load_weights(net: nn.Module, checkpoint: dict[str, Any], path: str | Path, model: str) -> None:
    """Load the ``net.*`` weights of a ``Classifier`` checkpoint into ``net``, or explain in one line why not."""
    state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or resized:
        first = (f"e.g. {resized[0]} is {tuple(state[resized[0]].shape)} in the checkpoint and "
                 f"{tuple(expected[resized[0]].shape)} in the model" if resized else
                 f"e.g. {(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}")
        raise ValueError(f"{path} is the checkpoint of another model: it does not fit the {model} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, {len(resized)} resized tensors; "
                         f"{first}); pass the run directory this checkpoint was written in")
    net.load_state_dict(state)


ARGUMENT_DEFAULTS = {"n_iter": "n_iter", "exact_max_units": "exact_max_units", "lower_samples": "lower_bound_samples",
                     "ascent_steps": "lower_bound_ascent_steps"}
"""The command-line options whose defaults are :func:`evaluate_bounds`'s: ``argparse dest -> parameter``."""


def library_default(fn: Callable[..., Any], name: str) -> Any:
    """The default of the parameter ``name`` in ``fn``'s signature: where a default is defined once (the Hydra
    schema and the command line read it there)."""
    return inspect.signature(fn).parameters[name].default


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory of experiments/train.py (holds .hydra/config.yaml)")
    parser.add_argument("--ckpt", default=None, help="checkpoint to load (default: the newest *.ckpt in run_dir)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="split for the certified accuracy and the lower bound (default: test)")
    parser.add_argument("--radii", type=float, nargs="+", default=None,
                        help="L2 radii of the certified accuracy (default: the run's eval.radii)")
    parser.add_argument("--n-iter", type=int, help="most power iterations to converge (default %(default)s)")
    parser.add_argument("--exact-max-units", type=int,
                        help="run exact SeqLip only if every activation layer has at most this many units")
    parser.add_argument("--no-seqlip", action="store_true", help="skip SeqLip")
    parser.add_argument("--lower-samples", type=int, help="inputs the lower bound starts from")
    parser.add_argument("--ascent-steps", type=int, help="gradient-ascent steps of the lower bound")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the run's `threads`, 1 for these small nets; 0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    parser.add_argument("--traceback", action="store_true", help="on an error, show the whole stack")
    parser.add_argument("--curve", default=None, help="also draw the certified accuracy vs radius into this PNG")
    parser.set_defaults(**{dest: library_default(evaluate_bounds, name) for dest, name in ARGUMENT_DEFAULTS.items()})
    args = parser.parse_args(argv)
    try:
        return estimate(args)
    except (OSError, ValueError, TypeError, KeyError) as e:  # lipreg.UnsupportedOpError is a TypeError
        if args.traceback:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        parser.exit(2, f"{parser.prog}: error: {message}\n(--traceback shows the whole stack)\n")


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """The command: load the run, bound it, print the report (and write ``--json``)."""
    cfg, datamodule, net, ckpt_path = load_run(args.run_dir, args.ckpt)
    threads = args.threads if args.threads is not None else cfg.get("threads", 1)
    if threads:
        torch.set_num_threads(int(threads))
    radii = args.radii
    if radii is None:
        default = list(library_default(evaluate_bounds, "radii"))
        radii = list(cfg.get("eval", {}).get("radii", default)) if "eval" in cfg else default
    print(f"run dir    {Path(args.run_dir).resolve()}")
    print(f"checkpoint {ckpt_path}")
    print(f"model      {type(net).__name__}  data {type(datamodule).__name__} input {tuple(datamodule.input_shape)}")
    print()
    report = evaluate_bounds(
        net, datamodule, splits=[args.split], radii=radii, n_iter=args.n_iter,
        seqlip=() if args.no_seqlip else REPORTED_SEARCHES, exact_max_units=args.exact_max_units,
        lower_bound_samples=args.lower_samples, lower_bound_ascent_steps=args.ascent_steps,
        seed=int(cfg.get("seed", 0)), progress=not args.no_progress,
    )
    print(format_report(report, [args.split], radii))
    if args.curve:
        save_radius_curve(report["certified_radii"].get(args.split, {}), args.curve)
        print(f"curve      {args.curve}")
    if args.json:
        record = {k: v for k, v in report.items() if k != "certified_radii"}  # tensors: the curve's, not JSON's
        Path(args.json).write_text(json.dumps({**record, "checkpoint": str(ckpt_path)}, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""Issue 10: certified training. Clean and certified accuracy of ``LipCNN`` trained by each objective, on the full
test set, with the certified accuracy always from the certified bound (``MarginCertificate.certified()``:
pairwise when the head is linear; the global ``sqrt(2) L`` column uses ``est.certified_bound()`` of the whole net).

Rows (one run each, same seed, same data order):

* ``penalty``: cross-entropy + ``1e-2 * log L`` (the ``lipreg=penalty`` preset's loss);
* ``global margin``: ``LipschitzMarginLoss(pairwise=False)`` (Tsuzuku et al. 2018);
* ``pairwise margin``: ``LipschitzMarginLoss(pairwise=True)`` (GloRo constants ``||w_y - w_j|| L(body)``);
* ``seqlip margin``: pairwise, with the body bound from SeqLip (``method="seqlip"``);
* ``lse_eps0.6_cosine`` and its ``liplt_`` / ``seqlip_`` variants: the README's recipe against the AutoLip, LipLT and
  SeqLip estimates (issue 18's table, with ``--seeds 0 1``);
* ``pairwise_T...``, ``pairwise_eps...``, ``pairwise_cosine``: variants (temperature, training radius, learning
  rate decayed to 0 on a cosine over the run instead of constant);
* ``*_cosine`` rows with the cosine schedule: ``wide`` (LipCNN channels (64, 128), hidden 512), ``hinge`` / ``lse``
  (``kind=``, eqs. 3 / 4 of :mod:`lipreg.losses`; ``_eps0.5`` / ``_eps0.6``: trained at that eps, evaluated at
  0.3), ``ce0.5`` / ``ce1`` / ``ce1.5`` (``ce_weight=``: plus that times the plain cross-entropy).

Run: ``python -m benchmarks.certified_training --data fashion_mnist [--rows pairwise ...]
[--epochs 6] [--out results.jsonl]``; ``--table results.jsonl`` prints the Markdown table of collected rows and
``--curve PNG`` draws their certified-accuracy-vs-radius curves; ``--overhead`` prints the time of one training step
of each objective relative to plain cross-entropy (interleaved, medians: ``common.median_times``). One thread, as in
the other benchmarks.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import median_times, optimizer_step, train_epochs
from experiments.data import DigitsDataModule, FashionMNISTDataModule
from experiments.models import LipCNN
from lipreg import LipschitzEstimator, LipschitzPenalty
from lipreg.losses import LipschitzMarginLoss
from lipreg.margins import MarginCertificate, global_constants, pairwise_constants, split_linear_head
from lipreg.policy import BoundPolicy
from lipreg.metrics import certified_accuracy_curve, certified_radius

RADII = (0.1, 0.3, 0.5, 1.0)
EPS = {"fashion_mnist": 0.3, "digits": 0.3}
ROWS: dict[str, dict[str, Any]] = {
    "penalty": {"penalty": 1e-2},
    "global": {"pairwise": False},
    "pairwise": {"pairwise": True},
    "seqlip": {"pairwise": True, "method": "seqlip"},
    "pairwise_T0.25": {"pairwise": True, "temperature": 0.25},
    "pairwise_eps0.5": {"pairwise": True, "eps_scale": 5 / 3},
    "pairwise_cosine": {"pairwise": True, "cosine": True},
    "wide_cosine": {"pairwise": True, "cosine": True, "model": {"channels": (64, 128), "hidden": 512}},
    "hinge_cosine": {"pairwise": True, "cosine": True, "kind": "hinge"},
    "lse_cosine": {"pairwise": True, "cosine": True, "kind": "lse"},
    "ce0.5_cosine": {"pairwise": True, "cosine": True, "ce_weight": 0.5},
    "hinge_eps0.5_cosine": {"pairwise": True, "cosine": True, "kind": "hinge", "eps_scale": 5 / 3},
    "lse_eps0.5_cosine": {"pairwise": True, "cosine": True, "kind": "lse", "eps_scale": 5 / 3},
    "lse_eps0.6_cosine": {"pairwise": True, "cosine": True, "kind": "lse", "eps_scale": 2.0},
    "liplt_lse_eps0.6_cosine": {"pairwise": True, "cosine": True, "kind": "lse", "eps_scale": 2.0, "method": "liplt"},
    "seqlip_lse_eps0.6_cosine": {"pairwise": True, "cosine": True, "kind": "lse", "eps_scale": 2.0, "method": "seqlip"},
    "ce1_cosine": {"pairwise": True, "cosine": True, "ce_weight": 1.0},
    "ce1.5_cosine": {"pairwise": True, "cosine": True, "ce_weight": 1.5},
}


def datamodule(name: str, seed: int = 0) -> Any:
    module = FashionMNISTDataModule if name == "fashion_mnist" else DigitsDataModule
    data = module(batch_size=128, seed=seed)
    data.setup("fit")
    data.setup("test")
    return data


def objective(row: dict[str, Any], model: nn.Module, x0: Tensor, eps: float, steps: int) -> nn.Module:
    """The loss module of a row: ``(logits, y) -> loss``."""
    if "penalty" in row:
        penalty = LipschitzPenalty(model, x0, weight=row["penalty"], kind="log")

        class PenalisedCE(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.penalty = penalty

            def forward(self, logits: Tensor, y: Tensor) -> Tensor:
                return F.cross_entropy(logits, y) + self.penalty()

        return PenalisedCE()
    return LipschitzMarginLoss(model, x0, eps=eps * row.get("eps_scale", 1.0), pairwise=row["pairwise"],
                               method=row.get("method", "autolip"), warmup=int(0.3 * steps),
                               kind=row.get("kind", "ce"), temperature=row.get("temperature"),
                               ce_weight=row.get("ce_weight", 0.0))


EVAL_POLICY = BoundPolicy(dense_entries=2**25)
"""The evaluation's policy: dense matrices up to 2^25 entries, so that ECLipsE-Fast (whose verified matrix has the
order of all hidden widths, 10,448 on the Fashion-MNIST LipCNN) is eligible; the default policy's tightest
certificate is reported beside it."""


@torch.no_grad()
def pair_certificates(model: nn.Module, x0: Tensor) -> dict[str, Tensor]:
    """Certified per-pair constants ``K`` (C, C) of the model by each certificate: ``autolip`` (GloRo, eq. 3 of
    :mod:`lipreg.margins`, on the product of the body's certified layer norms: Alg. 1 on a chain), ``liplt`` and
    ``eclipse`` (carried through the body's chain: ``certified_pairs``, with :data:`EVAL_POLICY`), ``tightest``
    (``MarginCertificate.certified()`` with the default policy, what a user gets) and ``global`` (eq. 2 on the whole
    model's ``certified_bound()``)."""
    body, head = split_linear_head(model, x0)
    body_est = LipschitzEstimator(body, x0, policy=EVAL_POLICY)
    product = torch.tensor(math.prod(body_est.layer_bounds(certified=True).values()), dtype=torch.float64)
    out = {"autolip": pairwise_constants(head.weight, product)}
    for name, K in body_est.certified_pairs(head.weight).items():
        out[name.removeprefix("pairwise_")] = K
    out["tightest"] = MarginCertificate(model, x0, pairwise=True).certified()
    n_classes = head.weight.shape[0]
    out["global"] = global_constants(LipschitzEstimator(model, x0).certified_bound().to(torch.float64), n_classes)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Clean accuracy and certified accuracy at :data:`RADII` by each certificate (:func:`pair_certificates`) on
    the whole split, with the seconds each certificate took to compute (all of them together) and the curve of
    the tightest."""
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(1000)])
    start = time.perf_counter()
    constants = pair_certificates(model, x[:1])
    out: dict[str, Any] = {"clean": float((logits.argmax(1) == y).float().mean()),
                           "certify_s": time.perf_counter() - start}
    for name, K in constants.items():
        radii = certified_radius(logits, y, K)
        out[name] = dict(zip(map(str, RADII), certified_accuracy_curve(radii, RADII).tolist()))
        if name == "tightest":
            grid = torch.linspace(0, 1.5, 31)
            out["curve"] = [grid.tolist(), certified_accuracy_curve(radii, grid).tolist()]
    return out


def train_row(name: str, data_name: str, epochs: int, limit_batches: int | None = None,
              seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    data = datamodule(data_name, seed)
    model = LipCNN(data.input_shape, data.num_classes, **ROWS[name].get("model", {}))
    loader = data.train_dataloader()
    steps = epochs * (limit_batches or len(loader))
    x0 = next(iter(loader))[0]
    loss_fn = objective(ROWS[name], model, x0, EPS[data_name], steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if ROWS[name].get("cosine") else None
    epoch_times = train_epochs(model, loss_fn, loader, optimizer, schedule, epochs, limit_batches)
    x_test, y_test = data.test_set.tensors
    return {"row": name, "data": data_name, "seed": seed, "epochs": epochs, "s_per_epoch": sum(epoch_times) / epochs,
            **evaluate(model, x_test, y_test)}


CERTIFICATES = ("autolip", "liplt", "eclipse", "tightest", "deel", "global")
"""The certified-accuracy columns a result row may hold (:func:`pair_certificates`; ``deel``: deel-torchlip's own
guarantee, in ``benchmarks.deel_torchlip``'s rows)."""


def table(paths: list[str]) -> str:
    """The Markdown table of result files: per objective and certificate, the clean and certified accuracy at
    :data:`RADII` as the mean over the seeds run (their number in the last column)."""
    rows = [json.loads(line) for path in paths for line in open(path)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r)
    lines = ["| trained against | certified by | clean | " + " | ".join(f"@{e:g}" for e in RADII) + " | seeds |",
             "|---" * (4 + len(RADII)) + "|"]
    for name, runs in groups.items():
        clean = 100 * sum(r["clean"] for r in runs) / len(runs)
        for cert in (c for c in CERTIFICATES if c in runs[0]):
            cells = " | ".join(f"{100 * sum(r[cert][str(e)] for r in runs) / len(runs):.1f}" for e in RADII)
            lines.append(f"| {name} | {cert} | {clean:.1f} | {cells} | {len(runs)} |")
    return "\n".join(lines)


def curve(paths: list[str], png: str) -> None:
    """The certified-accuracy-vs-radius curve of the default tightest certificate (``curve``) of each objective's
    first seed, and deel-torchlip's own guarantee (``curve_deel``) where a row has it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4))
    ax = fig.add_subplot()
    seen: set[str] = set()
    for r in (json.loads(line) for path in paths for line in open(path)):
        if r["row"] in seen:
            continue
        seen.add(r["row"])
        ax.plot(*r["curve"], label=f"{r['row']} (lipreg tightest)")
        if "curve_deel" in r:
            ax.plot(*r["curve_deel"], linestyle="--", label=f"{r['row']} (deel guarantee)")
    ax.set_xlabel("L2 radius eps")
    ax.set_ylabel("certified accuracy (per pair)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def overhead(data_name: str, rows: list[str]) -> None:
    """Seconds per training step (forward, loss, backward, Adam) of each row's objective and of plain cross-entropy,
    timed interleaved on one batch, and their ratios."""
    data = datamodule(data_name)
    x, y = next(iter(data.train_dataloader()))
    steps = {}
    for name in ["plain", *rows]:
        torch.manual_seed(0)
        model = LipCNN(data.input_shape, data.num_classes)
        loss_fn = F.cross_entropy if name == "plain" else objective(ROWS[name], model, x, EPS[data_name], 1)
        steps[name] = optimizer_step(model, loss_fn, x, y)
    times = median_times(steps, rounds=7, repeat=3, clock=time.process_time)
    for name, seconds in times.items():
        print(f"{name:>16}: {1e3 * seconds:8.1f} ms / step   {seconds / times['plain']:5.2f} x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=sorted(EPS))
    parser.add_argument("--rows", nargs="+", default=["penalty", "global", "pairwise", "lse_eps0.6_cosine"], choices=ROWS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit-batches", type=int, default=None)
    parser.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    parser.add_argument("--table", nargs="+", default=None, help="print the table of results files and exit")
    parser.add_argument("--curve", default=None, help="with --table: draw the curves into this PNG")
    parser.add_argument("--overhead", action="store_true", help="time one step of each objective and exit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.overhead:
        overhead(args.data, args.rows)
        return
    if args.table:
        print(table(args.table))
        if args.curve:
            curve(args.table, args.curve)
        return
    for name, seed in ((name, seed) for name in args.rows for seed in args.seeds):
        result = train_row(name, args.data, args.epochs, args.limit_batches, seed)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""The paper's experiments (Scaman & Virmaux 2018, section 6), on this machine, in about two minutes of CPU.

1. **AutoLip, Greedy SeqLip and a lower bound** for an MLP, a CNN and an AlexNet-shaped net on the 8x8 digits
   (``experiments.models``), at random initialisation and after a short training (Adam, a few epochs). The lower
   bound is the largest local Jacobian norm found by gradient ascent from test points and from as many Gaussian
   points of scale 3 (:func:`lipreg.metrics.lower_bound`). The AutoLip and SeqLip columns are converged estimates
   (``est.converge()``); the ratio is AutoLip / SeqLip (the paper's "Ratio").
2. **The random-MLP experiment** ("SeqLip in the ideal scenario"): MLPs 2 -> [100] x depth -> 1 whose every weight
   is ``U S V^T`` with Haar ``U, V`` and ``S = eps I`` except its top ``k`` singular values set to 1; the ratio
   SeqLip / AutoLip against depth, next to the heuristic ``1 / pi^(depth - 1)`` of Theorem 3. Here every one of the
   ``depth`` pairs is optimised, the first (2-wide input) and the last (1-wide output) included, while the
   authors' code left the first pair out (its ratio is 1 at depth 1): hence also ``1 / pi^depth``.

Run: ``python -m experiments.paper_table`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import lipreg
from lipreg.metrics import lower_bound

from experiments.data import DigitsDataModule
from experiments.models import CNN, MLP, AlexNetSmall

ARCHITECTURES = {
    "MLP": lambda: MLP((1, 8, 8), 10, hidden=(128, 128)),
    "CNN": lambda: CNN((1, 8, 8), 10),
    "AlexNet": lambda: AlexNetSmall((1, 8, 8), 10),
}
EPOCHS = {"MLP": 15, "CNN": 15, "AlexNet": 40}  # AlexNet's dropout needs longer on 1,257 training digits


def digits(seed: int = 0) -> DigitsDataModule:
    data = DigitsDataModule(batch_size=64, seed=seed)
    data.setup("fit")
    data.setup("test")
    return data


def train(model: nn.Module, data: DigitsDataModule, epochs: int, lr: float = 1e-3) -> float:
    """Plain Adam on cross-entropy for ``epochs`` epochs; returns the test accuracy (model left in eval mode)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def trained(name: str, epochs: int | None = None, seed: int = 0) -> tuple[nn.Module, DigitsDataModule, float]:
    """A seeded model of ``ARCHITECTURES[name]`` trained on the digits (``EPOCHS[name]`` epochs by default)."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    data = digits(seed)
    torch.manual_seed(1)
    return model, data, train(model, data, EPOCHS[name] if epochs is None else epochs)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return float(value.detach() if isinstance(value, torch.Tensor) else value), time.perf_counter() - start


PAPER_POLICY = lipreg.BoundPolicy(seqlip_dense_entries=4_000_000, lowrank_rank=200)
"""SeqLip as the paper computes it: a full SVD of every operator up to 4M entries (all of these nets'), and the top
200 singular triplets beyond, instead of the training-speed defaults."""


def bounds(model: nn.Module, x: torch.Tensor, ascent_steps: int) -> dict[str, float]:
    """AutoLip, Greedy SeqLip (both converged, :data:`PAPER_POLICY`) and the gradient-ascent lower bound, with their
    times."""
    model.eval()
    autolip, t_autolip = timed(lambda: lipreg.LipschitzEstimator(model, x[:1]).converge(tol=1e-6, max_iter=2000))
    seq = lipreg.LipschitzEstimator(model, x[:1], method="seqlip", search="greedy", policy=PAPER_POLICY)
    seqlip, t_seqlip = timed(lambda: seq.converge(tol=1e-6, max_iter=2000))
    torch.manual_seed(0)
    points = torch.cat([x, 3 * torch.randn_like(x)])  # data, and far from it (other activation patterns)
    lower, t_lower = timed(lambda: lower_bound(model, points, ascent_steps=ascent_steps, lr=0.5, n_iter=20))
    return dict(autolip=autolip, seqlip=seqlip, lower=lower, t_autolip=t_autolip, t_seqlip=t_seqlip, t_lower=t_lower,
                chains=len(seq.seqlip.chains), pairs=sum(len(c.acts) for c in seq.seqlip.chains))


def model_table(epochs: int | None, ascent_steps: int, points: int) -> list[dict]:
    rows = []
    for name in ARCHITECTURES:
        n_epochs = EPOCHS[name] if epochs is None else epochs
        torch.manual_seed(0)
        model = ARCHITECTURES[name]().eval()
        data = digits(0)
        x = data.test_set.tensors[0][:points]
        rows.append(dict(model=name, state="random init", acc=float("nan"), **bounds(model, x, ascent_steps)))
        start = time.perf_counter()
        torch.manual_seed(1)  # the training's shuffling and dropout, independent of what ran before
        acc = train(model, data, n_epochs)
        rows.append(dict(model=name, state=f"trained {n_epochs} ep", acc=acc, t_train=time.perf_counter() - start,
                         **bounds(model, x, ascent_steps)))
    return rows


def print_model_table(rows: list[dict]) -> None:
    print("| model | weights | test acc | AutoLip | Greedy SeqLip | ratio AL/SL | lower bound | AL/LB | "
          "t AutoLip | t SeqLip | t LB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "-" if math.isnan(r["acc"]) else f"{r['acc']:.3f}"
        print(f"| {r['model']} | {r['state']} | {acc} | {r['autolip']:.4g} | {r['seqlip']:.4g} | "
              f"{r['autolip'] / r['seqlip']:.2f} | {r['lower']:.4g} | {r['autolip'] / r['lower']:.1f} | "
              f"{r['t_autolip']:.2f}s | {r['t_seqlip']:.2f}s | {r['t_lower']:.2f}s |")


# ------------------------------------------------------------------------------------------ random MLPs
def haar(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian with the signs of R's diagonal fixed."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def ideal_weight(m: int, n: int, k: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``U S V^T`` (``m x n``) with Haar ``U, V``, ``S = eps`` except its top ``k`` singular values, 1."""
    s = torch.full((min(m, n),), eps, dtype=torch.float64)
    s[:k] = 1.0
    return haar(m, generator)[:, : s.numel()] @ torch.diag(s) @ haar(n, generator)[:, : s.numel()].T


def random_mlp(depth: int, k: int, eps: float, seed: int, width: int = 100) -> MLP:
    model = MLP((2,), 1, hidden=(width,) * depth).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.net:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(ideal_weight(*layer.weight.shape, k, eps, generator))
    return model


def random_mlp_table(depths: list[int], ks: list[int], seeds: int, eps: float = 0.01) -> list[dict]:
    rows = []
    x = torch.zeros(1, 2, dtype=torch.float64)
    for depth in depths:
        row = dict(depth=depth, limit=math.pi ** -(depth - 1), limit_all=math.pi ** -depth)
        for k in ks:
            ratios, times = [], []
            for seed in range(seeds):
                model = random_mlp(depth, k, eps, seed)
                autolip, _ = timed(lambda: lipreg.LipschitzEstimator(model, x, dtype=torch.float64).converge(tol=1e-10))
                est = lipreg.LipschitzEstimator(model, x, method="seqlip", search="greedy", dtype=torch.float64,
                                                policy=PAPER_POLICY)
                seqlip, t = timed(lambda: est(n_iter=0))
                ratios.append(seqlip / autolip)
                times.append(t)
            row[f"k={k}"] = statistics.mean(ratios)
            row[f"t k={k}"] = statistics.mean(times)
        rows.append(row)
    return rows


def print_random_table(rows: list[dict], ks: list[int], seeds: int) -> None:
    print(f"SeqLip / AutoLip, MLP 2 -> [100] x depth -> 1, eps = 0.01, mean of {seeds} seeds "
          "(k = number of singular values set to 1)")
    print("| depth | " + " | ".join(f"k = {k}" for k in ks) + " | 1/pi^(depth-1) | 1/pi^depth | " +
          " | ".join(f"t (k = {k})" for k in ks) + " |")
    print("|---" * (3 + 2 * len(ks)) + "|")
    for r in rows:
        print(f"| {r['depth']} | " + " | ".join(f"{r[f'k={k}']:.4f}" for k in ks) +
              f" | {r['limit']:.4f} | {r['limit_all']:.4f} | " +
              " | ".join(f"{r[f't k={k}']:.2f}s" for k in ks) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs, points and seeds")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    epochs = 2 if args.quick else args.epochs
    rows = model_table(epochs, ascent_steps=2, points=32 if args.quick else 64)
    print_model_table(rows)
    print()
    ks, seeds = [1, 5], (1 if args.quick else 3)
    depths = [1, 2, 3] if args.quick else [1, 2, 3, 4, 5, 6]
    print_random_table(random_mlp_table(depths, ks, seeds), ks, seeds)
    print(f"\nwall time of the whole script: {time.perf_counter() - start:.1f}s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

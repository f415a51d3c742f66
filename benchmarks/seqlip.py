"""Issue 3: the time of one warm Greedy SeqLip call (``est()``, ``n_iter=1``, after one training step changed the
weights a little) relative to a cold one (the first call of a fresh estimator: all-ones patterns, random
subspaces), on the trained digits MLP and CNN (and AlexNet-shaped net), next to one training step and one warm
AutoLip call. Ratios from one run, medians over rounds. Run: ``python -m benchmarks.seqlip``."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import lipreg
from experiments.paper_table import trained


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int = 5) -> None:
    torch.set_num_threads(1)
    print("| model | cold SeqLip call | warm SeqLip call | warm / cold | training step | warm AutoLip call |")
    print("|---|---|---|---|---|---|")
    for name in ("MLP", "CNN", "AlexNet"):
        model, data, _ = trained(name)
        batches = iter(data.train_dataloader())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x0 = data.test_set.tensors[0][:1]

        def step() -> None:
            x, y = next(batches)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            model.eval()

        autolip = lipreg.LipschitzEstimator(model, x0)
        autolip()
        cold, warm, steps, auto = [], [], [], []
        for _ in range(rounds):
            estimator = lipreg.LipschitzEstimator(model, x0, method="seqlip", search="greedy")
            cold.append(seconds(estimator))
            for _ in range(2):
                steps.append(seconds(step))
                warm.append(seconds(estimator))
                auto.append(seconds(autolip))
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"| {name} | {c * 1e3:.1f} ms | {w * 1e3:.1f} ms | {w / c:.2f} | {statistics.median(steps) * 1e3:.1f} ms "
              f"| {statistics.median(auto) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()

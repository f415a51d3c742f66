"""The time of one warm Greedy SeqLip call (``est()``, ``n_iter=1``, after one training step changed the weights a
little: ``BoundPolicy.greedy_rounds_per_call`` rounds of each search from the stored patterns) relative to one
training step, and to building the estimator (whose warm start runs every search to a local max), on the trained
digits MLP and CNN (and AlexNet-shaped net), next to one warm AutoLip call. Ratios from one run, medians over
rounds. Run: ``python -m benchmarks.seqlip``."""
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
    print("| model | build (warm start) | warm SeqLip call | training step | warm call / step | warm AutoLip call |")
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
        build, warm, steps, auto = [], [], [], []
        for _ in range(rounds):
            holder: list[lipreg.LipschitzEstimator] = []
            build.append(seconds(lambda: holder.append(
                lipreg.LipschitzEstimator(model, x0, method="seqlip", search="greedy"))))
            estimator = holder[0]
            for _ in range(2):
                steps.append(seconds(step))
                warm.append(seconds(estimator))
                auto.append(seconds(autolip))
        b, w, s = statistics.median(build), statistics.median(warm), statistics.median(steps)
        print(f"| {name} | {b * 1e3:.1f} ms | {w * 1e3:.1f} ms | {s * 1e3:.1f} ms | {w / s:.2f} "
              f"| {statistics.median(auto) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()

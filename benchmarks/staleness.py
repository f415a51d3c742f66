"""Issue 9: the cost of the staleness check (has the model changed since the estimator traced it?) that every
``est()`` call runs, relative to one warm ``est()`` call and one training step (batch 128, digits).
Run: ``python -m benchmarks.staleness``."""
from __future__ import annotations

import torch

import lipreg
from benchmarks.common import digits_batch, median_times, models, train_step_fn


def main() -> None:
    torch.set_num_threads(1)  # small nets: one thread is fastest and least noisy on a shared 2-core machine
    x, y = digits_batch()
    print(f"{'model':8s} {'check':>9s} {'est()+backward':>15s} {'check/est':>10s} {'train step':>11s} "
          f"{'check/step':>11s}")
    for name, model in models().items():
        estimator = lipreg.LipschitzEstimator(model, x)
        step = train_step_fn(model, x, y)

        def warm_bound() -> None:
            estimator().backward()  # the penalty's real cost, check included

        times = median_times({"check": estimator.graph.stale, "bound": warm_bound, "step": step},
                             rounds=7, repeat=20)
        print(f"{name:8s} {times['check'] * 1e6:7.1f}us {times['bound'] * 1e3:13.3f}ms "
              f"{times['check'] / times['bound']:10.4f} {times['step'] * 1e3:9.3f}ms "
              f"{times['check'] / times['step']:11.4f}")


if __name__ == "__main__":
    main()

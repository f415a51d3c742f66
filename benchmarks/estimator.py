"""Issue 2: the cost of one warm AutoLip call (``n_iter=1``) relative to one training step (batch 128,
digits), and the time to converge to 1e-6.  Run: ``python -m benchmarks.estimator``."""
from __future__ import annotations

import time

import torch

import lipreg
from benchmarks.common import digits_batch, median_times, models, train_step_fn


def main() -> None:
    torch.set_num_threads(1)  # small nets: one thread is fastest and least noisy on a shared 2-core machine
    x, y = digits_batch()
    print(f"{'model':8s} {'train step':>11s} {'est(n_iter=1)':>14s} {'ratio':>7s} {'converge(1e-6)':>15s} {'bound':>9s}")
    for name, model in models().items():
        estimator = lipreg.LipschitzEstimator(model, x)
        step = train_step_fn(model, x, y)

        def warm_bound() -> None:
            estimator().backward()  # the penalty's real cost: bound and its gradient

        times = median_times({"step": step, "bound": warm_bound})
        start = time.perf_counter()
        bound = estimator.converge(tol=1e-6)
        converge_s = time.perf_counter() - start
        print(f"{name:8s} {times['step'] * 1e3:9.2f}ms {times['bound'] * 1e3:12.2f}ms "
              f"{times['bound'] / times['step']:7.3f} {converge_s:13.2f}s {float(bound.detach()):9.3f}")


if __name__ == "__main__":
    main()

"""Issue 6: the cost of ``certified_bound()`` relative to one warm estimate and to a training step, and the gap
certified / exact, per model and per layer.  Run: ``python -m experiments.bench.bench_certify``."""
from __future__ import annotations

import torch

import lipreg
from experiments.bench.common import BATCH, digits_batch, median_times, models, train_step_fn
from experiments.models import CNN


def exact_factor(estimator: lipreg.LipschitzEstimator, node) -> float:
    """The exact norm of a (fused) linear operator: the largest singular value of its dense matrix (float64)."""
    env = estimator.graph.constant_env(torch.float64, torch.device("cpu"))
    return float(torch.linalg.matrix_norm(estimator.graph.dense_matrix(node, env), 2))


def main() -> None:
    torch.set_num_threads(1)  # small nets: one thread is fastest and least noisy on a shared 2-core machine
    x, y = digits_batch()
    torch.manual_seed(0)
    cases = {name: (model, x, y) for name, model in models().items()}
    # 28x28 inputs (Fashion-MNIST's shape): convolutions too large for a dense matrix take the FFT bound
    cases["cnn28"] = (CNN((1, 28, 28), 10), torch.rand(BATCH, 1, 28, 28), y)
    print(f"{'model':8s} {'certified':>10s} {'/estimate':>10s} {'/step':>7s} {'no-grad':>12s} {'every 50 steps':>15s}")
    for name, (model, x, y) in cases.items():
        estimator = lipreg.LipschitzEstimator(model, x)
        step = train_step_fn(model, x, y)
        def logged() -> None:  # what the callback pays every certify_every_n_steps: no graph kept
            with torch.no_grad():
                estimator.certified_bound()

        times = median_times({"step": step, "estimate": lambda: estimator(), "certified": estimator.certified_bound,
                              "logged": logged}, rounds=5, repeat=2)
        share = times["logged"] / (50 * times["step"])
        print(f"{name:8s} {times['certified'] * 1e3:8.1f}ms {times['certified'] / times['estimate']:10.1f} "
              f"{times['certified'] / times['step']:7.2f} {times['logged'] * 1e3:10.1f}ms {share:14.1%}")
        env = estimator.graph.constant_env(estimator.dtype, torch.device("cpu"))
        with torch.no_grad():
            for node in estimator.graph.linear_nodes():
                certified = float(estimator.certified_factor(node, env))
                print(f"    {node.name:28s} certified/exact = {certified / exact_factor(estimator, node):.6f}")


if __name__ == "__main__":
    main()

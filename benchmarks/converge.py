"""Issue 12 target (b): ``est.converge(tol=1e-6)`` (Golub-Kahan-Lanczos on every operator) against the paper's
Alg. 2 as its authors run it: a plain autograd power method on each linear layer alone, ``v <- A^T A v / ||.||``,
until ``sigma = ||A v||`` moves by less than ``tol`` (relative) in one step. Both from the same random start, both
timed in one run (interleaved, median of the rounds), on (i) an MLP 784-500-500-10 and (ii) the 6-conv CNN
(conv-BN-ReLU at 3x32x32, 64-128 channels, global average pool, linear head), random init, eval mode. The value
compared is the AutoLip bound, the product of the layers' norms (ReLU has constant 1), and for the MLP also the
exact float64 SVDs. Run: ``python -m benchmarks.converge`` (one thread; ``--rounds``)."""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import lipreg
from benchmarks.certify import six_conv_cnn

TOL = 1e-6


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))


def affine_layers(model: nn.Sequential) -> list[nn.Sequential]:
    """The model's maximal runs of modules between ReLUs: each is one affine layer (conv with its eval batch norm;
    pool, flatten and linear head), as the estimator's fused operators are."""
    layers: list[list[nn.Module]] = [[]]
    for module in model:
        if isinstance(module, nn.ReLU):
            layers.append([])
        else:
            layers[-1].append(module)
    return [nn.Sequential(*run) for run in layers if run]


def plain_power_method(layer: nn.Module, shape: torch.Size, tol: float, generator: torch.Generator,
                       exact: float | None = None, max_iter: int = 200_000) -> tuple[float, int]:
    """Paper Alg. 2 on one affine layer (``A v = f(v) - f(0)``): ``sigma`` and the number of steps. It stops when
    ``sigma`` moves by less than ``tol`` (relative), or, given the ``exact`` norm, once ``sigma`` is within ``tol``
    of it (the steps the power method needs for an accurate value)."""
    with torch.no_grad():
        offset = layer(torch.zeros(shape))
    v = torch.randn(shape, generator=generator)
    v = v / v.norm()
    previous = math.nan
    for step in range(1, max_iter + 1):
        v.requires_grad_(True)
        out = layer(v) - offset
        sigma = float(out.detach().norm())
        (v,) = torch.autograd.grad(out, v, grad_outputs=out.detach())
        v = v / v.norm()
        if abs(sigma - (previous if exact is None else exact)) <= tol * sigma:
            return sigma, step
        previous = sigma
    return sigma, max_iter


def baseline(model: nn.Sequential, shape: torch.Size, to_exact: bool = False) -> tuple[float, int]:
    """The product of the per-layer power-method values (the AutoLip bound of a chain) and the total steps; with
    ``to_exact``, each layer iterated until within ``TOL`` of its exact norm (dense linear layers only)."""
    generator = torch.Generator().manual_seed(0)
    bound, steps = 1.0, 0
    with torch.no_grad():
        shapes = []
        x = torch.zeros(shape)
        for layer in affine_layers(model):
            shapes.append(x.shape)
            x = layer(x)
    for layer, layer_shape in zip(affine_layers(model), shapes):
        exact = float(torch.linalg.matrix_norm(layer[0].weight.detach().double(), 2)) if to_exact else None
        sigma, n = plain_power_method(layer, layer_shape, TOL, generator, exact)
        bound, steps = bound * sigma, steps + n
    return bound, steps


def exact_mlp(model: nn.Sequential) -> float:
    return math.prod(float(torch.linalg.matrix_norm(m.weight.detach().double(), 2))
                     for m in model if isinstance(m, nn.Linear))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def compare(name: str, model: nn.Sequential, shape: tuple[int, ...], rounds: int) -> None:
    """One row per baseline: its time, steps and value against ``converge()``'s, timed in the same rounds."""
    model.eval()
    est = lipreg.LipschitzEstimator(model, torch.zeros(shape))
    cold = {k: v.clone() for k, v in est.state_dict().items()}

    def converge() -> tuple[float, int]:
        est.load_state_dict(cold)  # every run starts from the same cold vectors
        return float(est.converge(tol=TOL).detach()), 0

    dense = all(isinstance(layer[0], nn.Linear) for layer in affine_layers(model))
    runs = {"converge": converge, "power method (Alg. 2)": lambda: baseline(model, torch.Size(shape))}
    if dense:
        runs["power method to 1e-6 of exact"] = lambda: baseline(model, torch.Size(shape), to_exact=True)
    converge()  # warm up
    samples: dict[str, list[float]] = {run: [] for run in runs}
    results: dict[str, tuple[float, int]] = {}
    for _ in range(rounds):
        for run, fn in runs.items():
            t, results[run] = timed(fn)
            samples[run].append(t)
    seconds = {run: sorted(ts)[len(ts) // 2] for run, ts in samples.items()}
    bound = results["converge"][0]
    exact = exact_mlp(model) if dense else None
    for run in runs:
        value, steps = results[run]
        versus = f"{value / exact - 1:+.1e}" if exact is not None else "-"
        ratio = "" if run == "converge" else f"{seconds[run] / seconds['converge']:.1f}x"
        print(f"{name:20s} {run:30s} {seconds[run]:8.2f}s {steps or '':>7} {ratio:>8s} {value:11.6g} "
              f"{bound / value - 1:+15.1e} {versus:>10s}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"tol={TOL}, {args.rounds} interleaved rounds (medians), one thread on a shared machine")
    print(f"{'model':20s} {'method':30s} {'time':>9s} {'steps':>7s} {'x conv.':>8s} {'value':>11s} "
          f"{'converge/value-1':>15s} {'/exact-1':>10s}")
    torch.manual_seed(0)
    compare("MLP 784-500-500-10", mlp(), (1, 784), args.rounds)
    torch.manual_seed(0)
    compare("6-conv CNN 3x32x32", six_conv_cnn(), (1, 3, 32, 32), args.rounds)


if __name__ == "__main__":
    main()

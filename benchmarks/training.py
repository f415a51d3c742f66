"""Issue 4: the cost of lipreg in a training step, CNN on digits, batch 128 (forward + backward + Adam).

Variants, timed interleaved in one run (ratios to the plain step; the machine is noisy, see ``common.median_times``):

* ``plain``: no lipreg;
* ``callback (log only)``: what ``LipschitzCallback()`` adds to a step: one warm iteration of the
  estimator, without grad, after the optimizer step (the logging itself, every ``log_every_n_steps``, is not timed);
* ``autolip penalty``: ``loss + LipschitzPenalty(model, x, n_iter=1)()`` (the penalty a module adds to its loss);
* ``hand-written 1 warm``: a minimal hand-written penalty, one warm power iteration per operator (the floor);
* ``spectral_norm``: ``torch.nn.utils.parametrizations.spectral_norm`` on every conv and linear layer (the anchor;
  note it bounds the reshaped kernel, not the convolution operator);
* ``naive 20 cold``: 20 power iterations from a fresh random vector per operator, every step.

Run: ``python -m benchmarks.training [--threads N] [--cpu-time] [--profile]``; ``--cpu-time`` times on
the process's CPU clock instead of the wall clock (on a loaded shared machine the wall clock mostly measures waiting
for a core); ``--profile`` adds a cProfile of the penalty's share of the step. One thread by default: the penalty
works on single samples and gains nothing from threads, while two threads on a shared two-core machine make the
plain step's time (the denominator) swing 2-4x.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import pstats
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import digits_batch, median_times, train_step_fn
from experiments.models import CNN
from lipreg.penalty import LipschitzPenalty

WEIGHT = 1e-3


class HandWrittenPenalty:
    """``weight * sum_i log ||A_i v_i||`` over the convolutions and linear layers (bias-free maps, at their real input
    sizes), ``v_i`` from ``n_iter`` power iterations through autograd: warm (kept between calls) or cold (fresh).
    Batch norm and the pooling constants are left out: a floor for the cost, not a bound."""

    def __init__(self, model: nn.Module, x: Tensor, n_iter: int, warm: bool) -> None:
        self.maps: list[tuple[Callable[[Tensor], Tensor], torch.Size]] = []
        shapes: list[torch.Size] = []
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hooks = [m.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[1:])) for m in layers]
        with torch.no_grad():
            model.eval()
            model(x[:1])
            model.train()
        for hook in hooks:
            hook.remove()
        for layer, shape in zip(layers, shapes):
            if isinstance(layer, nn.Conv2d):
                self.maps.append((lambda v, c=layer: F.conv2d(v, c.weight, None, c.stride, c.padding), shape))
            else:
                self.maps.append((lambda v, lin=layer: F.linear(v, lin.weight), shape))
        self.n_iter, self.warm = n_iter, warm
        self.vectors = [F.normalize(torch.randn(1, *shape).flatten(), dim=0).view(1, *shape) for _, shape in self.maps]

    def __call__(self) -> Tensor:
        total = torch.zeros(())
        for i, (apply, shape) in enumerate(self.maps):
            v = self.vectors[i] if self.warm else F.normalize(torch.randn(1, *shape).flatten(), dim=0).view(1, *shape)
            for _ in range(self.n_iter):
                v = v.detach().requires_grad_(True)
                av = apply(v)
                (w,) = torch.autograd.grad(av, v, grad_outputs=av.detach())
                v = (w / w.norm()).detach()
            if self.warm:
                self.vectors[i] = v
            total = total + torch.log(torch.linalg.vector_norm(apply(v)))
        return WEIGHT * total


def spectral_normed(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            torch.nn.utils.parametrizations.spectral_norm(module)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cpu-time", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = digits_batch()
    torch.manual_seed(0)
    base = CNN((1, 8, 8), 10)
    models = {name: copy.deepcopy(base) for name in ("plain", "log", "autolip", "hand1", "cold20")}
    penalty = LipschitzPenalty(models["autolip"], x, coefficient=WEIGHT, kind="log", n_iter=1)
    logger = LipschitzPenalty(models["log"], x, n_iter=1)
    plain_log_step = train_step_fn(models["log"], x, y)

    def log_only_step() -> None:
        plain_log_step()
        with torch.no_grad():
            logger()

    steps = {
        "plain": train_step_fn(models["plain"], x, y),
        "callback (log only)": log_only_step,
        "autolip penalty": train_step_fn(models["autolip"], x, y, penalty),
        "hand-written 1 warm": train_step_fn(models["hand1"], x, y, HandWrittenPenalty(models["hand1"], x, 1, True)),
        "spectral_norm": train_step_fn(spectral_normed(base), x, y),
        "naive 20 cold": train_step_fn(models["cold20"], x, y, HandWrittenPenalty(models["cold20"], x, 20, False)),
    }
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = median_times(steps, rounds=args.rounds, repeat=5, clock=clock)
    print(f"CNN on digits, batch {len(x)}, {args.threads} thread(s); median of {args.rounds} rounds x 5 steps"
          f"{' (CPU time)' if args.cpu_time else ''}")
    print(f"{'variant':22s} {'step':>9s} {'x plain':>8s}")
    for name, seconds in times.items():
        print(f"{name:22s} {seconds * 1e3:7.2f}ms {seconds / times['plain']:8.3f}")
    print(f"target (a): autolip penalty / spectral_norm = {times['autolip penalty'] / times['spectral_norm']:.3f}")
    if args.profile:
        profile_penalty(penalty)


def profile_penalty(penalty: LipschitzPenalty, calls: int = 200) -> None:
    """Where the penalty's time goes: its forward and its share of the backward."""
    params = [p for p in penalty.estimator.model.parameters()]

    def run() -> None:
        for _ in range(calls):
            torch.autograd.grad(penalty(), params, allow_unused=True)

    profiler = cProfile.Profile()
    profiler.runcall(run)
    print(f"\ncProfile of {calls} penalty calls (forward + its backward), by cumulative then own time:")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

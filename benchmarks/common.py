"""Shared pieces of the benchmarks: the digits models, a training step, and a robust timer.

Every benchmark prints ratios measured in one run (the machine is noisy): each timed function runs
interleaved with the others, several rounds, and the median is kept.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Callable

import torch
from torch import Tensor, nn

from experiments.data import DigitsDataModule
from experiments.models import CNN, MLP, AlexNetSmall

BATCH = 128


def digits_batch(batch_size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """One real training batch of the digits data."""
    data = DigitsDataModule(batch_size=batch_size, seed=0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def models() -> dict[str, nn.Module]:
    """The three reference architectures, on the digits shape, seeded."""
    torch.manual_seed(0)
    return {"mlp": MLP((1, 8, 8), 10), "cnn": CNN((1, 8, 8), 10), "alexnet": AlexNetSmall((1, 8, 8), 10)}


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  extra_loss: Callable[[], torch.Tensor] | None = None) -> Callable[[], None]:
    """forward + backward + Adam step on one batch (optionally plus a loss term)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        optimizer.step()

    return step


def median_times(fns: dict[str, Callable[[], object]], rounds: int = 7, repeat: int = 5,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved round by round, read on ``clock``
    (wall time by default; ``time.process_time`` counts only this process's CPU time, steadier on a shared
    machine)."""
    for fn in fns.values():
        fn()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(repeat):
                fn()
            samples[name].append((clock() - start) / repeat)
    return {name: statistics.median(values) for name, values in samples.items()}


def optimizer_step(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                   lr: float = 1e-3) -> Callable[[], None]:
    """One Adam training step of ``model`` on ``(x, y)`` under ``loss_fn``, as a function to time."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return step


def train_epochs(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], loader: Iterable,
                 optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler | None,
                 epochs: int, limit_batches: int | None = None) -> list[float]:
    """Train ``model`` on ``loss_fn(model(x), y)`` for ``epochs`` epochs (at most ``limit_batches`` batches each),
    stepping ``schedule`` (if any) after every optimizer step; the seconds of each epoch."""
    epoch_times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if limit_batches is not None and i >= limit_batches:
                break
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        epoch_times.append(time.perf_counter() - start)
    return epoch_times

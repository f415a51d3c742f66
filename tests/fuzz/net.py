"""The net, case and builder of the soundness fuzz's random architectures (:mod:`.arch`).

A :class:`FuzzNet` runs a list of steps ``(net, h) -> h``; a :class:`Builder` registers the submodules,
parameters and buffers the steps use and records the op kinds and registry targets drawn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]
Step = Callable[[nn.Module, Tensor], Tensor]


class FuzzNet(nn.Module):
    """``h = step(self, h)`` for each step in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Step] = []

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(self, x)
        return x


class TenfoldConv2d(nn.Conv2d):
    """A subclass that changes what the convolution computes through ``_conv_forward`` (``forward`` untouched)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return super()._conv_forward(x, 10 * weight, bias)


def times_ten_hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return 10 * output


def times_ten_pre_hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (10 * inputs[0],)


@dataclass
class Case:
    """One architecture with its estimator configuration."""

    index: int
    model: nn.Module
    x: Tensor
    dtype: torch.dtype
    fuse: bool
    kinds: set[str]
    targets: set[Any]
    description: str
    float32_reference: bool = False  # fake quantization has no float64 kernel
    mutate: Optional[Callable[[nn.Module], str]] = None  # applied after the estimators are built (staleness)
    per_sample: bool = False  # one sample whose batch axis the model drops: the reference runs sample by sample
    steps: list[str] = field(default_factory=list)  # the description of each step of ``model.steps``
    margin: Optional[str] = None  # the method of a per-pair MarginCertificate check (:mod:`.margins`), if any


@dataclass
class Builder:
    """The net under construction and what it records."""

    rng: random.Random
    net: FuzzNet = field(default_factory=FuzzNet)
    kinds: set[str] = field(default_factory=set)
    targets: set[Any] = field(default_factory=set)
    float32_reference: bool = False
    count: int = 0
    depth: int = 0  # nesting of residual / concatenation branches
    fresh: bool = False  # whether h is an intermediate tensor (in-place ops never write the model's input)
    mutations: list[tuple[str, Callable[[nn.Module], str]]] = field(default_factory=list)
    """After-build changes the drawn steps offer, with their kind (:func:`tests.fuzz.arch.draw_case` picks one)."""

    def add(self, value: nn.Module | Tensor, parameter: bool = False) -> str:
        """Register a submodule, parameter or buffer on the net; returns its attribute name."""
        name = f"m{self.count}"
        self.count += 1
        if isinstance(value, nn.Module):
            self.net.add_module(name, value)
        elif parameter:
            self.net.register_parameter(name, nn.Parameter(value))
        else:
            self.net.register_buffer(name, value)
        return name

    def add_mutation(self, kind: str, mutate: Callable[[nn.Module], str]) -> None:
        self.mutations.append((kind, mutate))

    def pick(self, options: list[Any]) -> Any:
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def note(self, kind: str, *targets: Any) -> None:
        self.kinds.add(kind)
        self.targets.update(targets)


def call(name: str, index: int | None = None) -> Step:
    """``net.<name>(h)`` (``[index]`` of the result for modules returning tuples)."""
    if index is None:
        return lambda net, h: getattr(net, name)(h)
    return lambda net, h: getattr(net, name)(h)[index]

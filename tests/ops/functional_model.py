"""A test model that is one functional call: shared by the rule tests."""
from __future__ import annotations

import torch
from torch import nn


class Fn(nn.Module):
    """A model that is one functional call, its tensors held as parameters (in float64)."""

    def __init__(self, fn, *tensors: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.tensors = nn.ParameterList([nn.Parameter(t.to(torch.float64)) for t in tensors])

    def forward(self, x):
        return self.fn(x, *self.tensors)

"""Parts of real model definitions, written after their sources (torchvision, timm, a GitHub U-Net) without
importing them: the call patterns the rule tests bound."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


class Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Affine(nn.Module):
    """timm's ResMLP ``Affine``: ``beta + alpha * x`` per channel, by ``addcmul``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth's logic, under its name: fx keeps it as one call (torch.fx.wrap)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    return input * noise.div_(1.0 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: passes ``self.training``, or ``True`` when ``always_on``."""

    def __init__(self, p: float, mode: str, always_on: bool = False) -> None:
        super().__init__()
        self.p, self.mode, self.always_on = p, mode, always_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.always_on or self.training)


def unet_pad(x: torch.Tensor) -> torch.Tensor:
    """U-Net's ``Up``: pad an upsampled map to its skip connection's size, amounts computed from sizes."""
    diff_y, diff_x = 9 - x.size()[2], 8 - x.size()[3]
    return F.pad(x, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's shufflenetv2.channel_shuffle."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """shufflenet_v2's InvertedResidual with stride 1: half the channels pass, the other half go through a
    branch, then the halves are concatenated and shuffled."""

    def __init__(self, channels: int, relu: bool) -> None:
        super().__init__()
        half = channels // 2
        self.branch2 = nn.Sequential(nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), *([nn.ReLU()] if relu else []),
                                     nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation as mobilenet_v3 builds it (hardsigmoid gate)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(x) * x

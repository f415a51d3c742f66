"""What a rule says about its op for the certificates of :mod:`lipreg.linalg.certify`: data, no algorithm.

A rule describes its op (:meth:`lipreg.ops.LinearOp.structure`) by one of these records; the certificate, its
route and its rounding are decided from them in :mod:`lipreg.linalg.certify` alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ConvGeometry", "OneSignMap", "WeightedMap"]

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


@dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of torch's ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` as the op applies them:
    ``padding`` is what torch pads with (for a module of a non-zeros mode, its ``_reversed_padding_repeated_twice``
    as (left, right) pairs per axis, not its public ``.padding``)."""

    stride: int | Sequence[int] = 1
    padding: Padding = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: int | Sequence[int] = 0


@dataclass(frozen=True)
class WeightedMap:
    """A linear op given by a weight in torch's layout: ``F.linear`` (``conv`` is ``None``: ``(out, in)``, acting on
    the last axis) or a convolution (``(c_out, c_in / groups, *kernel)``, transposed ``(c_in, c_out / groups,
    *kernel)``), on inputs of ``in_shape`` as the op receives them (batched, or unbatched ``(C, *spatial)``)."""

    weight: Tensor
    in_shape: torch.Size
    conv: ConvGeometry | None = None

    @property
    def channel_axis(self) -> int:
        """The axis of the input (and output: same rank) that the weight mixes, read from the input's real rank:
        the last for a linear layer; for an n-d convolution the one before its last n (axis 0 of an unbatched
        ``(C, *spatial)`` input, axis 1 of a batched one)."""
        rank = len(self.in_shape)
        return rank - 1 if self.conv is None else rank - (self.weight.dim() - 1)

    @property
    def spatial(self) -> torch.Size:
        """The sizes a convolution runs over: the input's last n."""
        return self.in_shape[len(self.in_shape) - (self.weight.dim() - 2):]


@dataclass(frozen=True)
class OneSignMap:
    """A linear op whose matrix entries all have one sign (average pooling, means, sums): ``apply`` computes ``A v``
    for a float64 ``v`` of ``in_shape`` on ``device``."""

    apply: Callable[[Tensor], Tensor]
    in_shape: torch.Size
    device: torch.device

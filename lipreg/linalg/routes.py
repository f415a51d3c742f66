"""The routes of one weighted op (linear layer, convolution) with the per-channel gains of its neighbours folded
in: which certificate, and whether it is the exact norm. The soundness argument of each route is stated in
:mod:`lipreg.linalg.certify`."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..policy import BoundPolicy
from .conv import conv_certificate
from .dense import certified_cast, is_exact, spectral_norm64
from .maps import WeightedMap

__all__ = ["channel_gains", "channel_matrix", "fold_channel_gains", "weighted_norm"]


def channel_gains(multiplier: Tensor, shape: torch.Size, axis: int, channels: int) -> Tensor | None:
    """The per-channel gains of the diagonal map ``v -> multiplier * v`` on tensors of ``shape``, the channels on
    ``axis`` (``channels`` of them); ``None`` when the multiplier is not constant along every other axis, or does
    not fit ``shape``."""
    try:
        full = torch.broadcast_to(multiplier, shape)
    except RuntimeError:
        return None
    if full.shape[axis] != channels:
        return None
    gains = full.movedim(axis, 0).reshape(channels, -1)
    return gains[:, 0] if bool((gains == gains[:, :1]).all()) else None


def fold_channel_gains(weight: Tensor, groups: int, rows: Tensor | None, columns: Tensor | None) -> Tensor:
    """``weight`` in torch's conv / linear layout ``(A, B / groups, *kernel)`` with per-channel gains folded in:
    ``W'[a, b] = rows[a] * W[a, b] * columns[g(a) * B / groups + b]``, ``g(a) = a // (A / groups)`` the group of ``a``.

    For a convolution (``rows`` on the output channels, ``columns`` on the input ones) ``W'`` is the kernel of
    ``diag(rows) o conv_W o diag(columns)`` when the diagonal maps are constant over space; for a linear layer
    ``W' = diag(rows) W diag(columns)``; for a transposed convolution, whose weight is ``(c_in, c_out / groups,
    *kernel)``, ``rows`` scale its input channels and ``columns`` its output ones. ``None`` is a gain of 1.
    """
    a, b = weight.shape[:2]
    tail = (1,) * (weight.dim() - 2)
    if rows is not None:
        weight = weight * rows.to(weight.dtype).view(a, 1, *tail)
    if columns is not None:
        per_row = columns.to(weight.dtype).view(groups, 1, b).expand(groups, a // groups, b).reshape(a, b)
        weight = weight * per_row.view(a, b, *tail)
    return weight


def weighted_norm(op: WeightedMap, before: Tensor | None, after: Tensor | None,
                  policy: BoundPolicy) -> tuple[Tensor, bool]:
    """Certified ``sigma_1(diag(after) A diag(before))`` in float64 (``before`` / ``after``: gains per input / output
    channel, ``None`` for 1), and whether it is the exact norm (up to the rounding margin)."""
    weight, geometry = op.weight.to(torch.float64), op.conv
    exact_max_dim = policy.exact_eig_max_dim(weight.device.type)
    if geometry is None:
        weight = fold_channel_gains(weight, 1, after, before)
        bound = certified_cast(spectral_norm64(weight, 10, exact_max_dim), torch.float64)
        return bound, is_exact(weight.shape, weight.device, exact_max_dim)
    rows, columns = (before, after) if geometry.transposed else (after, before)
    weight = fold_channel_gains(weight, geometry.groups, rows, columns)
    if _pointwise(weight, geometry.padding, geometry.padding_mode):
        return _pointwise_norm(weight, geometry.groups, exact_max_dim), _unpadded(geometry.padding)
    return conv_certificate(weight, op.spatial, stride=geometry.stride, padding=geometry.padding,
                            dilation=geometry.dilation, groups=geometry.groups, padding_mode=geometry.padding_mode,
                            transposed=geometry.transposed, output_padding=geometry.output_padding,
                            dense_max_entries=policy.conv_dense_entries)


def _unpadded(padding: object) -> bool:
    """Whether a conv's ``padding`` adds nothing (``'valid'``, ``'same'`` of a 1x1 kernel, zeros)."""
    if isinstance(padding, str):
        return True
    flat = [padding] if isinstance(padding, int) else [p for entry in padding for p in
                                                       (entry if isinstance(entry, (tuple, list)) else [entry])]
    return all(p == 0 for p in flat)


def _pointwise(weight: Tensor, padding: object, padding_mode: str) -> bool:
    """A 1x1 kernel padded with zeros (or not padded): the 1x1 route applies."""
    return math.prod(weight.shape[2:]) == 1 and (padding_mode == "zeros" or _unpadded(padding))


def _pointwise_norm(weight: Tensor, groups: int, exact_max_dim: float) -> Tensor:
    """``max_g ||W_g||_2`` over the groups' ``(A / groups, B / groups)`` matrices of a 1x1 kernel, certified."""
    a, b = weight.shape[:2]
    blocks = weight.reshape(groups, a // groups, b)
    return certified_cast(spectral_norm64(blocks, 10, exact_max_dim).max(), torch.float64)


def channel_matrix(op: WeightedMap) -> Tensor | None:
    """The float64 ``(C_out, C_in)`` matrix that a linear layer, or a 1x1 convolution padded with zeros (or not
    padded), applies to the channels of each pixel it computes (block-diagonal over groups; a transposed
    convolution's is the transpose of its weight's); ``None`` for any other op."""
    weight, geometry = op.weight.to(torch.float64), op.conv
    if geometry is None:
        return weight
    if not _pointwise(weight, geometry.padding, geometry.padding_mode):
        return None
    a, b, groups = weight.shape[0], weight.shape[1], geometry.groups
    blocks = weight.reshape(groups, a // groups, b)
    if geometry.transposed:
        blocks = blocks.transpose(1, 2)
    return torch.block_diag(*blocks)

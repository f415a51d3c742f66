"""Padding and resampling (``F.pad`` in every mode, ``F.interpolate`` / ``nn.Upsample`` in every mode): linear maps
that act on each padded or resampled axis alike and independently, so their norm is exact and cheap.

Both ops are separable: the map is ``A = A_1 (x) A_2 (x) ... (x) A_k`` on the last ``k`` axes (each ``A_d`` a
1-D map along axis ``d``), the identity on the axes before them, and ``sigma_1(A) = prod_d sigma_1(A_d)`` (the
singular values of a Kronecker product are the products of its factors'). Each ``A_d`` is read off torch's own op
applied to a 1-D probe, so the norm follows torch's index arithmetic (reflection, wrap-around, ``align_corners``,
scale factors) rather than a re-derivation of it:

* padding copies one input entry into each output entry (or writes a constant), so ``A_d^T A_d`` is diagonal,
  holding how many outputs read each input: ``sigma_1(A_d) = sqrt(max_j n_j)``, exactly (``n_j`` counted on
  integer indices). Constant padding is an embedding (or a crop): norm 1.
* nearest resampling likewise copies one input per output: ``sqrt(max_j n_j)`` exactly, ``sqrt(s)`` for an
  integer scale ``s`` (``sqrt(s^k)`` on ``k`` axes). Linear, cubic, area and antialiased resampling mix
  inputs: ``sigma_1(A_d)`` of the ``n_out x n_in`` float64 matrix by SVD, rounded upwards by
  ``16 max(n_in, n_out) eps ||A_d||``, above the error ``p(n) eps ||A_d||`` of a backward-stable SVD.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, LinearOp, NodeInfo
from .registry import register_rule

_EPS = torch.finfo(torch.float64).eps


def _copy_norm(matrix: Tensor) -> float | None:
    """``sqrt(max_j ||A e_j||^2)``, exact, for a 0/1 matrix with at most one 1 per row (``A^T A`` diagonal);
    ``None`` for any other matrix."""
    if not bool(((matrix == 0) | (matrix == 1)).all()) or bool(((matrix != 0).sum(dim=1) > 1).any()):
        return None
    return math.sqrt(float(matrix.sum(dim=0).max()))


def _svd_norm(matrix: Tensor) -> float:
    """``sigma_1`` of a float64 matrix by SVD, rounded upwards past the SVD's backward error."""
    sigma = float(torch.linalg.matrix_norm(matrix, 2))
    return sigma * (1.0 + 16.0 * max(matrix.shape) * _EPS)


@lru_cache(maxsize=None)
def _pad_axis_norm(mode: str, size: int, before: int, after: int) -> float:
    """``sigma_1`` of ``F.pad(., (before, after), mode)`` along one axis of ``size`` entries (reflect, replicate,
    circular): the square root of the most outputs that copy one input, read from torch's padding of the indices."""
    index = F.pad(torch.arange(size, dtype=torch.float64).view(1, 1, size), (before, after), mode=mode)
    counts = torch.bincount(index.flatten().long(), minlength=size)
    return math.sqrt(int(counts.max()))


class Pad(LinearOp):
    """``F.pad(x, pad, mode, value)``: ``pad = (left_k, right_k, left_{k-1}, right_{k-1}, ...)`` pads the last
    axes, last first. The constant (``value``) drops out of the linear part; constant padding is an isometric
    embedding (a crop where amounts are negative), whose adjoint is the crop (padding by the negated amounts)."""

    def __init__(self, pad: Sequence[int], mode: str) -> None:
        super().__init__(homogeneous=True)
        self.pad, self.mode = tuple(int(p) for p in pad), mode
        self.isometry = mode == "constant"

    def describe(self) -> str:
        return f"Pad({self.mode})"

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        if self.mode == "constant":
            return F.pad(v, self.pad, mode="constant", value=0.0)
        return F.pad(v, self.pad, mode=self.mode)

    def has_adjoint(self, info: NodeInfo) -> bool:
        return self.mode == "constant"

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return F.pad(u, tuple(-p for p in self.pad), mode="constant", value=0.0)

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        if self.mode == "constant":
            return torch.ones((), dtype=dtype, device=call.device)
        shape = info.in_shapes[0]
        norm = math.prod(_pad_axis_norm(self.mode, shape[-1 - k], self.pad[2 * k], self.pad[2 * k + 1])
                         for k in range(len(self.pad) // 2))
        return torch.full((), norm, dtype=dtype, device=call.device)


def _functional_pad(info: NodeInfo) -> Pad:
    return Pad(info.arg(1, "pad"), str(info.arg(2, "mode", "constant")))


def _pad_module(mode: str) -> Callable[[NodeInfo], Pad]:
    return lambda info: Pad(info.module.padding, mode)


@lru_cache(maxsize=None)
def _resample_axis_norm(mode: str, dims: int, n_in: int, n_out: int, scale: float | None,
                        align_corners: bool | None, recompute_scale_factor: bool | None, antialias: bool) -> float:
    """``sigma_1(A_d)`` of ``F.interpolate`` along one axis of ``n_in`` entries resampled to ``n_out``, by the
    size (``scale=None``) or by the scale factor ``scale``: the op is run on the ``n_in`` unit vectors along the
    last of ``dims`` spatial axes, the others of size 1 (where every mode is the identity)."""
    probe = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, *([1] * (dims - 1)), n_in)
    size = None if scale is not None else [1] * (dims - 1) + [n_out]
    scales = None if scale is None else [1.0] * (dims - 1) + [scale]
    extra = {"antialias": True} if antialias else {}
    out = F.interpolate(probe, size=size, scale_factor=scales, mode=mode, align_corners=align_corners,
                        recompute_scale_factor=recompute_scale_factor, **extra)
    matrix = out.reshape(n_in, n_out).T
    exact = _copy_norm(matrix)
    return _svd_norm(matrix) if exact is None else exact


class Resample(LinearOp):
    """``F.interpolate`` (``nn.Upsample``...): separable, its norm the product of the per-axis norms (module
    docstring); applied by the op itself, its adjoint from autograd."""

    def __init__(self, mode: str, scale_factor: Any, align_corners: bool | None,
                 recompute_scale_factor: bool | None, antialias: bool) -> None:
        super().__init__(homogeneous=True)
        self.mode, self.scale_factor, self.align_corners = mode, scale_factor, align_corners
        self.recompute_scale_factor, self.antialias = recompute_scale_factor, bool(antialias)

    def describe(self) -> str:
        return f"Resample({self.mode})"

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        in_sizes, out_sizes = info.in_shapes[0][2:], info.out_shape[2:]
        dims = len(in_sizes)
        scales = self.scale_factor if isinstance(self.scale_factor, (tuple, list)) else [self.scale_factor] * dims
        norm = math.prod(
            _resample_axis_norm(self.mode, dims, n_in, n_out, None if s is None else float(s), self.align_corners,
                                self.recompute_scale_factor, self.antialias)
            for n_in, n_out, s in zip(in_sizes, out_sizes, scales))
        return torch.full((), norm, dtype=dtype, device=call.device)


def _interpolate(info: NodeInfo) -> Resample:
    return Resample(str(info.arg(3, "mode", "nearest")), info.arg(2, "scale_factor"), info.arg(4, "align_corners"),
                    info.arg(5, "recompute_scale_factor"), bool(info.arg(6, "antialias", False)))


def _upsample(info: NodeInfo) -> Resample:
    m = info.module
    return Resample(str(m.mode), m.scale_factor, m.align_corners, m.recompute_scale_factor, False)


for _target in (F.pad, torch._C._nn.pad):
    register_rule(_target, _functional_pad)
register_rule(torch.constant_pad_nd, lambda info: Pad(info.arg(1, "pad"), "constant"))
register_rule(nn.modules.padding._ConstantPadNd, _pad_module("constant"))
register_rule(nn.modules.padding._ReflectionPadNd, _pad_module("reflect"))
register_rule(nn.modules.padding._ReplicationPadNd, _pad_module("replicate"))
register_rule(nn.modules.padding._CircularPadNd, _pad_module("circular"))
register_rule(F.interpolate, _interpolate)
register_rule(nn.Upsample, _upsample)

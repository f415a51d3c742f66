"""The geometry of torch's convolutions and transposed convolutions as torch computes them (sizes, padding
pairs), and the layer as a float64 function, for the certificates of :mod:`lipreg.linalg.conv`."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ConvLayer", "LayerGeometry", "layer_geometry"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _expand(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """An int or a length-``dims`` sequence of ints, as a ``dims``-tuple."""
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    if len(out) != dims:
        raise ValueError(f"{name} must be an int or have {dims} entries, got {value!r}")
    return out


def _resolve_padding(
    padding: str | int | Sequence[int], extents: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """(left, right) padding per axis as torch applies it; 'same' pads extent-1 with the extra
    element on the right (left = (extent-1)//2), 'valid' pads nothing; a tuple of (left, right) pairs is taken as
    it is (what a module of a non-zeros mode pads with: its ``_reversed_padding_repeated_twice``, reversed)."""
    if not isinstance(padding, (str, int)) and all(isinstance(p, (tuple, list)) for p in padding):
        pairs = tuple((int(left), int(right)) for left, right in padding)
        if len(pairs) != len(extents) or min(min(pair) for pair in pairs) < 0:
            raise ValueError(f"padding pairs {padding!r} do not fit {len(extents)} axes")
        return pairs
    if padding == "valid":
        return tuple((0, 0) for _ in extents)
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        return tuple(((e - 1) // 2, e - 1 - (e - 1) // 2) for e in extents)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")  # noqa: TRY004
    return tuple((p, p) for p in _expand(padding, len(extents), "padding"))


@dataclass(frozen=True)
class LayerGeometry:
    """Per-axis sizes of a conv layer; for a transposed layer, ``conv_in`` / ``conv_out`` are those
    of the (non-transposed) conv it is the adjoint of: conv_in = the transposed layer's output."""

    input_shape: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]
    conv_in: tuple[int, ...]
    conv_out: tuple[int, ...]


def layer_geometry(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int | Sequence[int],
    padding: str | int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    padding_mode: str,
    transposed: bool,
    output_padding: int | Sequence[int],
) -> LayerGeometry:
    """Validate the hyper-parameters as torch does and compute the sizes (ValueError if invalid).

    Transposed: output size (n-1)*s - l - r + extent + output_padding per axis; a conv with the
    same weight, stride, padding and dilation maps that size back to n + output_padding // s rows.
    """
    dims = weight.dim() - 2
    if dims not in (1, 2, 3):
        raise ValueError(f"weight must have 3, 4 or 5 dims, got shape {tuple(weight.shape)}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"weight.shape[0]={weight.shape[0]} is not divisible by groups={groups}")
    shape = _expand(input_shape, dims, "input_shape")
    stride_t = _expand(stride, dims, "stride")
    dilation_t = _expand(dilation, dims, "dilation")
    extents = tuple(d * (k - 1) + 1 for d, k in zip(dilation_t, weight.shape[2:]))
    pad = _resolve_padding(padding, extents, stride_t)
    conv_in = shape
    if transposed:
        if padding_mode != "zeros" or isinstance(padding, str):
            raise ValueError("transposed convolutions support only padding_mode='zeros' and int/tuple padding")
        out_pad = _expand(output_padding, dims, "output_padding")
        if any(op >= max(s, d) for op, s, d in zip(out_pad, stride_t, dilation_t)):
            raise ValueError("output_padding must be smaller than either stride or dilation")
        conv_in = tuple(
            (n - 1) * s - l - r + e + op for n, s, (l, r), e, op in zip(shape, stride_t, pad, extents, out_pad)
        )
    if min(conv_in) < 1 or any(n + l + r < e for n, (l, r), e in zip(conv_in, pad, extents)):
        raise ValueError(f"kernel extent {extents} does not fit input {conv_in} padded by {pad}")
    conv_out = tuple((n + l + r - e) // s + 1 for n, (l, r), e, s in zip(conv_in, pad, extents, stride_t))
    return LayerGeometry(shape, stride_t, dilation_t, pad, conv_in, conv_out)


@dataclass(frozen=True)
class ConvLayer:
    """A conv (or transposed conv) layer with float64 weight ``w64``, as torch's modules compute it."""

    w64: Tensor
    geometry: LayerGeometry
    padding: str | int | Sequence[int]
    groups: int
    padding_mode: str
    transposed: bool
    output_padding: int | Sequence[int]

    def scaled(self, w64: Tensor) -> ConvLayer:
        """The same layer with another weight (the scaled one)."""
        return dataclasses.replace(self, w64=w64)

    def op(self, weight: Tensor | None = None, groups: int | None = None) -> Callable[[Tensor], Tensor]:
        """The linear part (of this layer, or of the same geometry with another ``weight`` and ``groups``) as a
        function of a batched float64 input, exactly as nn.Conv*/nn.ConvTranspose* compute it (non-zeros modes:
        F.pad, then a valid conv)."""
        w = self.w64 if weight is None else weight
        g = self.groups if groups is None else groups
        dims = w.dim() - 2
        stride, dilation = self.geometry.stride, self.geometry.dilation
        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
            return lambda x: fn(x, w, None, stride, self.padding, self.output_padding, g, dilation)
        fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        if self.padding_mode == "zeros" and all(left == right for left, right in self.geometry.pad):
            return lambda x: fn(x, w, None, stride, tuple(left for left, _ in self.geometry.pad), dilation, g)
        torch_pad = tuple(p for pair in reversed(self.geometry.pad) for p in pair)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return lambda x: fn(F.pad(x, torch_pad, mode=mode), w, None, stride, 0, dilation, g)

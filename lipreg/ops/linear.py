"""Linear (affine) layers, module and functional forms. The rule returns the linear part ``A v`` (bias dropped).

Batch norm is bounded as the function it computes in eval mode, ``x -> gamma (x - mu) / sqrt(var + eps) + beta``
with the running statistics: in training mode the output depends on the whole batch and no per-sample
Lipschitz constant exists. Dropout (in :mod:`.structural`) is likewise taken at eval, as the identity.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linalg.maps import ConvGeometry, OneSignMap, WeightedMap
from .base import Call, LinearOp, NodeInfo, Refuse
from .registry import register_rule


class DenseLinear(LinearOp):
    """``nn.Linear``: ``v -> W v``."""

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return F.linear(v, info.module.weight.to(v.dtype))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        """``W^T u``, as ``u W`` on the last axis."""
        return u @ info.module.weight.to(u.dtype)

    def structure(self, info: NodeInfo, call: Call) -> WeightedMap:
        return WeightedMap(info.module.weight, info.in_shapes[0])


def _spatial(info: NodeInfo) -> torch.Size:
    """The sizes an n-d convolution runs over: the input's last n (torch takes ``(C, *spatial)`` as unbatched)."""
    return info.in_shapes[0][2 - info.module.weight.dim():]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _per_dim(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def explicit_padding(padding: Any) -> bool:
    """Whether a convolution's ``padding`` is a number per dimension (``'valid'`` is 0) rather than ``'same'``,
    which may pad one side more than the other: then the adjoint is left to autograd."""
    return not isinstance(padding, str) or padding == "valid"


def conv_adjoint(u: Tensor, weight: Tensor, in_spatial: Sequence[int], stride: Any, padding: Any, dilation: Any,
                 groups: int) -> Tensor:
    """``A^T u`` of the zero-padded convolution ``A = conv(., weight, stride, padding, dilation, groups)`` on inputs
    of spatial size ``in_spatial``: the transposed convolution with the same parameters, whose ``output_padding``
    ``(i + 2p - d (k - 1) - 1) mod s`` per dimension restores the input rows the strided windows never reach
    (the convolution's output size floors them away), so the result has exactly the input's size."""
    n = weight.dim() - 2
    params = _transposed_params(tuple(in_spatial), tuple(weight.shape[2:]), _per_dim(stride, n),
                                (0,) * n if padding == "valid" else _per_dim(padding, n), _per_dim(dilation, n))
    return _CONV_TRANSPOSE[n](u, weight, None, *params[:3], groups, params[3])


@functools.lru_cache(maxsize=1024)
def _transposed_params(in_spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                       padding: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """``(stride, padding, output_padding, dilation)`` of the transposed convolution in :func:`conv_adjoint`."""
    output_padding = tuple((i + 2 * p - d * (k - 1) - 1) % s
                           for i, k, s, p, d in zip(in_spatial, kernel, stride, padding, dilation))
    return stride, padding, output_padding, dilation


def conv_transpose_adjoint(u: Tensor, weight: Tensor, in_spatial: Sequence[int], stride: Any, padding: Any,
                           dilation: Any, groups: int) -> Tensor:
    """``A^T u`` of the transposed convolution ``A = conv_transpose(., weight, ...)`` (any ``output_padding``) on
    inputs of spatial size ``in_spatial``: the convolution with the same parameters. The rows ``output_padding``
    adds past the last window take part in no window of the stride grid, so it drops them; where ``dilation``
    exceeds ``stride`` the convolution may give extra trailing outputs, which belong to no input and are cut."""
    n = weight.dim() - 2
    out = _CONV[n](u, weight, None, stride, padding, dilation, groups)
    for axis, size in zip(range(-n, 0), in_spatial):
        out = out.narrow(axis, 0, size)
    return out


class Convolution(LinearOp):
    """``nn.Conv{1,2,3}d`` with any stride, padding (all modes), dilation and groups: the conv without bias."""

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        module = info.module
        return module._conv_forward(v, module.weight.to(v.dtype), None)

    def has_adjoint(self, info: NodeInfo) -> bool:
        """Zero padding by numbers: the other modes (reflect, replicate, circular) and ``'same'`` go to autograd."""
        return info.module.padding_mode == "zeros" and explicit_padding(info.module.padding)

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        m = info.module
        return conv_adjoint(u, m.weight.to(u.dtype), _spatial(info), m.stride, m.padding, m.dilation, m.groups)

    def structure(self, info: NodeInfo, call: Call) -> WeightedMap:
        m = info.module
        geometry = ConvGeometry(m.stride, applied_padding(m), m.dilation, m.groups, m.padding_mode)
        return WeightedMap(m.weight, info.in_shapes[0], geometry)


def applied_padding(module: nn.modules.conv._ConvNd) -> Any:
    """The padding torch applies: ``.padding`` for zeros (passed to the functional conv), else the private
    ``_reversed_padding_repeated_twice`` that ``_conv_forward`` pads with, fixed at construction (a ``.padding``
    set later is not what the module computes), as (left, right) pairs in axis order."""
    if module.padding_mode == "zeros":
        return module.padding
    flat = module._reversed_padding_repeated_twice
    return tuple(reversed([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]))


class TransposedConvolution(LinearOp):
    """``nn.ConvTranspose{1,2,3}d``: the adjoint of a convolution, with the module's ``output_padding``."""

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        m = info.module
        conv_t = _CONV_TRANSPOSE[m.weight.dim() - 2]
        return conv_t(v, m.weight.to(v.dtype), None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        m = info.module
        return conv_transpose_adjoint(u, m.weight.to(u.dtype), _spatial(info), m.stride, m.padding, m.dilation,
                                      m.groups)

    def structure(self, info: NodeInfo, call: Call) -> WeightedMap:
        m = info.module
        geometry = ConvGeometry(m.stride, m.padding, m.dilation, m.groups, transposed=True,
                                output_padding=m.output_padding)
        return WeightedMap(m.weight, info.in_shapes[0], geometry)


def batch_norm_scale(module: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype) -> Tensor:
    """The per-channel gain ``gamma / sqrt(running_var + eps)`` of an eval-mode batch norm."""
    scale = torch.rsqrt(module.running_var.to(dtype) + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.to(dtype)
    return scale


def _per_channel(gains: Tensor, ndim: int) -> Tensor:
    """Channel gains shaped ``(1, C, 1, ...)`` to multiply a batched ``ndim``-dim tensor."""
    return gains.view(1, -1, *([1] * (ndim - 2)))


class BatchNorm(LinearOp):
    """Eval-mode ``nn.BatchNorm{1,2,3}d``: the diagonal map ``v -> diag(gamma / sqrt(var + eps)) v``, norm
    ``max_c |gamma_c| / sqrt(var_c + eps)``."""

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        scale = call.memo((v.dtype, v.dim()), lambda: _per_channel(batch_norm_scale(info.module, v.dtype), v.dim()))
        return v * scale

    def multiplier(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        return _per_channel(batch_norm_scale(info.module, dtype), len(info.out_shape))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        """A diagonal map is its own adjoint."""
        return self.apply(info, call, u)

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        return batch_norm_scale(info.module, dtype).abs().max()


def _batch_norm_rule(info: NodeInfo) -> LinearOp | Refuse:
    if info.module.running_var is None:
        return Refuse(
            "BatchNorm with track_running_stats=False normalises with the statistics of each batch, so the output "
            "of one sample depends on the others and there is no per-sample Lipschitz constant"
        )
    return BatchNorm()


class FunctionalLinear(LinearOp):
    """``F.linear(x, weight, bias)`` with a constant ``weight``: ``v -> W v``, adjoint ``u -> W^T u``."""

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return F.linear(v, call.arg_value(1, "weight").to(v.dtype))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        return u @ call.arg_value(1, "weight").to(u.dtype)

    def structure(self, info: NodeInfo, call: Call) -> WeightedMap:
        """The weight as the graph computes it from the parameters (a computed weight included)."""
        return WeightedMap(call.arg_value(1, "weight"), info.in_shapes[0])


class FunctionalConvolution(LinearOp):
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` with a constant ``weight`` (read from
    the parameters, or computed from them: weight standardisation): the convolution without bias, adjoint the
    transposed convolution (:func:`conv_adjoint`) for numeric padding, autograd's for ``'same'``."""

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def _params(self, info: NodeInfo) -> tuple[Any, Any, Any, int]:
        return (info.arg(3, "stride", 1), info.arg(4, "padding", 0), info.arg(5, "dilation", 1),
                int(info.arg(6, "groups", 1)))

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        weight = call.arg_value(1, "weight").to(v.dtype)
        return _CONV[weight.dim() - 2](v, weight, None, *self._params(info))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return explicit_padding(info.arg(4, "padding", 0))

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        weight = call.arg_value(1, "weight").to(u.dtype)
        return conv_adjoint(u, weight, info.in_shapes[0][2 - weight.dim():], *self._params(info))

    def structure(self, info: NodeInfo, call: Call) -> WeightedMap:
        stride, padding, dilation, groups = self._params(info)
        return WeightedMap(call.arg_value(1, "weight"), info.in_shapes[0],
                           ConvGeometry(stride, padding, dilation, groups))


_LINEAR_SIGNATURE = ("input", "weight", "bias")


def _functional_linear(info: NodeInfo) -> LinearOp:
    """``F.linear`` with the input in ``input`` (the weight a constant): :class:`FunctionalLinear`; otherwise the
    generic affine rule."""
    return FunctionalLinear() if info.x_positions(_LINEAR_SIGNATURE) == [0] else LinearOp()


def _functional_convolution(info: NodeInfo) -> LinearOp:
    """``F.conv*d`` with the input in ``input``: :class:`FunctionalConvolution`; otherwise the generic affine
    rule."""
    return FunctionalConvolution() if info.x_positions(_LINEAR_SIGNATURE) == [0] else LinearOp()


_BATCH_NORM_SIGNATURE = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class FunctionalBatchNorm(LinearOp):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, momentum, eps)``: the diagonal map
    ``v -> v * weight / sqrt(running_var + eps)`` on the channels (axis 1, as torch reads them), folded into a
    neighbouring convolution or linear layer as the module's is."""

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return v * call.memo((v.dtype, v.dim()), lambda: self._gains(info, call, v.dtype, v.dim()))

    def _gains(self, info: NodeInfo, call: Call, dtype: torch.dtype, ndim: int) -> Tensor:
        scale = torch.rsqrt(call.arg_value(2, "running_var").to(dtype) + float(info.arg(7, "eps", 1e-5)))
        weight = call.arg_value(3, "weight")
        if weight is not None:
            scale = scale * weight.to(dtype)
        return _per_channel(scale, ndim)

    def multiplier(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        return self._gains(info, call, dtype, len(info.out_shape))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        """A diagonal map is its own adjoint."""
        return self.apply(info, call, u)

    def closed_form_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        return self.multiplier(info, call, dtype).abs().max()


def _functional_batch_norm(info: NodeInfo) -> LinearOp | Refuse:
    if info.arg(5, "training", False):
        return Refuse("F.batch_norm with training=True uses batch statistics: no per-sample Lipschitz constant")
    if info.x_positions(_BATCH_NORM_SIGNATURE) == [0] and info.arg(2, "running_var") is not None:
        return FunctionalBatchNorm()
    return LinearOp()


register_rule(nn.Linear, DenseLinear())
for _target in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # each overrides _ConvNd's methods: registered itself
    register_rule(_target, Convolution())
def _transposed_convolution(info: NodeInfo) -> LinearOp:
    """A call with ``output_size`` implies its own output padding: then the generic affine rule (the module's
    own call) rather than the module's ``output_padding``."""
    if info.arg(1, "output_size") is not None:
        return LinearOp()
    return TransposedConvolution()


for _target in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_target, _transposed_convolution)
for _target in (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm):  # SyncBatchNorm: its own forward, the same at eval
    register_rule(_target, _batch_norm_rule)
register_rule(F.batch_norm, _functional_batch_norm)

# Affine functions of one input-dependent argument; the generic rule subtracts the value at 0 (drops the bias).
register_rule(F.linear, _functional_linear)
for _target in (F.conv1d, F.conv2d, F.conv3d):
    register_rule(_target, _functional_convolution)
for _target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    register_rule(_target, LinearOp())

# Padding (constant, reflect, replicate, circular) is affine; reflect/replicate/circular repeat entries, so the
# norm can exceed 1 (the power method finds it, or the fused operator's when a convolution follows).
for _target in (F.pad, nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd):
    register_rule(_target, LinearOp())

class Averaging(LinearOp):
    """Average pooling (plain or adaptive), means and sums: linear maps whose entries all have one sign.

    Every entry of these ops is ``1/d >= 0`` for its window's divisor ``d``, except for average pools with a
    negative ``divisor_override``, whose entries are all ``<= 0``: described as a
    :class:`~lipreg.linalg.maps.OneSignMap`, certified by the Schur test (:func:`lipreg.linalg.certify.schur_bound`):
    exact for non-overlapping pools (``1/sqrt(k)`` for k inputs per window), ``ceil(k/s)/k`` per dimension for
    k-wide windows of stride s, whatever the padding, ``ceil_mode`` or ``count_include_pad``.
    """

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def structure(self, info: NodeInfo, call: Call) -> OneSignMap:
        return OneSignMap(lambda v: self.apply(info, call, v), info.in_shapes[0], call.device)


for _target in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, "mean", torch.sum, "sum"):
    register_rule(_target, Averaging())

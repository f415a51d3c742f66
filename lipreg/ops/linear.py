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

from ..linalg.certify import certified_cast, dense_spectral_bound, fold_channel_gains
from ..linalg.conv import conv_spectral_bound
from ..policy import BoundPolicy
from .base import Call, LinearOp, NodeInfo, Refuse
from .registry import register_rule


class WeightedOp(LinearOp):
    """A linear op given by a weight (``nn.Linear``, convolutions) whose certificate (:mod:`lipreg.linalg.certify`) can
    absorb per-channel diagonal factors on both sides: the certified norm of ``diag(after) A diag(before)`` is that
    of one operator, its weight with the gains folded in (:func:`~lipreg.linalg.certify.fold_channel_gains`), instead of
    the product ``max|after| ||A|| max|before||``, which is loose when the gains are spread out."""

    channel_axis = 1
    """The axis of the (batched) input and output that the weight mixes; every other axis is acted on alike."""

    def certified_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        return self.folded_norm(info, dtype, None, None)

    def folded_norm(self, info: NodeInfo, dtype: torch.dtype, before: Tensor | None, after: Tensor | None,
                    policy: BoundPolicy = BoundPolicy()) -> Tensor:
        """Certified ``sigma_1(diag(after) A diag(before))``, ``before`` / ``after`` gains per input / output channel
        (``None``: 1), computed from the weight in ``dtype``, with the size limits of ``policy``."""
        raise NotImplementedError

    def channel_gains(self, multiplier: Tensor, shape: torch.Size) -> Tensor | None:
        """The per-channel gains of the diagonal map ``v -> multiplier * v`` on inputs of ``shape`` (batch of one),
        or ``None`` when it is not constant along the axes other than :attr:`channel_axis`."""
        full = torch.broadcast_to(multiplier, shape).movedim(self.channel_axis, 0)
        gains = full.reshape(full.shape[0], -1)
        return gains[:, 0] if bool((gains == gains[:, :1]).all()) else None


class DenseLinear(WeightedOp):
    """``nn.Linear``: ``v -> W v``."""

    channel_axis = -1

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        return F.linear(v, info.module.weight.to(v.dtype))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        """``W^T u``, as ``u W`` on the last axis."""
        return u @ info.module.weight.to(u.dtype)

    def folded_norm(self, info: NodeInfo, dtype: torch.dtype, before: Tensor | None, after: Tensor | None,
                    policy: BoundPolicy = BoundPolicy()) -> Tensor:
        """``sigma_1(diag(after) W diag(before))`` exactly or by Gram iteration (an upper bound at every iterate)."""
        weight = fold_channel_gains(info.module.weight.to(dtype), 1, after, before)
        return dense_spectral_bound(weight, exact_max_dim=policy.exact_eig_max_dim(weight.device.type))


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


class Convolution(WeightedOp):
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

    def folded_norm(self, info: NodeInfo, dtype: torch.dtype, before: Tensor | None, after: Tensor | None,
                    policy: BoundPolicy = BoundPolicy()) -> Tensor:
        """The FFT bound of Sedghi et al. (2019) on the circular embedding of the convolution."""
        m = info.module
        weight = fold_channel_gains(m.weight.to(dtype), m.groups, after, before)
        return conv_spectral_bound(weight, _spatial(info), stride=m.stride, padding=m.padding,
                                   dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
                                   dense_max_entries=policy.conv_dense_entries)


class TransposedConvolution(WeightedOp):
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

    def folded_norm(self, info: NodeInfo, dtype: torch.dtype, before: Tensor | None, after: Tensor | None,
                    policy: BoundPolicy = BoundPolicy()) -> Tensor:
        """The FFT bound of the adjoint convolution (adjoints have equal norms)."""
        m = info.module
        weight = fold_channel_gains(m.weight.to(dtype), m.groups, before, after)
        return conv_spectral_bound(weight, _spatial(info), stride=m.stride, padding=m.padding,
                                   dilation=m.dilation, groups=m.groups, transposed=True,
                                   output_padding=m.output_padding,
                                   dense_max_entries=policy.conv_dense_entries)


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


class FunctionalConvolution(LinearOp):
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` with a constant ``weight`` and numeric
    padding: the convolution without bias, adjoint the transposed convolution (:func:`conv_adjoint`)."""

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def _params(self, info: NodeInfo) -> tuple[Any, Any, Any, int]:
        return (info.arg(3, "stride", 1), info.arg(4, "padding", 0), info.arg(5, "dilation", 1),
                int(info.arg(6, "groups", 1)))

    def apply(self, info: NodeInfo, call: Call, v: Tensor) -> Tensor:
        weight = call.arg_value(1, "weight").to(v.dtype)
        return _CONV[weight.dim() - 2](v, weight, None, *self._params(info))

    def has_adjoint(self, info: NodeInfo) -> bool:
        return True

    def adjoint(self, info: NodeInfo, call: Call, u: Tensor) -> Tensor:
        weight = call.arg_value(1, "weight").to(u.dtype)
        return conv_adjoint(u, weight, info.in_shapes[0][2 - weight.dim():], *self._params(info))


_LINEAR_SIGNATURE = ("input", "weight", "bias")


def _functional_linear(info: NodeInfo) -> LinearOp:
    """``F.linear`` with the input in ``input`` (the weight a constant): :class:`FunctionalLinear`; otherwise the
    generic affine rule."""
    return FunctionalLinear() if info.x_positions(_LINEAR_SIGNATURE) == [0] else LinearOp()


def _functional_convolution(info: NodeInfo) -> LinearOp:
    """``F.conv*d`` with the input in ``input`` and numeric padding: :class:`FunctionalConvolution`; otherwise the
    generic affine rule."""
    if info.x_positions(_LINEAR_SIGNATURE) == [0] and explicit_padding(info.arg(4, "padding", 0)):
        return FunctionalConvolution()
    return LinearOp()


def _functional_batch_norm(info: NodeInfo) -> LinearOp | Refuse:
    if info.arg(5, "training", False):
        return Refuse("F.batch_norm with training=True uses batch statistics: no per-sample Lipschitz constant")
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

    Certified by the Schur test: ``||A||_2 <= sqrt(max_i (|A| 1)_i * max_j (|A|^T 1)_j)``, the largest absolute
    row sum times the largest absolute column sum. Every entry of these ops is ``1/d >= 0`` for its window's
    divisor ``d``, except for average pools with a negative ``divisor_override``, whose entries are all ``<= 0``;
    with one sign, ``|A| 1 = |A 1|`` and ``|A|^T 1 = |A^T 1|``, both read off one application of ``A`` and ``A^T``
    to ones. Exact for non-overlapping pools (``1/sqrt(k)`` for k inputs per window), ``ceil(k/s)/k`` per dimension
    for k-wide windows of stride s, whatever the padding, ``ceil_mode`` or ``count_include_pad``.
    These ops have no weights: the sums are taken in float64 and the bound rounded upwards into ``dtype``.
    """

    def __init__(self) -> None:
        super().__init__(homogeneous=True)

    def certified_norm(self, info: NodeInfo, call: Call, dtype: torch.dtype) -> Tensor:
        ones = torch.ones(info.in_shapes[0], dtype=torch.float64, device=call.device, requires_grad=True)
        with torch.enable_grad():
            out = self.apply(info, call, ones)
            (column_sums,) = torch.autograd.grad(out, ones, torch.ones_like(out))
        return certified_cast(torch.sqrt(out.detach().abs().max() * column_sums.abs().max()), dtype)


for _target in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, "mean", torch.sum, "sum"):
    register_rule(_target, Averaging())

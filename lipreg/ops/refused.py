"""Ops that are refused with a reason rather than given a made-up constant."""
from __future__ import annotations

import operator

import torch
import torch.ao.nn.intrinsic.qat
import torch.ao.nn.qat
import torch.ao.nn.qat.dynamic
import torch.ao.quantization
import torch.nn.functional as F
from torch import nn

from .base import Refuse
from .registry import register_rule

_NORMALISATION = (
    "{name} divides by the input's own standard deviation, so its Lipschitz constant is unbounded near constant "
    "inputs; lipreg will not assume one. If your inputs keep the variance above a floor, register the bound you "
    "derive"
)
for _target, _name in ((nn.LayerNorm, "LayerNorm"), (F.layer_norm, "layer_norm"), (nn.GroupNorm, "GroupNorm"),
                       (F.group_norm, "group_norm"), (nn.InstanceNorm1d, "InstanceNorm"),
                       (nn.InstanceNorm2d, "InstanceNorm"), (nn.InstanceNorm3d, "InstanceNorm")):
    register_rule(_target, Refuse(_NORMALISATION.format(name=_name)))

_ATTENTION = (
    "attention multiplies input-dependent queries, keys and values, so it is not globally Lipschitz "
    "(Kim et al. 2021, 'The Lipschitz constant of self-attention')"
)
for _target in (nn.MultiheadAttention, F.scaled_dot_product_attention):
    register_rule(_target, Refuse(_ATTENTION))

for _target, _name in ((torch.exp, "exp"), ("exp", "exp"), (torch.pow, "pow"), ("pow", "pow"),
                       (operator.pow, "pow"), ("__pow__", "pow"),
                       (torch.square, "square"), ("square", "square")):
    register_rule(_target, Refuse(f"{_name} has an unbounded derivative: it is not globally Lipschitz"))

_FAKE_QUANT = (
    "fake quantization rounds to a grid: a step function, which jumps at every grid point, so it is not Lipschitz. "
    "Bound the float model (before torch.ao.quantization.prepare_qat / prepare), or a float copy of it"
)
_QAT = (
    "a quantization-aware module fake-quantizes its weight (a step function of it) and computes more than its "
    "float parent (the ConvBn / LinearBn fusions fold batch norm into the weight), so no float rule bounds it. "
    "Bound the float model before torch.ao.quantization.prepare_qat, or its float version after training "
    "(module.to_float())"
)
for _target in (torch.ao.quantization.FakeQuantizeBase, torch.ao.quantization.ObserverBase,
                torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine):
    register_rule(_target, Refuse(_FAKE_QUANT))
for _namespace in (torch.ao.nn.qat, torch.ao.nn.qat.dynamic, torch.ao.nn.intrinsic.qat):
    for _target in vars(_namespace).values():
        if isinstance(_target, type) and issubclass(_target, nn.Module):
            register_rule(_target, Refuse(_QAT))

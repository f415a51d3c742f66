"""Regressions found by the soundness fuzz (``python -m tests.fuzz.soundness``), each minimised to a small model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg


class _FlipClampNativeShuffle(nn.Module):
    """``x.flip(2) -> clamp(max=1) -> torch.native_channel_shuffle(., 3)``: permutations around a clamp, constant 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_channel_shuffle(x.flip(2).clamp(max=1.0), 3)


@pytest.mark.parametrize("fuse", [True, False])
def test_liplt_certifies_a_native_channel_shuffle_after_an_activation(fuse: bool) -> None:
    model = _FlipClampNativeShuffle().eval()
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 3, 4), method="liplt", fuse=fuse)
    assert float(est.certified_bound()) >= 1.0  # a spike below the clamp on one entry moves one output by as much


class _NativeShuffleThenSum(nn.Module):
    """``elu -> torch.native_channel_shuffle(., 3) -> sum(1)``: one linear node of a shuffle and a sum (norm sqrt 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_channel_shuffle(torch.nn.functional.elu(x), 3).sum(1)


def test_autolip_certifies_a_native_channel_shuffle_fused_with_a_sum() -> None:
    est = lipreg.LipschitzEstimator(_NativeShuffleThenSum().eval(), torch.randn(2, 3, 4), method="autolip")
    assert float(est.certified_bound()) >= 3 ** 0.5  # sum over 3 channels: a constant direction gains sqrt(3)

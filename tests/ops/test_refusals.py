"""Refusals name the op that truly blocks a model, after every node has been seen, with a sound fix: an op whose
rule refuses it (a product of input-dependent tensors, LayerNorm, attention, randomness, integer values) comes
before an op that merely lacks a rule, and the hint for a missing rule has no constant to paste."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from tests.ops.model_parts import Lambda, SqueezeExcitation, StochasticDepth

DT = torch.float64


def refusal(model: nn.Module, x: torch.Tensor) -> str:
    with pytest.raises(lipreg.UnsupportedOpError) as error:
        lipreg.LipschitzEstimator(model, x)
    return str(error.value)


def test_mobilenet_v3_block_is_refused_for_its_squeeze_excitation_product():
    block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), SqueezeExcitation(8, 4),
                          nn.Conv2d(8, 4, 1), nn.Hardswish())
    message = refusal(block, torch.randn(2, 3, 8, 8))
    first = message.splitlines()[0]
    assert first.startswith("operator.mul cannot be bounded, used by node '3.mul'"), first
    assert "product of two input-dependent tensors" in first
    assert "Hardswish" not in message and "no Lipschitz rule" not in message


class SineThenLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.sin(x))


def test_a_refused_op_comes_before_an_earlier_op_without_a_rule():
    message = refusal(SineThenLayerNorm(), torch.randn(2, 5))
    first, *rest = message.splitlines()
    assert first.startswith("torch.nn.modules.normalization.LayerNorm cannot be bounded, used by node 'norm'")
    assert "Other ops that block this model too:" in rest
    assert any("no Lipschitz rule for torch.sin" in line for line in rest)


def test_the_other_blockers_are_listed_up_to_ten():
    model = nn.Sequential(nn.Linear(5, 5), *[nn.LayerNorm(5) for _ in range(13)])
    message = refusal(model, torch.randn(2, 5))
    assert message.count("LayerNorm cannot be bounded") == 11 and "... and 2 more" in message


def test_ops_without_a_rule_get_a_hint_with_no_made_up_constant():
    model = Lambda(lambda x: torch.cos(torch.sin(x)))
    message = refusal(model, torch.randn(2, 5))
    assert message.startswith("lipreg has no Lipschitz rule for torch.sin")
    assert "lipreg.register_rule(torch.sin, L)" in message and "Activation(a, b)" in message
    assert "Activation(0.0, 1.0)" not in message and "2.0" not in message
    assert "no Lipschitz rule for torch.cos" in message  # named too, after the first


@pytest.mark.parametrize("fn, words", [
    (lambda x: x.sum(1, dtype=torch.int64), ["'sum'", "torch.int64"]),
    (lambda x: x.view(torch.int64) * 1.0, ["'view'", "bits"]),
    (lambda x: torch.addcmul(x, x, torch.ones(5, dtype=DT)), ["addcmul", "a + value * (b * c)"]),
    (lambda x: torch.addcmul(torch.ones(5, dtype=DT), x, x), ["addcmul", "product of two input-dependent"]),
    (lambda x: torch.cat(x.chunk(5, 1)[::-1], 1), ["'chunk'", "used whole"]),
    (lambda x: F.hardshrink(x, 0.5), ["hardshrink", "jumps by 0.5"]),
    (lambda x: torch.maximum(x[:, :1], 2 * x), ["maximum", "different shapes"]),
    (lambda x: x.max(1).indices * 1.0, ["getattr", "element 1"]),
    (lambda x: x.to(torch.int32) * 1.0, ["'to'", "torch.int32"]),
    (lambda x: F.threshold(x, 0.1, 0.0), ["threshold", "jumps by 0.1"]),
])
def test_refused_ops_name_the_op_and_the_reason(fn, words):
    message = refusal(nn.Sequential(nn.Linear(5, 5), Lambda(fn)).to(DT), torch.randn(2, 5, dtype=DT))
    assert all(word in message.splitlines()[0] for word in words), message


def test_active_stochastic_depth_is_refused_as_random():
    message = refusal(nn.Sequential(nn.Linear(5, 5), StochasticDepth(0.2, "row", always_on=True)),
                      torch.randn(2, 5))
    assert message.startswith("torchvision.ops.stochastic_depth.stochastic_depth cannot be bounded")
    assert "random" in message.splitlines()[0]


@pytest.mark.parametrize("moves", [lambda h: h.T, lambda h: h.mT, lambda h: h.t(), lambda h: h.transpose(0, 1),
                                   lambda h: torch.transpose(h, 1, 0), lambda h: h.permute(1, 0),
                                   lambda h: h.movedim(0, -1)],
                         ids=["T", "mT", "t", "transpose", "torch.transpose", "permute", "movedim"])
def test_a_permutation_that_moves_the_batch_axis_is_refused_with_the_fix(moves):
    """Moving axis 0 of a (B, F) tensor mixes the samples of a batch; lipreg bounds one sample's map: a clear
    refusal (it used to fail with a shape error inside the operators)."""
    model = nn.Sequential(nn.Linear(5, 5), Lambda(lambda h: torch.sigmoid(moves(h)).T), nn.Linear(5, 5))
    with pytest.raises(lipreg.UnsupportedOpError, match="moves the batch axis"):
        lipreg.LipschitzEstimator(model, torch.randn(3, 5))


@pytest.mark.parametrize("keeps", [lambda h: h.unsqueeze(1).mT, lambda h: h.unsqueeze(-1).permute(0, 2, 1),
                                   lambda h: h.view(-1, 5, 1).transpose(1, 2), lambda h: h.unsqueeze(1).movedim(1, 2)],
                         ids=["mT 3-d", "permute", "transpose", "movedim"])
def test_a_permutation_of_per_sample_axes_is_bounded(keeps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), Lambda(lambda h: keeps(h).flatten(1)), nn.Linear(5, 5)).double()
    certified = float(lipreg.LipschitzEstimator(model, torch.randn(3, 5, dtype=torch.float64),
                                                dtype=torch.float64).certified_bound())
    W = model[2].weight.detach() @ model[0].weight.detach()
    assert certified == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-5)


@pytest.mark.parametrize("sorts", [lambda h: torch.msort(h), lambda h: torch.sort(h, 0)[0], lambda h: h.sort(dim=-2).values,
                                   lambda h: torch.topk(h, 1, 0).values],
                         ids=["msort", "sort(dim=0)", "sort(dim=-2)", "topk(dim=0)"])
def test_a_sort_along_the_batch_axis_is_refused(sorts):
    model = nn.Sequential(nn.Linear(5, 5), Lambda(sorts), nn.Linear(5, 5))
    with pytest.raises(lipreg.UnsupportedOpError, match="sorts along axis 0, the batch axis"):
        lipreg.LipschitzEstimator(model, torch.randn(3, 5))


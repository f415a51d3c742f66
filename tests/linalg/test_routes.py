"""The routes of weighted ops on the shapes real networks use (issue 17.2), each against the exact norm of the
node (the SVD of a float64 ``jacrev`` Jacobian): 1x1 convs at any stride, grouped and depthwise convs per group,
convs on small maps, a pooling + flatten + linear node just over the dense limit, and the functional forms
(``F.batch_norm`` at eval, ``F.conv2d`` / ``F.linear`` with a computed weight). Stand-ins of torchvision's blocks
(bottleneck, inverted residual) are built here: nothing may depend on torchvision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from lipreg.linalg.conv import conv_spectral_bound
from tests.ops.functional_model import Fn

DT = torch.float64
PER_OP = lipreg.BoundPolicy(dense_entries=0)  # no dense matrix of a whole node: the weighted op's own route


def node_norms(model: nn.Module, x: torch.Tensor, policy: lipreg.BoundPolicy) -> list[tuple[float, float]]:
    """(certified, exact) of every linear node: exact from the dense Jacobian of its float64 operator."""
    est = lipreg.LipschitzEstimator(model, x, dtype=DT, policy=policy)
    pairs = []
    for operator in est.linear_operators().values():
        exact = float(torch.linalg.matrix_norm(operator.dense().detach(), 2))
        pairs.append((float(operator.certified_norm(policy).detach()), exact))
    return pairs


def assert_exact(pairs: list[tuple[float, float]], rel: float = 2e-6) -> None:
    for certified, exact in pairs:
        assert exact <= certified <= exact * (1 + rel)


def _spread_bn(channels: int, seed: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.exp(2 * torch.rand(channels, generator=generator) - 1))
        bn.running_var.copy_(torch.exp(2 * torch.rand(channels, generator=generator) - 1))
    return bn


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_pointwise_convolution_is_its_matrix_norm(stride, groups, transposed):
    """A 1x1 conv (and BN after it) at any stride: ``max_g ||W_g||``, exact without padding."""
    torch.manual_seed(stride + groups)
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(8, 12, 1, stride=stride, groups=groups)
    model = nn.Sequential(conv, _spread_bn(12, stride)).to(DT).eval()
    assert_exact(node_norms(model, torch.randn(2, 8, 7, 7, dtype=DT), PER_OP))


def test_pointwise_convolution_with_zero_padding_is_an_upper_bound():
    torch.manual_seed(0)
    model = nn.Conv2d(6, 5, 1, stride=2, padding=1).to(DT)
    ((certified, exact),) = node_norms(model, torch.randn(2, 6, 5, 5, dtype=DT), PER_OP)
    assert exact <= certified <= exact * (1 + 2e-6)


@pytest.mark.parametrize("spatial", [1, 2, 4, 7])
def test_depthwise_and_grouped_convolutions_on_small_maps(spatial):
    """A depthwise 3x3 (mobilenet) and a grouped 3x3 (resnext) with BN: exact, group by group, where the FFT bound
    of the circular embedding is loose."""
    torch.manual_seed(spatial)
    for channels, groups in ((12, 12), (16, 4)):
        model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False),
                              _spread_bn(channels, spatial)).to(DT).eval()
        assert_exact(node_norms(model, torch.randn(2, channels, spatial, spatial, dtype=DT), PER_OP))


def test_small_map_dense_is_tighter_than_fft():
    """A 3x3 conv of 64 channels on a 4x4 map (vgg / resnet at 32x32): exact, where the FFT bound is looser."""
    torch.manual_seed(1)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(DT)
    ((certified, exact),) = node_norms(conv, torch.randn(2, 64, 4, 4, dtype=DT), PER_OP)
    assert exact <= certified <= exact * (1 + 2e-6)
    fft = float(conv_spectral_bound(conv.weight.detach(), (4, 4), padding=1, dense_max_entries=0))
    assert fft > certified * 1.01


class Bottleneck(nn.Module):
    """torchvision's Bottleneck / ResNeXt block, stand-in: 1x1, grouped 3x3 (stride 2), 1x1, BN after each, and a
    strided 1x1 + BN shortcut."""

    def __init__(self, c_in: int, width: int, groups: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), _spread_bn(width, 1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=groups, bias=False)
        self.bn2 = _spread_bn(width, 2)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), _spread_bn(c_out, 3)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), _spread_bn(c_out, 4))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.down(x))


class InvertedResidual(nn.Module):
    """mobilenet_v2's block, stand-in: 1x1 expansion, depthwise 3x3, 1x1 projection, BN after each, ReLU6."""

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        hidden = channels * expansion
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), _spread_bn(hidden, 5), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), _spread_bn(hidden, 6), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), _spread_bn(channels, 7))

    def forward(self, x):
        return x + self.block(x)


@pytest.mark.parametrize("block", ["bottleneck", "inverted residual"])
def test_real_blocks_are_certified_exactly_node_by_node(block):
    torch.manual_seed(0)
    model, shape = {"bottleneck": (Bottleneck(16, 32, 8, 32), (16, 8, 8)),
                    "inverted residual": (InvertedResidual(4, 4), (4, 7, 7))}[block]
    assert_exact(node_norms(model.to(DT).eval(), torch.randn(2, *shape, dtype=DT), PER_OP))


class ProjectionExpansion(nn.Module):
    """mobilenet_v2 / mnasnet: a block's 1x1 projection + BN, then the next block's 1x1 expansion + BN, with no
    activation between: one node of two weighted ops."""

    def __init__(self, stride: int, padding: int, groups: int) -> None:
        super().__init__()
        self.project, self.bn1 = nn.Conv2d(16, 8, 1, bias=False), _spread_bn(8, 8)
        self.expand = nn.Conv2d(8, 24, 1, stride=stride, padding=padding, groups=groups, bias=False)
        self.bn2 = _spread_bn(24, 9)

    def forward(self, x):
        return self.bn2(self.expand(self.bn1(self.project(x)) * 0.5))


@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 0, 1), (2, 0, 2), (2, 1, 1)])
def test_chain_of_pointwise_convolutions_is_one_matrix(stride, padding, groups):
    """Exact (the norm of the product of the channel matrices and gains) where the product of the two convs'
    norms is loose; with zero padding an upper bound."""
    torch.manual_seed(stride)
    model = ProjectionExpansion(stride, padding, groups).to(DT).eval()
    ((certified, exact),) = node_norms(model, torch.randn(2, 16, 5, 5, dtype=DT), PER_OP)
    assert exact <= certified <= exact * (1 + 2e-6)


def test_pooling_flatten_linear_just_over_the_dense_limit():
    """vgg's head on a 1x1 map: adaptive pooling to 7x7 copies each channel 49 times, so the product of the ops'
    norms is 7 ||W||; the node is thin (64 inputs), so its dense matrix is formed: exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(64 * 49, 256)).to(DT)
    policy = lipreg.BoundPolicy(dense_entries=64 * 64)  # 64 x 256 entries: 4 times the limit, smaller side 64
    ((certified, exact),) = node_norms(model, torch.randn(2, 64, 1, 1, dtype=DT), policy)
    assert exact <= certified <= exact * (1 + 2e-6)
    ((product, _),) = node_norms(model, torch.randn(2, 64, 1, 1, dtype=DT), lipreg.BoundPolicy(dense_entries=0))
    assert product > 2 * certified


def _standardised(w: torch.Tensor) -> torch.Tensor:
    flat = w.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(w)


FUNCTIONAL = {
    "F.conv2d with a standardised weight": (
        lambda: Fn(lambda x, w: F.conv2d(x, _standardised(w), padding=1), torch.randn(5, 3, 3, 3)), (3, 8, 8)),
    "F.conv2d same padding, groups": (
        lambda: Fn(lambda x, w: F.conv2d(x, 2 * w, padding="same", groups=2), torch.randn(4, 2, 3, 3)), (4, 7, 7)),
    "F.linear with a computed weight": (
        lambda: Fn(lambda x, w: F.linear(x, w / w.norm(dim=1, keepdim=True)), torch.randn(9, 12)), (12,)),
    "F.conv2d then F.batch_norm at eval": (
        lambda: Fn(lambda x, w, m, v, g, b: F.batch_norm(F.conv2d(x, w, padding=1), m, v, g, b, False, 0.1, 1e-3),
                   torch.randn(6, 3, 3, 3), torch.randn(6), torch.rand(6) + 0.1, torch.randn(6) * 3, torch.randn(6)),
        (3, 8, 8)),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_forms_are_certified(name):
    """Refused at certified_bound() before (no certificate, too large for the dense route): now exact."""
    torch.manual_seed(0)
    factory, shape = FUNCTIONAL[name]
    assert_exact(node_norms(factory().eval(), torch.randn(2, *shape, dtype=DT), PER_OP))

"""The ops real model definitions use (torchvision's shufflenet_v2, mobilenet_v3, efficientnet, U-Nets,
segmentation heads, timm's affine layers), each rule against an independent exact reference: the largest singular
value of the float64 ``torch.func.jacrev`` Jacobian.

Every linear op is checked alone (its closed form), between two convolutions (fused into one operator, certified
from its dense matrix and from per-op certificates) and unfused: the certified bound is at least the exact norm,
and the converged estimate is within 1e-4 of it. The call patterns mirror the model sources without importing
them (:mod:`tests.ops.model_parts`).
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from tests.ops.model_parts import Affine, Lambda, ShuffleUnit, StochasticDepth, unet_pad
from tests.ops.test_rules import jacobian_norm
from tests.test_host_syncs import Training, counted_syncs

DT = torch.float64
REL = 1e-4


# (name, op on (1, 4, 6, 6) maps)
LINEAR_OPS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("chunk 0", lambda: Lambda(lambda x: x.chunk(2, dim=1)[0])),
    ("chunk 1", lambda: Lambda(lambda x: x.chunk(2, dim=1)[1])),
    ("torch.chunk", lambda: Lambda(lambda x: torch.chunk(x, 3, 2)[-1])),
    ("split sizes", lambda: Lambda(lambda x: torch.split(x, [1, 3], dim=1)[1])),
    ("split method", lambda: Lambda(lambda x: x.split(4, dim=3)[1])),
    ("torch.split keywords", lambda: Lambda(lambda x: torch.split(x, split_size_or_sections=[1, 3], dim=1)[1])),
    ("split method keywords", lambda: Lambda(lambda x: x.split(split_size=2, dim=1)[1])),
    ("unbind", lambda: Lambda(lambda x: x.unbind(1)[2].unsqueeze(1))),
    ("tensor_split indices", lambda: Lambda(lambda x: x.tensor_split([1, 4], dim=2)[1])),
    ("tensor_split uneven", lambda: Lambda(lambda x: torch.tensor_split(x, 4, dim=3)[0])),
    ("upsample nearest x2", lambda: nn.Upsample(scale_factor=2)),
    ("upsample nearest 1.5", lambda: Lambda(lambda x: F.interpolate(x, scale_factor=1.5))),
    ("nearest size", lambda: Lambda(lambda x: F.interpolate(x, size=(7, 4)))),
    ("nearest-exact", lambda: Lambda(lambda x: F.interpolate(x, scale_factor=(1.7, 0.6), mode="nearest-exact"))),
    ("UpsamplingNearest2d", lambda: nn.UpsamplingNearest2d(scale_factor=3)),
    ("bilinear align_corners (U-Net)", lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)),
    ("bilinear", lambda: Lambda(lambda x: F.interpolate(x, scale_factor=1.7, mode="bilinear"))),
    ("bilinear size", lambda: Lambda(lambda x: F.interpolate(x, size=(9, 5), mode="bilinear"))),
    ("bilinear recompute", lambda: Lambda(lambda x: F.interpolate(x, scale_factor=1.3, mode="bilinear",
                                                                 recompute_scale_factor=True))),
    ("bilinear antialias down", lambda: Lambda(lambda x: F.interpolate(x, size=(4, 3), mode="bilinear",
                                                                      antialias=True))),
    ("UpsamplingBilinear2d", lambda: nn.UpsamplingBilinear2d(size=(8, 11))),
    ("bicubic", lambda: Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"))),
    ("area down", lambda: Lambda(lambda x: F.interpolate(x, size=(4, 5), mode="area"))),
    ("pad constant value", lambda: Lambda(lambda x: F.pad(x, (1, 2, 0, 3), value=2.5))),
    ("pad crop", lambda: Lambda(lambda x: F.pad(x, (-1, 2, 1, -2)))),
    ("pad U-Net", lambda: Lambda(unet_pad)),
    ("pad reflect", lambda: Lambda(lambda x: F.pad(x, (2, 1, 1, 3), mode="reflect"))),
    ("pad replicate", lambda: Lambda(lambda x: F.pad(x, (3, 0, 2, 2), mode="replicate"))),
    ("pad circular", lambda: Lambda(lambda x: F.pad(x, (2, 1, 0, 4), mode="circular"))),
    ("ZeroPad2d", lambda: nn.ZeroPad2d((1, 0, 2, 1))),
    ("ReflectionPad2d", lambda: nn.ReflectionPad2d(2)),
    ("ReplicationPad2d", lambda: nn.ReplicationPad2d((1, 3, 0, 2))),
    ("CircularPad2d", lambda: nn.CircularPad2d(3)),
    ("ChannelShuffle", lambda: nn.ChannelShuffle(2)),
    ("F.channel_shuffle", lambda: Lambda(lambda x: F.channel_shuffle(x, 4))),
    ("PixelShuffle", lambda: nn.PixelShuffle(2)),
    ("PixelUnshuffle", lambda: nn.PixelUnshuffle(2)),
    ("pixel_unshuffle", lambda: Lambda(lambda x: F.pixel_shuffle(F.pixel_unshuffle(x, 3), 3))),
    ("addcmul affine", lambda: Affine(4)),
    ("addcmul shift", lambda: Lambda(lambda x: x.addcmul(torch.ones(4, 1, 1, dtype=DT),
                                                         torch.full((6,), 2.0, dtype=DT)))),
    ("stochastic_depth eval", lambda: StochasticDepth(0.2, "row")),
    ("flip", lambda: Lambda(lambda x: x.flip(2, 3))),
    ("roll", lambda: Lambda(lambda x: torch.roll(x, (1, -2), (2, 3)))),
    ("expand", lambda: Lambda(lambda x: x.unsqueeze(2).expand(-1, -1, 3, -1, -1).flatten(2, 3))),
    ("repeat", lambda: Lambda(lambda x: x.repeat(1, 2, 1, 1))),
    ("broadcast_to", lambda: Lambda(lambda x: torch.broadcast_to(x[:, :1], (x.size(0), 4, 6, 6)))),
    ("float casts", lambda: Lambda(lambda x: x.float().to(torch.float64).cpu())),
    ("transpose attribute", lambda: Lambda(lambda x: x.mT)),
]


class Sandwich(nn.Module):
    """conv -> op -> conv: the op is fused with a convolution on each side."""

    def __init__(self, op: nn.Module, channels: int = 4, size: int = 6) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.op = op
        with torch.no_grad():
            mid = op.to(DT)(torch.zeros(1, channels, size, size, dtype=DT))
        self.last = nn.Conv2d(mid.shape[1], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.op(self.first(x)))


def bounds(model: nn.Module, x: torch.Tensor, fuse: bool = True, dense: bool = True) -> tuple[float, float, float]:
    """(certified, converged, exact) in float64; ``dense=False``: no operator certified from its dense matrix."""
    policy = lipreg.BoundPolicy() if dense else lipreg.BoundPolicy(dense_entries=0)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT, fuse=fuse, policy=policy)
    certified = float(est.certified_bound().detach())
    converged = float(est.converge(tol=1e-12).detach())
    return certified, converged, jacobian_norm(model, x)


@pytest.mark.parametrize("name, make", LINEAR_OPS, ids=[c[0] for c in LINEAR_OPS])
def test_linear_op_alone_and_fused(name, make):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=DT)
    for model in (make().to(DT).eval(), Sandwich(make()).to(DT).eval()):
        certified, converged, exact = bounds(model, x)
        assert certified >= exact, (certified, exact)
        assert converged == pytest.approx(exact, rel=REL), (converged, exact)
    unfused, _, exact = bounds(model, x, fuse=False)
    per_op, _, _ = bounds(model, x, dense=False)
    assert unfused >= exact and per_op >= exact


@pytest.mark.parametrize("make, scale, dims", [
    (lambda: nn.Upsample(scale_factor=2), 4, 2),
    (lambda: nn.Upsample(scale_factor=3), 3, 1),
    (lambda: nn.Upsample(scale_factor=(2, 3, 2)), 12, 3),
    (lambda: nn.Upsample(scale_factor=2, mode="trilinear"), None, 3),
    (lambda: nn.Upsample(scale_factor=2.5, mode="linear", align_corners=True), None, 1),
])
def test_upsampling_in_every_dimension(make, scale, dims):
    """Nearest upsampling by integer factors: sqrt(prod_d s_d) exactly (``scale`` is the product); linear and
    trilinear against jacrev."""
    x = torch.randn(2, 2, *[4] * dims, dtype=DT)
    certified, converged, exact = bounds(make().to(DT), x)
    if scale is not None:
        assert exact == pytest.approx(math.sqrt(scale), rel=1e-12)
    assert certified >= exact and converged == pytest.approx(exact, rel=REL)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 3])
def test_pad_in_1d_and_3d(mode, dims):
    pad = (2, 1, 0, 3, 1, 1)[: 2 * dims]
    model = Lambda(lambda x: F.pad(x, pad, mode=mode))
    certified, converged, exact = bounds(model, torch.randn(2, 2, *[4] * dims, dtype=DT))
    assert certified >= exact and converged == pytest.approx(exact, rel=REL)


EXPLICIT_ADJOINTS = [("pad constant", lambda: Lambda(lambda x: F.pad(x, (1, -2, 3, 0), value=1.0))),
                     ("ChannelShuffle", lambda: nn.ChannelShuffle(2)),
                     ("PixelShuffle", lambda: nn.PixelShuffle(2)),
                     ("PixelUnshuffle", lambda: nn.PixelUnshuffle(2)),
                     ("chunk", lambda: Lambda(lambda x: x.chunk(3, dim=2)[1])),
                     ("unbind", lambda: Lambda(lambda x: x.unbind(1)[-1])),
                     ("tensor_split keywords", lambda: Lambda(lambda x: x.tensor_split(indices=[1, 4], dim=3)[2])),
                     ("split", lambda: Lambda(lambda x: torch.split(x, [1, 3], 1)[1]))]


@pytest.mark.parametrize("name, make", EXPLICIT_ADJOINTS, ids=[c[0] for c in EXPLICIT_ADJOINTS])
def test_explicit_adjoints_pass_the_dot_test(name, make):
    est = lipreg.LipschitzEstimator(make().to(DT), torch.randn(2, 4, 6, 6, dtype=DT), dtype=DT)
    (operator,) = est.linear_operators().values()
    assert operator.explicit_adjoint
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(operator.in_shape, generator=generator, dtype=DT)
    u = torch.randn(operator.out_shape, generator=generator, dtype=DT)
    (reference,) = torch.func.vjp(operator.matvec, v)[1](u)
    torch.testing.assert_close(operator.rmatvec(u), reference, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ nonlinear
def slope_range(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    x = torch.linspace(-30.0, 30.0, 3_000_001, dtype=DT, requires_grad=True)
    (slope,) = torch.autograd.grad(fn(x).sum(), x)
    return float(slope.min()), float(slope.max())


ACTIVATIONS = [("hardswish", nn.Hardswish, (-0.5, 1.5)), ("hardsigmoid", nn.Hardsigmoid, (0.0, 1.0 / 6.0)),
               ("mish", nn.Mish, None), ("selu", nn.SELU, (0.0, 1.0507009873554805 * 1.6732632423543772)),
               ("logsigmoid", nn.LogSigmoid, (0.0, 1.0)),
               ("tanhshrink", nn.Tanhshrink, (0.0, 1.0)), ("softshrink", nn.Softshrink, (0.0, 1.0)),
               ("threshold at its value", lambda: nn.Threshold(0.3, 0.3), (0.0, 1.0))]


@pytest.mark.parametrize("name, module, interval", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation_slopes_are_exact(name, module, interval):
    """The rule's slope interval contains every derivative on a dense float64 grid, and the grid reaches its
    ends (within the grid's resolution), which are the closed forms where there is one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), module(), nn.Linear(5, 3)).to(DT)
    low, high = slope_range(model[1])
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 5, dtype=DT), dtype=DT)
    (rule,) = [node.rule for node in est.graph.nodes if isinstance(node.rule, lipreg.ops.Activation)]
    assert rule.a <= low and rule.b >= high
    assert low - rule.a < 1e-5 and rule.b - high < 1e-5
    if interval is not None:
        assert low == pytest.approx(interval[0], abs=1e-5) and high == pytest.approx(interval[1], abs=1e-5)
    certified = float(est.certified_bound().detach())
    assert all(certified >= jacobian_norm(model, 4 * torch.randn(1, 5, dtype=DT)) for _ in range(20))


def test_type_as_an_input_dependent_tensor_reads_its_dtype_only():
    torch.manual_seed(0)
    model = Sandwich(Lambda(lambda x: x.float().type_as(x))).to(DT)
    certified, converged, exact = bounds(model, torch.randn(2, 4, 6, 6, dtype=DT))
    assert certified >= exact and converged >= exact * (1 - REL)


EXTREMA = [("amax", lambda x: x.amax((2, 3)), 1.0), ("max over a dim", lambda x: torch.max(x, 1)[0], 1.0),
           ("max values", lambda x: x.max(dim=2, keepdim=True).values, 1.0), ("min of all", lambda x: x.min(), 1.0),
           ("maximum with a constant", lambda x: torch.maximum(x, torch.zeros(1, 4, 1, 1, dtype=DT)), 1.0),
           ("maximum broadcast 4 times", lambda x: torch.maximum(x[:, :1], torch.zeros(1, 4, 1, 1, dtype=DT)), 2.0),
           ("maximum of two", lambda x: torch.minimum(x, -x.flip(3)), math.sqrt(2.0)),
           ("group sort (GroupSort2 / MaxMin)", lambda x: x.unflatten(1, (2, 2)).sort(dim=2).values.flatten(1, 2), 1.0),
           ("full sort, descending", lambda x: torch.sort(x.flatten(1), dim=1, descending=True)[0], 1.0),
           ("top 5 values", lambda x: x.flatten(1).topk(5, dim=1).values, 1.0)]


@pytest.mark.parametrize("name, fn, constant", EXTREMA, ids=[e[0] for e in EXTREMA])
def test_extrema(name, fn, constant):
    """Maxima, minima and sorts: the certified constant is the exact one (attained by the Jacobian at some sample),
    and above every sampled Jacobian."""
    torch.manual_seed(0)
    model = Lambda(fn)
    certified = float(lipreg.LipschitzEstimator(model, torch.randn(2, 4, 3, 3, dtype=DT), dtype=DT).certified_bound())
    samples = [jacobian_norm(model, torch.randn(1, 4, 3, 3, dtype=DT)) for _ in range(20)]
    assert certified >= max(samples) and certified == pytest.approx(constant, rel=1e-6)
    if name != "maximum of two":  # its constant is attained where x = -flip(x), a set of measure zero
        assert max(samples) == pytest.approx(constant, rel=1e-12)


@pytest.mark.parametrize("relu", [False, True])
def test_shufflenet_unit(relu):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ShuffleUnit(8, relu), ShuffleUnit(8, relu)).to(DT).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    certified = float(est.certified_bound().detach())
    samples = [jacobian_norm(model, torch.randn(1, 3, 5, 5, dtype=DT)) for _ in range(3)]
    assert certified >= max(samples)
    if not relu:  # linear: the sum over the two paths is an upper bound, exact on each path
        assert float(est.converge(tol=1e-12).detach()) >= samples[0] * (1 - REL)


class UNetLike(nn.Module):
    """Closed-form and fused new rules in one net: upsampling, reflect and computed zero padding, a split, a shuffle,
    a cast, an extremum, stochastic depth."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.up = nn.Conv2d(1, 4, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear")
        self.pad, self.shuffle, self.drop = nn.ReflectionPad2d(1), nn.ChannelShuffle(2), StochasticDepth(0.1, "row")
        self.head = nn.Linear(2 * 9 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shuffle(self.pad(self.up(torch.relu(self.conv(x)))))
        a, b = h.chunk(2, dim=1)
        h = torch.maximum(self.drop(a)[..., :9, :8], unet_pad(b[..., :7, :6])).float()
        return self.head(h.flatten(1))


def test_new_rules_keep_the_training_step_free_of_host_syncs():
    torch.manual_seed(0)
    training = Training(UNetLike().eval(), torch.randn(8, 1, 4, 4))
    training.step()  # the first call builds the record
    with counted_syncs() as counts:
        for _ in range(3):
            training.step()
    assert not counts, f"host synchronisations {dict(counts)}"


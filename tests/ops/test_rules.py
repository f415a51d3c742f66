"""Every rule against an exact, independent reference.

Linear operators: the largest singular value of the dense Jacobian (``torch.func.jacrev`` of the layer on one
sample, in float64; the Jacobian of an affine map is its linear part, so biases drop out by themselves) or
``torch.linalg.matrix_norm(W, 2)``. Max pooling: the largest gain of a single spike, over every input position,
computed with torch's own pooling. Activations: the extreme derivatives on a dense float64 grid.
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from tests.ops.functional_model import Fn

DT = torch.float64
REL = 1e-4


def jacobian_norm(fn, x: torch.Tensor) -> float:
    """sigma_max of the dense Jacobian of ``fn`` at one sample ``x[:1]``."""
    x1 = x[:1].to(DT)
    jac = torch.func.jacrev(fn)(x1).detach()
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x1.numel()), 2))


def converged(model: nn.Module, x: torch.Tensor, fuse: bool = False, **converge) -> float:
    est = lipreg.LipschitzEstimator(model, x, dtype=DT, fuse=fuse)
    return float(est.converge(**converge).detach())


def assert_rel(value: float, reference: float, rel: float = REL) -> None:
    assert value == pytest.approx(reference, rel=rel), (value, reference)


def layer_case(make: Callable[[], nn.Module], shape: tuple[int, ...], fuse: bool = False) -> None:
    """The converged bound of a one-layer model equals the exact norm of its linear part."""
    torch.manual_seed(0)
    model = make().to(DT).eval()
    x = torch.randn(3, *shape, dtype=DT)
    assert_rel(converged(model, x, fuse=fuse), jacobian_norm(model, x))


# ------------------------------------------------------------------------------------------ dense layers
def test_linear_matches_matrix_norm():
    torch.manual_seed(0)
    layer = nn.Linear(9, 6).to(DT)
    x = torch.randn(4, 9, dtype=DT)
    assert_rel(converged(layer, x), float(torch.linalg.matrix_norm(layer.weight.detach(), 2)))


def test_float32_model_in_float64():
    """A float32 model bounded in float64: the reference is the float64 norm of the same float32 weights."""
    torch.manual_seed(1)
    layer = nn.Linear(8, 5)
    x = torch.randn(2, 8)
    reference = float(torch.linalg.matrix_norm(layer.weight.detach().to(DT), 2))
    assert converged(layer, x, tol=1e-14, max_iter=100_000) == pytest.approx(reference, rel=1e-10)


CONVS = {
    "conv1d stride dilation groups reflect": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"), (4, 11)),
    "conv1d replicate": (lambda: nn.Conv1d(2, 3, 4, padding=3, padding_mode="replicate"), (2, 7)),
    "conv2d zeros stride": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 6)),
    "conv2d circular": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular"), (2, 7, 6)),
    "conv2d reflect": (lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"), (2, 5, 6)),
    "conv2d replicate": (lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="replicate"), (2, 5, 5)),
    "conv2d same dilation groups": (lambda: nn.Conv2d(2, 4, 3, padding="same", dilation=2, groups=2), (2, 6, 6)),
    "conv2d same circular": (lambda: nn.Conv2d(3, 2, (3, 2), padding="same", padding_mode="circular"), (3, 5, 4)),
    "conv2d depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3, bias=False), (3, 5, 5)),
    "conv3d circular stride": (
        lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=1, padding_mode="circular"), (2, 4, 5, 3)),
    "conv3d groups dilation": (lambda: nn.Conv3d(2, 4, 2, dilation=2, groups=2), (2, 4, 4, 3)),
    "convT1d stride output_padding groups": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2), (4, 5)),
    "convT2d stride padding output_padding": (
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 4, 4)),
    "convT2d groups dilation": (
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=3, padding=1, output_padding=2, dilation=2, groups=2), (4, 3, 3)),
    "convT3d stride output_padding": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=1), (2, 2, 3, 2)),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_convolution(name):
    make, shape = CONVS[name]
    layer_case(make, shape)


POOLS = {
    "avgpool1d": (lambda: nn.AvgPool1d(3, stride=1), (2, 8)),
    "avgpool2d overlapping padded": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 7)),
    "avgpool2d ceil no count_include_pad": (lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                                         count_include_pad=False), (2, 6, 6)),
    "avgpool2d divisor_override": (lambda: nn.AvgPool2d(2, stride=1, divisor_override=3), (1, 4, 4)),
    "avgpool3d": (lambda: nn.AvgPool3d(2, stride=1), (1, 3, 4, 3)),
    "adaptiveavgpool1d": (lambda: nn.AdaptiveAvgPool1d(4), (2, 7)),
    "adaptiveavgpool2d": (lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5)),
    "adaptiveavgpool3d": (lambda: nn.AdaptiveAvgPool3d(2), (2, 3, 3, 5)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_average_pooling(name):
    make, shape = POOLS[name]
    layer_case(make, shape)


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (5,)), (nn.BatchNorm1d, (5, 3)),
                                        (nn.BatchNorm2d, (5, 3, 3)), (nn.BatchNorm3d, (5, 2, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval(cls, shape, affine):
    torch.manual_seed(2)
    bn = cls(5, affine=affine).to(DT)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.05, 3.0)
    if affine:
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    bn.train()  # the bound is that of the eval-mode function whatever the flag
    x = torch.randn(3, *shape, dtype=DT)
    value = converged(bn, x)
    assert bn.training
    bn.eval()
    assert_rel(value, jacobian_norm(bn, x))


def test_batch_norm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(lipreg.UnsupportedOpError, match="track_running_stats=False") as error:
        lipreg.LipschitzEstimator(model, torch.randn(2, 2, 5, 5))
    assert "node '1'" in str(error.value)


def test_batch_norm_without_running_stats_on_one_sample_says_where():
    """BatchNorm1d with batch statistics cannot even run on one (N, C) sample: the error gives the rule's reason,
    names the node and the cause, not fx's metadata dump."""
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(lipreg.UnsupportedOpError, match=r"used by node '1'.*track_running_stats=False.*"
                                                         r"fails there.*ValueError: Expected more than 1 value"):
        lipreg.LipschitzEstimator(model, torch.randn(2, 3))


# ------------------------------------------------------------------------------------- functional forms
FUNCTIONAL = {
    "F.linear": (lambda x, w, b: F.linear(x, w, b), [(4, 6), (4,)], (6,)),
    "F.conv1d": (lambda x, w: F.conv1d(x, w, None, 2, 1), [(3, 2, 3)], (2, 9)),
    "F.conv2d positional": (lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 1), [(3, 2, 3, 3), (3,)], (2, 6, 6)),
    "F.conv2d keywords": (lambda x, w: F.conv2d(x, w, stride=2, padding=1, dilation=2), [(3, 2, 3, 3)], (2, 7, 7)),
    "F.conv2d groups": (lambda x, w: F.conv2d(x, w, groups=2), [(4, 1, 2, 2)], (2, 4, 4)),
    "F.conv3d": (lambda x, w: F.conv3d(x, w, padding=1), [(2, 1, 2, 2, 2)], (1, 3, 3, 3)),
    "F.conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w, stride=2), [(2, 3, 3, 3)], (2, 3, 3)),
    "F.avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 2, 1), [], (2, 7, 7)),
    "F.adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 2), [], (2, 5, 5)),
    "x * c (tensor)": (lambda x, c: x * c, [(1, 5)], (5,)),
    "c * x (tensor)": (lambda x, c: c * x, [(5,)], (5,)),
    "x * c (broadcast to a larger shape)": (lambda x, c: x * c, [(3, 1)], (1,)),
    "x * 3": (lambda x: x * 3.0, [], (5,)),
    "x / c": (lambda x, c: x / c, [(5,)], (5,)),
    "x / 4": (lambda x: x / 4, [], (5,)),
    "torch.mul": (lambda x, c: torch.mul(x, c), [(2, 1, 1)], (2, 3, 3)),
    "x.mean(1)": (lambda x: x.mean(1), [], (5, 3)),
    "torch.mean dims": (lambda x: torch.mean(x, dim=(2, 3)), [], (3, 4, 4)),
    "x.sum(-1)": (lambda x: x.sum(-1), [], (3, 4)),
    "flatten": (lambda x: x.flatten(1) * 2, [], (3, 4)),
    "view": (lambda x: x.view(x.size(0), -1), [], (3, 4)),
    "permute": (lambda x: x.permute(0, 2, 1) * 2, [], (3, 4)),
    "transpose reshape": (lambda x: torch.reshape(x.transpose(1, 2), (-1, 12)), [], (3, 4)),
    "neg": (lambda x: -x, [], (3,)),
    "1 - x": (lambda x: 1 - x, [], (3,)),
    "torch.add alpha": (lambda x: torch.add(1, x, alpha=3), [], (3,)),
    "basic slicing": (lambda x: x[:, ::2], [], (6,)),
    "advanced indexing with repeats": (lambda x: x[:, [0, 0, 1]], [], (6,)),
    "x @ W": (lambda x, w: x @ w, [(4, 3)], (4,)),
    "W @ x": (lambda x, w: w @ x, [(4, 3)], (3, 2)),
    "dropout (eval)": (lambda x: F.dropout(x, 0.5, training=False) * 2, [], (4,)),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional(name):
    fn, shapes, in_shape = FUNCTIONAL[name]
    layer_case(lambda: Fn(fn, *[torch.randn(s) for s in shapes]), in_shape)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_functional_padding(mode):
    """``F.pad`` is linear (norm above 1 for reflect/replicate/circular, which repeat entries), and fused with the
    convolution after it the pair is one operator with the exact norm; unfused, the product is above it."""
    torch.manual_seed(4)
    model = Fn(lambda x, w: F.conv2d(F.pad(x, (1, 1, 2, 0), mode=mode), w), torch.randn(2, 2, 3, 3))
    x = torch.randn(2, 2, 4, 5, dtype=DT)
    pad = Fn(lambda x: F.pad(x, (1, 1, 2, 0), mode=mode))
    assert_rel(converged(pad, x), jacobian_norm(pad, x))
    assert_rel(converged(model, x, fuse=True), jacobian_norm(model, x))
    assert converged(model, x) >= jacobian_norm(model, x) * (1 - 1e-6)


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((1, 2, 0, 1)), nn.ConstantPad1d(2, 3.0), nn.ReflectionPad2d(1),
                                 nn.ReplicationPad1d((2, 1)), nn.CircularPad2d(1)])
def test_padding_modules(pad):
    layer_case(lambda: pad, (2, 4) if "1d" in type(pad).__name__ else (2, 3, 4))

# -------------------------------------------------------------------------------------------- max pooling
def spike_gain(pool, shape: tuple[int, ...]) -> float:
    """max_j ||pool(e_j) - pool(0)||: the exact constant of a max pool, by brute force over every input."""
    n = math.prod(shape)
    spikes = torch.eye(n, dtype=DT).reshape(n, 1, *shape)  # one channel, each sample a spike
    zero = pool(torch.zeros(1, 1, *shape, dtype=DT))
    return float(torch.linalg.vector_norm((pool(spikes) - zero).reshape(n, -1), dim=1).max())


MAX_POOLS = {
    "maxpool2d 3x3 stride 2 (AlexNet)": (nn.MaxPool2d(3, stride=2), (9, 9), 2.0),
    "maxpool2d non-overlapping": (nn.MaxPool2d(2), (6, 6), 1.0),
    "maxpool2d 3x3 stride 1": (nn.MaxPool2d(3, stride=1), (5, 5), 3.0),
    "maxpool2d ceil_mode": (nn.MaxPool2d(3, stride=2, ceil_mode=True), (8, 8), 2.0),
    "maxpool2d padding": (nn.MaxPool2d(3, stride=2, padding=1), (6, 7), 2.0),
    "maxpool2d padding ceil_mode": (nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True), (5, 5), 1.0),
    "maxpool2d dilation": (nn.MaxPool2d(2, stride=1, dilation=2), (5, 5), 2.0),
    "maxpool2d stride 3 ceil_mode tail": (nn.MaxPool2d(4, stride=3, ceil_mode=True), (6, 7), None),
    "maxpool1d 3 stride 2": (nn.MaxPool1d(3, stride=2), (9,), math.sqrt(2)),
    "maxpool1d padding ceil_mode": (nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), (6,), None),
    "maxpool3d 3 stride 2": (nn.MaxPool3d(3, stride=2), (5, 5, 5), math.sqrt(8)),
    "maxpool3d rectangular": (nn.MaxPool3d((2, 3, 1), stride=(2, 1, 1)), (4, 5, 3), None),
    "adaptivemaxpool2d": (nn.AdaptiveMaxPool2d((3, 2)), (7, 5), None),
    "adaptivemaxpool1d": (nn.AdaptiveMaxPool1d(4), (6,), None),
    "F.max_pool2d": (Fn(lambda x: F.max_pool2d(x, 3, 2)), (9, 9), 2.0),
    "F.max_pool2d keywords": (Fn(lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1)), (4, 4), 3.0),
    "F.max_pool1d default stride": (Fn(lambda x: F.max_pool1d(x, 2)), (6,), 1.0),
}


@pytest.mark.parametrize("name", list(MAX_POOLS))
def test_max_pooling(name):
    pool, shape, known = MAX_POOLS[name]
    pool = pool.to(DT)
    reference = spike_gain(pool, shape)
    if known is not None:
        assert reference == pytest.approx(known, rel=1e-12)  # the brute force agrees with the hand count
    value = converged(pool, torch.randn(2, 1, *shape, dtype=DT))
    assert value == pytest.approx(reference, rel=1e-7)


def test_max_pooling_of_several_channels():
    """Channels are pooled separately: the constant does not grow with their number."""
    pool = nn.MaxPool2d(3, stride=2)
    assert converged(pool, torch.randn(2, 4, 9, 9)) == pytest.approx(2.0, rel=1e-7)


def test_bound_has_the_requested_dtype_without_linear_nodes():
    """Pooling and activations only: nothing to take the dtype from but the estimator's own."""
    est = lipreg.LipschitzEstimator(nn.Sequential(nn.MaxPool1d(3, stride=2), nn.Tanh()), torch.randn(2, 1, 9),
                                    dtype=DT)
    bound = est()
    assert bound.dtype == DT
    assert math.sqrt(2) <= float(bound) <= math.sqrt(2) * (1 + 1e-12)  # a certificate: rounded upwards


# ------------------------------------------------------------------------------------------ activations
ACTIVATIONS = {
    "ReLU": nn.ReLU(),
    "LeakyReLU(0.1)": nn.LeakyReLU(0.1),
    "LeakyReLU(2.0)": nn.LeakyReLU(2.0),
    "ELU(0.5)": nn.ELU(0.5),
    "ELU(2.0)": nn.ELU(2.0),
    "Tanh": nn.Tanh(),
    "Sigmoid": nn.Sigmoid(),
    "Softplus": nn.Softplus(),
    "Softplus(beta=3)": nn.Softplus(beta=3.0),
    "GELU": nn.GELU(),
    "GELU(tanh)": nn.GELU(approximate="tanh"),
    "SiLU": nn.SiLU(),
    "Hardtanh": nn.Hardtanh(),
    "Hardtanh(-2, 3)": nn.Hardtanh(-2.0, 3.0),
    "ReLU6": nn.ReLU6(),
    "F.leaky_relu(0.2)": Fn(lambda x: F.leaky_relu(x, 0.2)),
    "F.elu(alpha=3)": Fn(lambda x: F.elu(x, alpha=3.0)),
    "torch.sigmoid": Fn(lambda x: torch.sigmoid(x)),
    "x.tanh()": Fn(lambda x: x.tanh()),
    "F.gelu": Fn(lambda x: F.gelu(x)),
    "F.silu": Fn(lambda x: F.silu(x)),
    "torch.clamp": Fn(lambda x: torch.clamp(x, -1.0, 2.0)),
    "torch.abs": Fn(lambda x: torch.abs(x)),
    "abs(x)": Fn(lambda x: abs(x)),
}


def empirical_slopes(fn) -> tuple[float, float]:
    """min and max of f' on a float64 grid of step 1e-4 over [-30, 30] (by autograd, not differences)."""
    x = torch.linspace(-30.0, 30.0, 600_001, dtype=DT, requires_grad=True)
    (slope,) = torch.autograd.grad(fn(x).sum(), x)
    return float(slope.min()), float(slope.max())


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_slope_interval(name):
    act = ACTIVATIONS[name]
    est = lipreg.LipschitzEstimator(act, torch.randn(2, 3), dtype=DT)
    node = est.graph.output
    a, b = node.rule.slopes(node.ops[0])
    lo, hi = empirical_slopes(act)
    assert a <= lo + 1e-12 and hi <= b + 1e-12, ((a, b), (lo, hi))  # the interval contains every slope...
    assert lo - a <= 1e-4 and b - hi <= 1e-4, ((a, b), (lo, hi))  # ...and its ends are attained
    assert float(est.converge()) == pytest.approx(max(abs(lo), abs(hi)), abs=1e-4)


def test_sigmoid_is_a_quarter():
    bound = float(lipreg.LipschitzEstimator(nn.Sigmoid(), torch.randn(1, 3)).converge())
    assert 0.25 <= bound <= 0.25 * (1 + 2.4e-7)  # a certificate: rounded upwards (at most one float32 ulp)

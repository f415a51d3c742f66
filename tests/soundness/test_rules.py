"""Rules that certified below the truth (issue 9, classes 3, 4, 6 and 7), each against an independent exact
reference: the SVD of a float64 ``jacrev`` Jacobian for linear ops, spike counts for max pooling, brute force over
the regions of a piecewise-linear chain, finite pairs for the softplus jump."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from tests.ops.functional_model import Fn

DT = torch.float64


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """``||J||_2`` of the model at the sample ``x[:1]`` (float64): the exact constant of a linear model, a lower
    bound of any model's."""
    jac = torch.func.jacrev(lambda v: model(v))(x[:1].to(DT)).detach()
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x[:1].numel()), 2))


def spike_gain(pool: nn.Module, sample_shape: tuple[int, ...]) -> float:
    """``max_j ||pool(e_j) - pool(0)||`` over every input entry: the exact constant of a max pool. The spikes are
    stacked along the first dimension, which torch pools independently whether it reads it as the batch or,
    for an unbatched input, as the channels."""
    n = math.prod(sample_shape)
    spikes = torch.eye(n, dtype=DT).reshape(n, *sample_shape)
    zero = pool(torch.zeros(1, *sample_shape, dtype=DT))
    return float(torch.linalg.vector_norm((pool(spikes) - zero).reshape(n, -1), dim=1).max())


def certified(model: nn.Module, x: torch.Tensor, **kwargs) -> float:
    return float(lipreg.LipschitzEstimator(model, x, dtype=DT, **kwargs).certified_bound().detach())


@pytest.fixture
def no_dense_route() -> dict:
    """Every linear operator certified by its rule's own ``certified_norm`` (Schur test, FFT bound), as operators
    too large to form are, instead of the exact norm of its dense matrix: the estimator options that say so."""
    return {"policy": lipreg.BoundPolicy(dense_entries=0)}


# --------------------------------------------------------------- class 3: averaging with negative weights
AVG_POOLS = {
    "AvgPool2d divisor -1 (issue)": (nn.AvgPool2d(3, 2, 1, divisor_override=-1), (3, 16, 16)),
    "F.avg_pool2d divisor -2": (Fn(lambda x: F.avg_pool2d(x, 3, 2, 1, divisor_override=-2)), (2, 12, 12)),
    "F.avg_pool3d divisor -3 ceil_mode": (Fn(lambda x: F.avg_pool3d(x, 2, 2, 0, True, True, -3)), (1, 7, 7, 7)),
}


@pytest.mark.parametrize("name", list(AVG_POOLS))
def test_average_pooling_with_a_negative_divisor(name, no_dense_route):
    """All its weights are <= 0: the Schur test must take absolute row and column sums."""
    pool, shape = AVG_POOLS[name]
    x = torch.randn(2, *shape, dtype=DT)
    assert certified(pool, x, **no_dense_route) >= jacobian_norm(pool, x)


def _random_avg_pool(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    dims = rng.choice([1, 2, 3])
    kernel = rng.randint(1, 3)
    padding = rng.randint(0, kernel // 2)
    kwargs = dict(stride=rng.randint(1, 3), padding=padding, ceil_mode=rng.random() < 0.5,
                  count_include_pad=rng.random() < 0.5)
    if dims > 1 and rng.random() < 0.6:
        kwargs["divisor_override"] = rng.choice([-3, -1, 1, 2, 5])
    cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
    size = rng.randint(kernel, 7)
    channels = (rng.randint(1, 2),) if rng.random() < 0.5 else ()  # () : an unbatched input (C, *spatial)
    return cls(kernel, **kwargs), channels + (size,) * dims


@pytest.mark.parametrize("seed", range(40))
def test_schur_test_of_average_pools_is_an_upper_bound(seed, no_dense_route):
    """Random kernels, strides, padding, ceil_mode, count_include_pad, divisor overrides of both signs, batched
    and unbatched inputs: the Schur certificate is never below the exact norm."""
    pool, shape = _random_avg_pool(random.Random(seed))
    x = torch.randn(2, *shape, dtype=DT)
    assert certified(pool, x, **no_dense_route) >= jacobian_norm(pool, x), pool


# ------------------------------------------------------------ class 4: elementwise ops that broadcast their input
# broadcasts an x of shape (B, 1, 3) to (B, 4, 3): 4 copies of x
THRESHOLDS = torch.randn(1, 4, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
BROADCASTING = {  # op, and a value of x where every copy of x is on the slope-1 side of its threshold(s)
    "torch.clamp(x, min=t) (issue)": (lambda x, t: torch.clamp(x, min=t), 10.0),
    "torch.clamp(x, max=t)": (lambda x, t: torch.clamp(x, max=t), -10.0),
    "x.clip(t - 10, t + 10)": (lambda x, t: x.clip(t - 10, t + 10), 0.0),
    "torch.clamp(t, min=x)": (lambda x, t: torch.clamp(t, min=x), 10.0),
}


@pytest.mark.parametrize("name", list(BROADCASTING))
def test_elementwise_op_that_broadcasts_its_input(name):
    """Each entry of x is copied 4 times, so the constant is sqrt(4) = 2, attained where every copy is on the
    slope-1 side: that local Jacobian norm is the exact reference."""
    fn, side = BROADCASTING[name]
    model = Fn(fn, THRESHOLDS)
    exact = jacobian_norm(model, torch.full((1, 1, 3), side, dtype=DT))
    assert exact == pytest.approx(2.0, rel=1e-12)
    bound = certified(model, torch.randn(2, 1, 3, dtype=DT))
    assert exact <= bound <= exact * (1 + 1e-6)


class ClampChain(nn.Module):
    """Linear(3, 3) -> clamp(., min=t) with t of shape (1, 4, 3) -> flatten -> Linear(12, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(12, 2)
        self.t = nn.Parameter(THRESHOLDS.clone().float())

    def forward(self, x):
        return self.b(torch.clamp(self.a(x), min=self.t).flatten(1))


def test_seqlip_chain_through_a_broadcasting_activation():
    """SeqLip used to crash (size mismatch) on this chain. Exact reference: clamp is piecewise linear and
    ``a`` is invertible, so every region is reached; for each coordinate of ``a(x)``, one point below, between
    and above its 4 thresholds (5^3 points) sees every region, and the max of the local Jacobian norms there
    is the constant."""
    torch.manual_seed(0)
    model = ClampChain().to(DT)
    levels = torch.sort(THRESHOLDS[0], dim=0).values  # (4, 3): the sorted thresholds of each coordinate
    between = torch.cat([levels[:1] - 1, (levels[1:] + levels[:-1]) / 2, levels[-1:] + 1])  # (5, 3)
    w, b = model.a.weight.detach(), model.a.bias.detach()
    exact = max(jacobian_norm(model, torch.linalg.solve(w, torch.stack([between[i, k] for k, i in enumerate(p)])
                                                        - b)[None, None])
                for p in itertools.product(range(5), repeat=3))
    x = torch.randn(2, 1, 3, dtype=DT)
    for method in ({}, {"method": "seqlip", "search": "exact"}):
        assert certified(model, x, **method) >= exact


# ---------------------------------------------------------------------- class 6: the jump of softplus's threshold
def past_the_switch(beta: float, threshold: float, dtype: torch.dtype, n: int) -> torch.Tensor:
    """The switch point ``threshold / beta`` in ``dtype`` and the ``n`` floats after it, toward the linear side."""
    points = [torch.tensor(threshold / beta, dtype=dtype)]
    toward = torch.tensor(math.copysign(math.inf, beta), dtype=dtype)
    for _ in range(n):
        points.append(torch.nextafter(points[-1], toward))
    return torch.stack(points)


def straddling_ratio(fn, beta: float, threshold: float, dtype: torch.dtype) -> float:
    """``|f(x') - f(x)| / |x' - x|`` for neighbouring floats of ``dtype`` at the switch, computed in ``dtype``: a
    finite pair that sees a jump of the op as it is evaluated."""
    x = past_the_switch(beta, threshold, dtype, 1)
    y = fn(x)
    return float(((y[1] - y[0]) / (x[1] - x[0])).abs())


SOFTPLUS_REFUSED = {  # (beta, threshold, dtype, the jump's size as the message prints it)
    "threshold=0 (issue)": (1.0, 0.0, torch.float32, "0.693"),
    "beta=2, threshold=5": (2.0, 5.0, torch.float32, "0.00336"),
    "default threshold in float64": (1.0, 20.0, torch.float64, "2.06e-09"),
    "beta=-1, threshold=10": (-1.0, 10.0, torch.float32, "4.54e-05"),
}


@pytest.mark.parametrize("name", list(SOFTPLUS_REFUSED))
@pytest.mark.parametrize("form", ["module", "functional"])
def test_softplus_whose_jump_survives_rounding_is_refused(name, form):
    beta, threshold, dtype, jump = SOFTPLUS_REFUSED[name]
    fn = nn.Softplus(beta, threshold) if form == "module" else Fn(lambda x: F.softplus(x, beta, threshold))
    assert straddling_ratio(fn, beta, threshold, dtype) > 10  # as evaluated, the op is not 1-Lipschitz
    with pytest.raises(lipreg.UnsupportedOpError, match=rf"jumps by .*= {jump}.*discontinuous") as error:
        lipreg.LipschitzEstimator(fn, torch.randn(2, 3, dtype=dtype))
    assert "Use threshold >=" in str(error.value)


@pytest.mark.parametrize("beta, threshold, dtype", [(1.0, 20.0, torch.float32), (3.0, 20.0, torch.float32),
                                                    (1.0, 20.0, torch.bfloat16), (1.0, 35.0, torch.float64),
                                                    (-2.0, 16.0, torch.float32)])
def test_softplus_whose_jump_rounds_away_is_the_smooth_softplus(beta, threshold, dtype):
    """Accepted thresholds: wherever torch takes the linear branch (a dense sample of the floats of ``dtype``
    past the switch), it returns exactly the correctly rounded smooth ``log(1 + e^(beta x)) / beta``, so the op
    evaluated is the smooth one, with slopes in ``[0, 1]``."""
    past = past_the_switch(beta, threshold, dtype, 200)
    x = torch.cat([past, past[0] * torch.linspace(1.0, 3.0, 1000, dtype=torch.float64).to(dtype)])
    x = x[x * beta > threshold]  # torch's test for its linear branch
    x64 = x.to(torch.float64)
    smooth = (x64 + torch.log1p(torch.exp(-beta * x64)) / beta).to(dtype)  # the same as s(x), without overflow
    assert len(x) > 1000 and torch.equal(F.softplus(x, beta, threshold), smooth)
    model = nn.Softplus(beta, threshold)
    bound = float(lipreg.LipschitzEstimator(model, torch.randn(2, 3, dtype=dtype), dtype=DT).certified_bound())
    assert 1.0 <= bound <= 1.0 + 1e-12  # the slope bound 1, rounded upwards


# ---------------------------------------------------------- class 7: pooling inputs without a channel dimension
UNBATCHED_MAX_POOLS = {  # pool, the per-sample shape (torch reads (B, *spatial) as an unbatched (C, *spatial))
    "MaxPool2d(3, 1) on (B, 8, 8) (issue)": (nn.MaxPool2d(3, 1), (8, 8)),
    "MaxPool1d(3, 1) on (B, L)": (nn.MaxPool1d(3, 1), (8,)),
    "MaxPool3d(2, 1) on (B, 5, 5, 5)": (nn.MaxPool3d(2, 1), (5, 5, 5)),
    "AdaptiveMaxPool2d(3) on (B, 8, 8)": (nn.AdaptiveMaxPool2d(3), (8, 8)),
    "AdaptiveMaxPool1d(3) on (B, L)": (nn.AdaptiveMaxPool1d(3), (8,)),
    "F.max_pool2d on (B, 7, 7)": (Fn(lambda x: F.max_pool2d(x, 3, 1, 1)), (7, 7)),
    "F.max_pool1d return_indices": (Fn(lambda x: F.max_pool1d(x, 3, 1, return_indices=True)[0]), (8,)),
    "F.adaptive_max_pool2d on (B, 7, 5)": (Fn(lambda x: F.adaptive_max_pool2d(x, (3, 2))), (7, 5)),
}


@pytest.mark.parametrize("name", list(UNBATCHED_MAX_POOLS))
def test_max_pooling_of_unbatched_inputs(name):
    pool, shape = UNBATCHED_MAX_POOLS[name]
    exact = spike_gain(pool, shape)
    assert certified(pool, torch.randn(2, *shape, dtype=DT)) == pytest.approx(exact, rel=1e-9)


def _random_max_pool(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    dims = rng.choice([1, 2, 3])
    kernel, dilation = rng.randint(1, 3), rng.randint(1, 2)
    cls = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
    pool = cls(kernel, stride=rng.randint(1, 3), padding=rng.randint(0, kernel // 2), dilation=dilation,
               ceil_mode=rng.random() < 0.5)
    channels = (rng.randint(1, 2),) if rng.random() < 0.5 else ()  # () : an unbatched input (C, *spatial)
    return pool, channels + (rng.randint(dilation * (kernel - 1) + 1, 6),) * dims


@pytest.mark.parametrize("seed", range(40))
def test_max_pool_constant_is_its_spike_count(seed):
    """Random kernels, strides, padding, dilation, ceil_mode, batched and unbatched inputs: the certified
    constant is the brute-force spike count exactly."""
    pool, shape = _random_max_pool(random.Random(seed))
    exact = spike_gain(pool, shape)
    assert certified(pool, torch.randn(2, *shape, dtype=DT)) == pytest.approx(exact, rel=1e-9), pool


UNBATCHED_LINEAR = {  # the same pattern in the certified norms of the linear ops (which used to crash)
    "AvgPool2d(3, 1) on (B, 9, 9)": (nn.AvgPool2d(3, 1), (9, 9)),
    "AvgPool1d(3, 2, 1) on (B, L)": (nn.AvgPool1d(3, 2, 1), (9,)),
    "AdaptiveAvgPool2d(3) on (B, 8, 7)": (nn.AdaptiveAvgPool2d(3), (8, 7)),
    "AdaptiveAvgPool1d(4) on (B, L)": (nn.AdaptiveAvgPool1d(4), (9,)),
    "Conv2d(1, 2, 3) on (B, 9, 9)": (nn.Conv2d(1, 2, 3), (9, 9)),
    "Conv1d(1, 2, 3, stride=2) on (B, L)": (nn.Conv1d(1, 2, 3, stride=2), (11,)),
    "ConvTranspose2d(1, 2, 3) on (B, 6, 6)": (nn.ConvTranspose2d(1, 2, 3), (6, 6)),
}


@pytest.mark.parametrize("name", list(UNBATCHED_LINEAR))
def test_linear_ops_on_unbatched_inputs(name, no_dense_route):
    torch.manual_seed(0)
    op, shape = UNBATCHED_LINEAR[name]
    op = op.to(DT)
    x = torch.randn(2, *shape, dtype=DT)
    assert certified(op, x, **no_dense_route) >= jacobian_norm(op, x)


class UserClamp(nn.Module):
    """A user op registered as elementwise, that broadcasts its input 4 times (as torch.clamp(x, min=t) does)."""

    def forward(self, x):
        return torch.clamp(x, min=THRESHOLDS.to(x.dtype))


class UserRowSum(nn.Module):
    """A user op wrongly registered as elementwise: it sums rows."""

    def forward(self, x):
        return x.sum(-1)


def test_user_registered_elementwise_rules_get_the_shape_guard():
    exact = jacobian_norm(UserClamp(), torch.full((1, 1, 3), 10.0, dtype=DT))
    assert exact == pytest.approx(2.0, rel=1e-12)
    with lipreg.ops.registered(UserClamp, lipreg.ops.Activation(0.0, 1.0)):
        assert certified(UserClamp(), torch.randn(2, 1, 3, dtype=DT)) >= exact
    with lipreg.ops.registered(UserRowSum, lipreg.ops.Activation(0.0, 1.0)):
        with pytest.raises(lipreg.UnsupportedOpError, match="elementwise, but it maps 3 entries to 1"):
            lipreg.LipschitzEstimator(UserRowSum(), torch.randn(2, 3, dtype=DT))


# --------------------------------------------------------------- issue 16, class 2: bit reinterpretation
BIT_CASTS = {
    "float32 bits as int32": (lambda x: x.view(torch.int32) * 1.0, torch.float32, "'view'"),
    "float64 bits as int64": (lambda x: x.view(torch.int64) * 1.0, torch.float64, "'view'"),
    "float32 bits as float16": (lambda x: x.view(torch.float16) * 1.0, torch.float32, "'view'"),
    "view(dtype=...)": (lambda x: x.view(dtype=torch.int16) * 1.0, torch.float32, "'view'"),
    "view(y.dtype)": (lambda x: x.view(torch.zeros(1, dtype=torch.int32).dtype) * 1.0, torch.float32, "'view'"),
    "integer sum": (lambda x: x.sum(1, dtype=torch.int64) * 1.0, torch.float64, "'sum'"),
}


@pytest.mark.parametrize("name", list(BIT_CASTS))
def test_bit_reinterpretation_and_integer_values_are_refused(name):
    """``Tensor.view(dtype)`` was bounded as a reshape of norm 1 (or failed with a shape error when the widths
    differ) and an integer-valued sum with an autograd error from inside fx. Each is a step function of the input:
    one ulp of the input (1.2e-7 at 1.0 in float32) moves the int32 bits by 1, a ratio of 8e6 at 1.0 and of 1e45
    among subnormals, so no certificate holds. Refused at build, naming the op."""
    fn, dtype, op = BIT_CASTS[name]
    x = torch.ones(2, 6, dtype=dtype)
    step = torch.nextafter(x, torch.full_like(x, 2.0)) - x
    if "int32" in name:
        jump = (torch.nextafter(x, torch.full_like(x, 2.0)).view(torch.int32) - x.view(torch.int32)).to(dtype)
        assert float((jump / step).min()) > 1e6  # the reference: the op's difference quotient at one ulp
    model = nn.Sequential(nn.Linear(6, 6), Fn(fn)).to(dtype)
    with pytest.raises(lipreg.UnsupportedOpError, match=op):
        lipreg.LipschitzEstimator(model, x, dtype=dtype)

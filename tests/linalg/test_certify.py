"""Tests for lipreg.linalg.certify and lipreg.linalg.conv: certified spectral-norm bounds of dense matrices and
convolutions.

The independent reference is the exact norm: the largest singular value (torch.linalg
matrix_norm(., 2), i.e. an SVD) of the weight matrix, or of the dense Jacobian of the layer's
linear part built with torch.func.jacrev, in float64.  Where the Jacobian is too large, a
power-iteration value ||A x|| / ||x|| is used: it is a LOWER bound on the exact norm, so
"bound <= 1.01 * lower" implies "bound <= 1.01 * exact".
"""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lipreg.linalg import certify, conv, conv_layer, dense, maps, routes
from lipreg.linalg.certify import dense_spectral_bound, gram_spectral_bound
from lipreg.linalg.conv import conv_spectral_bound

F64 = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _exact_dense(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(W.to(torch.complex128 if W.is_complex() else F64), 2)


def _jacobian(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(1, *in_shape, dtype=F64)
    with torch.no_grad():
        jac = torch.func.jacrev(layer)(x)
    return jac.reshape(-1, math.prod(in_shape))


def _exact_layer(layer: nn.Module, in_shape: tuple[int, ...]) -> float:
    return torch.linalg.matrix_norm(_jacobian(layer, in_shape), 2).item()


def _power_lower(layer: nn.Module, in_shape: tuple[int, ...], iters: int = 300) -> float:
    """||A x|| / ||x|| after power iteration on A^T A: a lower bound on ||A||."""
    x = torch.randn(1, *in_shape, generator=_gen(1), dtype=F64)
    for _ in range(iters):
        x = (x / x.norm()).requires_grad_()
        (x,) = torch.autograd.grad(layer(x), x, layer(x).detach())
    x = x.detach() / x.norm()
    with torch.no_grad():
        return layer(x).norm().item()


def _layer(
    dims: int,
    c_in: int,
    c_out: int,
    k: int,
    *,
    seed: int = 0,
    transposed: bool = False,
    **kw,
) -> nn.Module:
    cls = (CONV_T if transposed else CONV)[dims]
    layer = cls(c_in, c_out, k, bias=False, **kw).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=_gen(seed), dtype=F64))
    return layer.requires_grad_(False)


def _bound(layer: nn.Module, spatial: tuple[int, ...], **kw) -> torch.Tensor:
    return conv_spectral_bound(
        layer.weight,
        spatial,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        padding_mode=layer.padding_mode,
        transposed=layer.transposed,
        output_padding=layer.output_padding,
        **kw,
    )


# ------------------------------------------------------------------------------------ dense


DENSE_SHAPES = [(1, 1), (7, 3), (3, 7), (20, 20), (64, 48), (100, 1), (2, 3, 5, 4), (6, 9, 2)]


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_gram_is_decreasing_upper_bound_and_converges(shape):
    W = _randn(*shape, seed=len(shape) + shape[-1])
    exact = _exact_dense(W)
    previous = None
    for n_iter in range(15):
        bound = gram_spectral_bound(W, n_iter=n_iter)
        assert bound.shape == W.shape[:-2]
        assert torch.all(bound >= exact)
        if previous is not None:
            assert torch.all(bound <= previous * (1 + 1e-12))
        previous = bound
    assert torch.allclose(previous, exact, rtol=1e-5, atol=0)


def test_gram_zero_iterations_is_frobenius():
    W = _randn(5, 4)
    assert torch.allclose(gram_spectral_bound(W, n_iter=0), torch.linalg.matrix_norm(W), rtol=2e-6)


def test_gram_worst_case_equal_singular_values():
    # All sigmas equal (orthogonal Q): ||G_T||_F^(1/2^T) = rank^(1/2^(T+1)) * sigma_1, the worst case.
    Q = torch.linalg.qr(_randn(16, 16))[0] * 3.0
    for n_iter in (1, 4, 8):
        expected = 3.0 * 16 ** (1 / 2 ** (n_iter + 1))
        assert gram_spectral_bound(Q, n_iter).item() == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_equals_exact(shape):
    W = _randn(*shape, seed=shape[0])
    bound = dense_spectral_bound(W)
    exact = _exact_dense(W)
    assert bound.shape == W.shape[:-2]
    assert torch.all(bound >= exact)
    assert torch.allclose(bound, exact, rtol=1e-5, atol=0)


def test_dense_gram_path_bounds_and_is_tight():
    W = _randn(3, 40, 30, seed=3)
    exact = _exact_dense(W)
    bound = dense_spectral_bound(W, exact_max_dim=0)  # force Gram iteration
    assert torch.all(bound >= exact)
    assert torch.allclose(bound, exact, rtol=1e-5, atol=0)
    loose = dense_spectral_bound(W, exact_max_dim=0, n_iter=2)
    assert torch.all(loose >= exact) and torch.all(loose <= exact * 30 ** (1 / 8) * (1 + 1e-5))


def test_dense_complex_batch():
    W = torch.complex(_randn(5, 4, 6, seed=1), _randn(5, 4, 6, seed=2))
    exact = _exact_dense(W)
    for bound in (dense_spectral_bound(W), gram_spectral_bound(W, n_iter=14)):
        assert bound.dtype == F64
        assert torch.all(bound >= exact)
        assert torch.allclose(bound, exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_low_precision_is_rounded_up(dtype):
    W = _randn(30, 20, seed=4).to(dtype)
    exact = _exact_dense(W.to(F64))
    for bound in (dense_spectral_bound(W), gram_spectral_bound(W, n_iter=12)):
        assert bound.dtype == dtype
        assert bound.to(F64) >= exact
        assert bound.to(F64) <= exact * (1 + 1e-6) * (1 + 2 * torch.finfo(dtype).eps)


def _sigma1_gradient(W: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(W)
    return torch.outer(U[:, 0], Vh[0])


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (32, 32)])
def test_dense_gradient_is_u_vT(shape):
    W = _randn(*shape, seed=5).requires_grad_()
    dense_spectral_bound(W).backward()
    expected = _sigma1_gradient(W.detach()) * (1 + 1e-6)
    assert torch.isfinite(W.grad).all()
    assert torch.allclose(W.grad, expected, atol=1e-8)
    W.grad = None
    gram_spectral_bound(W, n_iter=12).backward()
    assert torch.allclose(W.grad, expected, atol=1e-4)


def test_gradients_finite_at_degenerate_points():
    """Zero matrix and fully repeated sigma_1; Gram paths may overestimate by rank^(1/2^(T+1))."""
    paths = [
        (dense_spectral_bound, 1.0),
        (lambda w: gram_spectral_bound(w, 6), 5 ** (1 / 2**7)),
        (lambda w: dense_spectral_bound(w, exact_max_dim=0), 5 ** (1 / 2**11)),
    ]
    for W in (torch.zeros(4, 3, dtype=F64), torch.eye(5, dtype=F64)):
        for fn, worst in paths:
            leaf = W.clone().requires_grad_()
            bound = fn(leaf)
            bound.backward()
            assert torch.isfinite(leaf.grad).all()
            exact = _exact_dense(W).item()
            assert exact <= bound.item() <= exact * worst * (1 + 2e-6) + 1e-100


def test_dense_rejects_vectors():
    with pytest.raises(ValueError):
        dense_spectral_bound(torch.ones(3))
    with pytest.raises(ValueError):
        gram_spectral_bound(torch.ones(3, 3), n_iter=-1)


# ------------------------------------------------------------------------------ convolution


def _conv_grid():
    """(dims, spatial, k, stride, padding, dilation, groups, mode) for non-transposed convs."""
    spatial = {1: (9,), 2: (7, 6), 3: (5, 5, 6)}
    for dims, stride, padding, dilation, groups, mode in itertools.product(
        (1, 2, 3), (1, 2), (0, 1, "same"), (1, 2), (1, 2), ("zeros", "circular", "reflect", "replicate")
    ):
        if padding == "same" and stride != 1:
            continue
        if dims == 3 and (dilation, groups) != (1, 1) and mode in ("reflect", "replicate"):
            continue  # keep the suite fast; 3-d dilation/groups are covered with the other modes
        yield dims, spatial[dims], 3, stride, padding, dilation, groups, mode


@pytest.mark.parametrize("dims,spatial,k,stride,padding,dilation,groups,mode", list(_conv_grid()))
def test_conv_certified_over_hyperparameter_grid(dims, spatial, k, stride, padding, dilation, groups, mode):
    hyper = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "padding_mode": mode}
    layer = _layer(dims, 2 * groups, 2 * groups, k, **hyper)
    c_in = layer.in_channels
    exact = _exact_layer(layer, (c_in, *spatial))
    fourier = _bound(layer, spatial, dense_max_entries=0).item()
    default = _bound(layer, spatial).item()
    assert fourier >= exact
    assert default >= exact
    assert default <= exact * (1 + 2e-6)  # tiny operator: the dense exact norm is used


@pytest.mark.parametrize(
    "dims,spatial,k,stride,padding,out_pad,dilation,groups",
    [
        (1, (6,), 3, 1, 0, 0, 1, 1),
        (1, (6,), 4, 2, 1, 1, 1, 2),
        (1, (5,), 3, 3, 2, 2, 1, 1),
        (1, (5,), 3, 1, 1, 1, 2, 1),  # output_padding >= stride, allowed since dilation > 1
        (2, (4, 5), 3, 2, 1, 1, 1, 1),
        (2, (4, 4), 4, 2, 1, 0, 1, 2),
        (2, (3, 4), 3, 2, 0, 1, 2, 1),
        (2, (5, 5), 3, 1, 1, 0, 1, 1),
        (3, (3, 3, 2), 3, 2, 1, 1, 1, 1),
        (3, (2, 3, 3), 2, 1, 0, 0, 1, 2),
    ],
)
def test_conv_transposed_certified(dims, spatial, k, stride, padding, out_pad, dilation, groups):
    layer = _layer(
        dims,
        2 * groups,
        3 * groups,
        k,
        transposed=True,
        stride=stride,
        padding=padding,
        output_padding=out_pad,
        dilation=dilation,
        groups=groups,
    )
    exact = _exact_layer(layer, (layer.in_channels, *spatial))
    assert _bound(layer, spatial, dense_max_entries=0).item() >= exact
    default = _bound(layer, spatial).item()
    assert exact <= default <= exact * (1 + 2e-6)


@pytest.mark.parametrize(
    "transposed,c_in,c_out,groups,kw",
    [
        (False, 6, 4, 2, {"stride": 2, "padding": 1}),
        (False, 3, 9, 3, {"padding": 2, "dilation": 2, "padding_mode": "reflect"}),
        (False, 4, 2, 1, {"padding": 1, "padding_mode": "circular"}),
        (False, 2, 8, 2, {"padding": "same", "padding_mode": "replicate"}),
        (True, 4, 6, 2, {"stride": 2, "padding": 1, "output_padding": 1}),
        (True, 9, 3, 3, {"padding": 1, "dilation": 2}),
    ],
)
def test_dense_route_exact_for_grouped_unequal_channels(transposed, c_in, c_out, groups, kw):
    """The dense route builds each group's block from its kernel slices: with c_in != c_out per group, the order
    of rows (output channel, pixel) and columns (input channel, pixel) matters; the norm is that of the Jacobian."""
    layer = _layer(2, c_in, c_out, 3, seed=c_in + c_out, transposed=transposed, groups=groups, **kw)
    spatial = (5, 6)
    exact = _exact_layer(layer, (c_in, *spatial))
    assert exact <= _bound(layer, spatial).item() <= exact * (1 + 2e-6)


def test_transposed_conv_equals_adjoint_conv_bound():
    """A transposed conv (output_padding < stride) is the adjoint of the conv on its output shape."""
    layer_t = _layer(2, 4, 6, 3, transposed=True, stride=2, padding=1, output_padding=1)
    out_shape = tuple(layer_t(torch.zeros(1, 4, 5, 6, dtype=F64)).shape[2:])
    for dense in (0, 2**20):
        from_t = conv_spectral_bound(
            layer_t.weight, (5, 6), 2, 1, transposed=True, output_padding=1, dense_max_entries=dense
        )
        from_conv = conv_spectral_bound(layer_t.weight, out_shape, 2, 1, dense_max_entries=dense)
        assert from_t.item() == pytest.approx(from_conv.item(), rel=1e-9)


CIRCULAR_EXACT = [
    (1, (8,), 3, 1, 1),
    (1, (7,), 4, 1, 1),
    (2, (8, 10), 3, 1, 1),
    (2, (6, 7), 4, 1, 1),  # even kernel: asymmetric 'same' padding
    (2, (9, 7), 5, 2, 1),  # dilated, kernel extent 9 > 7: taps alias on the grid
    (2, (8, 6), 3, 1, 2),  # stride dividing the size: still exact (polyphase)
    (3, (4, 5, 4), 3, 1, 1),
]


@pytest.mark.parametrize("dims,spatial,k,dilation,stride", CIRCULAR_EXACT)
def test_circular_same_is_exact(dims, spatial, k, dilation, stride):
    padding = "same" if stride == 1 else (k - 1) // 2 * dilation
    layer = _layer(dims, 3, 4, k, padding=padding, dilation=dilation, stride=stride, padding_mode="circular")
    exact = _exact_layer(layer, (3, *spatial))
    bound = _bound(layer, spatial, dense_max_entries=0).item()
    assert exact <= bound <= exact * (1 + 1e-5)


@pytest.mark.parametrize(
    "c,n,padding",
    [(16, 16, 1), (16, 16, "same"), (8, 32, 1), (32, 16, 1)],
)
def test_zero_padded_fourier_bound_is_tight(c, n, padding):
    """Stride-1 zero-padded 3x3 convs, Fourier bound only: within 1% of the exact norm."""
    layer = _layer(2, c, c, 3, padding=padding, seed=c + n)
    bound = _bound(layer, (n, n), dense_max_entries=0).item()
    lower = _power_lower(layer, (c, n, n))
    assert bound <= 1.01 * lower


@pytest.mark.parametrize("c,n,padding", [(8, 8, 1), (4, 8, 0), (16, 8, "same"), (4, 12, 1)])
def test_zero_padded_small_default_is_tight(c, n, padding):
    """Small operators (<= 2^20 entries) also get their exact dense norm: within 1% (in fact exact)."""
    layer = _layer(2, c, c, 3, padding=padding, seed=c)
    exact = _exact_layer(layer, (c, n, n))
    assert exact <= _bound(layer, (n, n)).item() <= 1.01 * exact


def test_strided_fourier_bound_uses_polyphase():
    """Stride 2 is handled exactly on the circular grid, not by dropping the stride."""
    layer = _layer(2, 8, 8, 3, stride=2, padding=1)
    exact = _exact_layer(layer, (8, 16, 16))
    bound = _bound(layer, (16, 16), dense_max_entries=0).item()
    assert exact <= bound <= 1.02 * exact


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": 1},
        {"padding": 1, "stride": 2, "groups": 2},
        {"padding": "same", "padding_mode": "circular"},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "stride": 2, "output_padding": 1, "transposed": True},
    ],
)
@pytest.mark.parametrize("dense", [0, 2**20])
def test_conv_bound_gradient(kw, dense):
    """Gradients exist, are finite, and match central finite differences."""
    kw = dict(kw)
    transposed = kw.pop("transposed", False)
    layer = _layer(2, 4, 4, 3, transposed=transposed, **kw)
    weight = layer.weight.detach().clone().requires_grad_()

    def f(w: torch.Tensor) -> torch.Tensor:
        return conv_spectral_bound(
            w, (6, 6), layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode, transposed,
            layer.output_padding, dense_max_entries=dense,
        )

    f(weight).backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    direction = torch.randn(weight.shape, generator=_gen(7), dtype=F64)
    eps = 1e-6
    with torch.no_grad():
        numeric = (f(weight + eps * direction) - f(weight - eps * direction)) / (2 * eps)
    assert (weight.grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-6)


def test_conv_float32_weight():
    layer = _layer(2, 3, 5, 3, padding=1)
    w32 = layer.weight.float().requires_grad_()
    with torch.no_grad():
        layer.weight.copy_(w32.double())  # the exact norm of the float32 weights
    exact = _exact_layer(layer, (3, 8, 8))
    for dense in (0, 2**20):
        bound = conv_spectral_bound(w32, (8, 8), padding=1, dense_max_entries=dense)
        assert bound.dtype == torch.float32 and bound.dim() == 0
        assert bound.double().item() >= exact
        bound.backward()
        assert torch.isfinite(w32.grad).all()


def test_conv_invalid_arguments():
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (8, 8), stride=2, padding="same")
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (8, 8), padding_mode="mirror")
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (8, 8), padding=1, padding_mode="reflect", transposed=True)
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (8, 8), transposed=True, stride=2, output_padding=2)
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (2, 2))  # kernel larger than the input
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (8, 8), groups=3)
    with pytest.raises(ValueError):
        conv_spectral_bound(w, (8, 8, 8))


# ------------------------------------------------------------------------------ property


@st.composite
def conv_configs(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    spatial = tuple(draw(st.integers(1, 7 if dims < 3 else 4)) for _ in range(dims))
    if transposed:
        padding = draw(st.integers(0, 2))
        mode = "zeros"
        out_pad = draw(st.integers(0, max(stride, dilation) - 1))
    else:
        padding = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
        mode = draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"]))
        out_pad = 0
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    return dims, transposed, groups, k, stride, dilation, spatial, padding, mode, out_pad, c_in, c_out, seed


def _build_or_none(config):
    dims, transposed, groups, k, stride, dilation, spatial, padding, mode, out_pad, c_in, c_out, seed = config
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "padding_mode": mode}
    if transposed:
        kw["output_padding"] = out_pad
    try:
        layer = _layer(dims, c_in, c_out, k, seed=seed, transposed=transposed, **kw)
        layer(torch.zeros(1, c_in, *spatial, dtype=F64))
    except (RuntimeError, ValueError, NotImplementedError):
        return None  # a combination torch itself rejects
    return layer


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(conv_configs())
def test_property_certified_bound_is_upper_bound(config):
    layer = _build_or_none(config)
    assume(layer is not None)
    spatial = config[6]
    exact = _exact_layer(layer, (layer.in_channels, *spatial))
    for dense in (0, 2**20):
        bound = _bound(layer, spatial, dense_max_entries=dense).item()
        assert bound >= exact


@pytest.mark.parametrize("module", [certify, conv, conv_layer, dense, maps, routes])
def test_module_is_a_leaf(module):
    """The certificates import nothing of lipreg but each other (certify.py decides, from routes.py, conv.py and
    dense.py's numerics) and the leaf :mod:`lipreg.policy` (their default limits): what a soundness review reads."""
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "lipreg" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            sibling = node.level == 1 and node.module in {"certify", "conv", "conv_layer", "dense", "maps", "routes"}
            policy = node.level == 2 and node.module == "policy"
            assert sibling or policy or (node.level == 0 and (node.module or "").split(".")[0] != "lipreg")


# ------------------------------------------------------------------------------ operators of fused nodes


class _ConvBNScale(nn.Module):
    """conv -> eval batch norm (spread gains) -> optionally a product by a per-pixel (not per-channel) constant."""

    def __init__(self, per_pixel: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, groups=1)
        self.bn = nn.BatchNorm2d(5)
        generator = _gen(3)
        self.bn.weight.data = torch.exp(4 * torch.rand(5, generator=generator) - 2)
        self.bn.running_var = torch.exp(4 * torch.rand(5, generator=generator) - 2)
        self.register_buffer("pixel", torch.rand(1, 1, 6, 6, generator=generator) + 0.5 if per_pixel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y * self.pixel if self.pixel is not None else y


@pytest.mark.parametrize("per_pixel", [False, True])
def test_small_fused_node_certified_norm_is_exact(per_pixel):
    """A small node of one weighted op is certified from its weight with the BN gains folded in; a diagonal op
    whose gains cannot fold (per pixel) must not turn it into a product of norms: exact either way."""
    import lipreg

    torch.manual_seed(0)
    model = _ConvBNScale(per_pixel).eval()
    (operator,) = lipreg.LipschitzEstimator(model, torch.randn(2, 3, 6, 6)).linear_operators().values()
    exact = _exact_layer(model.double().requires_grad_(False), (3, 6, 6))
    certified = operator.certified_norm().item()
    assert exact <= certified <= exact * (1 + 2e-6)

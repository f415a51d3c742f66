"""Adversarial review of this round's certificates: every certified number against an independent exact reference.

References: the SVD of a float64 ``torch.func.jacrev`` Jacobian (exact for a linear model), and for piecewise-linear
nets with one hidden layer of ``h <= n_in`` units in general position (all ``2^h`` activation patterns are realised)
the exact constant ``max_D ||W_2 D W_1||`` over the patterns ``D``, brute force; per pair ``max_D ||(e_i - e_j)^T
W_2 D W_1||``. Deeper nets get sampled Jacobians (a lower bound of the truth). A certified value below a reference
(beyond ``1e-9`` relative) is a violation.
"""
from __future__ import annotations

import itertools
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
import lipreg.bounds.certificates as certificates
import lipreg.margins as margins

DT = torch.float64
TOL = 1e-9
POLICIES = {"dense": lipreg.BoundPolicy(), "per-op": lipreg.BoundPolicy(dense_entries=0),
            "fft": lipreg.BoundPolicy(dense_entries=0, conv_dense_entries=0)}
NO_SEQLIP = lipreg.BoundPolicy(exact_search_units=0)
"""Exact SeqLip off (``search="auto"`` plans greedy searches, never certified): LipLT and ECLipsE are tested."""


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """``||J||_2`` of ``model`` at ``x`` in float64: the exact constant of a linear model."""
    model = model.to(DT)
    jac = torch.func.jacrev(lambda v: model(v))(x.to(DT)).detach()
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2))


def certify(model: nn.Module, x: torch.Tensor, **options) -> tuple[float, float]:
    """``certified_bound()`` and the product of ``layer_bounds(certified=True)``."""
    est = lipreg.LipschitzEstimator(model, x, **options)
    product = 1.0
    for value in est.layer_bounds(certified=True).values():
        product *= value
    return float(est.certified_bound()), product


# ------------------------------------------------------------------- regression: NaN candidates
def test_all_zero_weights_certify_zero_not_nan():
    """Exact SeqLip on all-zero weights gives NaN (0 / 0); the tightest certificate took it (``torch.min``
    propagates NaN), so ``certified_bound()`` was NaN for a constant model and warned of an overflow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.5), nn.Linear(4, 4), nn.LeakyReLU(0.5), nn.Linear(4, 3))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.zero_()
    x = torch.randn(1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bound = float(lipreg.LipschitzEstimator(model, x).certified_bound())
        pairs = lipreg.MarginCertificate(model, x).certified()
    assert bound >= jacobian_norm(model, x) == 0.0
    assert bool((pairs == 0).all())


def test_tightest_skips_nan_candidates_only_where_others_exist():
    nan = float("nan")
    name, best = certificates.tightest({"seqlip": torch.tensor([nan, nan]), "liplt": torch.tensor([2.0, nan])})
    assert name == "liplt" and best[0] == 2.0 and bool(best[1].isnan())


# ------------------------------------------------------------------- linear routes: convolutions and channel chains
def _bn(rng: random.Random, dims: int, channels: int) -> nn.Module:
    """An eval batch norm with gains of mixed sign over two orders of magnitude."""
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](channels).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([rng.choice([-1, 1]) * 10 ** rng.uniform(-1, 1) for _ in range(channels)]))
        bn.running_var.uniform_(0.01, 3.0)
    return bn


def _random_conv(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """A conv (odd sizes, stride above the kernel, dilation, groups of one channel, transposed, every padding mode,
    'same' / 'valid'), batch norms of mixed sign around it, sometimes a 1x1 conv after it, batched or not."""
    dims = rng.choice([1, 2, 2, 3])
    groups = rng.choice([1, 1, 2, 3])
    c_in, c_out = groups * rng.choice([1, 2, 3]), groups * rng.choice([1, 2, 3])
    transposed = rng.random() < 0.3
    kwargs = dict(kernel_size=[rng.choice([1, 1, 2, 3]) for _ in range(dims)],
                  stride=[rng.choice([1, 2, 3, 4]) for _ in range(dims)],
                  dilation=[rng.choice([1, 1, 2]) for _ in range(dims)], groups=groups,
                  padding=[rng.choice([0, 1, 2]) for _ in range(dims)], bias=rng.random() < 0.5)
    if transposed:
        kwargs["output_padding"] = [rng.randrange(max(s, d)) for s, d in zip(kwargs["stride"], kwargs["dilation"])]
        conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](c_in, c_out, **kwargs)
    else:
        kwargs["padding_mode"] = rng.choice(["zeros", "reflect", "replicate", "circular"])
        if rng.random() < 0.3:
            kwargs["padding"] = rng.choice(["same", "valid"])
            kwargs["stride"] = 1
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](c_in, c_out, **kwargs)
    layers = [_bn(rng, dims, c_in)] if rng.random() < 0.4 else []
    layers.append(conv)
    if rng.random() < 0.5:
        layers.append(_bn(rng, dims, c_out))
    if rng.random() < 0.3:
        layers.append((nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](c_out, rng.choice([1, 2, 4]), 1,
                                                                  stride=rng.choice([1, 2]), padding=rng.choice([0, 1])))
    sizes = [rng.choice([1, 2, 3, 5, 7] if dims < 3 else [1, 2, 3]) for _ in range(dims)]
    batch = [] if c_in == 1 and rng.random() < 0.5 else [1]  # unbatched: lipreg's sample is x[:1], (1, *sizes)
    return nn.Sequential(*layers).eval(), (*batch, c_in, *sizes)


def _valid(model: nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with torch.no_grad():
            return model(torch.zeros(shape)).numel() > 0
    except (RuntimeError, ValueError):  # a geometry torch rejects
        return False


def test_conv_routes_never_below_the_jacobian():
    """Every conv route (1x1 at any stride, per group, small-map dense, FFT, Gram beyond 1024 not here), with gains
    folded, in every model dtype and weight scale, against the exact norm of the float64 Jacobian."""
    rng, checked = random.Random(0), 0
    torch.manual_seed(0)
    while checked < 60:
        model, shape = _random_conv(rng)
        if not _valid(model, shape):
            continue
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(rng.choice([1.0, 1.0, 1e-30, 1e30]) if p.dim() > 1 else 1.0)
        x = torch.randn(shape)
        dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32, torch.float64])
        if not all(bool(p.to(dtype).isfinite().all()) for p in model.parameters()):
            continue
        exact = jacobian_norm(model.to(dtype), x)  # of the model in its own dtype's weights
        model.to(dtype)
        for policy in POLICIES.values():
            bound, product = certify(model, x.to(dtype), policy=policy, dtype=rng.choice([torch.float32, DT]))
            assert min(bound, product) >= exact * (1 - TOL), (model, shape, dtype, policy)
            checked += 1


class _Gains(nn.Module):
    """Linear layers / 1x1 convs with constant multipliers (buffers) between them."""

    def __init__(self, layers: list[nn.Module], gains: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for i, gain in enumerate(gains):
            self.register_buffer(f"g{i}", gain)
        self.n_gains = len(gains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            gain = getattr(self, f"g{i}")
            x = x if gain is None else x * gain
        return x


def _random_chain(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """A chain of 1x1 convs (any stride, zero padding, groups, transposed) or of linear layers (on 2-D or 3-D
    inputs), with multipliers that are per channel, constant, or vary along another axis (must not be folded)."""
    conv = rng.random() < 0.6
    if conv:
        dims = rng.choice([1, 2])
        channels = rng.choice([1, 2, 3, 4])
        batch = [] if channels == 1 and rng.random() < 0.5 else [1]  # unbatched (C = 1, *sizes)
        shape = batch + [channels] + [rng.choice([1, 2, 3, 4]) for _ in range(dims)]
    else:
        shape = [rng.choice([1, 2, 3]) for _ in range(rng.choice([1, 2]))] + [rng.choice([1, 2, 3, 4])]
        channels = shape[-1]
    layers, gains, x = [], [], torch.zeros(shape)
    for _ in range(rng.choice([2, 3])):
        out = rng.choice([1, 2, 3, 4])
        if conv:
            groups = rng.choice([1, math.gcd(channels, out)])
            transposed = rng.random() < 0.25
            cls = ((nn.ConvTranspose1d, nn.ConvTranspose2d) if transposed else (nn.Conv1d, nn.Conv2d))[dims - 1]
            stride = rng.choice([1, 2, 3])
            extra = {"output_padding": rng.choice([0, 1])} if transposed and stride > 1 else {}
            layer = cls(channels, out, 1, stride=stride, padding=rng.choice([0, 0, 1]), groups=groups, bias=False,
                        **extra)
        else:
            layer = nn.Linear(channels, out, bias=False)
        with torch.no_grad():
            layer.weight.mul_(rng.choice([1.0, 1e-3, 1e3]))
            x = layer(x)
        axis = x.dim() - 1 - (dims if conv else 0)
        kind = rng.choice(["channel", "channel", "scalar", "other", "full", None])
        gain_shape = {"channel": [x.shape[a] if a == axis else 1 for a in range(x.dim())], "scalar": [],
                      "full": list(x.shape), None: None,
                      "other": [x.shape[a] if a == (axis + 1) % x.dim() else 1 for a in range(x.dim())]}[kind]
        gains.append(None if gain_shape is None else torch.randn(gain_shape) * rng.choice([0.1, 1.0, 10.0]))
        layers.append(layer)
        channels = out
    return _Gains(layers, gains).eval(), tuple(shape)


def test_channel_chains_never_below_their_matrix():
    """Chains of channel mixings with gains (the product-matrix route) against the dense float64 matrix of the
    model (built by forward passes on the basis: the model is linear and has no bias)."""
    rng, checked = random.Random(1), 0
    torch.manual_seed(1)
    while checked < 60:
        model, shape = _random_chain(rng)
        if not _valid(model, shape):
            continue
        basis = torch.eye(math.prod(shape), dtype=DT)
        with torch.no_grad():
            model64 = model.to(DT)
            matrix = torch.stack([model64(e.view(shape)).flatten() for e in basis], 1)
        exact = float(torch.linalg.matrix_norm(matrix, 2))
        model.float()
        for name, policy in POLICIES.items():
            try:
                bound, _ = certify(model, torch.randn(shape), policy=policy)
            except lipreg.UnsupportedOpError:  # a refusal is sound: per-op routes with a gain that does not fold
                assert name != "dense"
                continue
            assert bound >= exact * (1 - TOL), (model, shape)
            checked += 1


# ------------------------------------------------------------------- resampling, padding, shuffles, split parts
class _Op(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _random_op(rng: random.Random):
    """``(fn, shape)``: interpolate / upsample (every mode, scale factors below and above 1, non-integer, sizes,
    align_corners, antialias), F.pad in every mode (negative amounts crop), shuffles, parts of split / chunk /
    unbind / tensor_split times a constant."""
    dims = rng.choice([1, 2, 3])
    sizes = [rng.choice([1, 2, 3, 4, 5, 7]) for _ in range(dims)]
    shape = (1, rng.choice([1, 2, 3]), *sizes)
    kind = rng.choice(["resample", "resample", "pad", "pad", "shuffle", "split"])
    if kind == "resample":
        mode = rng.choice(["nearest", "nearest-exact", "area", ("linear", "bilinear", "trilinear")[dims - 1]]
                          + (["bicubic"] if dims == 2 else []))
        corners = rng.choice([None, True, False]) if mode in ("linear", "bilinear", "trilinear", "bicubic") else None
        antialias = mode in ("bilinear", "bicubic") and rng.random() < 0.3
        if rng.random() < 0.5:
            scale = tuple(rng.choice([0.5, 0.7, 1.0, 1.5, 2.0, 2.5, 3.0]) for _ in range(dims))
            recompute = rng.choice([None, True, False])
            return (lambda x: F.interpolate(x, scale_factor=scale, mode=mode, align_corners=corners,
                                            recompute_scale_factor=recompute, antialias=antialias)), shape
        size = [rng.choice([1, 2, 3, 5, 8]) for _ in range(dims)]
        return nn.Upsample(size=size, mode=mode, align_corners=corners), shape
    if kind == "pad":
        mode = rng.choice(["constant", "reflect", "replicate", "circular"])
        pad = [rng.randint(-1, n + 1) for n in reversed(sizes[rng.randrange(dims):]) for _ in range(2)]
        return (lambda x: F.pad(x, pad, mode=mode, value=1.0) if mode == "constant" else F.pad(x, pad, mode=mode)), \
            shape
    if kind == "shuffle":
        r = rng.choice([2, 3])
        if rng.random() < 0.5:
            return (lambda x: F.pixel_shuffle(x, r) * 2.0), (1, r * r * shape[1], *shape[2:4])
        return (lambda x: F.pixel_unshuffle(x, r) * 2.0), (1, shape[1], r * shape[2], r * rng.choice([1, 2]))
    dim = rng.randrange(1, len(shape))
    return rng.choice([lambda x: torch.split(x, 2, dim)[-1] * 3.0, lambda x: torch.chunk(x, 2, dim)[0] * -2.0,
                       lambda x: x.unbind(dim)[-1] * 1.5, lambda x: torch.tensor_split(x, 3, dim)[1] * 2.0]), shape


def test_resampling_padding_shuffles_and_parts_never_below_the_jacobian():
    rng, checked = random.Random(2), 0
    torch.manual_seed(2)
    while checked < 80:
        fn, shape = _random_op(rng)
        model = fn if isinstance(fn, nn.Module) else _Op(fn)
        if not _valid(model, shape):
            continue
        x = torch.randn(shape)
        exact = jacobian_norm(model, x)
        model.float()
        for policy in (POLICIES["per-op"], POLICIES["dense"]):  # per-op: the op's own closed form
            bound, product = certify(model, x, policy=policy)
            assert bound >= exact * (1 - TOL), (shape, fn)
            checked += 1


# ------------------------------------------------------------------- chain certificates: LipLT, ECLipsE, per pair
SLOPED = {"relu": nn.ReLU, "leaky 0.1": lambda: nn.LeakyReLU(0.1), "leaky 3": lambda: nn.LeakyReLU(3.0),
          "leaky -0.5": lambda: nn.LeakyReLU(-0.5), "leaky -2": lambda: nn.LeakyReLU(-2.0), "abs": lambda: _Op(torch.abs)}
"""Piecewise-linear activations of two slopes (``TWO_SLOPES``), slope intervals ``[a, b]`` with ``a < 0`` or ``b > 1``
among them."""
TWO_SLOPES = {"relu": (0.0, 1.0), "leaky 0.1": (0.1, 1.0), "leaky 3": (3.0, 1.0), "leaky -0.5": (-0.5, 1.0),
              "leaky -2": (-2.0, 1.0), "abs": (-1.0, 1.0)}


@pytest.fixture
def forced(monkeypatch):
    """``force(name)``: the tightest-certificate choice returns the candidate whose name ends with ``name`` (when it
    is offered), so that each certificate is checked on its own."""
    choice = {"name": None}
    original = certificates.tightest

    def tightest(candidates):
        for name, value in candidates.items():
            if choice["name"] is not None and name.endswith(choice["name"]):
                return name, value.to(DT)
        return original(candidates)
    monkeypatch.setattr(certificates, "tightest", tightest)
    monkeypatch.setattr(margins, "tightest", tightest)
    return lambda name: choice.update(name=name)


def _exact_one_hidden(model: nn.Sequential, slopes: tuple[float, float]) -> tuple[float, torch.Tensor]:
    """The exact constant and per-pair constants of a net ``W_2 rho(W_1 x + b_1) + b_2`` with one hidden layer,
    ``W_1`` of full row rank ``h <= n``: every pattern ``D`` in ``{a, b}^h`` is realised, so the constant is
    ``max_D ||W_2 D W_1||`` and the pair's ``max_D ||(e_i - e_j)^T W_2 D W_1||`` (brute force)."""
    w1, w2 = model[0].weight.detach().to(DT), model[2].weight.detach().to(DT)
    best, pairs = 0.0, torch.zeros(w2.shape[0], w2.shape[0], dtype=DT)
    for pattern in itertools.product(slopes, repeat=w1.shape[0]):
        jac = w2 @ torch.diag(torch.tensor(pattern, dtype=DT)) @ w1
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
        pairs = torch.maximum(pairs, (jac[:, None] - jac[None]).norm(dim=-1))
    return best, pairs


@pytest.mark.parametrize("activation", list(SLOPED))
def test_chain_certificates_never_below_the_exact_constant(forced, activation):
    """LipLT, ECLipsE-Fast and their per-pair forms, each forced, on one-hidden-layer nets whose exact constant is
    known by brute force over the activation patterns (slopes with ``a < 0`` or ``b > 1`` included)."""
    torch.manual_seed(3)
    for trial in range(3):
        hidden, n_in = 4, 4 + trial
        model = nn.Sequential(nn.Linear(n_in, hidden), SLOPED[activation](), nn.Linear(hidden, 3)).eval()
        exact, pairs = _exact_one_hidden(model, TWO_SLOPES[activation])
        x = torch.randn(1, n_in)
        for name in ("liplt", "eclipse", None):
            forced(name)
            est = lipreg.LipschitzEstimator(model, x, method="liplt", policy=NO_SEQLIP, dtype=DT)
            assert float(est.certified_bound()) >= exact * (1 - TOL), (activation, name, est.certificate)
            margin = lipreg.MarginCertificate(model, x, method="liplt", policy=NO_SEQLIP)
            assert bool((margin.certified() >= pairs * (1 - TOL)).all()), (activation, name, margin.certificate)


def test_eclipse_refuses_a_negative_lower_slope():
    """ECLipsE drops ``lambda a b ||W dx||^2``, nonnegative only for ``a >= 0``: it must not certify otherwise."""
    from lipreg.bounds.eclipse import certified_eclipse
    weights = [torch.randn(4, 3, dtype=DT)]
    assert certified_eclipse(weights, [(-0.5, 1.0)], torch.randn(2, 4, dtype=DT)) is None
    assert certified_eclipse(weights, [(1.0, 3.0)], torch.randn(2, 4, dtype=DT)) is not None


def test_verified_gram_bound_on_a_clustered_spectrum():
    """Beyond 1024-square Gram matrices, a Lanczos value proved by a shifted Cholesky factorisation: a top eigenvalue
    1e-6 above a cluster of 1,099 others (Lanczos cannot separate them) stays above ``eigvalsh``'s."""
    from lipreg.linalg.dense import verified_sigma
    torch.manual_seed(4)
    n = 1100
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT))
    spectrum = torch.cat([torch.ones(1, dtype=DT), torch.full((n - 1,), 1 - 1e-6, dtype=DT)])
    gram = (q * spectrum) @ q.T
    gram = (gram + gram.T) / 2
    assert float(verified_sigma(gram)) >= float(torch.linalg.eigvalsh(gram)[-1].sqrt())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("layer", [0, 2, 4])
def test_margin_certificate_of_non_finite_weights_is_non_finite_not_an_error(layer, value):
    """A NaN / inf weight in the body reached ECLipsE's ``eigvalsh`` through the per-pair certificates and raised
    torch's ``LinAlgError`` (issue 16: non-finite weights give the documented warning and a non-finite value)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[layer].weight[0, 0] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-finite warning of certified_bound()
        pairs = lipreg.MarginCertificate(model, torch.randn(1, 3)).certified()
    assert not bool(pairs[0, 1:].isfinite().any())  # every pair through the non-finite entry (row 0 of the head)

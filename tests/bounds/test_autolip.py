"""AutoLip (paper Alg. 1) over whole graphs, gradients of the bound, warm start and state.

References are built layer by layer from independent exact norms (``matrix_norm(W, 2)``, the SVD of a dense
``jacrev`` Jacobian, closed forms for batch norm and max pooling) and combined by hand: a product along a chain,
``1 + L(g)`` for a residual block ``x + g(x)``, ``sqrt(sum L_i^2)`` for a concatenation.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg

DT = torch.float64
REL = 1e-4


def jacobian_norm(fn, in_shape: tuple[int, ...]) -> float:
    """sigma_max of the dense Jacobian of ``fn`` (an affine map: its linear part) at a sample of ``in_shape``."""
    x = torch.randn(1, *in_shape, dtype=DT)
    with torch.no_grad():
        jac = torch.func.jacrev(fn)(x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), 2))


def spectral(layer: nn.Linear) -> float:
    return float(torch.linalg.matrix_norm(layer.weight.detach().to(DT), 2))


def bn_norm(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """max_c |gamma_c| / sqrt(var_c + eps), written out."""
    gain = bn.weight.detach().to(DT).abs() / torch.sqrt(bn.running_var.to(DT) + bn.eps)
    return float(gain.max())


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 3.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    return bn


def bound(model: nn.Module, x: torch.Tensor, fuse: bool = False, **options) -> tuple[float, lipreg.LipschitzEstimator]:
    est = lipreg.LipschitzEstimator(model, x, dtype=DT, fuse=fuse, **options)
    return float(est.converge(tol=1e-12).detach()), est


# ------------------------------------------------------------------------------------------ sequential
def test_mlp_is_the_product_of_spectral_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.LeakyReLU(0.1), nn.Linear(8, 7), nn.Tanh(),
                          nn.Linear(7, 3)).to(DT)
    value, est = bound(model, torch.randn(4, 6, dtype=DT))
    norms = [spectral(model[i]) for i in (0, 2, 4, 6)]
    assert value == pytest.approx(math.prod(norms), rel=REL)
    layers = est.layer_bounds()
    for i, norm in zip((0, 2, 4, 6), norms):
        assert layers[str(i)] == pytest.approx(norm, rel=REL)
    assert layers["1"] == 1.0 and layers["3"] == 1.0


def test_sigmoid_mlp_uses_a_quarter():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 2)).to(DT)
    value, _ = bound(model, torch.randn(2, 4, dtype=DT))
    reference = spectral(model[0]) * spectral(model[2]) * spectral(model[4]) / 16
    assert value == pytest.approx(reference, rel=REL)


def test_linear_chain_fused_is_the_norm_of_the_product():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4), nn.Linear(4, 3)).to(DT)
    x = torch.randn(3, 6, dtype=DT)
    unfused, _ = bound(model, x)
    fused, est = bound(model, x, fuse=True)
    first = torch.linalg.matrix_norm((model[1].weight @ model[0].weight).detach(), 2)
    last = torch.linalg.matrix_norm((model[4].weight @ model[3].weight).detach(), 2)
    assert fused == pytest.approx(float(first * last), rel=REL)
    assert unfused == pytest.approx(math.prod(spectral(model[i]) for i in (0, 1, 3, 4)), rel=REL)
    assert fused <= unfused
    assert set(est.layer_bounds()) == {"0+1", "2", "3+4"}


class SmallCNN(nn.Module):
    """conv -> BN -> ReLU -> max pool 3/2 -> conv -> BN -> LeakyReLU -> avg pool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = randomize_bn(nn.BatchNorm2d(4))
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular")
        self.bn2 = randomize_bn(nn.BatchNorm2d(3))
        self.pool2 = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(F.leaky_relu(self.bn2(self.conv2(x)), 0.2))
        return self.fc(torch.flatten(x, 1))


def test_cnn_with_batch_norm_and_pooling():
    torch.manual_seed(3)
    model = SmallCNN().to(DT).eval()
    x = torch.randn(2, 2, 9, 9, dtype=DT)
    # unfused: the product of every layer's own exact norm; max pool 3x3 stride 2 is exactly 2
    unfused, est = bound(model, x)
    per_layer = [jacobian_norm(model.conv1, (2, 9, 9)), bn_norm(model.bn1), 2.0,
                 jacobian_norm(model.conv2, (4, 4, 4)), bn_norm(model.bn2),
                 jacobian_norm(model.pool2, (3, 4, 4)), spectral(model.fc)]
    assert unfused == pytest.approx(math.prod(per_layer), rel=REL)
    assert est.layer_bounds()["pool1"] == 2.0
    # fused: conv1+bn1, conv2+bn2 and pool2+flatten+fc are each one operator with its exact norm
    fused, est = bound(model, x, fuse=True)
    segment1 = jacobian_norm(nn.Sequential(model.conv1, model.bn1), (2, 9, 9))
    segment2 = jacobian_norm(nn.Sequential(model.conv2, model.bn2), (4, 4, 4))
    segment3 = jacobian_norm(nn.Sequential(model.pool2, nn.Flatten(), model.fc), (3, 4, 4))
    assert fused == pytest.approx(segment1 * 2.0 * segment2 * segment3, rel=REL)
    assert set(est.layer_bounds()) == {"conv1+bn1", "relu", "pool1", "conv2+bn2", "leaky_relu",
                                       "pool2+flatten+fc"}
    assert fused <= unfused * (1 + 1e-9)


# ------------------------------------------------------------------------------------------- branches
class Residual(nn.Module):
    """x -> l0 -> h + l2(relu(l1(h))) -> (that) + proj(that) ... -> out: sums, never products, at the adds."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.l0 = nn.Linear(4, width)
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.l0(x)
        h = h + self.l2(torch.relu(self.l1(h)))  # identity shortcut: 1 + L(g)
        h = self.b(torch.tanh(self.a(h))) - self.proj(h)  # projection shortcut, subtracted: L(g) + L(proj)
        return self.out(h)


def test_residual_network_sums_at_the_adds():
    torch.manual_seed(4)
    model = Residual().to(DT)
    s = {name: spectral(layer) for name, layer in model.named_children()}
    reference = s["l0"] * (1 + s["l1"] * s["l2"]) * (s["a"] * s["b"] + s["proj"]) * s["out"]
    for fuse in (False, True):  # nothing to fuse: every linear output feeds a branch or an add
        value, _ = bound(model, torch.randn(3, 4, dtype=DT), fuse=fuse)
        assert value == pytest.approx(reference, rel=REL)


def test_residual_of_the_input_itself():
    torch.manual_seed(5)
    inner = nn.Linear(5, 5).to(DT)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return x + 0.5 * torch.relu(self.inner(x)) + x

    value, _ = bound(Block(), torch.randn(2, 5, dtype=DT))
    assert value == pytest.approx(2 + 0.5 * spectral(inner), rel=REL)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(5, 4)
        self.q = nn.Linear(5, 6)
        self.r = nn.Conv1d(1, 2, 3)
        self.out = nn.Linear(4 + 6 + 2 * 3, 3)

    def forward(self, x):
        parts = [self.p(x), torch.sigmoid(self.q(x)), self.r(x[:, None, :]).flatten(1)]
        return self.out(torch.cat(parts, dim=1))


def test_concatenation_is_the_root_of_the_sum_of_squares():
    torch.manual_seed(6)
    model = Concat().to(DT)
    parts = [spectral(model.p), spectral(model.q) / 4, jacobian_norm(model.r, (1, 5))]
    reference = math.sqrt(sum(p * p for p in parts)) * spectral(model.out)
    for fuse in (False, True):  # r -> flatten fuse, still the norm of r
        value, _ = bound(model, torch.randn(2, 5, dtype=DT), fuse=fuse)
        assert value == pytest.approx(reference, rel=REL)


def test_several_outputs_are_bounded_jointly():
    torch.manual_seed(7)
    a, b = nn.Linear(4, 3).to(DT), nn.Linear(4, 2).to(DT)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.a(x), torch.relu(self.b(x))

    value, _ = bound(TwoHeads(), torch.randn(2, 4, dtype=DT))
    assert value == pytest.approx(math.hypot(spectral(a), spectral(b)), rel=REL)


def test_constant_branches_do_not_count():
    """Parameters and what is computed from them are constants (L = 0): x + c, x * (2 w) with w a parameter."""
    torch.manual_seed(8)

    class WithConstants(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, dtype=DT))
            self.l = nn.Linear(5, 5).to(DT)

        def forward(self, x):
            return self.l(x * (2 * self.w) + self.w.exp())

    model = WithConstants()
    value, _ = bound(model, torch.randn(2, 5, dtype=DT), fuse=True)
    reference = torch.linalg.matrix_norm(model.l.weight.detach() * (2 * model.w.detach()), 2)
    assert value == pytest.approx(float(reference), rel=REL)


# ------------------------------------------------------------------------------------------ gradients
def finite_difference(est: lipreg.LipschitzEstimator, param: torch.Tensor, index: tuple[int, ...],
                      h: float = 1e-6) -> float:
    """Central difference of the converged bound in one weight entry."""
    values = []
    for step in (h, -h):
        with torch.no_grad():
            param[index] += step
        values.append(float(est.converge(tol=0.0, max_iter=5000).detach()))
        with torch.no_grad():
            param[index] -= step
    return (values[0] - values[1]) / (2 * h)


class Tiny(nn.Module):
    """conv -> BN -> tanh -> max pool -> flatten -> linear; with seed 2 each operator's top two singular values
    are at least 10% apart, so the power method converges to machine precision in a few hundred steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn1 = randomize_bn(nn.BatchNorm2d(3))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        return self.fc(self.pool(torch.tanh(self.bn1(self.conv1(x)))).flatten(1))


@pytest.mark.parametrize("fuse", [False, True])
def test_gradient_matches_finite_differences(fuse):
    torch.manual_seed(2)
    model = Tiny().to(DT).eval()
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 1, 6, 6, dtype=DT), dtype=DT, fuse=fuse)
    est.converge(tol=0.0, max_iter=5000)
    # sigma stalls in float64 while the vector is still ~1e-8 off, and the gradient is first order in that error:
    # iterate on (a gap ratio of at most 0.9 makes 500 more steps reach machine precision)
    value = est(n_iter=500)
    params = [model.conv1.weight, model.bn1.weight, model.fc.weight]
    grads = torch.autograd.grad(value, params)
    generator = torch.Generator().manual_seed(0)
    for param, grad in zip(params, grads):
        for _ in range(3):
            index = tuple(int(torch.randint(s, (), generator=generator)) for s in param.shape)
            assert float(grad[index]) == pytest.approx(finite_difference(est, param, index), rel=1e-6, abs=1e-9)
    if not fuse:  # the largest batch-norm gain carries the whole gradient of a max: the others get exactly 0
        gains = model.bn1.weight.detach().abs() / torch.sqrt(model.bn1.running_var + model.bn1.eps)
        assert torch.count_nonzero(grads[1]) == 1 and grads[1][gains.argmax()] != 0


def test_gradient_is_u_v_transpose():
    """At convergence d sigma_1 / d W = u_1 v_1^T (Danskin), u_1, v_1 from the SVD."""
    torch.manual_seed(10)
    layer = nn.Linear(7, 5).to(DT)
    est = lipreg.LipschitzEstimator(layer, torch.randn(2, 7, dtype=DT), dtype=DT)
    (grad,) = torch.autograd.grad(est.converge(tol=0.0), [layer.weight])
    u, s, vh = torch.linalg.svd(layer.weight.detach())
    expected = torch.outer(u[:, 0], vh[0])
    assert torch.allclose(grad, expected, atol=1e-8)


# --------------------------------------------------------------------------------- warm start and state
def test_one_warm_iteration_beats_ten_cold_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 20)).to(DT)
    x = torch.randn(2, 20, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    est.converge(tol=0.0, max_iter=5000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    exact = spectral(model[0]) * spectral(model[2])
    warm = float(est(n_iter=1).detach())
    assert abs(warm - exact) / exact < 1e-4
    for seed in range(1, 6):
        cold = float(lipreg.LipschitzEstimator(model, x, dtype=DT, seed=seed, warm_start=False)(n_iter=10).detach())
        assert abs(warm - exact) < abs(cold - exact), (warm, cold, exact)


def test_state_dict_round_trip_is_bit_for_bit():
    torch.manual_seed(12)
    model = SmallCNN().eval()
    x = torch.randn(2, 2, 9, 9)
    est = lipreg.LipschitzEstimator(model, x)
    est(n_iter=3)
    state = copy.deepcopy(est.state_dict())
    assert state and all(torch.isfinite(v).all() for v in state.values())
    expected = est(n_iter=2)
    fresh = lipreg.LipschitzEstimator(model, x, seed=123)
    assert not torch.equal(fresh(n_iter=0), est(n_iter=0))  # a different seed starts elsewhere...
    fresh = lipreg.LipschitzEstimator(model, x, seed=123)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(n_iter=2), expected)  # ...until it loads the state
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, est.state_dict()[name])


def test_estimate_approaches_from_below():
    """||A v|| with ||v|| = 1 never exceeds sigma_1: every iterate is below the converged value."""
    torch.manual_seed(13)
    layer = nn.Linear(30, 30).to(DT)
    est = lipreg.LipschitzEstimator(layer, torch.randn(1, 30, dtype=DT), dtype=DT)
    exact = spectral(layer)
    values = [float(est(n_iter=1).detach()) for _ in range(30)]
    assert all(v <= exact * (1 + 1e-12) for v in values)
    assert values[-1] > values[0]
    assert not est.certified


# ------------------------------------------------------------------------------------------ no overflow
def scaled_orthogonal(width: int, scale: float) -> nn.Linear:
    layer = nn.Linear(width, width)
    q, _ = torch.linalg.qr(torch.randn(width, width, dtype=DT))
    layer.weight.data = (scale * q).to(layer.weight.dtype)
    return layer


class DenseStack(nn.Module):
    """A chain of gains ``g_i Q_i`` (``Q_i`` orthogonal) then DenseNet's pattern, linear: ``h_k = cat(h_{k-1},
    w_k Q_k h_{k-1})``, so ``||J_k x||^2 = (1 + w_k^2) ||J_{k-1} x||^2`` and AutoLip's ``L_{k-1} sqrt(1 + w_k^2)``
    is exact: the bound is ``prod g_i prod sqrt(1 + w_k^2)``."""

    def __init__(self, gains: list[float], scales: list[float], width: int = 3) -> None:
        super().__init__()
        self.chain = nn.Sequential(*[scaled_orthogonal(width, g) for g in gains])
        self.layers = nn.ModuleList([scaled_orthogonal(width * 2 ** k, w) for k, w in enumerate(scales)])

    def forward(self, x):
        x = self.chain(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


@pytest.mark.parametrize("method", ["converge", "est"])
def test_concatenations_of_constants_above_1e19_do_not_overflow_float32(method):
    """Factors of 1e5 whose product, 1e20, enters concatenations (its square overflows float32) in a bound of
    3e20, which fits: the float32 bound is the float64 Jacobian's norm. It was inf when the concatenation squared
    its parents (and the warning blamed NaN or inf weights)."""
    torch.manual_seed(0)
    model = DenseStack([1e5] * 4, [1.0, 2.0]).to(DT)
    reference = jacobian_norm(model, (3,))
    assert reference == pytest.approx(1e20 * math.sqrt(10), rel=1e-6)  # the exact value, Q_k rounded to float32
    model32 = copy.deepcopy(model).float()
    est = lipreg.LipschitzEstimator(model32, torch.randn(2, 3), fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-finite warning either
        value = float((est.converge(tol=1e-7) if method == "converge" else est(n_iter=3)).detach())
        certified = float(est.certified_bound().detach())
    assert value == pytest.approx(reference, rel=1e-5)
    assert reference <= certified <= reference * (1 + 1e-5)


def test_the_gradient_through_a_scaled_concatenation_is_that_of_the_plain_form():
    """``m sqrt(sum (L_i / m)^2)`` differentiates as ``sqrt(sum L_i^2)``: ``dL/dL_i = L_i / L``."""
    from lipreg.bounds.autolip import root_sum_squares

    values = torch.tensor([3.0, 4.0, 0.0], dtype=DT, requires_grad=True)
    out = root_sum_squares(list(values))
    out.backward()
    assert float(out.detach()) == 5.0
    torch.testing.assert_close(values.grad, torch.tensor([0.6, 0.8, 0.0], dtype=DT))
    assert float(root_sum_squares([torch.tensor(math.inf), torch.tensor(1.0)])) == math.inf
    assert float(root_sum_squares([torch.tensor(0.0), torch.tensor(0.0)])) == 0.0


def test_the_non_finite_warning_names_its_cause():
    """Finite weights whose norm overflows float32 are not blamed on NaN weights; NaN weights are named."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.fill_(1e30)  # sigma = 4e30 is finite, A^T A v = 1.6e61 overflows float32
    est = lipreg.LipschitzEstimator(net, torch.randn(2, 4))
    est()
    with pytest.warns(RuntimeWarning, match=r"factors at \['0'\] although every weight is finite now: their norms "
                                            r"exceed torch.float32's largest value"):
        est.check_finite()
    with torch.no_grad():
        net[2].weight[0, 0] = math.nan
    est()
    with pytest.warns(RuntimeWarning, match=r"the weights hold NaN or inf \(parameters \['2.weight'\]\)"):
        est.check_finite()

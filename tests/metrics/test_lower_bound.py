"""Tests for lipreg.metrics.lower_bound (lipreg.metrics.jacobian) against independent references (dense Jacobians, closed forms)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipreg.metrics import local_jacobian_norm, lower_bound

DT = torch.float64


def _per_sample_jac_norms(model, x):
    """Reference: dense per-sample Jacobian via jacrev on single samples, then its spectral norm."""
    norms = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        J = torch.func.jacrev(model)(xb)  # (1, *out, 1, *in)
        n_out = model(xb).numel()
        norms.append(torch.linalg.matrix_norm(J.reshape(n_out, xb.numel()), 2))
    return torch.stack(norms).detach()


def _mlp(act, dims=(5, 16, 12, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT).eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, 4),
        )
        .to(DT)
        .eval()
    )


def _layer_norm_product(model):
    prod = 1.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            prod *= float(torch.linalg.matrix_norm(m.weight.detach(), 2))
    return prod


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_local_norm_matches_dense_jacobian_mlp(act):
    model = _mlp(act)
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=DT)
    norms, v = local_jacobian_norm(model, x, n_iter=100)
    ref = _per_sample_jac_norms(model, x)
    torch.testing.assert_close(norms, ref, rtol=1e-4, atol=0)
    assert v.shape == x.shape
    torch.testing.assert_close(v.norm(dim=1), torch.ones(6, dtype=DT))
    assert not norms.requires_grad and not v.requires_grad


def test_local_norm_matches_dense_jacobian_cnn():
    model = _cnn()
    torch.manual_seed(2)
    x = torch.randn(5, 2, 7, 7, dtype=DT)
    norms, v = local_jacobian_norm(model, x, n_iter=100)
    ref = _per_sample_jac_norms(model, x)
    torch.testing.assert_close(norms, ref, rtol=1e-4, atol=0)
    assert v.shape == x.shape
    # the returned vectors are (approximately) top right singular vectors: ||J v|| = sigma_max
    for b in range(x.shape[0]):
        _, jv = torch.func.jvp(model, (x[b : b + 1],), (v[b : b + 1],))
        assert abs(float(jv.detach().norm()) - float(ref[b])) <= 1e-4 * float(ref[b])


def test_local_norm_is_lower_bound_for_any_n_iter():
    model = _mlp(nn.Tanh)
    torch.manual_seed(3)
    x = torch.randn(4, 5, dtype=DT)
    ref = _per_sample_jac_norms(model, x)
    prev = None
    for n_iter in (0, 1, 3, 10):
        torch.manual_seed(4)
        norms, _ = local_jacobian_norm(model, x, n_iter=n_iter)
        assert torch.all(norms <= ref * (1 + 1e-12))
        if prev is not None:  # power iteration on J^T J is monotone from the same start
            assert torch.all(norms >= prev * (1 - 1e-12))
        prev = norms


@pytest.mark.parametrize("out_shape", [(), (2, 3)])
def test_output_shapes(out_shape):
    torch.manual_seed(0)
    W = torch.randn(*out_shape, 4, dtype=DT) if out_shape else torch.randn(4, dtype=DT)

    def f(x):  # (B, 4) -> (B, *out_shape), linear
        return torch.tensordot(x, W, dims=([1], [W.dim() - 1]))

    x = torch.randn(3, 4, dtype=DT)
    norms, _ = local_jacobian_norm(f, x, n_iter=200)
    expected = torch.linalg.matrix_norm(W.reshape(-1, 4), 2)
    torch.testing.assert_close(norms, expected.expand(3), rtol=1e-8, atol=0)


def test_linear_map_lower_bound_is_spectral_norm():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).to(DT)
    x = torch.randn(3, 7, dtype=DT)
    lb = lower_bound(lin, x, n_iter=300)
    assert lb.dim() == 0 and not lb.requires_grad
    torch.testing.assert_close(lb, torch.linalg.matrix_norm(lin.weight.detach(), 2), rtol=1e-8, atol=0)


def test_ascent_never_decreases_and_stays_below_layer_product():
    model = _mlp(nn.Tanh, dims=(4, 20, 20, 3), seed=5)
    torch.manual_seed(6)
    x = torch.randn(8, 4, dtype=DT)
    torch.manual_seed(7)
    base = lower_bound(model, x, ascent_steps=0, n_iter=30)
    torch.manual_seed(7)
    asc = lower_bound(model, x, ascent_steps=15, lr=0.2, n_iter=30)
    assert float(asc) >= float(base)
    assert float(asc) <= _layer_norm_product(model) * (1 + 1e-9)
    # and it is a lower bound of the true max local norm over the starting batch's neighbourhood:
    assert float(base) <= float(_per_sample_jac_norms(model, x).max()) * (1 + 1e-12)


def test_ascent_improves_smooth_network():
    # f(x) = tanh(w.x): the local norm |w| (1 - tanh^2(w.x)) is maximal at w.x = 0, far from the start.
    w = torch.tensor([[3.0, 4.0]], dtype=DT)  # |w| = 5

    def f(x):
        return torch.tanh(x @ w.T)

    x = torch.tensor([[0.3, 0.4]], dtype=DT)  # w.x = 2.5
    base = lower_bound(f, x, ascent_steps=0, n_iter=5)
    asc = lower_bound(f, x, ascent_steps=40, lr=0.05, n_iter=5)
    assert float(asc) > float(base) * 3
    assert float(asc) <= 5.0 * (1 + 1e-12)


def _brute_force_relu_bound(W1, W2):
    n = W1.shape[0]
    best = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=n):
        s = torch.tensor(bits, dtype=W1.dtype)
        best = max(best, float(torch.linalg.matrix_norm(W2 @ (s[:, None] * W1), 2)))
    return best


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_in=st.integers(1, 4),
    n_hidden=st.integers(1, 8),
    n_out=st.integers(1, 4),
    ascent=st.sampled_from([0, 3]),
)
def test_relu_one_hidden_layer_below_pattern_brute_force(seed, n_in, n_hidden, n_out, ascent):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out)).to(DT).eval()
    x = 2 * torch.randn(16, n_in, dtype=DT)
    lb = float(lower_bound(model, x, ascent_steps=ascent, lr=0.5, n_iter=30))
    ub = _brute_force_relu_bound(model[0].weight.detach(), model[2].weight.detach())
    assert 0.0 <= lb <= ub * (1 + 1e-10) + 1e-12


def test_brute_force_with_ten_hidden_units():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 2)).to(DT).eval()
    x = 3 * torch.randn(64, 3, dtype=DT)
    lb = float(lower_bound(model, x, n_iter=50))
    ub = _brute_force_relu_bound(model[0].weight.detach(), model[2].weight.detach())
    assert 0.0 < lb <= ub * (1 + 1e-10)


def test_no_side_effects_on_model_and_inputs():
    model = _mlp(nn.Tanh)
    model.train()  # no BN/Dropout: no warning, and the mode must be left untouched
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    x_before = x.detach().clone()
    params_before = [p.detach().clone() for p in model.parameters()]
    lb = lower_bound(model, x, ascent_steps=3, lr=0.1, n_iter=5)
    assert not lb.requires_grad
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None
    torch.testing.assert_close(x.detach(), x_before)
    for p, q in zip(model.parameters(), params_before):
        torch.testing.assert_close(p.detach(), q)


def test_works_under_no_grad_and_float32():
    model = _mlp(nn.Tanh).float()
    x = torch.randn(4, 5)
    torch.manual_seed(0)
    a = lower_bound(model, x, ascent_steps=2, n_iter=10)
    torch.manual_seed(0)
    with torch.no_grad():
        b = lower_bound(model, x, ascent_steps=2, n_iter=10)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b)


def test_training_mode_checks_and_mode_kept():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 2)).to(DT)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        local_jacobian_norm(model, torch.randn(5, 3, dtype=DT), n_iter=2)
    assert model.training
    model[1].eval()  # only Dropout left in training mode: random function -> warning
    with pytest.warns(RuntimeWarning, match="eval"):
        local_jacobian_norm(model, torch.randn(5, 3, dtype=DT), n_iter=2)
    assert model[2].training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_jacobian_norm(model, torch.randn(5, 3, dtype=DT), n_iter=2)


def test_zero_jacobian_and_empty_batch():
    lin = nn.Linear(3, 2).to(DT)
    nn.init.zeros_(lin.weight)
    norms, v = local_jacobian_norm(lin, torch.randn(4, 3, dtype=DT), n_iter=5)
    assert torch.all(norms == 0) and torch.all(torch.isfinite(v))
    assert float(lower_bound(lin, torch.randn(4, 3, dtype=DT), ascent_steps=2)) == 0.0
    assert float(lower_bound(lin, torch.zeros(0, 3, dtype=DT))) == 0.0


def test_v0_is_used_and_validated():
    lin = nn.Linear(2, 2, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([3.0, 1.0], dtype=DT)))
    x = torch.zeros(2, 2, dtype=DT)
    v0 = torch.tensor([[0.0, 2.0], [1.0, 0.0]], dtype=DT)
    norms, v = local_jacobian_norm(lin, x, n_iter=0, v0=v0)
    torch.testing.assert_close(norms, torch.tensor([1.0, 3.0], dtype=DT))
    with pytest.raises(ValueError):
        local_jacobian_norm(lin, x, v0=torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError):
        local_jacobian_norm(lin, x, v0=torch.ones(3, 2, dtype=DT))
    with pytest.raises(ValueError):
        lower_bound(lin, x, ascent_steps=-1)


# ------------------------------------------------------------------ low precision: computed in float64, rounded down
LOW = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_linear_lower_bound_below_exact_norm(dtype):
    """In the model's dtype the power iteration overshoots ||W||_2 (bfloat16: 0.5 % above); in float64, rounded
    down, it does not, and it stays below ``certified_bound()`` (the exact norm of the model's own weights)."""
    import lipreg

    worst = 0.0
    for seed in range(12):
        torch.manual_seed(seed)
        lin = nn.Linear(16, 8).to(dtype).eval()
        x = torch.randn(4, 16, dtype=dtype)
        lb = lower_bound(lin, x, n_iter=60)
        assert lb.dtype == dtype
        exact = torch.linalg.matrix_norm(lin.weight.detach().double(), 2)
        assert float(lb) <= float(exact), (seed, float(lb), float(exact))
        assert float(lb) <= float(lipreg.LipschitzEstimator(lin, x).certified_bound().detach())
        worst = max(worst, float(lb) / float(exact))
    assert worst > 1 - 2 * torch.finfo(dtype).eps  # still tight: one rounding of the output dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_network_lower_bound_below_float64_jacobians(dtype):
    """A tanh network in low precision: the local norms (and their max, with ascent) are below the exact float64
    Jacobian norms of the same weights, at the same points (no ascent) and at the reference's best point."""
    model = _mlp(nn.Tanh, dims=(6, 24, 24, 4), seed=3).to(dtype)
    x = 2 * torch.randn(8, 6).to(dtype)
    ref = _mlp(nn.Tanh, dims=(6, 24, 24, 4), seed=3).to(dtype).double()  # the same weights, exactly, in float64
    exact = _per_sample_jac_norms(ref, x.double())
    norms, v = local_jacobian_norm(model, x, n_iter=80)
    assert norms.dtype == dtype and v.dtype == dtype
    assert torch.all(norms.double() <= exact), (norms, exact)
    assert float(lower_bound(model, x, n_iter=80)) <= float(exact.max())


def test_rounding_down_into_a_narrower_dtype_and_float64_output_check():
    """``dtype=`` rounds the float64 maximum down (float64 inputs, float32 result), and a callable that does not
    compute in float64 is refused instead of being bounded in its own precision."""
    torch.manual_seed(0)
    lin = nn.Linear(9, 5).to(DT)
    x = torch.randn(3, 9, dtype=DT)
    lb = lower_bound(lin, x, n_iter=300, dtype=torch.float32)
    exact = torch.linalg.matrix_norm(lin.weight.detach(), 2)
    assert lb.dtype == torch.float32 and float(lb) <= float(exact) and float(lb) > float(exact) * (1 - 2e-7)
    w32 = torch.randn(4, 9)
    with pytest.raises(TypeError, match="float64"):
        lower_bound(lambda z: (z.float() @ w32.T), x)


def test_model_left_untouched_by_the_float64_copy():
    model = _mlp(nn.Tanh).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lower_bound(model, torch.randn(3, 5, dtype=torch.bfloat16), ascent_steps=1)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, before[k])

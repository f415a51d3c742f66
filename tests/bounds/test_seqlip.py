"""SeqLip (paper eq. 8) against independent references.

* one hidden layer: exact SeqLip is exactly ``max_D ||W_2 D W_1||`` over the ``2^n`` vertex patterns (brute force,
  one matrix norm per pattern, written here without any lipreg code);
* deeper chains: exact SeqLip lies between the brute-force max over all *joint* patterns of the Jacobian product
  (eq. 7) and AutoLip;
* low-rank: the subspace iteration's singular values against ``svdvals`` of the dense ``jacrev`` Jacobian;
* any graph (residual, branching): lower bound (local Jacobian norms) <= SeqLip <= AutoLip, over random
  architectures (hypothesis);
* gradients (``gradcheck`` in float64), warm state (``state_dict`` round trip, warm call cheaper than cold).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipreg
from lipreg.bounds.autolip import autolip_bound as graph_autolip
from lipreg import BoundPolicy
from lipreg.bounds.seqlip import exact_search, find_chains, greedy_search, pair_matrix, vertex_sigma
from tests.bounds.references import mlp

DT = torch.float64


# ---------------------------------------------------------------------------------------------- helpers


def seqlip_bound(model: nn.Module, x: torch.Tensor, **options) -> float:
    est = lipreg.LipschitzEstimator(model, x, method="seqlip", dtype=DT, **options)
    return float(est.converge(tol=1e-10, max_iter=1000).detach())


def autolip_bound(model: nn.Module, x: torch.Tensor) -> float:
    """AutoLip with the exact norm of every linear node (svdvals of its dense ``jacrev`` Jacobian), not the
    power method's estimate from below."""
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    operators = {op.node: op for op in est.linear_operators().values()}
    factors = {}
    for node in est.graph.linear_nodes():
        jac = torch.func.jacrev(operators[node].matvec)(torch.zeros(node.in_shape, dtype=DT))
        factors[node] = torch.linalg.svdvals(jac.reshape(-1, node.in_shape.numel()).detach())[0]
    return float(graph_autolip(est.graph, factors))


def vertices(n: int, lo: float, hi: float) -> torch.Tensor:
    """All ``2^n`` diagonals with entries in ``{lo, hi}``, shape ``(2^n, n)``."""
    return torch.tensor(list(itertools.product([lo, hi], repeat=n)), dtype=DT)


def brute_force_joint(weights: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """``max ||W_K D_{K-1} ... D_1 W_1||_2`` over every joint vertex pattern (eq. 7), batched over patterns."""
    products = weights[0].unsqueeze(0)
    for W, (lo, hi) in zip(weights[1:], slopes):
        diags = vertices(W.shape[1], lo, hi)  # (v, n)
        products = (W[None, None] @ (diags[None, :, :, None] * products[:, None])).flatten(0, 1)
    return float(torch.linalg.matrix_norm(products, 2).max())


def linear_weights(model: nn.Sequential) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model if isinstance(m, nn.Linear)]


def local_lower_bound(model: nn.Module, x: torch.Tensor) -> float:
    """Max local Jacobian norm at the points ``x`` (a valid lower bound of the Lipschitz constant)."""
    try:
        from lipreg.metrics import lower_bound
    except ImportError:  # pragma: no cover - the module is written by another issue
        norms = [torch.linalg.matrix_norm(torch.func.jacrev(model)(xi[None]).reshape(-1, xi.numel()), 2)
                 for xi in x]
        return float(torch.stack(norms).max())
    torch.manual_seed(0)
    return float(lower_bound(model, x, ascent_steps=1, lr=0.3, n_iter=20))


# ------------------------------------------------------------------------------------- one hidden layer
@pytest.mark.parametrize("n", [3, 9, 14])
def test_one_hidden_layer_exact_equals_brute_force(n):
    model = mlp([5, n, 3], seed=n)
    x = torch.randn(2, 5, dtype=DT)
    W1, W2 = linear_weights(model)
    diags = vertices(n, 0.0, 1.0)
    brute = float(torch.linalg.matrix_norm(W2[None] @ (diags[:, :, None] * W1[None]), 2).max())
    exact = seqlip_bound(model, x, search="exact")
    greedy = seqlip_bound(model, x, search="greedy")
    assert exact == pytest.approx(brute, rel=1e-5)
    assert greedy <= exact * (1 + 1e-9)
    assert autolip_bound(model, x) >= exact * (1 - 1e-9)


@pytest.mark.parametrize("act, lo, hi", [(nn.Sigmoid, 0.0, 0.25), (lambda: nn.LeakyReLU(0.1), 0.1, 1.0),
                                         (nn.Tanh, 0.0, 1.0)])
def test_one_hidden_layer_slope_intervals(act, lo, hi):
    """Sigmoid has slopes [0, 1/4] (not 1), LeakyReLU(0.1) the vertices {0.1, 1}."""
    model = mlp([4, 8, 2], act=act, seed=3)
    x = torch.randn(2, 4, dtype=DT)
    W1, W2 = linear_weights(model)
    brute = float(torch.linalg.matrix_norm(W2[None] @ (vertices(8, lo, hi)[:, :, None] * W1[None]), 2).max())
    assert seqlip_bound(model, x, search="exact") == pytest.approx(brute, rel=1e-5)


def test_auto_is_exact_for_small_widths_and_certified():
    model = mlp([4, 10, 3])
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), method="seqlip", dtype=DT)
    assert est.seqlip.certified
    greedy = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), method="seqlip", dtype=DT,
                                       search="greedy")
    assert not greedy.seqlip.certified
    wide = lipreg.LipschitzEstimator(mlp([4, 20, 3]), torch.randn(2, 4, dtype=DT), method="seqlip", dtype=DT)
    assert not wide.seqlip.certified  # width 20 > BoundPolicy.exact_search_units: greedy


# ------------------------------------------------------------------------------------------ deep chains
@pytest.mark.parametrize("widths, act, slopes", [
    ([4, 8, 8, 3], nn.ReLU, (0.0, 1.0)),
    ([3, 5, 6, 5, 2], nn.ReLU, (0.0, 1.0)),
    ([3, 6, 5, 2], nn.Sigmoid, (0.0, 0.25)),
    ([3, 5, 6, 5, 2], lambda: nn.LeakyReLU(0.2), (0.2, 1.0)),
])
def test_deep_chain_between_joint_brute_force_and_autolip(widths, act, slopes):
    model = mlp(widths, act=act, seed=len(widths))
    x = torch.randn(2, widths[0], dtype=DT)
    weights = linear_weights(model)
    joint = brute_force_joint(weights, [slopes] * (len(weights) - 1))
    exact = seqlip_bound(model, x, search="exact")
    greedy = seqlip_bound(model, x, search="greedy")
    autolip = autolip_bound(model, x)
    assert joint <= exact * (1 + 1e-9)
    assert greedy <= exact * (1 + 1e-9)
    assert exact <= autolip * (1 + 1e-9)


def test_pair_search_primitives():
    """Exact search finds the brute-force max; greedy never goes below its start and is <= exact."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        B = torch.randn(4, 10, generator=gen, dtype=DT)
        C = torch.randn(10, 5, generator=gen, dtype=DT)
        norms = torch.linalg.matrix_norm(B[None] @ (vertices(10, 0.0, 1.0)[:, :, None] * C[None]), 2)
        p = exact_search(B, C, 0.0, 1.0)
        exact = float(torch.linalg.matrix_norm(pair_matrix(B, C, vertex_sigma(p, 0.0, 1.0)), 2))
        assert exact == pytest.approx(float(norms.max()), rel=1e-12)
        start = torch.rand(10, generator=gen) < 0.5
        g = greedy_search(B, C, 0.0, 1.0, start)
        greedy = float(torch.linalg.matrix_norm(pair_matrix(B, C, vertex_sigma(g, 0.0, 1.0)), 2))
        initial = float(torch.linalg.matrix_norm(pair_matrix(B, C, vertex_sigma(start, 0.0, 1.0)), 2))
        assert initial * (1 - 1e-12) <= greedy <= exact * (1 + 1e-12)
        for k in range(10):  # a local max: no single flip improves
            q = g.clone()
            q[k] = ~q[k]
            flipped = pair_matrix(B, C, vertex_sigma(q, 0.0, 1.0))
            assert float(torch.linalg.matrix_norm(flipped, 2)) <= greedy * (1 + 1e-8)


# ----------------------------------------------------------------------------------------------- chains
class Residual(nn.Module):
    def __init__(self, width: int, hidden: int, act=nn.ReLU) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.body = nn.Sequential(nn.Linear(width, hidden), act(), nn.Linear(hidden, width))
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(torch.relu(h + self.body(h)))


class Branches(nn.Module):
    def __init__(self, a: int, b: int, act=nn.Tanh) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(3, a), nn.ReLU(), nn.Linear(a, 4))
        self.right = nn.Sequential(nn.Linear(3, b), act(), nn.Linear(b, b), act(), nn.Linear(b, 4))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


def test_find_chains_shapes():
    model = Residual(4, 5).to(DT)
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 3, dtype=DT), method="seqlip", dtype=DT)
    assert [c.name for c in find_chains(est.graph)] == ["body.0~body.2"]  # inp has two users; relu follows a sum
    # GELU (negative slopes) ends a chain: nothing to do
    gelu = mlp([3, 4, 2], act=nn.GELU)
    est = lipreg.LipschitzEstimator(gelu, torch.randn(2, 3, dtype=DT), method="seqlip", dtype=DT)
    assert est.seqlip.chains == []
    assert float(est.converge(tol=1e-13, max_iter=5000).detach()) == pytest.approx(
        autolip_bound(gelu, torch.randn(2, 3, dtype=DT)), rel=1e-8)
    # max pooling ends a chain; x.view(x.size(0), -1) is applied per sample (vmap)
    cnn = ConvNet().to(DT).eval()
    est = lipreg.LipschitzEstimator(cnn, torch.randn(2, 2, 6, 6, dtype=DT), method="seqlip", dtype=DT)
    assert [len(c.ops) for c in est.seqlip.chains] == [2]
    assert torch.isfinite(est())


def test_residual_block_gets_one_plus_seqlip():
    """x + g(x): the bound is (1 + SeqLip(g)), never a product; checked on a graph made of that block alone."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp([4, 6, 4], seed=7)

        def forward(self, x):
            return x + self.body(x)

    block = Block().to(DT)
    x = torch.randn(2, 4, dtype=DT)
    g = seqlip_bound(block.body, x, search="exact")
    assert seqlip_bound(block, x, search="exact") == pytest.approx(1 + g, rel=1e-9)


# ----------------------------------------------------------------------------------------------- low rank
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.c2(torch.relu(self.c1(x)))
        x = self.pool(torch.relu(x))
        return self.fc(x.view(x.size(0), -1))


def test_low_rank_singular_values_match_dense_jacobian():
    torch.manual_seed(0)
    model = ConvNet().to(DT).eval()
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, method="seqlip", dtype=DT, search="lowrank",
                                    policy=BoundPolicy(lowrank_rank=6))
    est.converge(tol=1e-14, max_iter=3000)
    for node, conv in zip(est.seqlip.chains[0].ops, [model.c1, model.c2]):
        shape = node.in_shape
        jac = torch.func.jacrev(lambda v: conv(v))(torch.zeros(shape, dtype=DT)).reshape(-1, shape.numel())
        dense = torch.linalg.svdvals(jac)[:6]
        found = est.seqlip.subspace_singular_values(node)
        torch.testing.assert_close(found, dense, rtol=1e-8, atol=1e-10)
    assert not est.seqlip.certified


def test_low_rank_at_full_rank_equals_full_svd():
    model = mlp([6, 20, 18, 5], seed=5)  # width 20 > 16: greedy pairs
    x = torch.randn(2, 6, dtype=DT)
    full = seqlip_bound(model, x, search="greedy")
    low = seqlip_bound(model, x, search="lowrank", policy=BoundPolicy(lowrank_rank=20))
    assert low == pytest.approx(full, rel=1e-8)
    conv = ConvNet().to(DT).eval()
    xc = torch.randn(2, 2, 6, 6, dtype=DT)
    assert seqlip_bound(conv, xc, search="lowrank", policy=BoundPolicy(lowrank_rank=1000)) == pytest.approx(
        seqlip_bound(conv, xc, search="greedy"), rel=1e-8)


# ------------------------------------------------------------------------------- random architectures
ACTS = [nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.3), nn.ELU,
        lambda: nn.Softplus(threshold=40.0)]  # float64 models: the default threshold 20 jumps, refused


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["residual", "branches", "deep"]), a=st.integers(2, 7), b=st.integers(2, 7),
       act=st.integers(0, len(ACTS) - 1), seed=st.integers(0, 10_000))
def test_random_graphs_between_lower_bound_and_autolip(kind, a, b, act, seed):
    torch.manual_seed(seed)
    if kind == "residual":
        model = Residual(a, b, ACTS[act])
    elif kind == "branches":
        model = Branches(a, b, ACTS[act])
    else:
        model = nn.Sequential(nn.Linear(3, a), ACTS[act](), nn.Linear(a, b), ACTS[act](), nn.Linear(b, 2))
    model = model.to(DT).eval()
    x = torch.randn(16, 3, dtype=DT)
    seq = seqlip_bound(model, x)  # auto: exact on these widths
    assert seq <= autolip_bound(model, x) * (1 + 1e-8)
    assert local_lower_bound(model, x) <= seq * (1 + 1e-8)


# ------------------------------------------------------------------------------------- gradients, state
def _functional(model: nn.Module):
    """The model's parameters as plain tensors to pass to gradcheck (the estimator reads them at call time)."""
    slots = [(mod, name) for mod in model.modules() for name, p in list(mod._parameters.items()) if p is not None]
    values = [getattr(mod, name).detach().clone().requires_grad_(True) for mod, name in slots]
    for mod, name in slots:
        del mod._parameters[name]

    def assign(*tensors):
        for (mod, name), t in zip(slots, tensors):
            setattr(mod, name, t)

    return values, assign


@pytest.mark.parametrize("search, act", [("exact", nn.ReLU), ("greedy", nn.Sigmoid), ("lowrank", nn.Tanh)])
def test_gradcheck(search, act):
    model = mlp([4, 6, 5, 3, 2], act=act, seed=11)  # K = 4: ends and inner Sigma^(1/2) factors
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), method="seqlip", dtype=DT, search=search,
                                    policy=BoundPolicy(lowrank_rank=4))
    est(n_iter=50)
    values, assign = _functional(model)

    def bound(*tensors):
        assign(*tensors)
        return est(n_iter=0)  # patterns re-searched (stable under tiny steps), subspaces fixed

    assert torch.autograd.gradcheck(bound, values, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_finite_with_repeated_and_zero_singular_values():
    model = mlp([5, 6, 6, 6, 3], seed=2)
    with torch.no_grad():
        model[2].weight.copy_(1.3 * torch.linalg.qr(torch.randn(6, 6, dtype=DT)).Q)  # all singular values equal
        model[4].weight.copy_(torch.randn(6, 2, dtype=DT) @ torch.randn(2, 6, dtype=DT))  # rank 2
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 5, dtype=DT), method="seqlip", dtype=DT)
    est().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == 4 and all(torch.isfinite(g).all() for g in grads)
    values, assign = _functional(model)

    def bound(w):
        assign(values[0], values[1], w, *values[3:])
        return est(n_iter=0)

    assert torch.autograd.gradcheck(bound, (values[2],), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_bit_for_bit():
    model = nn.Sequential(ConvNet(), nn.ReLU(), nn.Linear(3, 20), nn.ReLU(), nn.Linear(20, 4)).eval()
    x = torch.randn(2, 2, 6, 6)
    options = dict(method="seqlip", search="greedy",
                   policy=BoundPolicy(lowrank_rank=5, seqlip_dense_entries=200))  # convs low-rank
    est = lipreg.LipschitzEstimator(model, x, seed=1, **options)
    assert any(op.lowrank for plan in est.seqlip.plans for op in plan.ops)
    for _ in range(3):
        est()
    state = est.state_dict()
    assert any(k.startswith("seqlip.pattern_") for k in state) and any(k.startswith("seqlip.subspace_") for k in state)
    fresh = lipreg.LipschitzEstimator(model, x, seed=2, **options)
    fresh.load_state_dict(state)
    assert torch.equal(est(), fresh())
    assert all(torch.equal(a, b) for a, b in zip(est.state_dict().values(), fresh.state_dict().values()))


def _count_decompositions(monkeypatch):
    calls = {"n": 0}
    eigh, svd = torch.linalg.eigh, torch.linalg.svd

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.linalg, "eigh", counting(eigh))
    monkeypatch.setattr(torch.linalg, "svd", counting(svd))
    return calls


def test_a_warm_call_runs_a_bounded_search_that_climbs(monkeypatch):
    """Work counted, not timed (timings are the benchmark's job): a call runs ``greedy_rounds_per_call`` rounds per
    pair from the stored patterns, a handful of decompositions, while the warm start at construction runs the
    searches to a local max; from all-ones patterns, successive calls climb monotonically to that local max."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(2, 32)
    calls = _count_decompositions(monkeypatch)
    converged = lipreg.LipschitzEstimator(model, x, method="seqlip", search="greedy")
    at_start = calls["n"]
    calls["n"] = 0
    top = float(converged(n_iter=0).detach())
    per_call = calls["n"]
    assert per_call <= 3 + 2 * 12  # 3 SVDs; per pair a state, an alternating step, <= log2(96) flip sets
    assert per_call < at_start / 2
    cold = lipreg.LipschitzEstimator(model, x, method="seqlip", search="greedy", warm_start=False)
    values = [float(cold(n_iter=0).detach()) for _ in range(40)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(values, values[1:]))
    assert values[0] < (1 - 1e-3) * top and values[-1] == pytest.approx(top, rel=1e-9)
    assert float(cold.converge().detach()) == pytest.approx(top, rel=1e-9)


def test_a_warm_call_forms_no_dense_matrix_of_a_large_operator(monkeypatch):
    """At training speed: operators above ``BoundPolicy.seqlip_dense_entries`` are low-rank subspaces kept warm, so a
    call never forms their dense matrix nor takes a full SVD; the search runs on ``E x E`` pair matrices."""
    from lipreg.operator import LinearOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    est = lipreg.LipschitzEstimator(model, torch.randn(1, 1, 28, 28), method="seqlip")
    lowrank = [op for plan in est.seqlip.plans for op in plan.ops if op.lowrank]
    assert len(lowrank) == 3  # the two convolutions and the 784 x 128 linear layer (> 2^16 entries)

    dense, svd = LinearOperator.dense, torch.linalg.svd

    def refused(self):
        assert self.in_shape.numel() * self.out_shape.numel() <= BoundPolicy().seqlip_dense_entries, \
            f"dense matrix of {self.name} formed in a warm call"
        return dense(self)

    def small_svd(A, *args, **kwargs):
        assert min(A.shape[-2:]) <= 64, f"full SVD of {tuple(A.shape)} in a warm call"
        return svd(A, *args, **kwargs)

    monkeypatch.setattr(LinearOperator, "dense", refused)
    monkeypatch.setattr(torch.linalg, "svd", small_svd)
    bound = est()
    bound.backward()
    assert torch.isfinite(bound) and all(p.grad is not None for p in model.parameters() if p.dim() > 1)

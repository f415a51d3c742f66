"""Per-pair constants carried through the chain (LipLT rows, ECLipsE-Fast ``c X^-1 c^T``) against independent
references: each pair's brute-force max over activation patterns of ``||(w_y - w_j)^T D W ... ||`` and local Jacobian
norms of the logit gaps; never looser than GloRo's ``||w_y - w_j|| L(body)``; the training value and its warm state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lipreg.bounds.certificates import tightest
from lipreg.losses import LipschitzMarginLoss
from lipreg.margins import MarginCertificate
from tests.bounds.references import DT, local_max, mlp, pair_rows, vertex_max, weights


def upper_triangle(K: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(K.shape[0], K.shape[0], offset=1)
    return K[i, j]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", ["autolip", "liplt"])
def test_certified_pairs_reach_the_exact_pair_constants(seed, method):
    model = mlp([3, 5, 4, 4], seed=seed)
    x = torch.randn(2, 3, dtype=DT)
    margins = MarginCertificate(model, x, method=method, dtype=DT)
    K = upper_triangle(margins.certified())
    exact = vertex_max(weights(model), 0.0, 1.0, rows=pair_rows(4))
    lower = local_max(model, 3, n=100, rows=pair_rows(4))
    assert bool((lower <= exact + 1e-12).all()) and bool((exact <= K).all())
    gloro = upper_triangle(margins.constants(margins.estimator.certified_bound().detach()))
    assert bool((K <= gloro * (1 + 1e-5)).all()) and bool((K < gloro).any())  # GloRo rounded up
    assert margins.certificate is not None and "pairwise" in margins.certificate


def test_conv_body_pairs_are_sound():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 6), nn.ReLU(),
                          nn.Linear(6, 3)).to(DT).eval()
    x = torch.randn(2, 1, 4, 4, dtype=DT)
    margins = MarginCertificate(model, x, method="liplt", dtype=DT)
    K = upper_triangle(margins.certified())
    generator = torch.Generator().manual_seed(0)
    lower = torch.zeros(3, dtype=DT)
    for _ in range(200):
        J = torch.func.jacrev(model)(torch.randn(1, 1, 4, 4, dtype=DT, generator=generator) * 3).reshape(3, 16)
        lower = torch.maximum(lower, torch.linalg.vector_norm(pair_rows(3) @ J, dim=1))
    assert bool((lower <= K).all())


def test_training_value_is_never_looser_than_gloro_and_converges_to_the_certificate():
    model = mlp([4, 8, 7, 3], seed=5)
    x = torch.randn(2, 4, dtype=DT)
    liplt = MarginCertificate(model, x, method="liplt", dtype=DT)
    gloro = MarginCertificate(model, x, method="autolip", dtype=DT)
    liplt.estimator.converge(tol=1e-10)
    gloro.estimator.converge(tol=1e-10)
    K, _ = liplt(n_iter=0)
    G, _ = gloro(n_iter=0)
    assert bool((K <= G * (1 + 1e-9)).all()) and bool((K < G).any())
    certified = liplt.certified()
    pairs = liplt.estimator.certified_pairs(liplt.head.weight)
    assert bool((upper_triangle(pairs["pairwise_liplt"]) >= upper_triangle(K.detach()) * (1 - 1e-9)).all())
    assert bool((upper_triangle(pairs["pairwise_liplt"]) <= upper_triangle(K.detach()) * (1 + 1e-5)).all())
    assert bool((certified <= pairs["pairwise_liplt"]).all())


def test_margin_loss_with_liplt_trains_and_keeps_its_warm_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    loss_fn = LipschitzMarginLoss(model, x, eps=0.1, method="liplt", warmup=0)
    loss = loss_fn(model(x), y)
    loss.backward()
    assert model[0].weight.grad is not None and bool(torch.isfinite(model[0].weight.grad).all())
    copy = LipschitzMarginLoss(model, x, eps=0.1, method="liplt", warmup=0, seed=3)
    copy.load_state_dict(loss_fn.state_dict())
    assert float(copy(model(x), y).detach()) == pytest.approx(float(loss_fn(model(x), y).detach()), rel=1e-6)


def test_tightest_names_the_certificates_that_won():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [0.5, 0.0]])
    name, best = tightest({"a": a, "b": b})
    assert name == "a+b" and torch.equal(best, torch.minimum(a, b).double())
    assert tightest({"a": a, "b": a})[0] == "a"
    assert tightest({"x": torch.tensor(2.0), "y": torch.tensor(1.0)}) == ("y", torch.tensor(1.0, dtype=DT))


def test_liplt_margin_step_makes_no_host_synchronisation():
    from tests.test_host_syncs import counted_syncs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    loss_fn = LipschitzMarginLoss(model, x, eps=0.1, method="liplt", warmup=3)
    loss_fn(model(x), y).backward()  # the first call builds the operators
    with counted_syncs() as counts:
        for _ in range(3):
            loss_fn(model(x), y).backward()
    assert not counts, dict(counts)


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.Tanh])
def test_pairs_through_activations_of_any_slopes_are_sound(act):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), act(), nn.Linear(5, 3)).to(DT).eval()
    x = torch.randn(2, 3, dtype=DT)
    margins = MarginCertificate(model, x, method="liplt", dtype=DT)
    K = upper_triangle(margins.certified())
    lower = local_max(model, 3, n=300, rows=pair_rows(3))
    assert bool((lower <= K).all()), (lower, K)


def test_certified_certifies_the_body_once_and_keeps_the_gloro_candidate(monkeypatch):
    """``certified()`` runs the tightest body certificate once (inside ``certified_pairs``, which also gives the GloRo
    candidate on it) and the whole model's once; the GloRo candidate is ``||w_y - w_j||`` times the body's
    ``certified_bound()``, rounded upwards."""
    import lipreg.certification as certification
    import lipreg.estimator as estimator

    model = mlp([3, 5, 4, 4], seed=4)
    margins = MarginCertificate(model, torch.randn(2, 3, dtype=DT), dtype=DT)
    calls = {"body": 0, "whole": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(certification, "tightest64", counted("body", certification.tightest64))
    monkeypatch.setattr(estimator, "tightest64", counted("whole", estimator.tightest64))
    margins.certified()
    assert calls == {"body": 1, "whole": 1}
    pairs = margins.estimator.certified_pairs(margins.head.weight)
    body = margins.estimator.certified_bound().detach()
    gloro, reference = upper_triangle(pairs[margins.estimator.certificate]), upper_triangle(margins.constants(body))
    assert bool((gloro >= reference.detach()).all())
    assert gloro.tolist() == pytest.approx(reference.tolist(), rel=2e-6)  # certified_cast rounds upwards

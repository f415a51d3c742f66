"""``BoundPolicy``: validation, and every field reaching the place it limits (checked by the route it picks, against
independent references: ``torch.linalg.matrix_norm`` of ``jacrev`` Jacobians in float64, decomposition counts).

``test_every_field_has_a_behaviour_test`` fails for a field without its ``test_policy_<field>`` here, and a limit that
no code reads (because a constant elsewhere still decides) makes its ``test_policy_<field>`` fail.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lipreg
from lipreg import BoundPolicy

DT = torch.float64


def jacobian(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    jac = torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0))(torch.zeros(shape, dtype=DT))
    return jac.reshape(-1, math.prod(shape)).detach()


def spectral(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, 2))


def certified(model: nn.Module, shape: tuple[int, ...], policy: BoundPolicy, **options) -> float:
    est = lipreg.LipschitzEstimator(model, torch.randn(2, *shape, dtype=DT), dtype=DT, policy=policy, **options)
    return float(est.certified_bound().detach())


def mlp(*widths: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(DT).eval()


def seqlip(model: nn.Module, n_in: int, policy: BoundPolicy, **options) -> lipreg.LipschitzEstimator:
    return lipreg.LipschitzEstimator(model, torch.randn(2, n_in, dtype=DT), method="seqlip", dtype=DT,
                                     policy=policy, **options)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(BoundPolicy)])
def test_negative_or_nan_limits_are_refused(field):
    for bad in (-1, float("nan"), True, "4"):
        with pytest.raises(ValueError, match=f"BoundPolicy.{field} must be a number >= 0"):
            BoundPolicy(**{field: bad})


def test_unknown_fields_inconsistent_limits_and_mutation_are_refused():
    with pytest.raises(TypeError, match="dense_limit"):
        BoundPolicy(dense_limit=0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="lowrank_rank must be >= 1"):
        BoundPolicy(lowrank_rank=0)
    with pytest.raises(ValueError, match="exact_search_units=23 exceeds exact_search_limit=22"):
        BoundPolicy(exact_search_units=23)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BoundPolicy().dense_entries = 0  # type: ignore[misc]
    assert BoundPolicy(greedy_max_rounds=None) == BoundPolicy()
    with pytest.raises(TypeError, match="policy must be a lipreg.BoundPolicy, got dict"):
        lipreg.LipschitzEstimator(nn.Linear(2, 2), torch.randn(1, 2), policy={"dense_entries": 0})


def test_the_policy_module_is_a_leaf():
    """:mod:`lipreg.linalg.certify` and :mod:`lipreg.linalg.conv` take their default limits from the policy, so
    :mod:`lipreg.policy` imports nothing of lipreg (no cycle, and the certificates stay usable alone)."""
    tree = ast.parse(Path(lipreg.policy.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] != "lipreg"
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "lipreg" for a in node.names)


def test_every_field_has_a_behaviour_test():
    tested = {name.removeprefix("test_policy_") for name in globals() if name.startswith("test_policy_")}
    assert tested == {f.name for f in dataclasses.fields(BoundPolicy)}


# ------------------------------------------------------------------------- certificates (AutoLip route)
def _two_convs() -> nn.Sequential:
    """Two convolutions in a row: one fused operator, whose exact norm is below the product of theirs."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)).to(DT).eval()


def test_policy_dense_entries():
    """Dense route: the exact norm of the fused operator; ``dense_entries=0``: the product of the convolutions'
    own certificates (each exact here: small convolutions take their dense matrix inside the FFT certificate)."""
    model, shape = _two_convs(), (2, 6, 6)
    exact = spectral(jacobian(model, shape))
    product = spectral(jacobian(model[0], shape)) * spectral(jacobian(model[1], (3, 6, 6)))
    assert product > exact * 1.01
    assert certified(model, shape, BoundPolicy()) == pytest.approx(exact, rel=1e-5)
    assert certified(model, shape, BoundPolicy(dense_entries=0)) == pytest.approx(product, rel=1e-5)


def test_policy_conv_dense_entries():
    """Without any dense matrix the zero-padded convolution gets the FFT bound of its circular embedding: above
    the exact norm, and looser than with its dense matrix (which is exact)."""
    torch.manual_seed(4)
    model, shape = nn.Conv2d(2, 3, 3, padding=1).to(DT).eval(), (2, 5, 5)
    exact = spectral(jacobian(model, shape))
    with_dense = certified(model, shape, BoundPolicy(dense_entries=0))
    fft = certified(model, shape, BoundPolicy(dense_entries=0, conv_dense_entries=0))
    assert with_dense == pytest.approx(exact, rel=1e-5)
    assert fft >= exact and fft > with_dense * (1 + 1e-4)


def _eigvalsh_calls(monkeypatch, policy: BoundPolicy) -> int:
    calls = {"n": 0}
    eigvalsh = torch.linalg.eigvalsh

    def counting(*args, **kwargs):
        calls["n"] += 1
        return eigvalsh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counting)
    model = mlp(12, 9, 7, seed=2)
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 12, dtype=DT), dtype=DT, policy=policy)
    bounds = est.layer_bounds(certified=True)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for node, layer in zip(est.graph.linear_nodes(), linears, strict=True):
        assert bounds[node.name] >= spectral(layer.weight.detach())
    return calls["n"]


def test_policy_exact_eig_max_dim_cpu(monkeypatch):
    """On the CPU the dense norms are exact (``eigvalsh``) unless the limit sends them to the Gram iteration."""
    assert _eigvalsh_calls(monkeypatch, BoundPolicy(dense_entries=0)) >= 2  # the ops' certificates
    assert _eigvalsh_calls(monkeypatch, BoundPolicy()) >= 2  # the operators' dense matrices
    assert _eigvalsh_calls(monkeypatch, BoundPolicy(exact_eig_max_dim_cpu=0)) == 0
    assert _eigvalsh_calls(monkeypatch, BoundPolicy(dense_entries=0, exact_eig_max_dim_cpu=0)) == 0


def test_policy_exact_eig_max_dim_accelerator():
    """The limit of any other device type; the CPU's is unaffected."""
    policy = BoundPolicy(exact_eig_max_dim_cpu=5, exact_eig_max_dim_accelerator=7)
    assert (policy.exact_eig_max_dim("cpu"), policy.exact_eig_max_dim("cuda"), policy.exact_eig_max_dim("mps")) == \
        (5, 7, 7)


# --------------------------------------------------------------------------------------------- SeqLip
def test_policy_seqlip_dense_entries():
    est = seqlip(mlp(4, 10, 3), 4, BoundPolicy())
    assert est.seqlip.certified
    low = seqlip(mlp(4, 10, 3), 4, BoundPolicy(seqlip_dense_entries=39))  # 4 x 10 = 40 entries: low rank
    assert not low.seqlip.certified
    assert [op.lowrank for op in low.seqlip.plans[0].ops] == [True, False]


def test_policy_seqlip_dense_rank():
    low = seqlip(mlp(4, 10, 3), 4, BoundPolicy(seqlip_dense_rank=3))  # min(4, 10) = 4 > 3, min(10, 3) = 3
    assert [op.lowrank for op in low.seqlip.plans[0].ops] == [True, False]


def test_policy_exact_search_units():
    """Width 18 (> 16): greedy by default (not certified); exact with a policy that allows 18 units, and then the
    brute-force max of ``||W_2 D W_1||`` over the ``2^18`` diagonal patterns."""
    model = mlp(3, 18, 2, seed=1)
    assert not seqlip(model, 3, BoundPolicy()).seqlip.certified
    exact = seqlip(model, 3, BoundPolicy(exact_search_units=18))
    assert exact.seqlip.certified
    W1, W2 = (m.weight.detach() for m in model if isinstance(m, nn.Linear))
    bits = torch.arange(18)
    brute = 0.0
    for first in range(0, 1 << 18, 1 << 15):
        diags = ((torch.arange(first, first + (1 << 15))[:, None] >> bits) & 1).to(DT)
        brute = max(brute, float(torch.linalg.matrix_norm(W2 @ (diags[:, :, None] * W1), 2).max()))
    assert float(exact(n_iter=0).detach()) == pytest.approx(brute, rel=1e-9)


def test_policy_exact_search_limit():
    with pytest.raises(ValueError, match=r"width 10: 2\^10 patterns .*limit 2\^8, BoundPolicy.exact_search_limit"):
        seqlip(mlp(4, 10, 3), 4, BoundPolicy(exact_search_units=8, exact_search_limit=8), search="exact")
    allowed = seqlip(mlp(4, 10, 3), 4, BoundPolicy(exact_search_units=10, exact_search_limit=10), search="exact")
    assert allowed.seqlip.certified


def _subspaces(policy: BoundPolicy) -> tuple[list[int], list[tuple[int, ...]]]:
    """The ranks ``E`` of a low-rank chain 6 -> 30 -> 25 -> 4, and the shapes of its subspace buffers."""
    est = seqlip(mlp(6, 30, 25, 4), 6, policy, search="lowrank")
    shapes = [tuple(b.shape) for name, b in est.seqlip.named_buffers() if name.startswith("subspace_")]
    return [op.rank for op in est.seqlip.plans[0].ops], shapes


def test_policy_lowrank_rank():
    assert _subspaces(BoundPolicy(lowrank_rank=5, lowrank_oversample=0))[0] == [5, 5, 4]  # at most the true rank
    assert _subspaces(BoundPolicy(lowrank_rank=1, lowrank_oversample=0)) == ([1, 1, 1], [(1, 6), (1, 30), (1, 25)])


def test_policy_lowrank_oversample():
    """``E`` + oversampling vectors, at most ``min(n_in, n_out)``."""
    assert _subspaces(BoundPolicy(lowrank_rank=5, lowrank_oversample=3)) == ([5, 5, 4], [(6, 6), (8, 30), (4, 25)])


def test_policy_greedy_max_rounds():
    """No round: the greedy keeps its starting pattern, all ones, so the pair factor is ``||W_2 W_1||``."""
    model = mlp(5, 12, 4, seed=2)
    W1, W2 = (m.weight.detach() for m in model if isinstance(m, nn.Linear))
    est = seqlip(model, 5, BoundPolicy(greedy_max_rounds=0), search="greedy")
    assert float(est(n_iter=0).detach()) == pytest.approx(spectral(W2 @ W1), rel=1e-10)
    searched = seqlip(model, 5, BoundPolicy(), search="greedy")
    assert float(searched(n_iter=0).detach()) > spectral(W2 @ W1) * (1 + 1e-6)


def test_policy_greedy_rounds_per_call():
    """Without a warm start the patterns start all ones: no round per call keeps them there until ``converge()``
    searches; one round per call climbs at the first call."""
    model = mlp(5, 12, 4, seed=2)
    W1, W2 = (m.weight.detach() for m in model if isinstance(m, nn.Linear))
    frozen = seqlip(model, 5, BoundPolicy(greedy_rounds_per_call=0), search="greedy", warm_start=False)
    assert float(frozen(n_iter=0).detach()) == pytest.approx(spectral(W2 @ W1), rel=1e-10)
    climbed = seqlip(model, 5, BoundPolicy(greedy_rounds_per_call=1), search="greedy", warm_start=False)
    assert float(climbed(n_iter=0).detach()) > spectral(W2 @ W1) * (1 + 1e-6)
    assert float(frozen.converge().detach()) == pytest.approx(float(climbed.converge().detach()), rel=1e-10)



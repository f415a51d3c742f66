"""Tests for lipreg.metrics: hand-computed certificates, running max, state handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics.utilities.data import dim_zero_max, dim_zero_sum

from lipreg.metrics import CertifiedRobustAccuracy, EmpiricalLipschitz, lower_bound, upper_over_lower

# ----------------------------------------------------------------------------- fixed logits
# margin M = f_t - max_{j != t} f_j; certified at eps iff M > sqrt(2) * L * eps
LOGITS = torch.tensor(
    [
        [3.0, 1.0, 0.0],  # t=0, M=2
        [2.0, 2.0, 0.0],  # t=0, tie for the top: M=0, never certified
        [0.0, 1.0, 0.5],  # t=1, M=0.5
        [5.0, 0.0, 0.0],  # t=2, wrong: M=-5
        [1.0, 1.0, 1.0],  # t=1, three-way tie: M=0
        [0.0, 0.0, 4.0],  # t=2, M=4
    ]
)
TARGET = torch.tensor([0, 0, 1, 2, 1, 2])
EPS = (0.0, 0.5, 1.0, 1.5)
# by hand, L=1: thresholds 0, 0.707, 1.414, 2.121 -> certified rows {0,2,5}, {0,5}, {0,5}, {5}
EXPECTED_L1 = {0.0: 3, 0.5: 2, 1.0: 2, 1.5: 1}
# L=2: thresholds 0, 1.414, 2.828, 4.243 -> {0,2,5}, {0,5}, {5}, {}
EXPECTED_L2 = {0.0: 3, 0.5: 2, 1.0: 1, 1.5: 0}


def _update_in_chunks(metric, L, certified=True, chunks=((0, 2), (2, 5), (5, 6))):
    for a, b in chunks:
        metric.update(LOGITS[a:b], TARGET[a:b], L, certified=certified)


@pytest.mark.parametrize("L, expected", [(1.0, EXPECTED_L1), (2.0, EXPECTED_L2)])
def test_certified_accuracy_hand_computed(L, expected):
    m = CertifiedRobustAccuracy(eps=EPS)
    _update_in_chunks(m, L)
    out = m.compute()
    assert list(out) == [f"certified_acc@{e:g}" for e in EPS]
    assert list(out) == ["certified_acc@0", "certified_acc@0.5", "certified_acc@1", "certified_acc@1.5"]
    for e in EPS:
        assert float(out[f"certified_acc@{e:g}"]) == pytest.approx(expected[e] / 6)
    assert int(m.total) == 6
    assert m.correct_certified.tolist() == [expected[e] for e in EPS]


def test_certified_accuracy_matches_loop_reference():
    torch.manual_seed(0)
    logits = torch.randn(50, 5)
    target = torch.randint(0, 5, (50,))
    logits[:5, 0] = logits[:5, 1]  # some ties
    eps = (0.0, 0.05, 0.2, 0.7)
    L = 1.3
    m = CertifiedRobustAccuracy(eps=eps)
    m.update(logits[:17], target[:17], torch.tensor(L), certified=True)
    m.update(logits[17:], target[17:], L, certified=True)
    out = m.compute()
    for e in eps:
        count = 0
        for row, t in zip(logits.tolist(), target.tolist()):
            runner = max(v for j, v in enumerate(row) if j != t)
            correct = row[t] > runner  # strict: ties are not correct
            count += correct and (row[t] - runner) > math.sqrt(2) * L * e
        assert float(out[f"certified_acc@{e:g}"]) == pytest.approx(count / 50)


def test_single_eps_float_and_default():
    m = CertifiedRobustAccuracy(eps=0.25)
    m.update(LOGITS, TARGET, 1.0, certified=True)
    assert list(m.compute()) == ["certified_acc@0.25"]
    # M > sqrt2 * 0.25 = 0.354: rows 0, 2, 5
    assert float(m.compute()["certified_acc@0.25"]) == pytest.approx(3 / 6)
    assert list(CertifiedRobustAccuracy().compute()) == ["certified_acc@0.1"]


def test_estimate_rejected_by_default():
    m = CertifiedRobustAccuracy(eps=EPS)
    with pytest.raises(ValueError, match="certified_bound|allow_estimate"):
        m.update(LOGITS, TARGET, 1.0, certified=False)
    assert int(m.total) == 0


def test_allow_estimate_labels_results_estimated():
    m = CertifiedRobustAccuracy(eps=EPS, allow_estimate=True)
    m.update(LOGITS[:3], TARGET[:3], 1.0, certified=True)  # certified part
    assert all(k.startswith("certified_acc@") for k in m.compute())
    m.update(LOGITS[3:], TARGET[3:], 1.0, certified=False)  # one estimate taints the accumulation
    out = m.compute()
    assert list(out) == [f"estimated_acc@{e:g}" for e in EPS]
    for e in EPS:
        assert float(out[f"estimated_acc@{e:g}"]) == pytest.approx(EXPECTED_L1[e] / 6)
    assert int(m.n_estimated) == 3
    m.reset()
    m.update(LOGITS, TARGET, 1.0, certified=True)
    assert all(k.startswith("certified_acc@") for k in m.compute())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, torch.tensor(float("inf"))])
def test_bad_bound_raises(bad):
    m = CertifiedRobustAccuracy(eps=EPS, allow_estimate=True)
    with pytest.raises(ValueError):
        m.update(LOGITS, TARGET, bad, certified=True)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        CertifiedRobustAccuracy(eps=())
    with pytest.raises(ValueError):
        CertifiedRobustAccuracy(eps=(-1.0,))
    with pytest.raises(ValueError):
        CertifiedRobustAccuracy(eps=(0.1, 0.1))
    m = CertifiedRobustAccuracy()
    with pytest.raises(ValueError):
        m.update(LOGITS, TARGET[:3], 1.0, certified=True)
    with pytest.raises(ValueError):
        m.update(LOGITS, torch.full((6,), 3), 1.0, certified=True)
    with pytest.raises(ValueError):
        m.update(LOGITS, TARGET, torch.ones(2), certified=True)


def test_zero_bound_certifies_strictly_correct():
    m = CertifiedRobustAccuracy(eps=(0.0, 100.0))
    m.update(LOGITS, TARGET, 0.0, certified=True)
    out = m.compute()
    assert float(out["certified_acc@0"]) == pytest.approx(3 / 6)
    assert float(out["certified_acc@100"]) == pytest.approx(3 / 6)


def test_forward_returns_batch_value_and_accumulates():
    m = CertifiedRobustAccuracy(eps=EPS)
    batch = m(LOGITS[:2], TARGET[:2], 1.0, certified=True)
    assert float(batch["certified_acc@0"]) == pytest.approx(1 / 2)
    m(LOGITS[2:], TARGET[2:], 1.0, certified=True)
    assert float(m.compute()["certified_acc@0"]) == pytest.approx(3 / 6)


def test_reductions_are_as_documented():
    cra = CertifiedRobustAccuracy(eps=EPS)
    assert cra._reductions["correct_certified"] is dim_zero_sum
    assert cra._reductions["total"] is dim_zero_sum
    assert cra._reductions["n_estimated"] is dim_zero_sum
    emp = EmpiricalLipschitz(nn.Linear(2, 2))
    assert set(emp._reductions) == {"value"}
    assert emp._reductions["value"] is dim_zero_max
    assert float(emp._defaults["value"]) == 0.0
    assert cra.correct_certified.dtype == torch.long and cra.correct_certified.shape == (len(EPS),)


# ----------------------------------------------------------------------------- EmpiricalLipschitz
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_empirical_lipschitz_is_running_max():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    torch.manual_seed(1)
    batches = [torch.randn(5, 4) * s for s in (3.0, 0.1, 1.0)]
    metric = EmpiricalLipschitz(model, n_iter=10, ascent_steps=2, lr=0.1)
    model.eval()
    expected = []
    for i, x in enumerate(batches):
        torch.manual_seed(100 + i)
        expected.append(float(lower_bound(model, x, ascent_steps=2, lr=0.1, n_iter=10)))
    model.train()  # the metric switches to eval itself (Dropout off)
    for i, x in enumerate(batches):
        torch.manual_seed(100 + i)
        metric.update(x)
        assert float(metric.compute()) == pytest.approx(max(expected[: i + 1]), rel=1e-6)
    assert max(expected) > min(expected)  # the max actually matters
    assert model.training
    metric.reset()
    assert float(metric.value) == 0.0


def test_empirical_lipschitz_restores_flags_and_leaves_model_alone():
    model = _model()
    model.train()
    model[3].eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model[0].bias.grad = None
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    metric = EmpiricalLipschitz(model, n_iter=5, ascent_steps=1)
    metric.update(torch.randn(6, 4))
    assert [m.training for m in model.modules()] == flags
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g)
    for k, v in model.named_buffers():  # BatchNorm running stats untouched (eval mode during update)
        torch.testing.assert_close(v, buffers[k])
    assert float(metric.compute()) > 0


def test_empirical_lipschitz_restores_flags_on_error():
    model = _model().train()
    metric = EmpiricalLipschitz(model)
    with pytest.raises(Exception):
        metric.update(torch.randn(3, 5))  # wrong input width
    assert all(m.training for m in model.modules())


def test_empirical_lipschitz_state_dict_has_no_model_weights():
    model = _model()
    metric = EmpiricalLipschitz(model)
    assert list(metric.parameters()) == []
    assert list(metric.children()) == []
    assert metric.model is model
    metric.persistent(True)
    metric.update(torch.randn(4, 4))
    sd = metric.state_dict()
    assert set(sd) == {"value"}
    model_keys = set(model.state_dict())
    assert not (set(sd) & model_keys)


def test_empirical_lipschitz_linear_model_exact():
    torch.manual_seed(3)
    lin = nn.Linear(6, 4)
    metric = EmpiricalLipschitz(lin, n_iter=200)
    metric.update(torch.randn(3, 6))
    metric.update(torch.randn(2, 6))
    ref = float(torch.linalg.matrix_norm(lin.weight.detach(), 2))
    assert float(metric.compute()) == pytest.approx(ref, rel=1e-5)


def test_upper_over_lower():
    assert upper_over_lower(4.0, 2.0) == 2.0
    assert upper_over_lower(torch.tensor(3.0), torch.tensor(1.5)) == pytest.approx(2.0)
    assert upper_over_lower(1.0, 0.0) == math.inf
    assert upper_over_lower(0.0, 0.0) == 1.0
    assert upper_over_lower(math.inf, 1.0) == math.inf
    with pytest.raises(ValueError):
        upper_over_lower(-1.0, 1.0)
    with pytest.raises(ValueError):
        upper_over_lower(1.0, float("nan"))


def test_metrics_package_names_and_no_shadowed_submodule():
    import importlib

    import lipreg.metrics as metrics

    jacobian = importlib.import_module("lipreg.metrics.jacobian")
    assert metrics.lower_bound is jacobian.lower_bound  # the function, not a submodule of that name
    assert callable(metrics.lower_bound) and callable(metrics.functional.lower_bound)
    for name in metrics.__all__:
        assert getattr(metrics, name) is not None
    with pytest.warns(DeprecationWarning, match="renamed lipreg.metrics.upper_over_lower"):
        assert metrics.lipschitz_gap(4.0, 2.0) == 2.0
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        metrics.nope  # noqa: B018

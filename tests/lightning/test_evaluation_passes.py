"""The passes the callback's validation and the end-of-run evaluation (``experiments/estimate.py``) share:
``CertifiedAccuracyPass`` accumulated over batches equals the functional kernels on the whole data, for the global
and the per-pair certificate, and keeps each sample's radius under both; ``pair_certificate`` is ``None`` without a
linear head or without class logits, and the callback asks for it once per fit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lipreg
from lipreg import keys
from lipreg.lightning import validation
from lipreg.lightning.certified_accuracy import CertifiedAccuracyPass, pair_certificate
from lipreg.lightning.lower_bound import LowerBoundPass
from lipreg.metrics import certified_accuracy, certified_radius, lower_bound, upper_over_lower

EPS = (0.05, 0.2)


def _classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(40, 5)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::5] = (y[::5] + 1) % 4  # some errors: they are never certified
    return net, x, y


def test_batches_add_up_to_the_kernels_on_the_whole_data() -> None:
    net, x, y = _classifier()
    bound = lipreg.LipschitzEstimator(net, x[:1]).certified_bound()
    certificate = pair_certificate(net, x[:1])
    assert certificate is not None
    pairs = certificate.certified()
    robust = CertifiedAccuracyPass(bound, pairs, EPS)
    with torch.no_grad():
        for i in range(0, len(x), 16):  # three batches, the last one short
            robust.update(net(x[i:i + 16]), y[i:i + 16])
        logits = net(x)
    got = robust.compute("test")
    assert set(got) == {keys.certified_acc(e, "test") for e in EPS} | {keys.certified_acc(e, "test", pairwise=True)
                                                                       for e in EPS}
    for constants, pairwise in ((bound, False), (pairs, True)):
        expected = certified_accuracy(logits, y, constants, EPS)
        assert [float(got[keys.certified_acc(e, "test", pairwise)]) for e in EPS] == pytest.approx(
            expected.tolist(), abs=1e-6)
    radii = robust.radii()
    assert set(radii) == {"global", "pairwise"}
    assert torch.equal(radii["global"], certified_radius(logits, y, bound))
    assert torch.equal(radii["pairwise"], certified_radius(logits, y, pairs))
    assert 0 < float(got[keys.certified_acc(EPS[0], "test")]) < 1  # not a trivial case
    assert set(robust.compute()) == {keys.certified_acc(e) for e in EPS} | {
        keys.certified_acc(e, pairwise=True) for e in EPS}  # the callback's robust/ group by default


def test_without_a_linear_head_the_pass_is_global_only() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).eval()
    x = torch.randn(8, 5)
    assert pair_certificate(net, x[:1]) is None
    assert pair_certificate(nn.Linear(5, 1), x[:1]) is None  # one output: no class logits
    robust = CertifiedAccuracyPass(lipreg.LipschitzEstimator(net, x[:1]).certified_bound(), None, EPS)
    with torch.no_grad():
        robust.update(net(x), net(x).argmax(1))
    assert set(robust.radii()) == {"global"} and len(robust.radii()["global"]) == 8
    assert not any(keys.PAIRWISE in k for k in robust.compute())


def test_the_lower_bound_pass_is_the_kernel_and_its_bracket() -> None:
    net, x, _ = _classifier()
    lower = LowerBoundPass(net, batches=1, ascent_steps=0)
    torch.manual_seed(1)  # the power iterations start at random
    lower.update(x[:8], 0)
    lower.update(x[8:], 1)  # past `batches`: not seen
    got = lower.compute(5.0)
    torch.manual_seed(1)
    expected = lower_bound(net, x[:8], dtype=torch.float32)
    assert float(got[keys.LOWER]) == float(expected)
    assert float(got[keys.UPPER_OVER_LOWER]) == pytest.approx(float(upper_over_lower(5.0, got[keys.LOWER])))


def test_the_callback_builds_the_pair_certificate_once_even_when_there_is_none(monkeypatch) -> None:
    calls: list[nn.Module] = []
    monkeypatch.setattr(validation, "pair_certificate", lambda model, example: calls.append(model))
    estimator = SimpleNamespace(model=nn.Linear(3, 2), example_input=torch.zeros(1, 3))
    evaluation = validation.ValidationEvaluation(SimpleNamespace(estimator=estimator), 1, EPS, 1, 0,
                                                 lambda b: b[0], lambda b: b[1])
    assert evaluation._pairwise() is None and evaluation._pairwise() is None
    assert len(calls) == 1

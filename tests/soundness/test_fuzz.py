"""Slices of the soundness fuzz (``tests/fuzz/soundness.py``): every number lipreg calls certified must be >= a
float64 lower bound of the true constant (local Jacobian norms, finite pairs), and every failure must be a clean
``UnsupportedOpError``; and the checker itself can fail."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import lipreg
from lipreg.ops import Constant, Refuse
from tests.fuzz.arch import Case
from tests.fuzz.soundness import ISSUE16, CaseRun, run


def _assert_sound(n: int, seed: int) -> None:
    report = run(n, seed=seed)
    assert report.n == n
    assert any(kind.startswith(ISSUE16) for kinds in report.case_kinds.values() for kind in kinds)  # drawn too
    assert not report.findings, report.summary()


def test_fuzz_quick_slice_has_no_violation_and_no_crash() -> None:
    _assert_sound(24, seed=1)


@pytest.mark.slow
def test_fuzz_slice_has_no_violation_and_no_crash() -> None:
    _assert_sound(200, seed=1)


class _Doubler(nn.Module):
    """``x -> 2x``, registered below with the wrong constant 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.fixture
def wrong_rule() -> Iterator[None]:
    """``_Doubler`` registered with the constant 1 for one test (the registry is global)."""
    with lipreg.ops.registered(_Doubler, 1.0):
        yield


def _violations(case: Case) -> list[str]:
    check = CaseRun(case, seed=0)
    check.run()
    assert not [f for f in check.findings if f.kind == "crash"], [f.line() for f in check.findings]
    return [f.where for f in check.findings if f.kind == "violation"]


def test_fuzz_check_flags_an_unsound_rule(wrong_rule: None) -> None:
    """The checker itself can fail: a rule that claims 1 for a map of constant 2 is a violation."""
    model = nn.Sequential(nn.Linear(3, 3), _Doubler()).eval()
    case = Case(0, model, torch.randn(2, 3), torch.float64, True, {"Doubler"}, {_Doubler}, "Linear -> Doubler")
    wrong = _violations(case)
    assert any("certified_bound" in w for w in wrong)
    assert any("layer" in w for w in wrong)


class _OneSample(nn.Module):
    """The 16.3 layout: ``h[0]`` -> a convolution on the unbatched ``(C, L)`` sample -> ``_Doubler`` -> ``unsqueeze(0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.doubler = nn.Conv1d(2, 3, 2), _Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.doubler(self.conv(x[0])).unsqueeze(0)


def test_fuzz_check_flags_an_unsound_rule_on_an_unbatched_sample(wrong_rule: None) -> None:
    """The sample-by-sample reference of the unbatched-convolution class can fail too."""
    case = Case(0, _OneSample().eval(), torch.randn(1, 2, 5), torch.float64, True, {"Doubler"}, {_Doubler},
                "h[0] -> Conv1d on (C, L) -> Doubler -> unsqueeze(0)", per_sample=True)
    assert any("certified_bound" in w for w in _violations(case))


def test_fuzz_check_flags_a_stale_or_wrong_bound_after_a_container_edit(wrong_rule: None) -> None:
    """A layer appended to a ``Sequential`` after the estimators were built is checked on the kept estimators: a
    stale bound (the old model's) and a retraced one (with the wrong rule) are both below the truth."""
    model = nn.Sequential(nn.Linear(3, 3)).eval()

    def mutate(net: nn.Module) -> str:
        net.append(_Doubler())
        return "net.append(Doubler())"
    case = Case(0, model, torch.randn(2, 3), torch.float64, True, {"16.4 container edit"}, {_Doubler},
                "Sequential(Linear)", mutate=mutate)
    assert any("certified_bound" in w for w in _violations(case))


class _Switch(nn.Module):
    """The identity, whose registered rule below refuses it once ``refused`` is set."""

    refused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture
def switch_rule() -> Iterator[None]:
    try:
        with lipreg.ops.registered(_Switch, lambda info: Refuse("switched off") if _Switch.refused else Constant(1.0)):
            yield
    finally:
        _Switch.refused = False


def test_fuzz_check_flags_a_kept_estimator_that_certifies_what_a_fresh_one_refuses(switch_rule: None) -> None:
    """After a change, a kept estimator must not certify a model that lipreg now refuses (the dtype-change class:
    Softplus's jump is hidden by float32 rounding, not by float64's). The change here is invisible to the model (a
    rule's verdict), so the kept estimators certify whatever the fingerprint covers: the checker must say so."""
    def mutate(net: nn.Module) -> str:
        _Switch.refused = True
        return "the rule of _Switch now refuses"
    case = Case(0, nn.Sequential(nn.Linear(3, 3), _Switch()).eval(), torch.randn(2, 3), torch.float64, True,
                {"16.4 dtype change"}, {_Switch}, "Linear -> Switch", mutate=mutate)
    assert any("after the change" in w for w in _violations(case))


def test_fuzz_check_flags_an_unsound_margin_certificate(wrong_rule: None) -> None:
    """The per-pair margin check can fail: the body's wrong constant makes every pair's ``K_ij`` half the truth."""
    model = nn.Sequential(nn.Linear(3, 4), _Doubler(), nn.Linear(4, 3)).eval()
    case = Case(0, model, torch.randn(2, 3), torch.float64, True, {"Doubler"}, {_Doubler}, "Linear -> Doubler -> head",
                margin="autolip")
    assert any(w.startswith("MarginCertificate") for w in _violations(case))

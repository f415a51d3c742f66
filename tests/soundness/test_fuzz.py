"""A 200-architecture slice of the soundness fuzz (``tests/fuzz/soundness.py``): every number lipreg
calls certified must be >= a float64 lower bound of the true constant (local Jacobian norms, finite pairs), and
every failure must be a clean ``UnsupportedOpError``."""
from __future__ import annotations

import torch
from torch import nn

import lipreg
from tests.fuzz.arch import Case
from tests.fuzz.soundness import CaseRun, run


def test_fuzz_slice_has_no_violation_and_no_crash() -> None:
    report = run(200, seed=1)
    assert report.n == 200
    assert not report.violations and not report.crashes, report.summary()


class _Doubler(nn.Module):
    """``x -> 2x``, registered below with the wrong constant 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_fuzz_check_flags_an_unsound_rule() -> None:
    """The checker itself can fail: a rule that claims 1 for a map of constant 2 is a violation."""
    model = nn.Sequential(nn.Linear(3, 3), _Doubler()).eval()
    case = Case(0, model, torch.randn(2, 3), torch.float64, True, {"Doubler"}, {_Doubler}, "Linear -> Doubler")
    check = CaseRun(case, seed=0)
    with lipreg.ops.registered(_Doubler, 1.0):
        check.run()
    wrong = [f for f in check.findings if f.kind == "violation"]
    assert any("certified_bound" in f.where for f in wrong)
    assert any("layer" in f.where for f in wrong)
    assert not [f for f in check.findings if f.kind == "crash"]

"""Package conventions: ``import lipreg`` loads no Lightning, torchmetrics or matplotlib (those load on first use
of ``lipreg.LipschitzCallback`` / ``lipreg.metrics``), ``__all__`` and ``dir()`` are complete, ``__version__`` is the
installed metadata's, ``repr(est)`` says what the estimator holds, progress bars are optional, and the ``Literal``
option types list exactly what the code accepts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import nn

import lipreg
from lipreg.options import MarginKind, Method, PenaltyKind, Search

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "matplotlib", "tensorboard", "hydra", "sklearn")


def loaded_after(statement: str) -> list[str]:
    """The heavy top-level packages in ``sys.modules`` after ``statement``, in a fresh interpreter."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout
    return [m for m in json.loads(out.splitlines()[-1]) if m in HEAVY]


def test_import_lipreg_loads_no_lightning_and_the_lazy_names_work() -> None:
    assert loaded_after("import lipreg; lipreg.LipschitzEstimator; lipreg.LipschitzPenalty") == []
    lazy = loaded_after("import lipreg; lipreg.LipschitzCallback; lipreg.metrics.CertifiedRobustAccuracy")
    assert {"lightning", "pytorch_lightning", "torchmetrics"} <= set(lazy)


def test_public_names() -> None:
    assert set(lipreg.__all__) <= set(dir(lipreg))
    for name in lipreg.__all__:
        assert getattr(lipreg, name) is not None
    from lipreg.lightning import LipschitzCallback
    assert lipreg.LipschitzCallback is LipschitzCallback
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lipreg.Nope  # noqa: B018
    assert lipreg.__version__ == version("lipreg")
    assert (ROOT / "lipreg" / "py.typed").exists()


def test_repr_shows_method_operators_and_warm_state() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    text = repr(lipreg.LipschitzEstimator(net, torch.zeros(1, 4)))
    assert "method='autolip'" in text and "operators=['0', '2'] (power iteration: 2" in text
    assert "warm_state=12 values" in text  # the two warm vectors: 4 + 8 entries
    text = repr(lipreg.LipschitzEstimator(net, torch.zeros(1, 4), method="seqlip"))
    assert "method='seqlip'" in text and "seqlip_chains=1" in text


def test_progress_bars_are_optional_and_change_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    quiet, shown = (lipreg.LipschitzEstimator(net, torch.zeros(1, 6)) for _ in range(2))
    expected = (quiet.converge(tol=1e-9), quiet.certified_bound())
    assert capsys.readouterr().err == ""
    got = (shown.converge(tol=1e-9, progress=True), shown.certified_bound(progress=True))
    err = capsys.readouterr().err
    assert "converge" in err and "certify" in err
    assert [float(v) for v in got] == [float(v) for v in expected]


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


ENTRY_POINTS = {
    "LipschitzEstimator": lambda **kw: lipreg.LipschitzEstimator(small_net(), torch.zeros(1, 4), **kw),
    "LipschitzPenalty": lambda **kw: lipreg.LipschitzPenalty(small_net(), torch.zeros(1, 4), **kw),
    "LipschitzMarginLoss": lambda **kw: lipreg.LipschitzMarginLoss(small_net(), torch.zeros(1, 4), eps=0.1, **kw),
    "MarginCertificate": lambda **kw: lipreg.MarginCertificate(small_net(), torch.zeros(1, 4), **kw),
    "LipschitzCallback": lambda **kw: lipreg.LipschitzCallback(**kw),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("typo", "closest"), [("fusee", "fuse"), ("n_iters", "n_iter"), ("serch", "search")])
def test_every_entry_point_refuses_a_misspelled_option_naming_the_closest(entry: str, typo: str,
                                                                          closest: str) -> None:
    with pytest.raises(TypeError, match=rf"{entry}\(\) got an unknown option '{typo}'; did you mean {closest}="):
        ENTRY_POINTS[entry](**{typo: True})


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_method_of_the_literal_is_accepted_and_another_refused(entry: str) -> None:
    for method in get_args(Method):
        ENTRY_POINTS[entry](method=method)
    with pytest.raises(ValueError, match="method must be one of 'autolip', 'seqlip'.*did you mean 'seqlip'"):
        ENTRY_POINTS[entry](method="seqlp")


def test_every_search_penalty_kind_and_margin_kind_of_the_literals_is_accepted() -> None:
    for search in get_args(Search):
        lipreg.LipschitzEstimator(small_net(), torch.zeros(1, 4), method="seqlip", search=search)
    for kind in get_args(PenaltyKind):
        lipreg.LipschitzPenalty(small_net(), torch.zeros(1, 4), kind=kind, threshold=1.0)()
    for kind in get_args(MarginKind):
        lipreg.LipschitzMarginLoss(small_net(), torch.zeros(1, 4), eps=0.1, kind=kind, warmup=0)(
            torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="search must be one of"):
        lipreg.LipschitzEstimator(small_net(), torch.zeros(1, 4), method="seqlip", search="greedyy")
    with pytest.raises(ValueError, match="search='exact' is a SeqLip option"):
        lipreg.LipschitzEstimator(small_net(), torch.zeros(1, 4), search="exact")


def test_linear_operators_are_built_by_the_estimator_only() -> None:
    est = lipreg.LipschitzEstimator(small_net(), torch.zeros(1, 4))
    operators = est.linear_operators()
    assert list(operators) == ["0", "2"] and all(isinstance(op, lipreg.LinearOperator) for op in operators.values())
    with pytest.raises(TypeError, match=r"use LipschitzEstimator\(model, x\).linear_operators\(\)"):
        lipreg.LinearOperator()


def test_the_estimator_answers_what_the_library_layers_above_it_need() -> None:
    net = small_net()
    est = lipreg.LipschitzEstimator(net, torch.ones(5, 4))
    est()
    assert list(est.layer_factors()) == ["0", "2"]  # the ReLU's constant 1 is left out
    assert torch.equal(est.example_input, torch.ones(1, 4))
    assert est.certificate is None  # no certificate computed yet
    est.certified_bound()
    assert est.certificate is not None and set(est.certificate.split("+")) <= {"autolip", "seqlip", "liplt", "eclipse"}
    assert est.exact_search
    assert lipreg.LipschitzEstimator(net, torch.ones(1, 4), method="seqlip", search="exact").exact_search
    assert not lipreg.LipschitzEstimator(net, torch.ones(1, 4), method="seqlip", search="lowrank").exact_search

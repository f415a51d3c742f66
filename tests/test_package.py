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
from lipreg.estimator import METHODS
from lipreg.options import Method, PenaltyKind, Search
from lipreg.penalty import PENALTY_KINDS
from lipreg.bounds.seqlip import SEARCHES

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


def test_option_types_match_what_the_code_accepts() -> None:
    assert get_args(Method) == METHODS
    assert get_args(Search) == SEARCHES
    assert set(get_args(PenaltyKind)) == set(PENALTY_KINDS)

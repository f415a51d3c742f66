"""The end-of-run evaluation (``experiments/estimate.py``'s ``evaluate_bounds``, also ``train.py``'s final
evaluation) and its one report formatter (``experiments/report.py``):

* its certified accuracies, lower bound and per-sample radii are those of the library's kernels, with the
  tightest certificate and the per-pair certificate of the network; ``--curve`` draws the callback's figure from
  the radii of the reported accuracies;
* ``train.py``'s run summary is built from the rows of ``estimate.py``'s report, and prints the README's
  quick-start summary as the README shows it.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lipreg
from experiments import estimate, report, train
from lipreg import keys
from lipreg.margins import MarginCertificate
from lipreg.metrics import certified_accuracy, certified_radius
from tests.experiments.test_hydra import _compose

README = Path(__file__).resolve().parents[2] / "README.md"
RADII = (0.05, 0.2)


class _Data:
    """The part of a data module ``evaluate_bounds`` reads: ``<split>_set`` tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.val_set, self.test_set = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])


@pytest.fixture(scope="module")
def evaluated():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(70, 5)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::7] = (y[::7] + 1) % 4
    result = estimate.evaluate_bounds(net, _Data(x, y), splits=("val", "test"), radii=RADII, n_iter=50,
                                      lower_bound_samples=8, lower_bound_ascent_steps=0)
    return net, x, y, result


def test_the_certified_numbers_are_the_kernels_with_the_tightest_and_the_pair_certificates(evaluated) -> None:
    net, x, y, result = evaluated
    m = result["metrics"]
    assert result["errors"] == {} and result["lower_split"] == "val"
    bound = lipreg.LipschitzEstimator(net, x[:1]).certified_bound()
    assert m[keys.certified("autolip")] == pytest.approx(float(bound), rel=1e-6)
    pairs = MarginCertificate(net, x[:1]).certified()
    for split, rows in (("val", slice(0, 30)), ("test", slice(30, None))):
        with torch.no_grad():
            logits = net(x[rows])
        for constants, pairwise in ((bound, False), (pairs, True)):
            expected = certified_accuracy(logits, y[rows], constants, RADII).tolist()
            assert [m[keys.certified_acc(e, split, pairwise)] for e in RADII] == pytest.approx(expected, abs=1e-6)
        radii = result["certified_radii"][split]
        assert torch.allclose(radii["global"], certified_radius(logits, y[rows], bound))
        assert torch.allclose(radii["pairwise"], certified_radius(logits, y[rows], pairs))
    assert 0 < m[keys.certified_acc(RADII[0], "test")] < 1  # not a trivial case
    assert 0 < m[keys.LOWER] <= m[keys.certified("autolip")]
    assert m[keys.UPPER_OVER_LOWER] == pytest.approx(m[keys.certified("autolip")] / m[keys.LOWER])


def test_the_curve_is_the_callbacks_figure_of_the_reported_radii(evaluated, tmp_path, monkeypatch) -> None:
    import matplotlib.figure

    saved = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.update(fig=fig, path=path))
    radii = evaluated[3]["certified_radii"]["test"]
    estimate.save_radius_curve(radii, tmp_path / "curve.png", max_radius=0.2)
    (ax,) = saved["fig"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"global", "pairwise"}
    metrics = evaluated[3]["metrics"]
    for kind, pairwise in (("global", False), ("pairwise", True)):  # the curve at 0.2 is the reported accuracy
        xs, ys = lines[kind].get_data()
        assert xs[-1] == pytest.approx(0.2)
        assert ys[-1] == pytest.approx(metrics[keys.certified_acc(0.2, "test", pairwise)], abs=1e-6)
    with pytest.raises(ValueError, match="no certified bound"):
        estimate.save_radius_curve({}, tmp_path / "none.png")


def test_the_run_summary_prints_the_rows_of_the_estimate_report(evaluated, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = evaluated[3]
    cfg = _compose([f"eval.radii=[{','.join(map(str, RADII))}]"])
    summary = train.format_summary(result["metrics"], result, cfg, {"model": "mlp"}, str(tmp_path), None, None)
    rows = estimate.format_report(result, ["test"], RADII).split("Lipschitz constant")[1].splitlines()[1:]
    assert rows and rows == report.report_rows(result, ["test"], RADII)
    assert all(row in summary.splitlines() for row in rows)  # the same rows, the same format
    assert "val accuracy" in summary and "max local Jacobian norm on val inputs" in summary


def test_the_run_summary_reads_as_the_readme_shows_it(tmp_path, monkeypatch) -> None:
    """The quick-start summary of the README, numbers included, is what ``format_summary`` prints for them."""
    block = re.search(r"^```\n(lipreg run summary.*?)^```", README.read_text(), flags=re.S | re.M).group(1)
    lines = block.splitlines()
    labels = {"test accuracy": keys.accuracy("test"), "AutoLip estimate": keys.bound("autolip"),
              "certified bound": keys.certified("autolip"), "lower bound": keys.LOWER,
              "certified / lower": keys.UPPER_OVER_LOWER, "test certified acc @ eps=0.1": keys.certified_acc(0.1, "test"),
              "test pairwise cert. @ eps=0.1": keys.certified_acc(0.1, "test", pairwise=True)}
    metrics = {}
    for line in lines[1:]:
        label = next((lab for lab in labels if line.startswith(f"  {lab} ")), None)
        if label is not None:
            metrics[labels[label]] = float(line[len(label) + 2:].split()[0])
    assert len(metrics) == len(labels), "the README's summary lost a row this test reads"
    run_dir = tmp_path / lines[-1].split("--logdir ")[1]
    monkeypatch.chdir(tmp_path)
    result = {"metrics": metrics, "errors": {}, "certified_by": "eclipse", "lower_split": "val"}
    summary = train.format_summary(metrics, result, _compose([]), {"model": "mlp", "data": "digits", "lipreg": "log"},
                                   str(run_dir), str(run_dir / "tensorboard"), None).splitlines()
    positions = [summary.index(line) for line in lines]  # every README line, as printed...
    assert positions == sorted(positions)  # ...and in the same order

"""The zoo benchmark's outcomes, records and table (``benchmarks/zoo.py``) on small models: no torchvision needed."""
from __future__ import annotations

import torch
from torch import nn

from benchmarks import zoo


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.conv(x)
        return (h * h).flatten(1)


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def records_of(model: nn.Module, size: int) -> list[zoo.Record]:
    emitted: list[zoo.Record] = []
    torch.manual_seed(0)
    final = zoo.measure(model, size, lambda r: emitted.append(dict(r)), tol=1e-6)
    return [*emitted, final]


def local_jacobian_norms(model: nn.Module, size: int, n: int = 16) -> float:
    """The largest float64 Jacobian norm at ``n`` random inputs: a lower bound of the true constant."""
    model = model.double().eval()
    torch.manual_seed(1)
    jacobians = [torch.func.jacrev(lambda v: model(v[None])[0])(x).reshape(10, -1)
                 for x in torch.randn(n, 3, size, size, dtype=torch.float64)]
    return max(float(torch.linalg.matrix_norm(j, ord=2)) for j in jacobians)


def test_a_bounded_model_has_every_figure_and_a_row():
    model = small_cnn()
    records = records_of(model, 8)
    final = records[-1]
    assert final["outcome"] == "bounded"
    phases = ["training step", "build", "est", "converge", "certify"]
    assert [r["phase"] for r in records] == [p for name in phases for p in (name, None)] + [None]
    # the tightest certificate may be below AutoLip's converged estimate, never below the truth
    assert final["converged"] > 0 and final["certified"] >= local_jacobian_norms(model, 8)
    row = zoo.table([{**final, "model": "cnn", "size": 8}]).splitlines()[-1].split(" | ")
    assert row[:2] == ["| cnn (8)", "bounded"] and len(row) == len(zoo.COLUMNS)
    assert all(row[2:]), row  # every figure present


def test_a_refused_model_reports_the_first_line_of_the_error():
    final = records_of(Square(), 4)[-1]
    assert final["outcome"].startswith("refused: UnsupportedOpError: ")
    assert "\n" not in final["outcome"] and "converged" not in final


def test_an_input_too_small_for_the_model_is_not_a_refusal():
    final = records_of(nn.Sequential(nn.Conv2d(3, 4, 5), nn.Flatten(), nn.Linear(4, 10)), 2)[-1]
    assert final["outcome"].startswith("n/a: RuntimeError")


def test_table_cells_and_specs():
    record = {"model": "m", "size": 32, "outcome": "a | b", "converged": 2e30, "certified": 4e30, "first_est": 1.0}
    row = zoo.table([record]).splitlines()[-1]
    assert row.startswith("| m (32) | a / b |") and "| 2.00 | 5.0e-31 |" in row
    assert zoo.parse_spec("resnet50@224", 32) == ("resnet50", 224)
    assert zoo.parse_spec("inception_v3", 32) == ("inception_v3", 75)
    assert zoo.first_line(ValueError("\n  first\nsecond")) == "ValueError: first"


def test_build_only_stops_once_the_estimator_is_built():
    final = zoo.measure(small_cnn(), 8, lambda r: None, build_only=True)
    assert final["outcome"] == "built" and "build_steps" in final and "first_est" not in final

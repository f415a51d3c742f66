"""Issue 16, class 4: changes a kept estimator, ``LipschitzPenalty`` or ``MarginCertificate`` must see (it retraces,
or raises when the new model is refused): modules appended or added, a dtype conversion, a private attribute read in
``forward``, a container attribute mutated in place; and changes that must not cost a retrace."""
from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn

import lipreg
from lipreg.margins import MarginCertificate
from tests.capture.reference import DT, exact_lipschitz, exact_pair_constants, inputs


def certified(est: lipreg.LipschitzEstimator) -> float:
    return float(est.certified_bound().detach())


def scaled_linear(n_in: int, n_out: int, scale: float) -> nn.Linear:
    torch.manual_seed(1)
    layer = nn.Linear(n_in, n_out, dtype=DT)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


class Stack(nn.Module):
    """Runs a ``ModuleList`` in order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4, dtype=DT), nn.Tanh()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Scaled(nn.Module):
    """Reads a private float, a dict entry and a list entry in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3, dtype=DT)
        self._temperature = 1.0
        self.config = {"gain": 1.0}
        self.gains = [1.0, 1.0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) / self._temperature * self.config["gain"] * self.gains[1]


def append_to_sequential(model: nn.Module) -> None:
    model.append(scaled_linear(4, 4, 100.0))


def append_to_module_list(model: nn.Module) -> None:
    model.layers.append(scaled_linear(4, 4, 100.0))


def add_module(model: nn.Module) -> None:
    model.add_module("extra", scaled_linear(4, 4, 100.0))


STRUCTURE = {"Sequential.append": append_to_sequential, "ModuleList.append": append_to_module_list,
             "add_module": add_module}


def structure_model(change: str) -> nn.Module:
    if change == "ModuleList.append":
        return Stack()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4, dtype=DT), nn.Tanh())


@pytest.mark.parametrize("change", STRUCTURE)
def test_modules_added_after_the_build_are_bounded(change):
    model = structure_model(change)
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    penalty = lipreg.LipschitzPenalty(model, xs, weight=1.0, kind="linear", dtype=DT)
    penalty()
    STRUCTURE[change](model)
    with pytest.warns(UserWarning, match="children changed"):
        assert certified(est) >= exact_lipschitz(model, xs)
    with pytest.warns(UserWarning, match="children changed"):
        penalty()
    assert float(penalty.estimator.converge(tol=1e-10).detach()) >= 0.99 * exact_lipschitz(model, xs)


ATTRIBUTES = {"private attribute": lambda m: setattr(m, "_temperature", 1e-3),
              "dict entry": lambda m: m.config.update(gain=1e3),
              "list entry": lambda m: m.gains.__setitem__(1, 1e3)}


@pytest.mark.parametrize("change", ATTRIBUTES)
def test_attributes_read_in_forward_are_part_of_the_fingerprint(change):
    model = Scaled()
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    cert = MarginCertificate(model, xs, pairwise=False, dtype=DT)
    est(), cert()
    ATTRIBUTES[change](model)
    exact = exact_lipschitz(model, xs)
    with pytest.warns(UserWarning, match="changed"):
        assert exact <= certified(est) <= exact * (1 + 1e-5)
    with pytest.warns(UserWarning, match="changed"):
        assert bool((cert.certified() >= exact_pair_constants(model, xs)).all())


def test_dtype_conversion_retraces_and_applies_the_new_dtype_rules():
    """Softplus's jump rounds away in float32 (certified) and not in float64 (refused): after ``model.double()``
    the kept estimator must see the float64 model, not certify it with the float32 verdict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 2))
    x = torch.randn(2, 3)
    est = lipreg.LipschitzEstimator(model, x)
    cert = MarginCertificate(model, x)
    est.certified_bound(), cert.certified()
    model.double()
    with pytest.warns(UserWarning, match=r"changed .*torch\.float32.* to .*torch\.float64"), \
            pytest.raises(lipreg.UnsupportedOpError, match="softplus"):
        est.certified_bound()
    with pytest.warns(UserWarning, match="changed"), pytest.raises(lipreg.UnsupportedOpError, match="softplus"):
        cert.certified()


def test_dtype_conversion_of_a_supported_model_is_certified_in_the_new_dtype():
    model = nn.Sequential(scaled_linear(4, 4, 3.0), nn.ReLU(), scaled_linear(4, 2, 2.0)).float()
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs.float(), dtype=DT)
    est.certified_bound()
    model.to(DT)
    with pytest.warns(UserWarning, match="float64"):
        assert certified(est) >= exact_lipschitz(model, xs)
    assert est.graph.sample.dtype == DT


def test_training_state_does_not_retrace():
    """What a training loop changes (parameter values, train/eval, private attributes forward does not read, a
    new entry in a dict forward does not read) is no change of the function: the same graph, no warning."""
    model = Scaled()
    model._step = 0
    model._cache = {}
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    graph = est.graph
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            model.train()
            optimizer.zero_grad()
            (model(xs).square().sum() + est()).backward()
            optimizer.step()
            model._step = step
            model._cache[step] = step
            model.eval()
    assert est.graph is graph


def test_a_record_read_in_forward_is_compared_by_content():
    class Configured(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 3, dtype=DT)
            self.cfg = types.SimpleNamespace(scale=1.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.cfg.scale

    model = Configured()
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    est()
    model.cfg.scale = 1e3
    with pytest.warns(UserWarning, match="cfg changed"):
        assert certified(est) >= exact_lipschitz(model, xs)


def test_an_unread_public_list_that_grows_does_not_retrace():
    """Lightning's pattern: outputs collected in a public list the forward never reads."""
    model = Scaled()
    model.outputs = []
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    graph = est.graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            model.outputs.append(model(xs))
            est()
    assert est.graph is graph


def test_a_class_default_changed_on_the_class_is_seen():
    class Tempered(nn.Module):
        temperature = 1.0

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 3, dtype=DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) / self.temperature

    model = Tempered()
    xs = inputs((4,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    est()
    Tempered.temperature = 1e-3
    with pytest.warns(UserWarning, match="temperature changed from 1.0 to 0.001"):
        assert certified(est) >= exact_lipschitz(model, xs)

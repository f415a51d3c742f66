"""Issue 16, class 5: a parameter or buffer read into Python in ``forward`` (``.item()``, ``.tolist()``,
``float()``, ``int()``) would be frozen at its value when the model was traced, while the bound reads the weights
anew at every evaluation: refused at capture, with the op, the module path, the source line and the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipreg
from tests.capture.reference import DT, exact_lipschitz, inputs

READS = {
    "item": lambda s, h: h * s.gain.item(),
    "tolist": lambda s, h: h * s.gain.reshape(1).tolist()[0],
    "float": lambda s, h: h * float(s.gain),
    "int": lambda s, h: h * int(s.count),
    "buffer item": lambda s, h: h * s.count.item(),
    "computed item": lambda s, h: h * (2 * s.gain).exp().item(),
}


class Block(nn.Module):
    def __init__(self, read: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=DT)
        self.gain = nn.Parameter(torch.tensor(1.0, dtype=DT))
        self.register_buffer("count", torch.tensor(1.0, dtype=DT))
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return READS[self.read](self, self.lin(x))


@pytest.mark.parametrize("read", READS)
def test_parameter_read_into_python_is_refused(read):
    """On the old code the bound kept the traced value: after the weight grew 50x, the certificate stayed below."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), Block(read))
    xs = inputs((3,))
    try:
        est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    except lipreg.UnsupportedOpError as err:
        message = str(err)
        assert 'test_python_reads.py", line' in message, message
        assert "'1" in message, message  # the module path of the block
        assert "keep it a tensor" in message.lower(), message
        return
    with torch.no_grad():
        model[1].gain.fill_(50.0)
        model[1].count.fill_(50.0)
    assert float(est.certified_bound().detach()) >= exact_lipschitz(model, xs)
    pytest.fail("a parameter read into Python was accepted")


def test_shape_and_dtype_of_a_parameter_are_not_values():
    class Sized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4, dtype=DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            width = self.lin.weight.shape[0]
            return self.lin(x) * torch.full((width,), 0.5, dtype=self.lin.weight.dtype)

    model = Sized()
    xs = inputs((3,))
    assert float(lipreg.LipschitzEstimator(model, xs, dtype=DT).certified_bound().detach()) >= exact_lipschitz(model, xs)


class PlainTensor(nn.Module):
    """A tensor attribute that is neither a parameter nor a buffer."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=DT)
        self.gain = torch.tensor(1.0, dtype=DT)
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.read == "item":
            return self.lin(x) * self.gain.item()
        return self.lin(x) * self.gain


def test_plain_tensor_attribute_read_into_python_is_refused():
    with pytest.raises(lipreg.UnsupportedOpError, match=r"gain into Python"):
        lipreg.LipschitzEstimator(PlainTensor("item"), inputs((3,)), dtype=DT)


def test_plain_tensor_attribute_is_read_anew():
    torch.manual_seed(0)
    model = PlainTensor("tensor")
    xs = inputs((3,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    est.certified_bound()
    model.gain.fill_(40.0)
    assert float(est.certified_bound().detach()) >= exact_lipschitz(model, xs)
    model.gain = torch.tensor(-90.0, dtype=DT)
    assert float(est.certified_bound().detach()) >= exact_lipschitz(model, xs)

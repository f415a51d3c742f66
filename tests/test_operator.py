"""``LinearOperator`` and the rules' explicit adjoints against independent references, in float64.

* each op's explicit adjoint (``rmatvec`` of an unfused operator) against autograd's vjp of its forward
  (``torch.func.vjp`` of ``matvec``), against ``<A v, u> = <v, A^T u>`` on random vectors, and against the dense
  matrix's transpose (``dense()`` is built from ``matvec`` alone): odd sizes, strides that leave rows out,
  groups, dilation larger than the stride, transposed convolutions with output padding, 1-d and 3-d;
* ops without an exact explicit adjoint ('same' or non-zero padding modes, permutations) stay on autograd;
* a fused node (conv -> batch norm -> flatten -> linear) chains its ops' adjoints;
* the training step's power step (``rayleigh_norms_and_step``) gives the same sigmas, vectors and weight
  gradients with explicit adjoints as with autograd's backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from lipreg.linalg.power import rayleigh_norms_and_step

DT = torch.float64


class Functional(nn.Module):
    """``f(x, self.weight)``: a functional op with a constant weight."""

    def __init__(self, fn, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(weight_shape, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight)


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def batch_norm(channels: int) -> nn.Module:
    bn = nn.BatchNorm2d(channels)
    bn.running_var.uniform_(0.2, 3.0)
    bn.running_mean.normal_()
    bn.weight.data.normal_()
    return bn


# (name, module, per-sample input shape, whether the adjoint is explicit)
CASES = [
    ("linear", lambda: nn.Linear(7, 5), (7,), True),
    ("linear on 3-d", lambda: nn.Linear(7, 5), (4, 7), True),
    ("conv stride 2 odd sizes", lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (3, 9, 11), True),
    ("conv stride 3 drops rows", lambda: nn.Conv2d(2, 4, 2, stride=3), (2, 10, 7), True),
    ("conv groups dilation", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=3, groups=2), (4, 13, 12), True),
    ("conv valid", lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 6, 7), True),
    ("conv1d", lambda: nn.Conv1d(3, 5, 4, stride=2, padding=1), (3, 15), True),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(2, 1, 2), padding=(0, 1, 1)), (2, 5, 4, 5), True),
    ("conv unbatched", lambda: Lambda(lambda x: nn.functional.conv2d(x.squeeze(0), torch.ones(2, 3, 3, 3, dtype=DT),
                                                                     stride=2)), (3, 7, 8), True),
    ("conv_transpose output_padding", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
     (3, 5, 6), True),
    ("conv_transpose dilation > stride", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, dilation=3, output_padding=2,
                                                                    groups=1), (2, 4, 5), True),
    ("conv_transpose groups 1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=3, groups=2, output_padding=2), (4, 5),
     True),
    ("batch norm", lambda: batch_norm(3), (3, 4, 5), True),
    ("flatten", lambda: nn.Flatten(), (2, 3, 4), True),
    ("view", lambda: Lambda(lambda x: x.view(x.size(0), 3, -1)), (2, 3, 4), True),
    ("scale", lambda: Lambda(lambda x: x * torch.arange(1.0, 5.0, dtype=DT)), (3, 4), True),
    ("divide", lambda: Lambda(lambda x: x / 3.0), (5,), True),
    ("negate", lambda: Lambda(lambda x: -x), (5,), True),
    ("dropout", lambda: nn.Dropout(0.3), (5,), True),
    ("F.linear", lambda: Functional(F.linear, (4, 6)), (6,), True),
    ("F.conv2d", lambda: Functional(lambda x, w: F.conv2d(x, w, None, 2, 1, 1, 2), (4, 1, 3, 3)), (2, 7, 6), True),
    ("conv same", lambda: nn.Conv2d(2, 3, 3, padding="same"), (2, 6, 5), False),
    ("conv reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 6, 5), False),
    ("permute", lambda: Lambda(lambda x: x.permute(0, 2, 1)), (3, 4), False),
    ("scale broadcast", lambda: Lambda(lambda x: x * torch.ones(3, 1, dtype=DT)), (1, 4), False),
]


def single_operator(make, shape: tuple[int, ...]) -> lipreg.LinearOperator:
    torch.manual_seed(0)
    model = nn.Sequential(make()).to(DT).eval()
    est = lipreg.LipschitzEstimator(model, torch.randn(2, *shape, dtype=DT), dtype=DT)
    (operator,) = est.linear_operators().values()
    return operator


@pytest.mark.parametrize("name, make, shape, explicit", CASES, ids=[c[0] for c in CASES])
def test_adjoint_matches_autograd_and_transpose(name, make, shape, explicit):
    operator = single_operator(make, shape)
    assert operator.explicit_adjoint is explicit
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(operator.in_shape, generator=generator, dtype=DT)
    u = torch.randn(operator.out_shape, generator=generator, dtype=DT)
    at_u = operator.rmatvec(u)
    assert at_u.shape == operator.in_shape
    _, vjp = torch.func.vjp(operator.matvec, v)
    (reference,) = vjp(u)
    torch.testing.assert_close(at_u, reference, rtol=1e-12, atol=1e-12)
    inner_out = torch.sum(operator.matvec(v) * u)
    inner_in = torch.sum(v * at_u)
    torch.testing.assert_close(inner_out, inner_in, rtol=1e-12, atol=1e-12)
    dense = operator.dense()
    torch.testing.assert_close(at_u.reshape(-1), dense.T @ u.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(operator.gram(v).reshape(-1), dense.T @ dense @ v.reshape(-1), rtol=1e-12,
                               atol=1e-12)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), batch_norm(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 3), batch_norm(3), nn.Flatten(), nn.Linear(3 * 3 * 4, 5)).to(DT).eval()


def test_fused_operator_chains_the_adjoints():
    """conv -> batch norm, and conv -> batch norm -> flatten -> linear, fused: the chain of adjoints is the
    transpose of the fused dense matrix."""
    est = lipreg.LipschitzEstimator(cnn(), torch.randn(2, 2, 9, 11, dtype=DT), dtype=DT)
    operators = list(est.linear_operators().values())
    assert [len(op.node.ops) for op in operators] == [2, 4]
    for operator in operators:
        assert operator.explicit_adjoint
        u = torch.randn(operator.out_shape, dtype=DT)
        torch.testing.assert_close(operator.rmatvec(u).reshape(-1), operator.dense().T @ u.reshape(-1),
                                   rtol=1e-12, atol=1e-12)


def test_power_step_with_explicit_adjoints_matches_autograd():
    """The training step's power step: sigmas, updated vectors and the gradient of sum(sigma) w.r.t. the weights
    are the same with the explicit adjoints as with autograd's joint backward."""
    model = cnn()
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 2, 9, 11, dtype=DT), dtype=DT)
    operators = list(est.linear_operators().values())
    vs = [torch.randn(op.in_shape, dtype=DT) for op in operators]
    results = []
    for adjoints in (None, [op.rmatvec for op in operators]):
        sigmas, new_vs = rayleigh_norms_and_step([op.matvec for op in operators], vs, adjoints=adjoints)
        grads = torch.autograd.grad(torch.stack(sigmas).sum(), list(model.parameters()), allow_unused=True)
        results.append((sigmas, new_vs, [g for g in grads if g is not None]))
    (s_auto, v_auto, g_auto), (s_explicit, v_explicit, g_explicit) = results
    for expected, actual in zip([*s_auto, *v_auto, *g_auto], [*s_explicit, *v_explicit, *g_explicit]):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert len(g_explicit) == 5  # conv, batch norm and linear weights (biases drop out)


def test_operators_read_the_weights_of_each_evaluation():
    """Operators are built once per graph, but each evaluation reads the model's weights as they are then."""
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    est = lipreg.LipschitzEstimator(model, torch.randn(1, 3, dtype=DT), dtype=DT)
    (first,) = est.linear_operators().values()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model[0].weight = nn.Parameter(model[0].weight * 1.5)
    (second,) = est.linear_operators().values()
    torch.testing.assert_close(second.dense(), model[0].weight.detach())

"""Capture soundness (issue 9, classes 1, 5, 8, 10): what torch.fx does not record, or a rule does not model,
must be bounded right or refused, never certified below the truth.

References: the SVD of the float64 ``torch.func.jacrev`` Jacobian of the eager model (exact for linear models, a
lower bound of the Lipschitz constant otherwise), and finite pairs that show a refusal was necessary.
"""
from __future__ import annotations

import pytest
import torch
import torch.ao.nn.intrinsic.qat as intrinsic_qat
import torch.ao.nn.qat as qat
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, get_default_qat_qconfig

import lipreg
from lipreg.ops import is_registered_module

DT = torch.float64


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """``||J||_2`` of the eager model (eval mode) at one sample: a lower bound of its Lipschitz constant, exact for
    a linear model."""
    model.eval()
    jac = torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0))(x[0])
    return float(torch.linalg.matrix_norm(jac.detach().reshape(-1, x[0].numel()), 2))


def difference_jacobian_norm(model: nn.Module, x: torch.Tensor, eps: float = 1e-6) -> float:
    """``||J||_2`` at one sample by central differences (exact for a piecewise-linear model away from its kinks),
    for models autograd cannot differentiate (in-place writes into tensors saved for backward)."""
    basis = torch.eye(x[0].numel(), dtype=x.dtype).view(-1, *x.shape[1:])
    with torch.no_grad():
        columns = [(model(x[:1] + eps * e) - model(x[:1] - eps * e)).flatten() / (2 * eps) for e in basis]
    return float(torch.linalg.matrix_norm(torch.stack(columns, 1), 2))


def certified(model: nn.Module, x: torch.Tensor) -> float:
    return float(lipreg.LipschitzEstimator(model, x, dtype=DT).certified_bound().detach())


def identity_linear(n: int) -> nn.Linear:
    layer = nn.Linear(n, n, bias=False)
    nn.init.eye_(layer.weight)
    return layer


# ------------------------------------------------------------------------------ class 1: in-place through an alias
class AliasedWrite(nn.Module):
    """``h = lin1(x); <write h in place>; return lin2(h)``: the write scales negative entries by 5, and the last op
    reads it through a node the graph holds from before the write (``h`` itself, a view of it)."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.lin1, self.lin2 = identity_linear(4), identity_linear(4)
        self.act = nn.LeakyReLU(5.0, inplace=True)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        g = h.view(-1, 4)  # a view: shares h's storage
        if self.write == "module":
            self.act(h)
        elif self.write == "functional":
            F.leaky_relu(h, 5.0, inplace=True)
        elif self.write == "positional":
            F.leaky_relu(h, 5.0, True)
        elif self.write == "method":
            h.mul_(5.0)
        elif self.write == "view":
            h.mul_(5.0)
            return self.lin2(g)
        elif self.write == "iadd":  # fx records h + x: only the cross-check sees it
            h += 4 * x
            return self.lin2(g)
        return self.lin2(h)


@pytest.mark.parametrize("write", ["module", "functional", "positional", "method"])
def test_reads_after_an_in_place_write_see_the_written_value(write):
    model = AliasedWrite(write).to(DT)
    x = -torch.rand(2, 4, dtype=DT) - 0.1  # negative: the leaky write scales every entry by 5
    true = jacobian_norm(model, x)
    assert true >= 4.9  # the graph's dataflow without the write (lin2(lin1 x)) has norm 1
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    assert float(est.certified_bound().detach()) >= true
    assert float(est.converge(tol=1e-12).detach()) >= true * (1 - 1e-9)


@pytest.mark.parametrize("write", ["view", "iadd"])
def test_in_place_write_read_through_another_alias_is_refused(write):
    model = AliasedWrite(write).to(DT)
    x = -torch.rand(2, 4, dtype=DT) - 0.1
    assert jacobian_norm(model, x) >= 4.9  # the truth; the graph's dataflow (lin2(lin1 x)) has norm 1
    with pytest.raises(lipreg.UnsupportedOpError, match="through another name|does not compute what the model"):
        lipreg.LipschitzEstimator(model, x, dtype=DT)


class SafeInPlace(nn.Module):
    """In-place ops whose operand has no other reader: the out-of-place op, bounded as such."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.LeakyReLU(3.0, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.lin1(x))
        h.mul_(2.0)
        h = F.leaky_relu(h, 0.5, inplace=True)
        h += 1.0
        return self.lin2(h.relu_())


def test_in_place_ops_without_another_reader_are_bounded():
    torch.manual_seed(0)
    model = SafeInPlace().to(DT)
    x = torch.randn(2, 4, dtype=DT)
    bound = certified(model, x)
    local = max(difference_jacobian_norm(model.eval(), torch.randn(1, 4, dtype=DT)) for _ in range(20))
    assert bound >= local > 0
    user_input = x.clone()
    lipreg.LipschitzEstimator(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)).to(DT), user_input)
    assert torch.equal(user_input, x)  # tracing never writes into the user's example


class RandomScale(nn.Module):
    """``x * u`` with ``u`` drawn at each call: a constant for fx, and a fresh one at every evaluation of the bound."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 9 * torch.rand(()))


def test_a_graph_that_does_not_compute_the_model_is_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 4, dtype=DT)
    norms = {round(jacobian_norm(RandomScale(), x), 6) for _ in range(5)}
    assert len(norms) > 1  # no single function to bound
    with pytest.raises(lipreg.UnsupportedOpError, match="does not compute what the model computes"):
        lipreg.LipschitzEstimator(RandomScale(), x, dtype=DT)


class WriteInput(nn.Module):
    """Writes the input in place, then reads it again by its name."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = identity_linear(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(3.0)
        return self.lin(x)


def test_in_place_write_into_the_input_is_followed():
    x = torch.randn(2, 4, dtype=DT)
    est = lipreg.LipschitzEstimator(WriteInput().to(DT), x, dtype=DT)
    assert 3.0 <= float(est.certified_bound().detach()) <= 3.0 * (1 + 1e-5)  # linear: exact norm 3


# ------------------------------------------------------------------------- class 5: behaviour the rules bypass
def _scale_output(module, args, out):
    return 10 * out


def _scale_input(module, args):
    return (10 * args[0],)


class Block(nn.Module):
    """A module fx traces through (not a leaf): its hooks are bypassed by the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("where", ["leaf forward hook", "leaf pre-hook", "traced-through pre-hook", "global hook"])
def test_forward_hooks_are_refused(where):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(2, 4, dtype=DT)
    plain = jacobian_norm(model, x)
    if where == "leaf forward hook":
        handle = model[1].register_forward_hook(_scale_output)
    elif where == "leaf pre-hook":
        handle = model[1].register_forward_pre_hook(_scale_input)
    elif where == "traced-through pre-hook":
        handle = model[0].register_forward_pre_hook(_scale_input)
    else:
        handle = nn.modules.module.register_module_forward_hook(_scale_output)
    try:
        assert jacobian_norm(model, x) >= 9.9 * plain  # what the hook does, and the rules would not see
        with pytest.raises(lipreg.UnsupportedOpError, match="hook"):
            lipreg.LipschitzEstimator(model, x, dtype=DT)
    finally:
        handle.remove()


def test_old_style_spectral_norm_is_refused_and_parametrization_is_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 6, dtype=DT)
    old = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(6, 5).to(DT)))
    with pytest.raises(lipreg.UnsupportedOpError, match="parametrizations.spectral_norm"):
        lipreg.LipschitzEstimator(old, x, dtype=DT)
    layer = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(6, 5).to(DT))
    layer.eval()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3.0)  # the normalised weight is recomputed on access
    exact = float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
    bound = certified(nn.Sequential(layer), x)
    assert exact <= bound <= exact * (1 + 1e-5)
    assert bound == pytest.approx(jacobian_norm(nn.Sequential(layer), x), rel=1e-5)


class TenfoldConv(nn.Conv2d):
    """Overrides ``_conv_forward`` (not ``forward``): computes 10x what nn.Conv2d's rule would bound."""

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, 10 * weight, bias)


def test_subclass_overriding_a_helper_method_loses_the_parent_rule():
    torch.manual_seed(0)
    conv = TenfoldConv(1, 1, 3, padding=1, bias=False).to(DT)
    assert not is_registered_module(conv)
    x = torch.randn(1, 1, 33, 33, dtype=DT)  # 1089 x 1089 > 2**20 entries: too large for the dense certificate
    exact = jacobian_norm(conv, x)
    est = lipreg.LipschitzEstimator(conv, x, dtype=DT)
    assert float(est.converge(tol=1e-9).detach()) == pytest.approx(exact, rel=1e-3)
    try:
        assert float(est.certified_bound().detach()) >= exact
    except lipreg.UnsupportedOpError as err:  # refusing is right; certifying the parent's 1/10 is not
        assert "certified norm" in str(err)


def test_torch_concrete_classes_keep_their_rules():
    for module in (nn.Conv1d(1, 1, 3), nn.Conv2d(1, 1, 3), nn.ConvTranspose2d(1, 1, 3), nn.BatchNorm2d(3),
                   nn.SyncBatchNorm(3), nn.ZeroPad2d(1), nn.ReflectionPad1d(1), nn.Linear(2, 2), nn.Dropout()):
        assert is_registered_module(module), type(module)


# ------------------------------------------------------------------------------ class 8: quantization-aware modules
def test_qat_conv_bn_is_refused():
    torch.manual_seed(0)
    model = intrinsic_qat.ConvBn2d(2, 3, 3, qconfig=get_default_qat_qconfig())  # fake-quant: float32 only
    model.bn.running_var.fill_(1e-3)  # the folded batch norm multiplies by ~30
    model.eval()
    x = torch.randn(2, 2, 8, 8)
    conv_alone = float(torch.linalg.matrix_norm(torch.func.jacrev(
        lambda v: F.conv2d(v, model.weight.detach()))(x[:1]).reshape(-1, x[0].numel()), 2))
    y = x[:1] + 1e-2 * torch.randn_like(x[:1])
    with torch.no_grad():
        ratio = float((model(x[:1]) - model(y)).norm() / (x[:1] - y).norm())
    assert ratio > 5 * conv_alone  # the float conv's rule would certify below this finite pair
    with pytest.raises(lipreg.UnsupportedOpError, match="quantization-aware"):
        lipreg.LipschitzEstimator(model, x)


def test_qat_linear_and_fake_quantize_are_refused():
    x = torch.randn(2, 4)
    with pytest.raises(lipreg.UnsupportedOpError, match="quantization-aware"):
        lipreg.LipschitzEstimator(nn.Sequential(qat.Linear(4, 2, qconfig=get_default_qat_qconfig())), x)

    class MyFakeQuantize(FakeQuantize):  # a subclass keeps the refusal
        def forward(self, x):
            return super().forward(x)

    for fake_quant in (FakeQuantize(), MyFakeQuantize()):
        model = nn.Sequential(nn.Linear(4, 4), fake_quant).eval()
        model(torch.linspace(-1, 1, 4).view(1, 4))  # calibrate the grid, then keep it
        fake_quant.disable_observer()
        scale = float(fake_quant.scale)
        below, above = torch.full((1, 4), 0.49 * scale), torch.full((1, 4), 0.51 * scale)  # straddle a step
        model[0] = nn.Identity()
        with torch.no_grad():
            ratio = float((model(above) - model(below)).norm() / (above - below).norm())
        assert ratio > 40  # a step: no Lipschitz constant
        with pytest.raises(lipreg.UnsupportedOpError, match="step function"):
            lipreg.LipschitzEstimator(model, x)


# ---------------------------------------------------------------------------------- class 10: always-on dropout
class MCDropout(nn.Dropout):
    """Monte-Carlo dropout: active at evaluation too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True)


class FunctionalDropout(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.lin = identity_linear(8)
        self.drop, self.mc_drop = nn.Dropout(0.5), MCDropout(0.5)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self, self.lin(x))


@pytest.mark.parametrize("call", [lambda m, h: F.dropout(h, 0.5, training=True), lambda m, h: F.dropout(h, 0.5),
                                  lambda m, h: F.dropout1d(h.unsqueeze(-1), 0.5).flatten(1),
                                  lambda m, h: torch.dropout(h, 0.5, True), lambda m, h: m.mc_drop(h)],
                         ids=["training=True", "default", "dropout1d", "torch.dropout", "MC-dropout module"])
def test_active_dropout_is_refused(call):
    model = FunctionalDropout(call).to(DT)
    x = torch.ones(2, 8, dtype=DT)
    torch.manual_seed(0)
    out = model(x[:1])
    kept = out != 0
    assert kept.any() and torch.allclose(out[kept], 2 * x[:1][kept])  # every realisation scales by 2, not 1
    with pytest.raises(lipreg.UnsupportedOpError, match="dropout is active"):
        lipreg.LipschitzEstimator(model, x, dtype=DT)


@pytest.mark.parametrize("call", [lambda m, h: F.dropout(h, 0.5, training=m.training), lambda m, h: F.dropout(h, 0.0),
                                  lambda m, h: F.alpha_dropout(h, 0.5), lambda m, h: m.drop(h)],
                         ids=["training=self.training", "p=0", "alpha_dropout default", "module"])
def test_inactive_dropout_is_the_identity(call):
    model = FunctionalDropout(call).to(DT)
    model.train()
    x = torch.randn(2, 8, dtype=DT)
    assert 1.0 <= certified(model, x) <= 1.0 + 2e-6  # the identity, its certificate rounded upwards
    assert model.training  # the trace's eval mode is restored


def test_torch_module_tracker_is_not_a_hook_that_changes_outputs():
    """FLOP counters and Lightning's model summary run a forward under torch's ModuleTracker, whose global hooks only
    record the module stack: an estimator built then (the callback builds on the first input it sees) is fine,
    while any other global hook is still refused."""
    from torch.utils.module_tracker import ModuleTracker

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with ModuleTracker():
        bound = lipreg.LipschitzEstimator(model, x, dtype=torch.float64).certified_bound()
    assert float(bound) >= jacobian_norm(model, x)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
    try:
        with pytest.raises(lipreg.UnsupportedOpError, match="global forward hooks"):
            lipreg.LipschitzEstimator(model, x, dtype=torch.float64)
    finally:
        handle.remove()


def test_nan_weights_are_not_a_graph_that_differs_from_the_model():
    """The eager / graph cross-check takes equal NaN and inf outputs as agreement (NaN weights reach the capture when
    a model with them is traced again): the estimator is built, and its bound is NaN, as the weights say."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 3, dtype=torch.float64), dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert torch.isnan(est())
        est.check_finite()  # est() itself reads nothing on the host

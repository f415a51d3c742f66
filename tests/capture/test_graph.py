"""Capture: errors worded for users (untraceable models, ops without a rule, refused ops), ``register_rule``,
non-finite weights, and a model that is bounded without being modified."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from lipreg.ops import Activation, LinearOp, registered

DT = torch.float64


def spectral(layer: nn.Linear) -> float:
    return float(torch.linalg.matrix_norm(layer.weight.detach().to(DT), 2))


# ------------------------------------------------------------------------------------------ untraceable
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.l(x)
        return -x


def test_untraceable_model_says_why_and_how():
    with pytest.raises(lipreg.UnsupportedOpError) as error:
        lipreg.LipschitzEstimator(Branchy(), torch.randn(2, 4))
    message = str(error.value)
    assert "torch.fx could not trace Branchy" in message
    assert "control flow that depends on tensor values" in message
    assert "concrete_args" in message and "register_rule" in message


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x, double: bool = False):
        return 2 * self.l(x) if double else self.l(x)


def test_concrete_args_fix_a_bool_argument():
    torch.manual_seed(0)  # seeded weights: a draw with nearly equal top singular values would stall the iteration
    model = Flagged().to(DT)
    with pytest.raises(lipreg.UnsupportedOpError):
        lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT))
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT, concrete_args={"double": True})
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(2 * spectral(model.l), rel=1e-6)


def test_registered_module_is_kept_whole():
    """The error's advice works: a registered class is not traced through, so its control flow is no obstacle."""
    torch.manual_seed(0)  # seeded weights, as above
    model = nn.Sequential(nn.Linear(3, 4), Branchy(), nn.Linear(4, 2)).to(DT)
    with registered(Branchy, 3.0):
        est = lipreg.LipschitzEstimator(model, torch.randn(2, 3, dtype=DT), dtype=DT)
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(3 * spectral(model[0]) * spectral(model[2]),
                                                                   rel=1e-6)
    assert est.layer_bounds()["1"] == 3.0


def test_several_tensor_inputs_are_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(lipreg.UnsupportedOpError, match="one tensor input.*concrete_args"):
        lipreg.LipschitzEstimator(TwoInputs(), torch.randn(2, 3))


def test_output_independent_of_the_input_is_refused():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.w * 2

    with pytest.raises(lipreg.UnsupportedOpError, match="does not depend on its input"):
        lipreg.LipschitzEstimator(Constant(), torch.randn(2, 3))


# ------------------------------------------------------------------------------------- ops with no rule
class Sine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.sin(h))  # no rule for sin


def test_op_without_rule_names_op_node_line_and_fix():
    with pytest.raises(lipreg.UnsupportedOpError) as error:
        lipreg.LipschitzEstimator(Sine(), torch.randn(2, 4))
    message = str(error.value)
    assert "no Lipschitz rule for torch.sin" in message
    assert "node 'sin'" in message
    assert f'File "{__file__}", line ' in message and "in forward" in message
    assert "torch.sin(h)" in message  # the source line itself
    assert "lipreg.register_rule(torch.sin, L)" in message


def test_module_without_rule_is_named_by_its_qualified_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Identity(), nn.Softmax(dim=1)))
    with pytest.raises(lipreg.UnsupportedOpError, match=r"torch\.nn\.modules\.activation\.Softmax.*node '1\.1'"):
        lipreg.LipschitzEstimator(model, torch.randn(2, 3))


def test_register_a_constant():
    torch.manual_seed(0)
    model = Sine().to(DT)
    with registered(torch.sin, 1.0):
        est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    assert float(est.converge().detach()) == pytest.approx(spectral(model.a) * spectral(model.b), rel=1e-6)


def test_register_an_activation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Softsign(), nn.Linear(5, 3)).to(DT)
    with pytest.raises(lipreg.UnsupportedOpError, match="Softsign"):
        lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT))
    with registered(nn.Softsign, Activation(0.0, 1.0)):  # softsign' = 1 / (1 + |x|)^2 in (0, 1]
        est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    assert float(est.converge().detach()) == pytest.approx(spectral(model[0]) * spectral(model[2]), rel=1e-6)


def test_register_a_linear_op():
    """cumsum is linear with norm above 1: the power method finds the norm of the lower-triangular ones matrix."""
    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    with pytest.raises(lipreg.UnsupportedOpError, match="torch.cumsum"):
        lipreg.LipschitzEstimator(Cumulative(), torch.randn(2, 6))
    with registered(torch.cumsum, LinearOp()):
        est = lipreg.LipschitzEstimator(Cumulative(), torch.randn(2, 6, dtype=DT), dtype=DT)
    exact = torch.linalg.matrix_norm(torch.tril(torch.ones(6, 6, dtype=DT)), 2)
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(float(exact), rel=1e-6)


def test_register_rule_rejects_other_things():
    with pytest.raises(TypeError, match="a rule is"):
        lipreg.register_rule(torch.sin, "1.0")
    with pytest.raises(ValueError):
        lipreg.register_rule(torch.sin, -1.0)
    with pytest.raises(lipreg.UnsupportedOpError, match="no Lipschitz rule for torch.sin"):  # nothing registered
        lipreg.LipschitzEstimator(Sine(), torch.randn(2, 4))


# -------------------------------------------------------------------------------------------- refused
class SelfGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        h = self.l(x)
        return h * torch.tanh(h)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class Gram(nn.Module):
    def forward(self, x):
        return x @ x.transpose(1, 2)


REFUSED = {
    "x * tanh(x)": (SelfGated(), (4,), r"operator\.mul cannot be bounded, used by node 'mul'.*product of two input"),
    "LayerNorm": (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), r"LayerNorm cannot be bounded.*node '1'.*"
                                                                             r"standard deviation"),
    "scaled dot product attention": (Attention(), (3, 4), r"scaled_dot_product_attention cannot be bounded.*not "
                                                          r"globally Lipschitz"),
    "MultiheadAttention": (SelfAttention(), (3, 4), r"MultiheadAttention cannot be bounded.*node 'attn'"),
    "x @ x^T": (Gram(), (3, 4), r"matmul cannot be bounded.*attention-like"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_ops_say_why(name):
    model, shape, pattern = REFUSED[name]
    with pytest.raises(lipreg.UnsupportedOpError, match=pattern) as error:
        lipreg.LipschitzEstimator(model, torch.randn(2, *shape))
    assert "cannot be bounded" in str(error.value)


def test_refusal_names_the_source_line():
    with pytest.raises(lipreg.UnsupportedOpError) as error:
        lipreg.LipschitzEstimator(SelfGated(), torch.randn(2, 4))
    assert f'File "{__file__}"' in str(error.value) and "h * torch.tanh(h)" in str(error.value)


def test_refused_root_module():
    """A model that is itself a refused layer (no enclosing module to trace)."""
    with pytest.raises(lipreg.UnsupportedOpError, match="LayerNorm cannot be bounded"):
        lipreg.LipschitzEstimator(nn.LayerNorm(4), torch.randn(2, 4))


@pytest.mark.parametrize("fn, pattern", [(lambda x: x / (1 + x.abs()), "division by an input-dependent"),
                                         (lambda x: torch.exp(x), "exp has an unbounded derivative"),
                                         (lambda x: x ** 2, "pow has an unbounded derivative"),
                                         (lambda x: F.layer_norm(x, (4,)), "layer_norm divides"),
                                         (lambda x: torch.div(x, 2, rounding_mode="floor"), "rounding_mode='floor'")])
def test_refused_functions(fn, pattern):
    class Model(nn.Module):
        def forward(self, x):
            return fn(x)

    with pytest.raises(lipreg.UnsupportedOpError, match=pattern):
        lipreg.LipschitzEstimator(Model(), torch.randn(2, 4))


# ---------------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_warn_and_keep_the_warm_state(bad):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4))
    healthy = float(est(n_iter=50).detach())
    state = copy.deepcopy(est.state_dict())
    original = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight[1, 2] = bad
    with pytest.warns(RuntimeWarning, match="non-finite Lipschitz bound"):
        value = est(n_iter=3)
        est.check_finite()  # est() itself reads nothing on the host
    assert not torch.isfinite(value)
    with pytest.warns(RuntimeWarning):
        assert not torch.isfinite(est.converge(max_iter=20))
    for name, vector in est.state_dict().items():
        assert torch.isfinite(vector).all()
        if name.endswith("_0"):
            assert torch.equal(vector, state[name])  # the poisoned operator's vector did not move
    with torch.no_grad():
        model[0].weight.copy_(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(est(n_iter=0).detach()) == pytest.approx(healthy, rel=1e-5)


# -------------------------------------------------------------------------------------- model untouched
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fuse", [False, True])
def test_model_is_not_modified_and_gets_the_gradients(fuse):
    torch.manual_seed(3)
    model = Net()
    for bn in (model.bn, model.head[2]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.train()
    model.head[2].eval()  # mixed flags must come back as they were
    flags = {name: m.training for name, m in model.named_modules()}
    before = snapshot(model)
    x = torch.randn(4, 2, 5, 5)

    est = lipreg.LipschitzEstimator(model, x, fuse=fuse)
    value = est(n_iter=5)
    value = value + est.converge()
    value.backward()

    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in before:  # running statistics and num_batches_tracked included
        assert torch.equal(before[key], after[key]), key
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            continue  # biases drop out of a Lipschitz constant
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not any(k.startswith(("conv", "bn", "head")) for k in est.state_dict())  # the weights are not ours
    assert not any(p is q for p in est.parameters() for q in model.parameters())


def test_bound_follows_the_current_weights():
    """Not a copy: a change of the model's weights shows in the next bound."""
    torch.manual_seed(4)
    model = nn.Linear(5, 5).to(DT)
    est = lipreg.LipschitzEstimator(model, torch.randn(1, 5, dtype=DT), dtype=DT)
    first = float(est.converge().detach())
    with torch.no_grad():
        model.weight.mul_(3.0)
    assert float(est.converge().detach()) == pytest.approx(3 * first, rel=1e-6)


def test_view_with_sizes_read_from_the_input():
    """``x.view(x.size(0), -1)``: traced sizes are static values, not input-dependent nodes."""
    torch.manual_seed(5)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 2 * 2, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))

    model = Model().to(DT)
    est = lipreg.LipschitzEstimator(model, torch.randn(7, 1, 4, 4, dtype=DT), dtype=DT)
    jac = torch.func.jacrev(model.conv)(torch.zeros(1, 1, 4, 4, dtype=DT)).reshape(8, 16)
    reference = float(torch.linalg.matrix_norm(jac.detach(), 2)) * spectral(model.fc)
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(reference, rel=1e-4)


def test_unused_branch_is_not_the_output():
    """A branch the output does not use bounds nothing, even when it is built after the output's (fused) segment
    started: the bound is ||W2 W1||, not the norm of the unused head."""
    torch.manual_seed(6)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.aux, self.l2 = nn.Linear(4, 5), nn.Linear(4, 50), nn.Linear(5, 3)

        def forward(self, x):
            h = self.l1(x)
            self.aux(x)  # computed, never used
            return self.l2(h)

    model = Model().to(DT)
    with torch.no_grad():
        model.aux.weight.mul_(100.0)
    for fuse in (False, True):
        est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT, fuse=fuse)
        value = float(est.converge(tol=1e-12).detach())
        expected = (torch.linalg.matrix_norm((model.l2.weight @ model.l1.weight).detach(), 2) if fuse
                    else spectral(model.l1) * spectral(model.l2))
        assert value == pytest.approx(float(expected), rel=1e-6)
        assert "aux" not in est.layer_bounds()


def test_reading_input_dependent_values_into_python_is_refused():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(x) * x.sum().item() / x.size(1)  # the size is fine, the item is not

    with pytest.raises(lipreg.UnsupportedOpError, match=r"node 'item'.*reads the values of an input-dependent"):
        lipreg.LipschitzEstimator(Model(), torch.randn(2, 4))


def test_constant_of_several_arguments_is_joint():
    """c-Lipschitz jointly in (a, b): L = c sqrt(L_a^2 + L_b^2). torch.maximum is 1-Lipschitz jointly."""
    torch.manual_seed(7)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return torch.maximum(self.l(x), x)

    model = Model().to(DT)
    with registered(torch.maximum, 1.0):
        est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(math.hypot(spectral(model.l), 1.0), rel=1e-6)


def test_elementwise_rule_with_two_input_dependent_arguments_is_refused():
    class Model(nn.Module):
        def forward(self, x):
            return torch.clamp(2 * x, min=x)

    with pytest.raises(lipreg.UnsupportedOpError, match=r"node 'clamp'.*2 input-dependent arguments.*exactly one"):
        lipreg.LipschitzEstimator(Model(), torch.randn(2, 4))


class WithIndices(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.pool = nn.MaxPool2d(3, 2, return_indices=True)

    def forward(self, x):
        if self.kind == "module":
            return self.pool(x)[0]
        if self.kind == "adaptive":
            return F.adaptive_max_pool2d(x, 3, return_indices=True)[0]
        return F.max_pool2d(x, 3, 2, return_indices=True)[0]


@pytest.mark.parametrize("kind", ["module", "functional", "adaptive"])
def test_max_pooling_with_indices(kind):
    """3x3 stride 2 on 7x7, and adaptive 7 -> 3 (the same windows): a spike in the middle is in 4 windows."""
    est = lipreg.LipschitzEstimator(WithIndices(kind), torch.randn(2, 1, 7, 7), dtype=DT)
    assert 2.0 <= float(est.converge()) <= 2.0 * (1 + 1e-12)  # a certificate: rounded upwards


def test_training_branches_are_traced_in_eval_mode():
    """``if self.training`` and ``training=self.training`` take their eval values, whatever the model's flag."""
    torch.manual_seed(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)

        def forward(self, x):
            h = F.batch_norm(self.l(x), self.mean, self.var, training=self.training)
            if self.training:
                h = h + 0.1 * torch.randn_like(h)
            return F.dropout(h, 0.5, training=self.training)

    model = Model().to(DT).train()
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    assert model.training
    gain = torch.rsqrt(model.var + 1e-5)
    reference = torch.linalg.matrix_norm(gain[:, None] * model.l.weight.detach(), 2)
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(float(reference), rel=1e-6)

"""Issue 9, class 9 and the misleading messages: an estimator that goes stale when the model changes under it, the
user's model left unmodified, keyword-only calls, wrappers fx cannot trace, batch norm on batch statistics, and
node names. Bounds are checked against the exact norm of a float64 ``jacrev`` Jacobian."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg

DT = torch.float64


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """||J(x)|| for one sample: the exact Lipschitz constant of a linear model, a lower bound of any other."""
    jac = torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0))(x[0].to(DT))
    return float(torch.linalg.matrix_norm(jac.detach().reshape(-1, x[0].numel()), 2))


def linear_chain(*widths: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b, dtype=DT) for a, b in zip(widths, widths[1:])])


# ------------------------------------------------------------------------------------------------ staleness
def test_replaced_submodule_is_certified_as_it_is_now():
    model = linear_chain(6, 5, 4)
    x = torch.randn(2, 6, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    est.certified_bound()
    model[1] = nn.Linear(5, 4, dtype=DT)
    with torch.no_grad():
        model[1].weight.mul_(30)
    true = jacobian_norm(model, x)
    with pytest.warns(UserWarning, match=r"submodule '1' is another object now"):
        certified = float(est.certified_bound().detach())
    assert true <= certified <= true * (1 + 2e-6)  # 1e-6 relative margin of every certificate, plus arithmetic


def test_replaced_submodule_is_estimated_as_it_is_now():
    """``est()`` checks too: the warm iterations run on the new operator, which converge to its norm."""
    model = linear_chain(6, 5, 4)
    x = torch.randn(2, 6, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    est()
    model[0] = nn.Linear(6, 5, dtype=DT)
    with torch.no_grad():
        model[0].weight.mul_(30)
    with pytest.warns(UserWarning, match="another object"):
        est()
    assert float(est.converge(tol=1e-12).detach()) == pytest.approx(jacobian_norm(model, x), rel=1e-6)


def test_changed_activation_slope_is_certified():
    """LeakyReLU(0.1) -> negative_slope = 5 between unit weights: the slope on negative inputs is the constant."""
    model = nn.Sequential(nn.Linear(3, 3, bias=False, dtype=DT), nn.LeakyReLU(0.1), nn.Linear(3, 3, bias=False, dtype=DT))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[2].weight.copy_(torch.eye(3))
    x = -torch.ones(1, 3, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    assert float(est.certified_bound().detach()) == pytest.approx(1.0, rel=1e-5)
    model[1].negative_slope = 5.0
    true = jacobian_norm(model, x)  # 5: every entry negative
    with pytest.warns(UserWarning, match=r"'1' \(LeakyReLU\): negative_slope changed from 0.1 to 5.0"):
        assert float(est.certified_bound().detach()) >= true == pytest.approx(5.0)


def test_changed_stride_is_certified():
    """A convolution's stride 2 -> 1: four times as many windows overlap on each input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, dtype=DT), nn.Flatten())
    x = torch.randn(1, 1, 7, 7, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    est.certified_bound()
    model[0].stride = (1, 1)
    true = jacobian_norm(model, x)
    with pytest.warns(UserWarning, match=r"stride changed from \(2, 2\) to \(1, 1\)"):
        assert true <= float(est.certified_bound().detach()) <= true * (1 + 1e-5)


def test_change_to_an_unsupported_model_raises_on_every_call():
    """A replacement the library refuses never falls back to certifying the old model."""
    model = nn.Sequential(nn.Linear(4, 4, dtype=DT), nn.ReLU(), nn.Linear(4, 2, dtype=DT))
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    model[1] = nn.LayerNorm(4, dtype=DT)
    for _ in range(2):
        with pytest.warns(UserWarning, match="another object"), \
                pytest.raises(lipreg.UnsupportedOpError, match="LayerNorm"):
            est.certified_bound()


def test_instance_attribute_over_a_class_default_is_seen():
    """``forward`` branched on a class attribute at trace time; an instance attribute now takes the other branch."""

    class Branch(nn.Module):
        scale: float | None = None

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if self.scale is None else self.scale * self.lin(x)

    model = Branch()
    x = torch.randn(2, 3, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    est.certified_bound()
    model.scale = 100.0
    true = jacobian_norm(model, x)
    with pytest.warns(UserWarning, match="scale changed from None to 100.0"):
        assert true <= float(est.certified_bound().detach()) <= true * (1 + 1e-5)


def test_rebuild_keeps_the_warm_state_of_unchanged_operators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, dtype=DT), nn.LeakyReLU(0.1), nn.Linear(5, 4, dtype=DT))
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 6, dtype=DT), dtype=DT, fuse=False)
    est.converge()
    warm = {name: tensor.clone() for name, tensor in est.state_dict().items()}
    assert warm
    model[1].negative_slope = 0.2
    with pytest.warns(UserWarning, match="negative_slope"):
        est(n_iter=0)
    assert all(torch.equal(est.state_dict()[name], tensor) for name, tensor in warm.items())


def test_hook_added_after_the_build_is_seen():
    model = linear_chain(4, 3)
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    model[0].register_forward_hook(lambda module, args, out: 10 * out)
    # the change is seen (a rebuild is tried), and the rebuilt graph refuses the hook, whose effect no rule sees
    with pytest.warns(UserWarning, match=r"'0' \(Linear\): hooks changed"), \
            pytest.raises(lipreg.UnsupportedOpError, match="forward hooks"):
        est.certified_bound()


def test_no_rebuild_when_only_values_or_modes_change():
    """Training steps (values updated in place, train/eval switches, a parameter replaced by one of the same
    shape, a method shadowed on the instance as Lightning callbacks do) change nothing the graph relies on: no
    rebuild, the same graph object."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, dtype=DT), nn.BatchNorm2d(2, dtype=DT), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3, dtype=DT))
    x = torch.randn(4, 1, 6, 6, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    graph = est.graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            model.train()
            model(x).sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.1 * p.grad)
            model.eval()
            est()
        model[4].weight = nn.Parameter(torch.randn(3, 32, dtype=DT))
        model.training_step = lambda *args: None
        bound = est.certified_bound()
    assert est.graph is graph
    assert float(bound.detach()) >= jacobian_norm(model, x)


def test_building_leaves_the_model_unmodified():
    """A tensor created in forward becomes a tracer constant: it lives in the GraphModule, not on the model."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * torch.tensor([1.0, -4.0, 2.0], dtype=DT)

    model = Scaled()
    before = dict(vars(model))
    x = torch.randn(2, 3, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    assert vars(model) == before
    true = jacobian_norm(model, x)
    assert true <= float(est.certified_bound().detach()) <= true * (1 + 1e-5)


# ------------------------------------------------------------------------------------------- keyword calls
class KeywordCall(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.c = nn.Parameter(torch.tensor([0.5, -3.0, 2.0, 0.25], dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.c)


@pytest.mark.parametrize("op", [
    lambda x, c: torch.mul(input=x, other=c),
    lambda x, c: torch.mul(input=c, other=x),
    lambda x, c: torch.div(input=x, other=c),
    lambda x, c: x.mul(other=c),
    lambda x, c: x.div(other=c),
], ids=["mul(input=x)", "mul(other=x)", "div(input=x)", "x.mul(other=c)", "x.div(other=c)"])
def test_keyword_calls_are_bounded(op):
    model = KeywordCall(op)
    x = torch.randn(2, 4, dtype=DT)
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    true = jacobian_norm(model, x)
    assert true <= float(est.certified_bound().detach()) <= true * (1 + 1e-5)


def test_keyword_division_by_the_input_is_still_refused():
    model = KeywordCall(lambda x, c: torch.div(input=c, other=x))
    with pytest.raises(lipreg.UnsupportedOpError, match="division by an input-dependent tensor"):
        lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT))


class KeywordAdd(nn.Module):
    """``x + alpha W x`` written with keywords in the other order: alpha belongs to ``other``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False, dtype=DT)
        with torch.no_grad():
            self.lin.weight.copy_(5 * torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(other=self.lin(x), input=x, alpha=10.0)


def test_keyword_add_weighs_the_right_summand():
    model = KeywordAdd()
    x = torch.randn(2, 4, dtype=DT)
    true = jacobian_norm(model, x)  # ||I + 50 I|| = 51
    est = lipreg.LipschitzEstimator(model, x, dtype=DT)
    assert float(est.certified_bound().detach()) >= true == pytest.approx(51.0)


# ---------------------------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("wrap, advice", [
    (nn.DataParallel, r"`\.module`"),
    (torch.compile, r"`\._orig_mod`"),
    (torch.jit.script, "original eager nn.Module"),
    (lambda m: torch.jit.trace(m, torch.randn(2, 4)), "original eager nn.Module"),
    (lambda m: nn.Sequential(nn.DataParallel(m)), r"submodule '0' is a wrapper .*DataParallel.*`\.module`"),
], ids=["DataParallel", "torch.compile", "jit.script", "jit.trace", "nested DataParallel"])
def test_wrappers_say_what_to_pass(wrap, advice):
    model = wrap(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    with pytest.raises(lipreg.UnsupportedOpError, match=advice):
        lipreg.LipschitzEstimator(model, torch.randn(2, 4))


def test_distributed_data_parallel_says_what_to_pass(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
        with pytest.raises(lipreg.UnsupportedOpError, match=r"DistributedDataParallel.*`\.module`"):
            lipreg.LipschitzEstimator(model, torch.randn(2, 4))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- batch norm on (B, C) inputs
def test_batch_statistics_on_flat_inputs_give_the_reason(capfd):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(lipreg.UnsupportedOpError, match=r"track_running_stats=False normalises with the statistics "
                                                          r"of each batch"):
        lipreg.LipschitzEstimator(model, torch.randn(8, 4))
    assert "Traceback" not in capfd.readouterr().err  # fx's ShapeProp printed one before raising


# ---------------------------------------------------------------------------------------------- node names
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.w)


class Squared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def test_function_nodes_are_named_by_their_module_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, dtype=DT), Block())
    est = lipreg.LipschitzEstimator(model, torch.randn(2, 4, dtype=DT), dtype=DT)
    assert set(est.layer_bounds(certified=True)) == {"0+1.matmul", "1.relu"}


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), Squared())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_messages_name_the_module_path():
    with pytest.raises(lipreg.UnsupportedOpError, match=r"used by node 'net\.1\.mul'.*\(net\.1\.mul\) is not"):
        lipreg.LipschitzEstimator(Wrapped(), torch.randn(2, 4))

"""Issue 16, class 1: a method shadowed on the instance of a layer (``module.forward = ...``,
``module._conv_forward = ...``, accelerate-style hooks), before or after the estimator is built, is what the
certificate bounds: the layer is traced through, and an override set later is a change of the model."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import lipreg
from lipreg.margins import MarginCertificate
from lipreg.ops import registry
from tests.capture.reference import DT, exact_lipschitz, exact_pair_constants, inputs


def certified(est: lipreg.LipschitzEstimator) -> float:
    return float(est.certified_bound().detach())


def tenfold_conv_forward(conv: nn.Conv2d) -> None:
    """``conv._conv_forward`` on the instance: the convolution runs with 10x its weight."""
    conv._conv_forward = lambda x, weight, bias: nn.Conv2d._conv_forward(conv, x, 10 * weight, bias)


def tenfold_forward(layer: nn.Module) -> None:
    """``layer.forward`` on the instance: 10x what the class computes."""
    cls = type(layer)
    layer.forward = lambda x: 10 * cls.forward(layer, x)


def accelerate_style_hook(layer: nn.Module) -> None:
    """What ``accelerate.hooks.add_hook_to_module`` does: keep the bound method, install a partial around it."""

    def new_forward(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        return 10 * module._old_forward(*args)

    layer._old_forward = layer.forward
    layer.forward = functools.update_wrapper(functools.partial(new_forward, layer), layer._old_forward)


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dtype=DT), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 5 * 5, 4, dtype=DT))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 4, dtype=DT))


OVERRIDES = {"_conv_forward": (conv_net, tenfold_conv_forward, 0), "forward": (mlp, tenfold_forward, 2),
             "accelerate": (mlp, accelerate_style_hook, 0)}


@pytest.mark.parametrize("override", OVERRIDES)
def test_override_set_before_the_build_is_bounded(override):
    make, apply, index = OVERRIDES[override]
    model = make()
    xs = inputs(model[0].weight.shape[1:2] + ((5, 5) if override == "_conv_forward" else ()))
    apply(model[index])
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    assert certified(est) >= exact_lipschitz(model, xs)
    assert float(est.converge(tol=1e-10).detach()) >= 0.99 * exact_lipschitz(model, xs)


@pytest.mark.parametrize("override", OVERRIDES)
def test_override_set_after_the_build_is_a_change(override):
    make, apply, index = OVERRIDES[override]
    model = make()
    xs = inputs(model[0].weight.shape[1:2] + ((5, 5) if override == "_conv_forward" else ()))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    before = certified(est)
    apply(model[index])
    with pytest.warns(UserWarning, match=rf"submodule '{index}' .*methods set on the instance changed"):
        after = certified(est)
    assert after >= exact_lipschitz(model, xs) and after > 5 * before


def test_override_of_the_model_itself_is_bounded():
    """fx traces a root with its class's forward; an instance forward on the model is followed all the same."""
    model = mlp()
    xs = inputs((5,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    tenfold_forward(model)
    with pytest.warns(UserWarning, match="the model itself .*methods set on the instance changed"):
        assert certified(est) >= exact_lipschitz(model, xs)
    bare = nn.Linear(5, 3, dtype=DT)  # a model whose own class has a rule
    tenfold_forward(bare)
    assert certified(lipreg.LipschitzEstimator(bare, xs, dtype=DT)) >= exact_lipschitz(bare, xs)


def test_pairwise_margin_constants_follow_an_override_of_the_head():
    torch.manual_seed(0)
    model = mlp()
    xs = inputs((5,))
    cert = MarginCertificate(model, xs, pairwise=True, dtype=DT)
    assert cert.pairwise
    tenfold_forward(model[2])
    with pytest.warns(UserWarning, match="changed"):
        constants = cert.certified()
    exact = exact_pair_constants(model, xs)
    assert bool((constants >= exact).all()), (constants / exact.clamp_min(1e-30)).min()
    tenfold_forward(model[0])  # set before the build
    assert bool((MarginCertificate(model, xs, dtype=DT).certified() >= exact_pair_constants(model, xs)).all())


def test_untraceable_override_names_the_module_and_the_line():
    model = mlp()
    model[2].forward = lambda x: x if x.sum() > 0 else -x  # data-dependent: fx cannot trace it
    with pytest.raises(lipreg.UnsupportedOpError) as info:
        lipreg.LipschitzEstimator(model, inputs((5,)), dtype=DT)
    message = str(info.value)
    assert "test_instance_overrides.py" in message and "x.sum() > 0" in message


class Steps(nn.Sequential):
    def training_step(self, batch: torch.Tensor) -> torch.Tensor:
        return self(batch).sum()


def test_functions_set_on_the_instance_that_forward_does_not_run_change_nothing():
    """A callback set on the model, a method forward never calls replaced (Lightning's strategies wrap
    ``training_step``), or a module's own bound forward stored on it (Lightning's forward redirection leaves
    ``module.forward = module.forward``): no rebuild."""
    torch.manual_seed(0)
    model = Steps(nn.Linear(5, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 4, dtype=DT))
    xs = inputs((5,))
    est = lipreg.LipschitzEstimator(model, xs, dtype=DT)
    graph = est.graph
    model.training_step = lambda *args: None
    model.forward = model.forward
    model[0].forward = model[0].forward
    model[0].on_fit_start = lambda: None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est()
    assert est.graph is graph


def test_method_patched_on_a_torch_class_is_bounded(monkeypatch):
    """The same override on the class (``nn.Conv2d._conv_forward = ...``) before the build."""
    original = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, x, w, b: original(self, x, 10 * w, b))
    model = conv_net()
    xs = inputs((1, 5, 5))
    assert certified(lipreg.LipschitzEstimator(model, xs, dtype=DT)) >= exact_lipschitz(model, xs)


class Squash(nn.Module):
    """``tanh(inner(x))`` with ``inner`` of norm at most 1: a registered constant of 1 holds for the class."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4, bias=False, dtype=DT)
        nn.init.eye_(self.inner.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner(x))


def test_override_inside_a_module_kept_whole_is_followed():
    """A module kept whole by its rule is traced through when a module inside it is overridden."""
    saved = dict(registry._RULES)
    try:
        lipreg.register_rule(Squash, 1.0)
        model = nn.Sequential(Squash())
        tenfold_forward(model[0].inner)
        xs = inputs((4,)) / 100  # near 0, where tanh' = 1
        assert certified(lipreg.LipschitzEstimator(model, xs, dtype=DT)) >= exact_lipschitz(model, xs)
    finally:
        registry._RULES.clear()
        registry._RULES.update(saved)

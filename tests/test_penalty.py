"""``LipschitzPenalty`` on its own: each kind against its formula on the estimator's bound, its errors, ``last_bound``,
its warm state as buffers of the LightningModule (checkpointed, moved by ``.to()``), AMP, and non-finite weights.

The reference bound is a second ``LipschitzEstimator`` with the same seed: both start from the same vectors, so
after the same number of calls they hold bitwise the same state and bound.
"""
from __future__ import annotations

import math
import warnings
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from lipreg import LipschitzEstimator, LipschitzMarginLoss
from lipreg.options import PenaltyKind
from lipreg.penalty import LipschitzPenalty
from tests.classifiers import MLP, Classifier


def small_net(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden=(16, 16))


def example() -> torch.Tensor:
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def formula(kind: str, bound: torch.Tensor, target: float | None) -> torch.Tensor:
    """``h`` written out independently of ``lipreg.penalty.PENALTY_FUNCTIONS``."""
    if kind == "linear":
        return bound
    if kind == "log":
        return torch.log(bound)
    excess = torch.clamp(bound - target, min=0.0)
    return excess if kind == "hinge" else excess * excess


def grads(value: torch.Tensor, net: torch.nn.Module) -> list[torch.Tensor]:
    params = list(net.parameters())
    found = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]


def test_every_kind_is_tested() -> None:
    """The parametrisation below covers every kind of the library's choice set."""
    assert set(get_args(PenaltyKind)) == {"linear", "log", "hinge", "squared_hinge"}


@pytest.mark.parametrize(("kind", "target_scale"), [("linear", None), ("log", None), ("hinge", 0.5),
                                                    ("hinge", 2.0), ("squared_hinge", 0.5), ("squared_hinge", 2.0)])
def test_kind_matches_its_formula_value_and_gradient(kind: str, target_scale: float | None) -> None:
    """``penalty() == weight * h(L)`` and its gradient ``weight * h'(L) dL/dtheta``, over three warm calls; a target
    above the bound (scale 2) gives a zero penalty and a zero gradient."""
    net, x = small_net(), example()
    reference = LipschitzEstimator(net, x)
    target = None if target_scale is None else target_scale * LipschitzEstimator(net, x).converge().item()
    penalty = LipschitzPenalty(net, x, coefficient=0.3, kind=kind, threshold=target)
    for _ in range(3):
        value = penalty()
        bound = reference()
        expected = 0.3 * formula(kind, bound, target)
        assert torch.equal(penalty.last_bound, bound.detach())
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0.0)
        for g, g_ref in zip(grads(value, net), grads(expected, net)):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)
    if target_scale == 2.0:
        assert float(value.detach()) == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in grads(penalty(), net))


def test_n_iter_warm_iterations_per_call() -> None:
    net, x = small_net(), example()
    penalty = LipschitzPenalty(net, x, coefficient=1.0, kind="linear", n_iter=3)
    reference = LipschitzEstimator(net, x)
    assert torch.equal(penalty(), reference(n_iter=3))
    assert torch.equal(penalty(), reference(n_iter=3))


@pytest.mark.parametrize("kind", ["hinge", "squared_hinge"])
@pytest.mark.parametrize("target", [None, math.inf, math.nan])
def test_hinge_needs_a_finite_threshold(kind: str, target: float | None) -> None:
    with pytest.raises(ValueError, match="needs a finite threshold"):
        LipschitzPenalty(small_net(), example(), kind=kind, threshold=target)


def test_the_old_keywords_weight_and_target_still_work_with_a_deprecation_warning() -> None:
    net, x = small_net(), example()
    with pytest.warns(DeprecationWarning, match=r"weight=...\) is renamed coefficient="):
        old = LipschitzPenalty(net, x, weight=0.3, kind="hinge", threshold=1.0)
    with pytest.warns(DeprecationWarning, match=r"target=...\) is renamed threshold="):
        LipschitzPenalty(net, x, kind="hinge", target=1.0)
    assert (old.coefficient, old.threshold) == (0.3, 1.0)
    with pytest.raises(TypeError, match="got both weight= .* and coefficient="):
        LipschitzPenalty(net, x, weight=0.3, coefficient=0.3)


def test_a_negative_coefficient_is_refused() -> None:
    with pytest.raises(ValueError, match="coefficient must be >= 0"):
        LipschitzPenalty(small_net(), example(), coefficient=-1.0)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        LipschitzPenalty(small_net(), example(), kind="quadratic")


def test_last_bound() -> None:
    net, x = small_net(), example()
    penalty = LipschitzPenalty(net, x, coefficient=0.5, kind="linear")
    assert penalty.last_bound is None
    value = penalty()
    assert value.requires_grad and not penalty.last_bound.requires_grad
    assert torch.equal(penalty.last_bound, (value / 0.5).detach())


def classifier_with_penalty(seed: int = 0) -> Classifier:
    net = small_net(seed)
    return Classifier(net, lip_penalty=LipschitzPenalty(net, example(), coefficient=1e-2))


def test_warm_state_is_in_the_lightning_modules_state_dict_and_restores() -> None:
    """The warm vectors are buffers of the LightningModule (the net's weights are not duplicated under the
    penalty); loading the state_dict into a fresh module gives the same next bound bitwise."""
    module = classifier_with_penalty()
    buffers = dict(module.lip_penalty.named_buffers(prefix="lip_penalty"))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert buffers and set(buffers) <= set(state)
    assert not [k for k in state if k.startswith("lip_penalty") and k not in buffers]
    for _ in range(3):
        module.lip_penalty()
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    assert any(not torch.equal(saved[k], state[k]) for k in buffers)  # the calls moved the warm state

    restored = classifier_with_penalty(seed=5)
    restored.load_state_dict(saved)
    assert torch.equal(restored.lip_penalty(), module.lip_penalty())
    for name, buffer in restored.lip_penalty.named_buffers(prefix="lip_penalty"):
        assert torch.equal(buffer, module.state_dict()[name])


def test_buffers_move_with_to() -> None:
    module = classifier_with_penalty().to("meta")
    assert all(b.device.type == "meta" for b in module.lip_penalty.buffers())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_penalty_on_cuda_matches_cpu() -> None:
    cpu = classifier_with_penalty()
    gpu = classifier_with_penalty().to("cuda")
    assert all(b.device.type == "cuda" for b in gpu.lip_penalty.buffers())
    for _ in range(3):
        expected, value = cpu.lip_penalty(), gpu.lip_penalty()
        assert value.device.type == "cuda"
        torch.testing.assert_close(value.cpu(), expected, rtol=1e-4, atol=0.0)


def test_bf16_autocast_computes_in_float32() -> None:
    """Under autocast the bound is computed as without it (float32): the same value, bitwise."""
    net, x = small_net(), example()
    plain = LipschitzPenalty(net, x, coefficient=1.0, kind="log")
    mixed = LipschitzPenalty(net, x, coefficient=1.0, kind="log")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = mixed()
    assert value.dtype == torch.float32
    assert torch.equal(value, plain())


def test_non_finite_bound_skips_the_penalty() -> None:
    """A NaN weight: a zero penalty whose gradient w.r.t. every parameter is exactly 0 (so the task loss's gradients
    stay finite), a NaN ``last_bound``, finite warm vectors (the NaN operator keeps its vector), and a RuntimeWarning
    at the next check (``layer_bounds()``) naming the NaN operator; once the weight is repaired the penalty is back."""
    net, x = small_net(), example()
    penalty = LipschitzPenalty(net, x, coefficient=1.0, kind="log")
    penalty()
    warm = {k: v.clone() for k, v in penalty.state_dict().items()}
    first = net.net[1].weight
    clean = first.detach().clone()
    with torch.no_grad():
        first[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is read on the host at the call: no warning there
        value = penalty()
    with pytest.warns(RuntimeWarning) as record:
        penalty.estimator.layer_bounds()
    messages = " | ".join(str(w.message) for w in record)
    assert "non-finite Lipschitz bound" in messages and "penalty is skipped" in messages
    assert "['net.0+net.1']" in messages  # the fused flatten + first linear
    assert float(value.detach()) == 0.0
    found = torch.autograd.grad(value, list(net.parameters()), retain_graph=True, allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in found)
    assert torch.isnan(penalty.last_bound)
    state = penalty.state_dict()
    assert all(torch.isfinite(buffer).all() for buffer in state.values())
    nan_layer = [name for name in state if name.endswith("_0_net_1")]  # the fused flatten + first linear
    assert len(nan_layer) == 1 and torch.equal(state[nan_layer[0]], warm[nan_layer[0]])  # kept, not poisoned
    # the task loss through the other layers (the NaN layer's output replaced) plus the skipped penalty
    hidden = torch.relu(net.net[3](torch.rand(4, 16)))
    (F.cross_entropy(net.net[5](hidden), torch.arange(4)) + value).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)

    with torch.no_grad():
        first.copy_(clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = penalty()
    assert value.requires_grad and torch.isfinite(value)


def assert_zero_gradients(value: torch.Tensor, params: list[torch.Tensor]) -> None:
    found = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in found), [
        None if g is None else g.abs().max() for g in found]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("layer", [1, 3, 5])
def test_non_finite_weights_give_an_exact_zero_gradient(bad: float, layer: int) -> None:
    """A NaN or inf entry in any layer: the penalty is 0, its gradient w.r.t. every parameter exactly 0 (a bare
    ``torch.where`` on the bound gives ``0 * inf = NaN`` to the other layers' factors and ``0 * NaN`` to the bad
    layer's own weights), and an Adam step on it moves nothing: no NaN appears in the model or the optimiser."""
    net, x = small_net(), example()
    penalty = LipschitzPenalty(net, x, coefficient=1.0, kind="log")
    penalty()
    with torch.no_grad():
        net.net[layer].weight[1, 2] = bad
    before = [p.detach().clone() for p in net.parameters()]
    value = penalty()
    assert float(value.detach()) == 0.0 and not torch.isfinite(penalty.last_bound)
    assert_zero_gradients(value, list(net.parameters()))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    value.backward()
    optimizer.step()
    assert all(torch.allclose(p, q, rtol=0.0, atol=0.0, equal_nan=True) for p, q in zip(net.parameters(), before))
    assert all(torch.isfinite(t).all() for state in optimizer.state.values() for t in state.values())
    with pytest.warns(RuntimeWarning, match=rf"non-finite factors at \['net\.({layer - 1}\+net\.)?{layer}'\]"):
        penalty.estimator.check_finite()


def test_an_overflowing_bound_is_skipped_with_a_zero_gradient() -> None:
    """Twelve layers of norm ~1e4 each: every factor is finite, their product overflows float32. The penalty is 0
    with an exactly zero gradient (the partial products past the overflow are inf: ``0 * inf`` in their backward),
    and the warning says the product overflows."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(12)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(1e4 / torch.linalg.matrix_norm(layer.weight, ord=2))
    net = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())])
    penalty = LipschitzPenalty(net, torch.randn(2, 4), coefficient=1.0, kind="linear")
    value = penalty()
    assert torch.isinf(penalty.last_bound) and float(value.detach()) == 0.0
    assert_zero_gradients(value, list(net.parameters()))
    with pytest.warns(RuntimeWarning, match="every factor is finite, and the bound they give exceeds"):
        factors = penalty.estimator.layer_bounds()
    assert all(math.isfinite(f) for f in factors.values())


def test_a_nan_inside_a_fused_operator_spares_the_other_operators() -> None:
    """The one case the gate cannot reach (``lipreg.finite``): in a fused ``conv + bn`` operator with a NaN conv
    weight, the batch norm's scale meets the NaN conv output. Every other operator's parameters, and the NaN conv
    weight itself, still get an exactly zero gradient, and the penalty is 0."""
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    penalty = LipschitzPenalty(cnn, torch.randn(2, 1, 4, 4), coefficient=1.0)
    penalty()
    with torch.no_grad():
        cnn[0].weight[0, 0, 0, 0] = math.nan
    value = penalty()
    assert float(value.detach()) == 0.0
    assert_zero_gradients(value, [cnn[0].weight, cnn[5].weight, cnn[5].bias])


@pytest.mark.parametrize("pairwise", [True, False])
def test_non_finite_margin_has_an_exact_zero_gradient(pairwise: bool) -> None:
    """``LipschitzMarginLoss`` with a NaN first layer: the loss equals the plain cross-entropy, and the margin
    term's gradient w.r.t. every parameter is exactly 0 (pairwise: the head's ``||w_y - w_j||`` meets ``L = NaN``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    margin = LipschitzMarginLoss(net, x, eps=0.3, warmup=0, pairwise=pairwise)
    logits = net(x).detach().requires_grad_(True)  # the task forward is not this test's concern
    margin(logits, y)
    with torch.no_grad():
        net[1].weight[0, 0] = math.nan
    loss = margin(logits, y)
    plain = F.cross_entropy(logits, y)
    assert torch.equal(loss.detach(), plain.detach())
    assert torch.equal(torch.autograd.grad(loss, logits, retain_graph=True)[0], torch.autograd.grad(plain, logits)[0])
    assert_zero_gradients(loss, list(net.parameters()))

"""``LipschitzMarginLoss`` and the margin certificates (``lipreg.margins``) against independent references.

* the loss's gradient against central finite differences (float64, frozen warm vectors);
* the loss against eq. (1) written out from a hand-computed bound, global and pairwise;
* certified per-pair constants against a brute force over pairs and activation patterns (dense float64 norms);
* the per-sample certified radius against a loop over pairs; non-linear heads fall back to the global constant;
* a network trained with the loss: no PGD attack (written here) flips a prediction inside its certified radius;
* the batch-norm warning (margin loss and penalty), the eps ramp, state_dict / ``.to()``;
* a model of two outputs: a ``ValueError`` that names the fix, not an ``IndexError``.

(The ``lipreg=certified`` preset through ``experiments/train.py`` is tested in ``tests/experiments``.)
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipreg import LipschitzEstimator, LipschitzMarginLoss, MarginCertificate
from lipreg.margins import split_linear_head
from lipreg.metrics import CertifiedRobustAccuracy, certified_radius
from lipreg.penalty import LipschitzPenalty
from tests.classifiers import CNN, LipCNN


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


# ------------------------------------------------------------------------------ the loss
KINDS = [("ce", 0.5, 0.0), ("ce", 1.0, 0.3), ("hinge", None, 0.0), ("lse", 0.05, 0.2)]


@pytest.mark.parametrize("pairwise", [True, False])
@pytest.mark.parametrize(("kind", "temperature", "ce_weight"), KINDS)
def test_gradient_matches_finite_differences(pairwise: bool, kind: str, temperature: float | None,
                                             ce_weight: float) -> None:
    net = mlp(dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    loss_fn = LipschitzMarginLoss(net, x, eps=0.7, pairwise=pairwise, n_iter=0, warmup=0, kind=kind,
                                  temperature=temperature, ce_weight=ce_weight,
                                  dtype=torch.float64)  # n_iter=0: the warm vectors stay fixed, the loss is a function
    loss_fn.certificate.estimator(n_iter=5)  # some non-trivial vectors first
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_fn(net(x), y), params)
    h = 1e-6
    for p, g in zip(params, grads):
        for index in itertools.islice(itertools.product(*map(range, p.shape)), 6):
            with torch.no_grad():
                p[index] += h
                up = float(loss_fn(net(x), y))
                p[index] -= 2 * h
                down = float(loss_fn(net(x), y))
                p[index] += h
            assert float(g[index]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("pairwise", [True, False])
def test_loss_is_the_shifted_cross_entropy(pairwise: bool) -> None:
    net = mlp(dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    loss_fn = LipschitzMarginLoss(net, x, eps=0.4, pairwise=pairwise, n_iter=0, warmup=0, dtype=torch.float64)
    assert loss_fn.pairwise is pairwise
    reference = LipschitzEstimator(net[:2] if pairwise else net, x, n_iter=0, dtype=torch.float64)
    bound = float(reference().detach())  # same seed: the same vectors, the same estimate
    W = net[2].weight.detach()
    logits = net(x).detach()
    shifted = logits.clone()
    for b in range(5):
        for j in range(3):
            if j != y[b]:
                K = (W[y[b]] - W[j]).norm() * bound if pairwise else math.sqrt(2) * bound
                shifted[b, j] += 0.4 * K
    expected = F.cross_entropy(shifted, y)
    assert float(loss_fn(net(x), y)) == pytest.approx(float(expected), rel=1e-10)
    assert float(loss_fn.last_bound) == pytest.approx(bound, rel=1e-12)


def per_sample_losses(loss_fn: LipschitzMarginLoss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([loss_fn(logits[b:b + 1], y[b:b + 1]).detach() for b in range(len(y))])


@pytest.mark.parametrize("kind", ["ce", "hinge", "lse"])
def test_zero_loss_against_the_certificate(kind: str) -> None:
    """Per sample and radius, against the certified radius of the certified constants: the hinge (eq. 3) is 0
    exactly when the sample is certified at eps; the LSE margin (eq. 4) is 0 only then, and is 0 once certified
    at eps + T log(C - 1); the cross-entropy (eq. 2) is never 0, and below T log 2 only when certified."""
    net = mlp(2, dtype=torch.float64)
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits = net(x).detach()
    y = logits.argmax(1)
    y[:3] = (y[:3] + 1) % 3  # misclassified: radius 0, certified nowhere
    temperature = {"ce": 0.05, "hinge": None, "lse": 0.02}[kind]
    loss_fn = LipschitzMarginLoss(net, x, eps=1.0, n_iter=0, warmup=0, kind=kind, temperature=temperature,
                                  dtype=torch.float64)
    loss_fn.certificate.estimator(n_iter=300)  # converged: the training K is the certified one to 1e-6 relative
    # the training K is GloRo's (eq. 3 on the AutoLip body bound): its certified twin, not the tightest certificate
    margins = loss_fn.certificate
    radius = certified_radius(logits, y, margins.constants(margins.estimator.certified_bound().detach()))
    r = radius.clamp_min(1e-3)
    slack = 0.02 * math.log(2) if kind == "lse" else 0.0
    seen = set()
    for eps in [torch.zeros_like(r), r * (1 - 1e-4), r * (1 + 1e-4), 0.3 * r, r - 1.5 * slack if slack else 0.7 * r, 3 * r]:
        for b in range(len(y)):
            loss_fn.eps = float(eps[b].clamp_min(0.0))
            loss = float(loss_fn(logits[b:b + 1], y[b:b + 1]))
            certified = bool(radius[b] > loss_fn.eps)
            seen.add((certified, loss == 0.0))
            if kind == "hinge":
                assert (loss == 0.0) == certified, (b, loss_fn.eps, float(radius[b]), loss)
            elif kind == "lse":
                assert loss > 0.0 or certified
                if radius[b] > loss_fn.eps + slack:
                    assert loss == 0.0
            else:
                assert loss > 0.0
                assert loss >= temperature * math.log(2) or certified
    assert {(True, kind != "ce"), (False, False)} <= seen  # both sides were met


def test_loss_options_are_validated() -> None:
    net, x = mlp(), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"margin loss kind must be one of 'ce', 'hinge', 'lse'; got 'gloro'"):
        LipschitzMarginLoss(net, x, eps=0.3, kind="gloro")
    with pytest.raises(ValueError, match="has no temperature"):
        LipschitzMarginLoss(net, x, eps=0.3, kind="hinge", temperature=0.5)
    for bad in ({"ce_weight": -1.0}, {"temperature": 0.0}, {"eps": -0.1}):
        with pytest.raises(ValueError, match="need eps >= 0"):
            LipschitzMarginLoss(net, x, **{"eps": 0.3, **bad})
    assert LipschitzMarginLoss(net, x, eps=0.3, kind="lse").temperature == 0.1


def test_ce_weight_adds_the_plain_cross_entropy() -> None:
    net = mlp(dtype=torch.float64)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    plain, mixed = (LipschitzMarginLoss(net, x, eps=0.3, n_iter=0, warmup=0, kind="lse", ce_weight=w,
                                        dtype=torch.float64) for w in (0.0, 0.4))
    logits = net(x)
    expected = float(plain(logits, y)) + 0.4 * float(F.cross_entropy(logits, y))
    assert float(mixed(logits, y)) == pytest.approx(expected, rel=1e-12)


def test_eps_ramps_from_zero_and_state_is_checkpointed() -> None:
    net = mlp()
    x = torch.randn(4, 4)
    loss_fn = LipschitzMarginLoss(net, x, eps=0.5, warmup=4)
    seen = []
    for _ in range(6):
        loss_fn(net(x), torch.zeros(4, dtype=torch.long))
        seen.append(loss_fn.last_eps)
    assert seen == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    loss_fn.eval()
    loss_fn(net(x), torch.zeros(4, dtype=torch.long))
    assert int(loss_fn.calls) == 6  # evaluation calls do not advance the ramp
    state = loss_fn.state_dict()
    assert "calls" in state and any(k.startswith("certificate.estimator.power_") for k in state)
    fresh = LipschitzMarginLoss(net, x, eps=0.5, warmup=4)
    fresh.load_state_dict(state)
    assert fresh.current_eps() == 0.5
    assert loss_fn.to(torch.float64).calls.dtype == torch.long


# ------------------------------------------------------------------------------ certificates
def pattern_brute_force(net: nn.Sequential, y: int, j: int) -> float:
    """max over all ReLU patterns D of ||(w_y - w_j)^T D W1||: an upper bound of the constant of z_y - z_j."""
    W1, W2 = net[0].weight.double(), net[2].weight.double()
    best = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=W1.shape[0]):
        row = (W2[y] - W2[j]) @ torch.diag(torch.tensor(bits, dtype=torch.float64)) @ W1
        best = max(best, float(torch.linalg.vector_norm(row)))
    return best


def test_pairwise_constants_against_brute_force() -> None:
    net = mlp(3)
    x = torch.randn(2, 4)
    K = MarginCertificate(net, x).certified()
    sigma = torch.linalg.matrix_norm(net[0].weight.double(), ord=2)
    for y, j in itertools.product(range(3), repeat=2):
        if y == j:
            assert float(K[y, j]) == 0.0
            continue
        gloro = float(torch.linalg.vector_norm(net[2].weight.double()[y] - net[2].weight.double()[j]) * sigma)
        assert float(K[y, j]) <= gloro * (1 + 1e-5)  # the tightest certificate: GloRo's or tighter
        assert float(K[y, j]) >= pattern_brute_force(net, y, j)
        assert float(K[y, j]) <= math.sqrt(2) * float(LipschitzEstimator(net, x).certified_bound()) * (1 + 1e-5)


def test_split_shares_the_weights_and_leaves_the_model_alone() -> None:
    net = LipCNN()
    names = set(vars(net))
    x = torch.rand(3, 1, 8, 8)
    body, head = split_linear_head(net, x)
    assert head is net.net[-1]
    assert torch.equal(head(body(x)), net(x))
    assert set(vars(net)) == names
    assert split_linear_head(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(1, 4)) is None


def test_non_linear_head_falls_back_to_the_global_constant() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Tanh())
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="global constant"):
        certificate = MarginCertificate(net, x)
    assert not certificate.pairwise
    L = float(LipschitzEstimator(net, x).certified_bound())
    K = certificate.certified()
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.all(K[off] >= math.sqrt(2) * L) and torch.all(K[off] <= math.sqrt(2) * L * (1 + 1e-5))


def test_certified_radius_against_a_loop() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(40, 4), torch.randint(0, 4, (40,))
    K = torch.rand(4, 4, dtype=torch.float64) * (1 - torch.eye(4, dtype=torch.float64))
    radius = certified_radius(logits, target, K)
    for b in range(40):
        y = int(target[b])
        gaps = [(float(logits[b, y]) - float(logits[b, j]), float(K[y, j])) for j in range(4) if j != y]
        expected = 0.0 if min(g for g, _ in gaps) <= 0 else min(g / k for g, k in gaps)
        assert float(radius[b]) <= expected and float(radius[b]) == pytest.approx(expected, rel=1e-12)
    metric = CertifiedRobustAccuracy(eps=(0.0, 0.5))
    metric.update(logits, target, K, certified=True)
    assert float(metric.compute()["certified_acc@0.5"]) == pytest.approx(float((radius > 0.5).double().mean()))


def test_metric_makes_the_caller_state_certified() -> None:
    metric = CertifiedRobustAccuracy(eps=0.1)
    with pytest.raises(TypeError, match="certified"):
        metric.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), 0.25)
    with pytest.raises(TypeError):
        metric.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), 0.25, True)


# ------------------------------------------------------------------------------ trained, then attacked
def pgd_flips(net: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, steps: int = 40) -> torch.Tensor:
    """L2 PGD inside each sample's ball of ``radius`` on the margin z_y - max_j z_j; True where it flips."""
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1)) * radius.view(-1, *[1] * (x.dim() - 1))
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        delta.requires_grad_(True)
        z = net(x + delta)
        margin = z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], -math.inf).max(1).values
        flipped |= (margin <= 0).detach()
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            delta = delta - 0.25 * radius.view(-1, *[1] * (x.dim() - 1)) * g
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (radius / norms).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
    return flipped


def test_trained_network_survives_pgd_inside_its_certified_radii() -> None:
    torch.manual_seed(0)
    centres = torch.randn(3, 6) * 2.0
    y = torch.arange(300) % 3
    x = centres[y] + 0.5 * torch.randn(300, 6)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    loss_fn = LipschitzMarginLoss(net, x, eps=0.5, warmup=50)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        radius = certified_radius(net(x), y, loss_fn.certified_constants()).float()
    certified = radius > 0
    assert certified.float().mean() > 0.5 and radius.max() > 0.3  # it certifies something worth attacking
    flipped = pgd_flips(net, x[certified], y[certified], radius[certified])
    assert not flipped.any()
    # the attack is real: at 3x the certified radius it flips some of those samples
    assert pgd_flips(net, x[certified], y[certified], 3 * radius[certified] + 1.0).any()


# ------------------------------------------------------------------------------ batch norm
def test_batch_norm_warning() -> None:
    net = CNN(channels=(4,), hidden=8)
    x = torch.rand(2, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"batch norm layers \['features.1'\].*ill-posed"):
        LipschitzMarginLoss(net, x, eps=0.1)
    with pytest.warns(UserWarning, match="batch statistics"):
        LipschitzPenalty(net, x, coefficient=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LipschitzPenalty(net, x, coefficient=0.0)  # logging only: no loss on the bound, nothing to warn about
        LipschitzMarginLoss(net.eval(), x, eps=0.1)  # frozen statistics: the bound is that of the training function
        LipschitzMarginLoss(LipCNN(), x, eps=0.1)


# ------------------------------------------------------------------------------ what is not a classifier
class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


BUILDERS = {"certificate": lambda m, x: MarginCertificate(m, x),
            "global": lambda m, x: MarginCertificate(m, x, pairwise=False),
            "loss": lambda m, x: LipschitzMarginLoss(m, x, eps=0.1)}


@pytest.mark.parametrize("build", list(BUILDERS.values()), ids=list(BUILDERS))
def test_a_model_of_two_outputs_is_a_clear_error(build: Any) -> None:
    """It was an ``IndexError`` from inside the graph (issue 16)."""
    with pytest.raises(ValueError, match=r"TwoHeads returns a tuple of 2 outputs.*returns the logits alone"):
        build(TwoHeads(), torch.randn(2, 4))


def test_logits_of_one_class_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"shape \(1, 1\).*classes >= 2"):
        MarginCertificate(nn.Linear(4, 1), torch.randn(2, 4))


@pytest.mark.parametrize("replaced", [0, 2], ids=["body module", "head"])
def test_pair_constants_follow_a_model_changed_after_the_build(replaced: int) -> None:
    """A module replaced after the certificate was built (in the body, which the body's own estimator holds by
    reference, or the head) is seen: the model is split again and the certified constants stay above the
    float64 local Jacobian norms of every z_y - z_j of the model as it is now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    certificate = MarginCertificate(model, x)
    certificate.certified()
    model[replaced] = nn.Linear(*model[replaced].weight.shape[::-1]).double()
    with torch.no_grad():
        model[replaced].weight.mul_(30.0)
    with pytest.warns(UserWarning, match="split again"):
        K = certificate.certified()
    for point in torch.randn(20, 4, dtype=torch.float64):
        J = torch.func.jacrev(lambda v: model(v[None])[0])(point)  # (3, 4)
        lower = torch.linalg.vector_norm(J[:, None, :] - J[None, :, :], dim=-1)
        assert bool((K >= lower * (1 - 1e-9)).all())


def test_a_warmup_fraction_ramps_over_that_fraction_of_the_planned_run() -> None:
    net, x, y = mlp(), torch.randn(4, 4), torch.arange(4) % 3
    loss_fn = LipschitzMarginLoss(net, x, eps=0.4, warmup_fraction=0.25)
    with pytest.raises(RuntimeError, match=r"plan_warmup\(total_training_calls\)"):
        loss_fn(net(x), y)
    loss_fn.plan_warmup(40)  # 10 calls of ramp
    assert loss_fn.warmup == 10
    for _ in range(5):
        loss_fn(net(x), y)
    assert loss_fn.current_eps() == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"warmup_fraction must lie in \[0, 1\]"):
        LipschitzMarginLoss(net, x, eps=0.4, warmup_fraction=1.5)


def test_the_default_warmup_is_the_measured_fraction_of_the_run_and_calls_given_win() -> None:
    """By default eps ramps over 30 % of the run (the measured recipe's), planned from the run's length; a loss that
    is never told the length says how to fix it; ``warmup=`` calls take precedence; no warm-up at all is refused."""
    net, x, y = mlp(), torch.randn(4, 4), torch.arange(4) % 3
    default = LipschitzMarginLoss(net, x, eps=0.4)
    assert (default.warmup, default.warmup_fraction) == (None, 0.3)
    with pytest.raises(RuntimeError, match=r"warmup=<training calls>"):
        default(net(x), y)
    default.plan_warmup(100)
    assert default.warmup == 30
    calls = LipschitzMarginLoss(net, x, eps=0.4, warmup=7)
    assert (calls.warmup, calls.warmup_fraction) == (7, None)
    calls.plan_warmup(100)
    assert calls.warmup == 7
    with pytest.raises(ValueError, match="needs a warm-up"):
        LipschitzMarginLoss(net, x, eps=0.4, warmup_fraction=None)

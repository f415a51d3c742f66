"""Issue 12, target (d): the training hot path (``est()``, ``LipschitzPenalty()`` and their backward) never makes the
host wait for the device, NaN weights included.

* Every way a tensor's value reaches Python (``item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``,
  ``tolist``, ``cpu``, ``numpy``) is counted over a few training steps of ``method="autolip"`` on an MLP and on a CNN
  (conv + batch norm + pooling): there must be none. On a GPU the same steps run under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising CUDA call.
* The non-finite record is read every ``check_finite_every`` calls (one read, then the warning), and at
  ``layer_bounds()``: those are the syncs there are.
* SeqLip's vertex search is a host-driven combinatorial loop that reads values on the host; the last test checks
  that every read of a SeqLip step is inside SeqLip (``lipreg/bounds/seqlip/``: the search, the pair factors and
  the gradient surrogate), none in the
  estimator, the penalty, the AutoLip part or the backward, and that their number does not grow with the steps.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from lipreg import LipschitzEstimator, LipschitzMarginLoss, LipschitzPenalty

SYNCS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counted_syncs() -> Iterator[Counter]:
    """Counts the calls of every method in ``SYNCS`` on any tensor while the block runs, by ``(method, file of the
    caller)``."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name: str):
        def method(self, *args, **kwargs):
            counts[name, sys._getframe(1).f_code.co_filename] += 1
            return originals[name](self, *args, **kwargs)
        return method

    for name in SYNCS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def nets(device: str) -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(16, 3)).eval()
    return [(name, net.to(device), torch.randn(8, 1, 4, 4, device=device)) for name, net in
            (("mlp", mlp), ("cnn", cnn))]


class Training:
    """Task loss + penalty + a bare differentiable ``est()``, and their backward (built outside the hot path)."""

    def __init__(self, net: nn.Module, x: torch.Tensor, method: str = "autolip") -> None:
        self.net, self.x, self.y = net, x, torch.arange(x.shape[0], device=x.device) % 3
        self.est = LipschitzEstimator(net, x, method=method)
        self.penalty = LipschitzPenalty(net, x, coefficient=0.1, method=method)

    def step(self) -> None:
        loss = F.cross_entropy(self.net(self.x), self.y) + self.penalty() + 1e-3 * self.est()
        loss.backward()


def first_weight(net: nn.Module) -> torch.Tensor:
    return next(m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("index", [0, 1], ids=["mlp", "cnn"])
def test_hot_path_reads_no_tensor_into_python(index: int) -> None:
    """Three finite steps and a NaN one: no value is read on the host; the NaN is told at the next check."""
    name, net, x = nets("cpu")[index]
    training = Training(net, x)
    training.step()  # the first call builds the record
    with counted_syncs() as counts:
        for _ in range(3):
            training.step()
        with torch.no_grad():
            first_weight(net)[0, 0] = float("nan")
        training.step()
    assert not counts, f"{name}: host synchronisations {dict(counts)}"
    with pytest.warns(RuntimeWarning, match="non-finite Lipschitz bound"):
        assert training.penalty.estimator.check_finite()


@pytest.mark.parametrize("pairwise", [True, False], ids=["pairwise", "global"])
def test_margin_loss_step_reads_no_tensor_into_python(pairwise: bool) -> None:
    """The margin loss with its eps ramp (the ramp is computed on the device) and its backward, a NaN step too."""
    _, net, x = nets("cpu")[0]
    y = torch.arange(x.shape[0]) % 3
    loss_fn = LipschitzMarginLoss(net, x, eps=0.3, pairwise=pairwise, warmup=10)
    loss_fn(net(x), y).backward()  # the first call builds the record
    with counted_syncs() as counts:
        for _ in range(3):
            loss_fn(net(x), y).backward()
        with torch.no_grad():
            first_weight(net)[0, 0] = float("nan")
        loss_fn(net(x), y).backward()
    assert not counts, f"host synchronisations {dict(counts)}"
    assert loss_fn.current_eps() == pytest.approx(0.3 * 5 / 10)


def test_the_record_is_read_every_check_finite_every_calls() -> None:
    """``check_finite_every = 3``: calls 1 and 2 read nothing, call 3 reads the record once and warns there."""
    _, net, x = nets("cpu")[0]
    est = LipschitzEstimator(net, x)
    est.check_finite_every = 3
    est()
    est.check_finite()  # the count starts here
    with torch.no_grad():
        net[1].weight[0, 0] = float("inf")
    with counted_syncs() as counts:
        est()
        est()
    assert not counts
    with counted_syncs() as counts, pytest.warns(RuntimeWarning, match=r"non-finite factors at \['0\+1'\]"):
        est()
    assert list(counts) == [("tolist", str(Path(lipreg.__file__).parent / "finite.py"))] and sum(counts.values()) == 1
    assert not est.check_finite()  # told once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hot_path_does_not_synchronise_the_gpu() -> None:
    for _, net, x in nets("cuda"):
        training = Training(net, x)
        training.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            training.step()
            with torch.no_grad():
                first_weight(net)[0, 0] = float("nan")
            training.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with pytest.warns(RuntimeWarning, match="non-finite Lipschitz bound"):
            training.penalty.estimator.check_finite()


@pytest.mark.parametrize("search", ["exact", "greedy"])
def test_seqlip_reads_values_only_inside_its_vertex_search(search: str) -> None:
    """The one exception to a sync-free hot path is SeqLip's combinatorial search over activation patterns: every
    host read of a SeqLip training step (penalty, bare ``est()``, backward) is made there, and as many at every step
    (a warm start: the search does not read more as training goes on)."""
    _, net, x = nets("cpu")[0]
    training = Training(net, x, method="seqlip")
    training.est = LipschitzEstimator(net, x, method="seqlip", search=search)
    training.step()
    per_step = []
    for _ in range(3):
        with counted_syncs() as counts:
            training.step()
        search_dir = Path(lipreg.__file__).parent / "bounds" / "seqlip"
        assert {Path(file).parent for _, file in counts} <= {search_dir}, dict(counts)
        per_step.append(sum(counts.values()))
    assert per_step[0] >= per_step[1] >= per_step[2]

"""Issue 18 on digits: how much each certificate certifies on the same trained weights, and what LipLT costs to train.

A ``LipCNN`` (8x8 digits: every operator small enough for dense certificates) is trained with the pairwise margin
loss (``kind="lse"``, eps 0.3, 30 % warm-up) against AutoLip (``method="autolip"``) and against LipLT
(``method="liplt"``). Each trained net is certified on the test split by every per-pair certificate, each alone:
GloRo on the certified AutoLip body (lipreg's certificate before issue 18), GloRo on the tightest body certificate,
pairwise LipLT, pairwise ECLipsE-Fast, eq. (2) on the whole net's tightest certificate, and their minimum (what
``MarginCertificate.certified()`` returns); the ceiling uses each pair's largest local Jacobian norm seen over the
test inputs (a lower bound, not a certificate). ``--overhead`` times one training step of each margin loss against
plain cross-entropy (interleaved medians, one thread).

Run: ``python -m benchmarks.certificates [--epochs 30] [--seeds 0 1] [--overhead]``.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import median_times, optimizer_step
from experiments.data import DigitsDataModule
from experiments.models import LipCNN
from lipreg.linalg.certify import certified_cast
from lipreg.losses import LipschitzMarginLoss
from lipreg.margins import MarginCertificate, global_constants, pairwise_constants
from lipreg.metrics import certified_accuracy_curve, certified_radius

RADII = (0.1, 0.3, 0.5, 1.0)


def data() -> DigitsDataModule:
    module = DigitsDataModule(batch_size=128)
    module.setup("fit")
    module.setup("test")
    return module


def train(method: str, epochs: int, seed: int, module: DigitsDataModule) -> nn.Module:
    torch.manual_seed(seed)
    model = LipCNN(module.input_shape, module.num_classes)
    loader = module.train_dataloader()
    x0 = next(iter(loader))[0]
    loss_fn = LipschitzMarginLoss(model, x0, eps=0.3, method=method, warmup=int(0.3 * epochs * len(loader)),
                                  kind="lse")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def certificates(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Every per-pair certificate ``(C, C)`` of ``model``, alone, and their minimum."""
    margins = MarginCertificate(model, x[:1])
    body = margins.estimator
    tightest_K = margins.certified()
    norms = body.layer_bounds(certified=True)
    autolip_body = math.prod(norms[node.name] for node in body.graph.linear_nodes())
    tight_body = body.certified_bound().double()
    pairs = body.certified_pairs(margins.head.weight)
    whole = type(body)(model, x[:1]).certified_bound().double()
    out = {"gloro_autolip": certified_cast(pairwise_constants(margins.head.weight, torch.tensor(autolip_body)),
                                           torch.float64),
           f"gloro_{body.certificate}": certified_cast(pairwise_constants(margins.head.weight, tight_body),
                                                       torch.float64),
           **pairs, "global_tightest": global_constants(whole, margins.n_classes), "tightest": tightest_K}
    print(f"  certificate used: {margins.certificate}; body {body.certificate}")
    return out


def ceiling(model: nn.Module, x: Tensor) -> Tensor:
    """Each pair's largest local Jacobian norm over the inputs ``x`` (a lower bound of its constant)."""
    C = model(x[:1]).shape[1]
    best = torch.zeros(C, C, dtype=torch.float64)
    for xb in x.split(64):
        J = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(xb).reshape(len(xb), C, -1).double()
        diff = J[:, :, None, :] - J[:, None, :, :]
        best = torch.maximum(best, torch.linalg.vector_norm(diff, dim=-1).amax(0))
    return best


def report(model: nn.Module, module: DigitsDataModule) -> dict[str, Any]:
    x, y = module.test_set.tensors
    with torch.no_grad():
        logits = model(x)
    rows = {**certificates(model, x), "ceiling (lower bounds)": ceiling(model, x)}
    clean = float((logits.argmax(1) == y).float().mean())
    print(f"  clean {100 * clean:.1f} %")
    print("  " + " | ".join(["certificate".ljust(24), *(f"@{r:g}" for r in RADII)]))
    out = {}
    for name, K in rows.items():
        accuracy = certified_accuracy_curve(certified_radius(logits, y, K), RADII)
        out[name] = accuracy.tolist()
        print("  " + " | ".join([name.ljust(24), *(f"{100 * float(a):.1f}" for a in accuracy)]))
    return out


def overhead(module: DigitsDataModule, batch: int = 128) -> None:
    x, y = next(iter(module.train_dataloader()))
    x, y = x[:batch], y[:batch]
    steps = {}
    for name in ("plain", "autolip", "liplt"):
        torch.manual_seed(0)
        model = LipCNN(module.input_shape, module.num_classes)
        loss_fn = F.cross_entropy if name == "plain" else LipschitzMarginLoss(model, x, eps=0.3, method=name,
                                                                              warmup=0, kind="lse")
        steps[name] = optimizer_step(model, loss_fn, x, y)
    times = median_times(steps, rounds=5, repeat=5)
    for name, seconds in times.items():
        print(f"{name:>8}: {1e3 * seconds:7.2f} ms / step  {seconds / times['plain']:5.2f} x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["autolip", "liplt"])
    parser.add_argument("--overhead", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = data()
    if args.overhead:
        overhead(module)
        return
    for method in args.methods:
        for seed in args.seeds:
            print(f"trained against {method}, seed {seed}:")
            report(train(method, args.epochs, seed, module), module)


if __name__ == "__main__":
    main()

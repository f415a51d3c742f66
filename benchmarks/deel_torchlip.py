"""Issue 18: a deel-torchlip baseline row for the Fashion-MNIST certified-training table.

The same data, schedule and evaluation as :mod:`benchmarks.certified_training` (``FashionMNISTDataModule(batch_size=128,
seed=seed)``, Adam at 1e-3 decayed to 0 on a cosine over the run, the full test set), with the net built from
deel-torchlip's 1-Lipschitz layers in the shape of :class:`experiments.models.LipCNN`::

    SpectralConv2d(1, 32, 4, stride 2, pad 1) - GroupSort2 - SpectralConv2d(32, 64, 4, stride 2, pad 1) - GroupSort2
    - Flatten - SpectralLinear(3136, 256) - GroupSort2 - FrobeniusLinear(256, 10, disjoint_neurons=True)

as in deel-torchlip's Fashion-MNIST example (``docs/notebooks/wasserstein_classification_fashionMNIST.ipynb``,
"Example 4: HKR multiclass and fooling": spectral convolutions and linear layers, GroupSort2, a FrobeniusLinear head
with disjoint neurons, Adam at 1e-3), trained by the multiclass loss that example proposes (``--loss``):

* ``lse_hkr`` (the default): ``LseHKRMulticlassLoss(alpha=0.9, min_margin=1.0, temperature=10.0)``, the
  example's default ``loss_choice``;
* ``hkr``: ``HKRMulticlassLoss(alpha=0.99, min_margin=0.25)``, the example's "robust" setting.

Chosen on one epoch, seed 0: both 85.6-85.7% clean; certified at 0.1 / 0.3 / 0.5 / 1.0 by deel's guarantee
69.8 / 47.3 / 33.2 / 14.3% (``lse_hkr``) against 69.5 / 39.6 / 18.6 / 2.9% (``hkr``).

Certified accuracy at each radius is reported twice:

* ``deel``: deel-torchlip's own guarantee, the example's certificate ``(top1 - top2) / 2`` on the deel model's
  logits (each head neuron is 1-Lipschitz by construction, ``disjoint_neurons=True``, so each logit gap is
  2-Lipschitz), counted only where the top-1 class is the label;
* ``tightest``: lipreg's certificate of the exported plain model (``vanilla_export()``: ``nn.Conv2d`` / ``nn.Linear``
  with the constrained weights), ``MarginCertificate(model, x, pairwise=True).certified()`` with
  :func:`lipreg.metrics.certified_radius`; ``global``: eq. 2 on that model's ``certified_bound()``. GroupSort2 is taught
  to lipreg for the evaluation as an op of Lipschitz constant 1 (sorting each pair of channels is a permutation of
  each pair, non-expansive in L2), with :func:`lipreg.ops.registered`: traced through, its min and max of each pair,
  concatenated, would be bounded by ``sqrt(2)``.

``export_max_abs_diff`` checks that the exported model reproduces the deel model's test logits; ``step_ratio`` is the
time of one training step (forward, loss, backward, Adam) of the deel net relative to a plain cross-entropy step of
:class:`~experiments.models.LipCNN` on the same batch, interleaved medians (``common.median_times``).

deel-torchlip is an optional dependency of this benchmark only (the library and tests never import it); install it
without letting it replace torch: ``pip install --no-deps deel-torchlip``.

Run: ``python -m benchmarks.deel_torchlip [--loss lse_hkr] [--seeds 0 1] [--epochs 6] [--limit-batches N]
[--out results.jsonl]``. One thread, as in the other benchmarks.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import median_times, optimizer_step, train_epochs
from experiments.data import FashionMNISTDataModule
from experiments.models import LipCNN
from lipreg import LipschitzEstimator
from lipreg.margins import MarginCertificate, global_constants, split_linear_head
from lipreg.metrics import certified_accuracy_curve, certified_radius
from lipreg.ops import registered

try:
    from deel import torchlip
except ImportError as error:  # pragma: no cover - an optional dependency of this benchmark only
    raise SystemExit("benchmarks.deel_torchlip needs deel-torchlip: pip install --no-deps deel-torchlip") from error

RADII = (0.1, 0.3, 0.5, 1.0)
NUM_CLASSES = 10
LOSSES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "hkr": ("HKRMulticlassLoss(alpha=0.99, min_margin=0.25)",
            lambda: torchlip.HKRMulticlassLoss(alpha=0.99, min_margin=0.25)),
    "lse_hkr": ("LseHKRMulticlassLoss(alpha=0.9, min_margin=1.0, temperature=10.0)",
                lambda: torchlip.LseHKRMulticlassLoss(alpha=0.9, min_margin=1.0, temperature=10.0)),
}
MODEL = ("SpectralConv2d(1,32,4,s2,p1)-GroupSort2-SpectralConv2d(32,64,4,s2,p1)-GroupSort2-Flatten-"
         "SpectralLinear(3136,256)-GroupSort2-FrobeniusLinear(256,10,disjoint_neurons=True)")


def deel_model(channels: tuple[int, int] = (32, 64), hidden: int = 256) -> nn.Module:
    """:class:`~experiments.models.LipCNN`'s shape (28x28 -> 14x14 -> 7x7) in deel-torchlip's 1-Lipschitz layers."""
    c1, c2 = channels
    return torchlip.Sequential(
        torchlip.SpectralConv2d(1, c1, kernel_size=4, stride=2, padding=1), torchlip.GroupSort2(),
        torchlip.SpectralConv2d(c1, c2, kernel_size=4, stride=2, padding=1), torchlip.GroupSort2(),
        nn.Flatten(), torchlip.SpectralLinear(c2 * 7 * 7, hidden), torchlip.GroupSort2(),
        torchlip.FrobeniusLinear(hidden, NUM_CLASSES, disjoint_neurons=True),
        k_coef_lip=1.0,
    )


def one_hot_loss(loss: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """deel's multiclass losses take one-hot targets."""
    return lambda logits, y: loss(logits, F.one_hot(y, NUM_CLASSES).to(logits.dtype))


def deel_radius(logits: Tensor, y: Tensor) -> Tensor:
    """deel-torchlip's certificate (its Fashion-MNIST example, ``disjoint_neurons=True`` head): ``(top1 - top2) / 2``
    where the top-1 class is the label, else 0."""
    top = logits.to(torch.float64).topk(2, dim=1)
    gap = top.values[:, 0] - top.values[:, 1]
    return torch.where(top.indices[:, 0] == y, gap / 2, torch.zeros_like(gap))


def curve_of(radii: Tensor) -> dict[str, float]:
    return dict(zip(map(str, RADII), certified_accuracy_curve(radii, RADII).tolist()))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Clean accuracy, deel's certified accuracy on the deel model's logits, and lipreg's (pairwise ``tightest``
    and ``global``) on the exported plain model's."""
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(1000)])
    plain = model.vanilla_export().eval()
    plain_logits = torch.cat([plain(xb) for xb in x.split(1000)])
    out: dict[str, Any] = {"clean": float((logits.argmax(1) == y).float().mean()),
                           "export_max_abs_diff": float((plain_logits - logits).abs().max()),
                           "deel": curve_of(deel_radius(logits, y))}
    start = time.perf_counter()
    with registered(torchlip.GroupSort2, 1.0):
        x0 = x[:1]
        K = MarginCertificate(plain, x0, pairwise=True).certified()
        global_K = global_constants(LipschitzEstimator(plain, x0).certified_bound().to(torch.float64), NUM_CLASSES)
        body, _ = split_linear_head(plain, x0)
        body_bound = math.prod(LipschitzEstimator(body, x0).layer_bounds(certified=True).values())
    out["certify_s"] = time.perf_counter() - start
    radii = certified_radius(plain_logits, y, K)
    out["tightest"] = curve_of(radii)
    out["global"] = curve_of(certified_radius(plain_logits, y, global_K))
    off = ~torch.eye(NUM_CLASSES, dtype=torch.bool)
    out["K_tightest"] = [float(K[off].min()), float(K[off].max())]  # deel's guarantee is K = 2 for every pair
    out["body_bound"] = float(body_bound)
    grid = torch.linspace(0, 1.5, 31)
    out["curve"] = [grid.tolist(), certified_accuracy_curve(radii, grid).tolist()]
    out["curve_deel"] = [grid.tolist(), certified_accuracy_curve(deel_radius(logits, y), grid).tolist()]
    return out


def step_ratio(loss_name: str, x: Tensor, y: Tensor, seed: int) -> dict[str, float]:
    """Seconds per training step of the deel net under its loss and of LipCNN under plain cross-entropy, timed
    interleaved on one batch (medians), and their ratio."""
    torch.manual_seed(seed)
    plain = LipCNN((1, 28, 28), NUM_CLASSES)
    deel = deel_model()
    times = median_times({"plain": optimizer_step(plain, F.cross_entropy, x, y),
                          "deel": optimizer_step(deel, one_hot_loss(LOSSES[loss_name][1]()), x, y)},
                         rounds=5, repeat=3)
    return {"step_s": times["deel"], "plain_step_s": times["plain"], "step_ratio": times["deel"] / times["plain"]}


def train_row(loss_name: str, epochs: int, limit_batches: int | None = None, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    data = FashionMNISTDataModule(batch_size=128, seed=seed)
    data.setup("fit")
    data.setup("test")
    loader = data.train_dataloader()
    steps = epochs * min(limit_batches or len(loader), len(loader))
    x0, y0 = next(iter(loader))
    timing = step_ratio(loss_name, x0, y0, seed)
    torch.manual_seed(seed)
    model = deel_model()
    loss_fn = one_hot_loss(LOSSES[loss_name][1]())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    epoch_times = train_epochs(model, loss_fn, loader, optimizer, schedule, epochs, limit_batches)
    x_test, y_test = data.test_set.tensors
    return {"row": f"deel_{loss_name}", "data": "fashion_mnist", "seed": seed, "epochs": epochs,
            "s_per_epoch": sum(epoch_times) / epochs, "model": MODEL, "loss": LOSSES[loss_name][0],
            "deel_torchlip": torchlip.__version__, **timing, **evaluate(model, x_test, y_test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", default="lse_hkr", choices=LOSSES)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit-batches", type=int, default=None)
    parser.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        result = train_row(args.loss, args.epochs, args.limit_batches, seed)
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("curve")}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Issue 6: the cost of ``certified_bound()`` relative to one warm estimate and to a training step, and the gap
certified / exact, per model and per layer.  Issue 10 item 3: certified / exact and certified / converged of conv +
batch norm segments with spread-out BN scales (the per-channel gains folded into the kernel before the FFT bound),
against the product of the two certificates (``unfolded``, what was computed before).  Issue 12 (c): the time of
``certified_bound()`` on a 6-conv CNN at 3x32x32 against one training step at batch 128, and its certified /
converged ratio; and on a ResNet-18-shaped CIFAR network (BasicBlocks 64-128-256-512, 3x32x32, BN): its time, peak
memory and certified / converged ratio.  Run: ``python -m benchmarks.certify`` (``--section
digits|folding|cnn6|resnet18`` for one part).
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import resource
import time
from collections.abc import Callable

import torch
from torch import nn

import lipreg
from benchmarks.common import BATCH, digits_batch, median_times, models, train_step_fn
from experiments.models import CNN
from lipreg.linalg.conv import conv_spectral_bound

F64 = torch.float64


def exact_factor(operator: lipreg.LinearOperator) -> float:
    """The exact norm of a (fused) linear operator: the largest singular value of its dense matrix (float64)."""
    return float(torch.linalg.matrix_norm(operator.in_float64().dense(), 2))


def digits() -> None:
    x, y = digits_batch()
    torch.manual_seed(0)
    cases = {name: (model, x, y) for name, model in models().items()}
    # 28x28 inputs (Fashion-MNIST's shape): convolutions too large for a dense matrix take the FFT bound
    cases["cnn28"] = (CNN((1, 28, 28), 10), torch.rand(BATCH, 1, 28, 28), y)
    print(f"{'model':8s} {'certified':>10s} {'/estimate':>10s} {'/step':>7s} {'no-grad':>12s} {'every 50 steps':>15s}")
    for name, (model, x, y) in cases.items():
        estimator = lipreg.LipschitzEstimator(model, x)
        step = train_step_fn(model, x, y)
        def logged() -> None:  # what the callback pays every certify_every_n_steps: no graph kept
            with torch.no_grad():
                estimator.certified_bound()

        times = median_times({"step": step, "estimate": lambda: estimator(), "certified": estimator.certified_bound,
                              "logged": logged}, rounds=5, repeat=2)
        share = times["logged"] / (50 * times["step"])
        print(f"{name:8s} {times['certified'] * 1e3:8.1f}ms {times['certified'] / times['estimate']:10.1f} "
              f"{times['certified'] / times['step']:7.2f} {times['logged'] * 1e3:10.1f}ms {share:14.1%}")
        with torch.no_grad():
            for name, operator in estimator.linear_operators().items():
                certified = float(operator.certified_norm())
                print(f"    {name:28s} certified/exact = {certified / exact_factor(operator):.6f}")


# ----------------------------------------------------------------------------- issue 10 item 3: folding
def spread_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Every BN weight log-uniform over 1e-2 .. 1e2 (random signs), running variances over 0.1 .. 10: the spread
    per-channel gains a trained network ends up with (issue 10: 0.129 .. 192 in the penalised Fashion CNN)."""
    generator = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        n = bn.num_features
        sign = torch.where(torch.rand(n, generator=generator) < 0.3, -1.0, 1.0)
        bn.weight.data = sign * torch.exp(torch.empty(n).uniform_(-math.log(100), math.log(100), generator=generator))
        bn.running_var = torch.exp(torch.empty(n).uniform_(-math.log(10), math.log(10), generator=generator))
    return model.eval()


def gram_exact_norm(segment: nn.Module, shape: tuple[int, ...], chunk: int = 256) -> float:
    """Exact sigma_1 of the linear part of ``segment`` (float64): sqrt(lambda_max(A^T A)), A^T A built column by
    column as the adjoint (autograd) of A applied to the identity basis."""
    segment = copy.deepcopy(segment).to(F64)
    n = math.prod(shape)
    zero = segment(torch.zeros(1, *shape, dtype=F64)).detach()
    gram = torch.empty(n, n, dtype=F64)
    for start in range(0, n, chunk):
        basis = torch.eye(n, dtype=F64)[start:start + chunk].view(-1, *shape).requires_grad_(True)
        out = segment(basis) - zero
        (rows,) = torch.autograd.grad(out, basis, out.detach())
        gram[start:start + chunk] = rows.reshape(-1, n)
    return float(torch.linalg.eigvalsh(gram)[-1].sqrt())


def unfolded(conv: nn.Conv2d, bn: nn.BatchNorm2d, spatial: tuple[int, int]) -> float:
    """The product of the conv's FFT certificate and the BN's largest gain (the certificate before folding)."""
    gains = bn.weight.detach().to(F64).abs() / torch.sqrt(bn.running_var.to(F64) + bn.eps)
    fft = conv_spectral_bound(conv.weight.detach().to(F64), spatial, padding=conv.padding, dense_max_entries=0)
    return float(fft) * float(gains.max())


def folding() -> None:
    segments = {  # name: (c_in, c_out, size, exact reference affordable)
        "28x28 1->32": (1, 32, 28, True), "28x28 32->32": (32, 32, 28, False),
        "32x32 3->64": (3, 64, 32, True), "32x32 64->64": (64, 64, 32, False),
    }
    print(f"\nconv3x3(pad 1) + BN, BN gains log-uniform 1e-2..1e2\n{'segment':14s} {'certified/exact':>16s} "
          f"{'certified/converged':>20s} {'unfolded/converged':>19s}")
    for seed, (name, (c_in, c_out, size, affordable)) in enumerate(segments.items()):
        torch.manual_seed(seed)
        segment = spread_batch_norms(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)), seed)
        x = torch.randn(2, c_in, size, size)
        estimator = lipreg.LipschitzEstimator(segment, x)
        certified = float(estimator.certified_bound())
        converged = float(estimator.converge(tol=1e-9))
        exact = gram_exact_norm(segment, (c_in, size, size)) if affordable else float("nan")
        print(f"{name:14s} {certified / exact:16.5f} {certified / converged:20.5f} "
              f"{unfolded(segment[0], segment[1], (size, size)) / converged:19.3f}")
    torch.manual_seed(0)
    model = spread_batch_norms(CNN((1, 28, 28), 10), 7)
    estimator = lipreg.LipschitzEstimator(model, torch.rand(2, 1, 28, 28))
    certified = float(estimator.certified_bound())
    converged = float(estimator.converge(tol=1e-9))
    certified_layers, converged_layers = estimator.layer_bounds(certified=True), estimator.layer_bounds()
    print(f"Fashion-MNIST CNN (issue 10), spread BN: certified / converged = {certified / converged:.5f}")
    for name in (n.name for n in estimator.graph.linear_nodes()):
        print(f"    {name:36s} certified/converged = {certified_layers[name] / converged_layers[name]:.5f}")


# ----------------------------------------------------------------------------- issue 12 (c): the 6-conv CNN
def six_conv_cnn(channels: tuple[int, ...] = (64, 64, 128, 128, 128, 128), classes: int = 10) -> nn.Module:
    """conv3x3(pad 1)-BN-ReLU x 6 at full 3x32x32 resolution, global average pool, linear head."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def cnn6() -> None:
    torch.manual_seed(0)
    model = spread_batch_norms(six_conv_cnn(), 11)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    estimator = lipreg.LipschitzEstimator(model, x)
    step = train_step_fn(model, x, y)  # trains in train mode: restore the eval statistics afterwards
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    times = median_times({"step": step, "certified": estimator.certified_bound}, rounds=3, repeat=1)
    model.load_state_dict(state)
    model.eval()
    certified = float(estimator.certified_bound())
    converged = float(estimator.converge(tol=1e-9))
    print(f"\n6-conv CNN 3x32x32, batch {BATCH}, spread BN: certified_bound() {times['certified']:.2f} s = "
          f"{times['certified'] / times['step']:.2f} training steps ({times['step']:.2f} s); "
          f"certified / converged = {certified / converged:.5f}")


# ----------------------------------------------------------------------------- issue 12 (c): ResNet-18
class ResBlock(nn.Module):
    """ResNet BasicBlock: ``relu(shortcut(x) + BN(conv3x3(relu(BN(conv3x3_stride(x))))))``, the shortcut a 1x1
    stride conv + BN when the shape changes, the identity otherwise."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-18: conv3x3(3 -> 64)-BN-ReLU stem at 32x32, 2 BasicBlocks per stage at 64, 128, 256, 512
    channels (stride 2 from the second stage), global average pool, linear head."""
    blocks: list[nn.Module] = []
    c_in = 64
    for stage, c_out in enumerate((64, 128, 256, 512)):
        blocks += [ResBlock(c_in, c_out, 1 if stage == 0 else 2), ResBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def timed_peak(fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds of one call of ``fn`` and the rise of the process's peak resident memory during it (MiB): the rise
    above the peak so far, so measured before anything larger (a training step) has run."""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def resnet() -> None:
    torch.manual_seed(0)
    model = spread_batch_norms(resnet18(), 13)
    estimator = lipreg.LipschitzEstimator(model, torch.randn(2, 3, 32, 32))
    def logged() -> None:
        with torch.no_grad():
            estimator.certified_bound()

    no_grad_s, no_grad_mib = timed_peak(logged)  # first: the peak so far is only the traced sample's
    grad_s, grad_mib = timed_peak(estimator.certified_bound)
    certified = float(estimator.certified_bound())
    converged_s, _ = timed_peak(lambda: estimator.converge(tol=1e-6, max_iter=300))
    converged = float(estimator(n_iter=0))
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step = median_times({"step": train_step_fn(model.train(), x, y)}, rounds=2, repeat=1)["step"]
    model.load_state_dict(state)
    model.eval()
    print(f"\nResNet-18 3x32x32 ({len(estimator.graph.linear_nodes())} linear operators), spread BN: "
          f"certified_bound() {grad_s:.2f} s = {grad_s / step:.2f} training steps at batch {BATCH} ({step:.2f} s), "
          f"peak memory +{grad_mib:.0f} MiB; under no_grad {no_grad_s:.2f} s, +{no_grad_mib:.0f} MiB; "
          f"converge(tol=1e-6, max_iter=300) {converged_s:.1f} s; certified / converged = {certified / converged:.4f}")


SECTIONS: dict[str, Callable[[], None]] = {"digits": digits, "folding": folding, "cnn6": cnn6, "resnet18": resnet}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--section", choices=tuple(SECTIONS), help="run this part only (default: all)")
    section = parser.parse_args().section
    torch.set_num_threads(1)  # one thread: fastest for small nets and least noisy on a shared 2-core machine
    for name, part in SECTIONS.items():
        if section in (None, name):
            part()


if __name__ == "__main__":
    main()

"""Small classifiers, data and a LightningModule for the library's tests, so that they need nothing of
``experiments/`` (whose own tests live in ``tests/experiments``).

The data are ten seeded Gaussian clusters of 8x8 single-channel images (``blobs``): separable enough that a few
epochs reach a high accuracy, so a penalty's effect on the bound and the certified accuracy can be measured.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

SHAPE = (1, 8, 8)
CLASSES = 10
EXAMPLE = torch.zeros(1, *SHAPE)


class MLP(nn.Module):
    """``net = Flatten - [Linear - ReLU] x len(hidden) - Linear``."""

    def __init__(self, hidden: Sequence[int] = (16,), classes: int = CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    """``features = [conv3x3 - BatchNorm - ReLU - MaxPool2d(2)] x len(channels)``, ``classifier = Flatten - Linear -
    ReLU - Linear``."""

    def __init__(self, channels: Sequence[int] = (8, 16), hidden: int = 32, classes: int = CLASSES) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c, size = 1, 8
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c, size = out, size // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(),
                                        nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LipCNN(nn.Module):
    """BN-free, ending in a plain ``nn.Linear`` (per-pair margins): ``[conv4x4 stride 2 - ReLU] x 2 - Flatten -
    Linear - ReLU - Linear``."""

    def __init__(self, channels: Sequence[int] = (8, 16), hidden: int = 32, classes: int = CLASSES) -> None:
        super().__init__()
        c, layers = 1, []
        for out in channels:
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.ReLU()]
            c = out
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 2 * 2, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def blobs(n: int, seed: int = 0, spread: float = 0.8) -> TensorDataset:
    """``n`` images of ten Gaussian clusters (unit-norm centres scaled by 4, isotropic noise ``spread``)."""
    generator = torch.Generator().manual_seed(1234)  # the same centres for every split
    centres = F.normalize(torch.randn(CLASSES, 64, generator=generator), dim=1) * 4.0
    generator.manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = centres[y] + spread * torch.randn(n, 64, generator=generator)
    return TensorDataset(x.reshape(n, *SHAPE), y)


class BlobsData(pl.LightningDataModule):
    """Train / val / test splits of :func:`blobs`, in a fixed order (no shuffling: a resumed fit sees the same
    batches)."""

    def __init__(self, batch_size: int = 32, train: int = 512, evaluation: int = 128) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.sets = {"train": blobs(train, seed=0), "val": blobs(evaluation, seed=1), "test": blobs(evaluation, 2)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=self.batch_size)


class Classifier(pl.LightningModule):
    """Cross-entropy on ``net`` with SGD, plus ``lip_penalty()`` when one is given (a module on this one, so the
    callback finds it); logs ``train/loss``, ``val/acc``, ``test/acc``."""

    def __init__(self, net: nn.Module, lr: float = 1e-2, lip_penalty: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.lip_penalty = lip_penalty
        self.example_input_array = EXAMPLE

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.lip_penalty is not None:
            loss = loss + self.lip_penalty()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

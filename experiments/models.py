"""Plain ``nn.Module`` networks for the experiments, plus the Lightning ``Classifier`` that trains them.

Every network:

* takes ``input_shape`` (one example, without the batch dimension) and
  ``num_classes`` first, so Hydra can build it with
  ``_target_: experiments.models.MLP`` and ``input_shape``/``num_classes``
  taken from the datamodule; list-valued args (from YAML) are accepted;
* keeps ``input_shape`` and ``num_classes`` as attributes;
* is built only from ``nn`` layers (``Linear``, ``Conv2d``, ``BatchNorm2d``,
  ``ReLU`` & co, ``MaxPool2d``, ``AdaptiveAvgPool2d``, ``Flatten``,
  ``Dropout``) and ``x + body(x)`` / ``torch.relu`` for residuals, with no
  data-dependent control flow, so ``torch.fx.symbolic_trace`` works on it.

The convolutional networks (``CNN``, ``AlexNetSmall``, ``ResNetSmall``) are
2-D only: ``input_shape`` must be ``(channels, height, width)``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ACTIVATIONS", "MLP", "CNN", "LipCNN", "AlexNetSmall", "ResNetSmall", "BasicBlock", "Classifier"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def _shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    return shape


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    shape = _shape(input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"{model} is a 2-D convolutional network and needs input_shape=(channels, height, width); "
            f"got {shape}. Use MLP for 1-D or flat inputs."
        )
    return shape  # type: ignore[return-value]


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def _pool_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MLP(nn.Module):
    """Flatten, then ``Linear``-activation layers of sizes ``hidden``, then a ``Linear`` to ``num_classes``.

    ``activation`` is one of ``relu``, ``tanh``, ``sigmoid``, ``leaky_relu``,
    ``elu``, ``softplus``, ``gelu``, ``silu``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.input_shape = _shape(input_shape)
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(self.input_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), _activation(activation)]
            width = int(h)
        layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """``[conv3x3(pad 1) - BatchNorm2d - ReLU - MaxPool2d(2)] x len(channels)``, flatten, linear, ReLU, linear.

    Each block halves the spatial size (floor): 8x8 -> 4x4 -> 2x2 and
    28x28 -> 14x14 -> 7x7 with the default two blocks.  Raises ``ValueError``
    if the input is not ``(C, H, W)`` or too small for the number of blocks.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "CNN")
        self.input_shape = (c, h, w)
        self.num_classes = int(num_classes)
        blocks: list[nn.Module] = []
        for out_c in channels:
            out_c = int(out_c)
            if h < 2 or w < 2:
                raise ValueError(
                    f"CNN: input {self.input_shape} is too small for {len(channels)} conv/max-pool blocks "
                    f"(spatial size would drop below 1); use fewer channels entries"
                )
            blocks += [
                nn.Conv2d(c, out_c, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c, h, w = out_c, h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, int(hidden)),
            nn.ReLU(),
            nn.Linear(int(hidden), self.num_classes),
        )
        self.feature_shape = (c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LipCNN(nn.Module):
    """BN-free CNN for certified training: ``[conv4x4(stride 2, pad 1) - ReLU] x len(channels)``, flatten,
    ``Linear(hidden) - ReLU - Linear(num_classes)``.

    No batch norm (its eval-mode bound would not be the training function's, see
    :func:`lipreg.penalty.warn_batch_statistics`) and no pooling; the last layer is a plain ``nn.Linear``, so
    :class:`lipreg.LipschitzMarginLoss` uses per-pair (GloRo) margins. Each conv halves the spatial size:
    28x28 -> 14x14 -> 7x7 (Fashion-MNIST), 8x8 -> 4x4 -> 2x2 (digits).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "LipCNN")
        self.input_shape = (c, h, w)
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = []
        for out_c in channels:
            if h < 2 or w < 2:
                raise ValueError(f"LipCNN: input {self.input_shape} is too small for {len(channels)} stride-2 convs")
            layers += [nn.Conv2d(c, int(out_c), kernel_size=4, stride=2, padding=1), nn.ReLU()]
            c, h, w = int(out_c), _pool_out(h, 4, 2, 1), _pool_out(w, 4, 2, 1)
        self.net = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(c * h * w, int(hidden)), nn.ReLU(), nn.Linear(int(hidden), self.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlexNetSmall(nn.Module):
    """AlexNet's layout (Krizhevsky et al. 2012) sized for small images.

    Features: five 3x3 convolutions (padding 1, stride 1) each followed by
    ReLU, with an overlapping max-pool ``MaxPool2d(3, stride=2, padding=1)``
    after conv1, conv2 and conv5 (as in AlexNet) -- a pool is left out where
    the map is already 1 pixel wide, so sizes never drop below 1.  Then
    ``AdaptiveAvgPool2d`` to at most ``avgpool_size`` x ``avgpool_size``, and the
    classifier ``Dropout - Linear(hidden) - ReLU - Dropout - Linear(hidden) - ReLU - Linear(num_classes)``.

    Spatial sizes (each pool maps ``s`` to ``ceil(s / 2)``):

    * 8x8 digits: conv1 8x8 -> pool 4x4 -> conv2 4x4 -> pool 2x2 -> conv3..5 2x2
      -> pool 1x1 -> avgpool 1x1; flattened features ``channels[4] * 1``.
    * 28x28 (Fashion-)MNIST: 28 -> 14 -> 7 -> pool 4x4 -> avgpool 2x2;
      flattened features ``channels[4] * 4``.
    * 32x32: 32 -> 16 -> 8 -> 4 -> avgpool 2x2.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 96, 96, 64),
        hidden: int = 256,
        dropout: float = 0.5,
        avgpool_size: int = 2,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "AlexNetSmall")
        if len(channels) != 5:
            raise ValueError(f"AlexNetSmall needs 5 conv widths, got channels={tuple(channels)}")
        self.input_shape = (c, h, w)
        self.num_classes = int(num_classes)
        pool_after = {0, 1, 4}
        layers: list[nn.Module] = []
        for i, out_c in enumerate(channels):
            out_c = int(out_c)
            layers += [nn.Conv2d(c, out_c, kernel_size=3, padding=1), nn.ReLU()]
            c = out_c
            if i in pool_after and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
                h, w = _pool_out(h, 3, 2, 1), _pool_out(w, 3, 2, 1)
        self.features = nn.Sequential(*layers)
        ah, aw = min(h, int(avgpool_size)), min(w, int(avgpool_size))
        self.avgpool = nn.AdaptiveAvgPool2d((ah, aw))
        self.feature_shape = (c, ah, aw)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * ah * aw, int(hidden)),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(int(hidden), int(hidden)),
            nn.ReLU(),
            nn.Linear(int(hidden), self.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class BasicBlock(nn.Module):
    """ResNet basic block with an identity shortcut: ``relu(x + BN(conv(relu(BN(conv(x))))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.body(x)
        return torch.relu(out)


class ResNetSmall(nn.Module):
    """Conv3x3 stem (``width`` channels) - BN - ReLU, ``blocks`` identity-shortcut :class:`BasicBlock` s,
    global average pooling, flatten, ``Linear(width, num_classes)``.  Resolution is kept throughout.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "ResNetSmall")
        self.input_shape = (c, h, w)
        self.num_classes = int(num_classes)
        width = int(width)
        self.stem = nn.Sequential(
            nn.Conv2d(c, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.layers = nn.Sequential(*[BasicBlock(width) for _ in range(int(blocks))])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, self.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class ClassifierSteps:
    """Cross-entropy (or Lipschitz-margin) classification of ``net`` with Adam: the steps of :class:`Classifier`,
    on no Lightning base.

    Args:
        net: the network; its ``input_shape``/``num_classes`` attributes are
            used unless given here.
        lr, weight_decay: Adam's.
        lip_penalty: optional ``(net, example_input) -> penalty module`` (e.g. a partial of
            :class:`lipreg.LipschitzPenalty`), built on ``net``; the training loss is then
            ``task loss + lip_penalty()`` (a ``LipschitzCallback`` logs the penalty as ``lipschitz/penalty``).
        margin_loss: optional ``(net, example_input) -> loss module`` (e.g. a partial of
            :class:`lipreg.LipschitzMarginLoss`); when given, ``margin_loss(logits, y)`` replaces the training
            cross-entropy (validation and test still report the plain cross-entropy).
        lr_schedule: ``None`` (constant ``lr``) or ``"cosine"`` (decayed to 0 over the run's optimizer steps).
        input_shape, num_classes: override/supply what ``net`` does not carry.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
    ``test/loss``, ``test/acc`` (epoch-level; ``train/loss`` also per step).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lip_penalty: Callable[[nn.Module, torch.Tensor], nn.Module] | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        margin_loss: Callable[[nn.Module, torch.Tensor], nn.Module] | None = None,
        lr_schedule: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "lip_penalty", "margin_loss"])
        self.net = net
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        if lr_schedule not in (None, "cosine"):
            raise ValueError(f"lr_schedule must be None or 'cosine', got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        shape = input_shape if input_shape is not None else getattr(net, "input_shape", None)
        n_cls = num_classes if num_classes is not None else getattr(net, "num_classes", None)
        if shape is None or n_cls is None:
            raise ValueError("Classifier needs input_shape and num_classes (pass them, or use a net that has them)")
        self.input_shape = _shape(shape)
        self.num_classes = int(n_cls)
        self.hparams["input_shape"] = list(self.input_shape)  # record the resolved values
        self.hparams["num_classes"] = self.num_classes
        self.example_input_array = torch.zeros(1, *self.input_shape)
        self.margin_loss = margin_loss(net, self.example_input_array) if margin_loss is not None else None
        self.lip_penalty = lip_penalty(net, self.example_input_array) if lip_penalty is not None else None
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.margin_loss(logits, y) if self.margin_loss is not None else F.cross_entropy(logits, y)
        if self.lip_penalty is not None:
            loss = loss + self.lip_penalty()
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule is None:
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Classifier(ClassifierSteps, pl.LightningModule):
    """:class:`ClassifierSteps` as a ``pytorch_lightning.LightningModule`` (``experiments/train.py`` puts the same
    steps on ``lightning.pytorch.LightningModule`` when the trainer is ``lightning.pytorch.Trainer``)."""

"""The callback's penalty as part of the loss: ``training_step`` shadowed so that it returns ``loss + penalty()``.

The penalty then joins the loss Lightning scales (AMP), divides (gradient accumulation) and averages (DDP), exactly
as an explicit loss term; a gradient added from a callback hook would not be. The task loss and the penalty are
logged apart (``lipschitz/task_loss``, ``lipschitz/penalty``).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import keys
from .source import EstimatorSource

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


class PenalisedStep:
    """Shadows ``pl_module.training_step`` with an instance attribute (Lightning, and its DDP wrapper, look it up at
    each call) until :meth:`remove`. The penalty is ``source.penalty()``, built by the end of the first step."""

    def __init__(self, pl_module: LightningModule, source: EstimatorSource) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            source.build_captured(pl_module.trainer, pl_module)
            if output is None or source.unsupported:
                return output
            source.require()
            penalty = source.penalty()
            task_loss = output["loss"] if isinstance(output, Mapping) else output
            pl_module.log(keys.TASK_LOSS, task_loss.detach(), on_step=True, on_epoch=False)
            pl_module.log(keys.PENALTY, penalty.detach(), on_step=True, on_epoch=False)
            if isinstance(output, Mapping):
                return {**output, "loss": task_loss + penalty}
            return output + penalty

        pl_module.training_step = training_step
        self._wrapped = (pl_module, training_step)

    def remove(self) -> None:
        """Give the module its own ``training_step`` back (unless someone shadowed it again since)."""
        module, step = self._wrapped
        if vars(module).get("training_step") is step:
            del module.training_step

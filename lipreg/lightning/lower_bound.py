"""The empirical lower bound of one pass over data (a validation epoch of the callback, or the end-of-run evaluation
of ``experiments/estimate.py``): the largest local Jacobian norm of the bounded model on the first ``batches``
batches (:class:`~lipreg.metrics.EmpiricalLipschitz`, a valid lower bound of the true constant: Scaman & Virmaux
2018, Thm. 1), reported with the bracket ``certified / lower``. Nothing here imports Lightning."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import keys
from ..metrics import EmpiricalLipschitz, upper_over_lower


class LowerBoundPass:
    """The running lower bound of one pass, on at most ``batches`` batches (with ``ascent_steps`` of gradient
    ascent on the inputs)."""

    def __init__(self, model: nn.Module, batches: int, ascent_steps: int, device: torch.device | str = "cpu") -> None:
        self.batches = batches
        self.metric = EmpiricalLipschitz(model, ascent_steps=ascent_steps).to(device)

    def update(self, x: Tensor, batch_idx: int) -> None:
        if batch_idx < self.batches:
            self.metric.update(x)

    def compute(self, certified: Tensor | float) -> dict[str, Tensor]:
        """``lipschitz/lower`` and ``lipschitz/upper_over_lower`` against the ``certified`` bound (0-dim tensors)."""
        lower = self.metric.compute()
        return {keys.LOWER: lower, keys.UPPER_OVER_LOWER: upper_over_lower(certified, lower)}

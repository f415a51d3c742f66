"""Taking the bounded module's input and the label out of a batch: ``batch[0]`` and ``batch[1]`` by default;
``LipschitzCallback(batch_to_input=..., batch_to_target=...)`` for any other batch (a dict, a dataclass...)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def default_batch_input(batch: Any) -> Tensor:
    """The input of a ``(x, y, ...)`` batch, or the batch itself when it is one tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return batch[0]
    raise TypeError(f"LipschitzCallback: cannot take the input out of a batch of type {type(batch).__name__}; pass "
                    "batch_to_input=..., e.g. LipschitzCallback(batch_to_input=lambda batch: batch['image'])")


def default_batch_target(batch: Any) -> Tensor:
    """The label of a ``(x, y, ...)`` batch."""
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 1:
        return batch[1]
    raise TypeError(f"LipschitzCallback: cannot take the label out of a batch of type {type(batch).__name__} for "
                    "the certified robust accuracy; pass batch_to_target=..., e.g. lambda batch: batch['label'], "
                    "or robust_eps=None to turn the robust metrics off")

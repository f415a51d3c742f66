"""The estimator's warnings, each pointing at the user's line: a non-finite bound and its cause, a re-trace.

A non-finite bound costs no host synchronisation on the hot path: :func:`watch` gates its gradient and records it
on the device (:mod:`lipreg.finite`); :func:`report` reads the record (one synchronisation) with the flags of the
model's weights, and :func:`warn_non_finite` names the cause: NaN or inf weights, a norm that overflows the dtype,
or finite factors whose bound overflows it.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .capture.graph import LipNode
from .capture.source import LIBRARY_DIRS
from .finite import NonFiniteRecord, finite_bound, zero_gradient_unless


def watch(record: NonFiniteRecord, bound: Tensor, factors: Sequence[Tensor], named: Mapping[str, Tensor]) -> None:
    """No host synchronisation: a non-finite ``bound`` gets an exact zero gradient through every one of ``factors``
    (:func:`~lipreg.finite.zero_gradient_unless`) and is recorded, with the ``named`` factors, on the device."""
    finite = finite_bound(bound)
    zero_gradient_unless(finite, factors)
    record.record(finite, bound, dict(named))


def report(record: NonFiniteRecord, model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``record`` holds a non-finite bound since it was last read; if so, :func:`warn_non_finite` names its
    non-finite factors and the model's non-finite parameters on ``device``, read in the same synchronisation."""
    named = [(name, p) for name, p in model.named_parameters() if p.device == device]

    def finite_weights() -> Tensor:  # read with the record, in its one synchronisation
        flags = [torch.isfinite(p.detach()).all() for _, p in named]
        return torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool, device=device)

    def warn(bound: float, bad: list[str], finite: list[bool]) -> None:
        bad_weights = [name for (name, _), ok in zip(named, finite) if not ok]
        warn_non_finite(bound, bad, dtype, bad_weights)

    return record.report(warn, finite_weights)


def check_certificate(bound: Tensor, factors: Mapping[LipNode, Tensor], model: nn.Module, dtype: torch.dtype) -> None:
    """:func:`warn_non_finite` if a certificate ``bound`` is not finite (host reads: off the hot path)."""
    if not math.isfinite(float(bound.detach())):
        bad_weights = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        bad = [node.name for node, f in factors.items() if not math.isfinite(float(f.detach()))]
        warn_non_finite(float(bound.detach()), bad, dtype, bad_weights)


def warn_non_finite(bound: float, bad: list[str], dtype: torch.dtype, bad_weights: list[str]) -> None:
    """The warning of :meth:`LipschitzEstimator.check_finite`, naming the cause: NaN or inf weights (``bad_weights``,
    the model's non-finite parameters now), a norm that overflows ``dtype`` from finite weights, or finite factors
    whose bound exceeds ``dtype``'s largest value."""
    largest = f"{dtype}'s largest value, {torch.finfo(dtype).max:.3g}"
    if bad and bad_weights:
        cause = (f"non-finite factors at {bad}: the weights hold NaN or inf (parameters {bad_weights}). Those "
                 "operators kept their previous warm vectors")
    elif bad:
        cause = (f"non-finite factors at {bad} although every weight is finite now: their norms exceed {largest} "
                 "(or the weights were NaN or inf at that call); rescale them or use dtype=torch.float64. Those "
                 "operators kept their previous warm vectors")
    else:
        cause = f"every factor is finite, and the bound they give exceeds {largest}: use dtype=torch.float64"
    warnings.warn(f"non-finite Lipschitz bound ({bound}) since the last check: {cause}. Its gradient was 0, so the "
                  "penalty is skipped for those steps (a LipschitzPenalty added 0, a LipschitzMarginLoss was the "
                  "plain cross-entropy)", RuntimeWarning, stacklevel=user_stacklevel())


def warn_retraced(change: str) -> None:
    """The warning of an estimator that traces its model again, saying what changed."""
    warnings.warn(f"the model changed since this LipschitzEstimator was built: {change}. It is traced again, "
                  "and the bound is that of the model as it is now", stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by the caller that points at the user's line: the frames of lipreg,
    torch (``nn.Module.__call__``) and contextlib in between are skipped."""
    frame, level = sys._getframe(1), 1  # the caller, at stacklevel 1
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(LIBRARY_DIRS)
                                        or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level

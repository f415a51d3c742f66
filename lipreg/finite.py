"""Non-finite bounds (NaN or inf weights, or a bound that overflows its dtype) with no host synchronisation.

``bool(torch.isfinite(bound))`` makes the host wait for the device at every training step. Here the flag stays a
device tensor:

* :func:`zero_gradient_unless` gives the bound an exact zero gradient when it is not finite. The bound is built from
  the linear operators' norms ``sigma_i = ||A_i v_i||`` by products and sums (paper Alg. 1); a zero upstream gradient
  times an inf or NaN factor (or partial product, when finite factors overflow) is NaN, so masking the bound alone
  (``torch.where``) still sends NaN to the finite layers. The gate sits instead on each factor's autograd node: the
  gradient it passes to ``A_i v_i`` becomes ``where(finite, g, 0)``, so the weights of ``A_i`` get ``0 v_i^T = 0``
  (``v_i`` is kept finite by the power steps), NaN weights included. What it cannot reach: inside one fused
  operator (``conv + bn``) that holds a NaN or inf weight, its other parameters meet the non-finite values in their
  own backward and get ``0 * NaN`` (as they do from the task loss, whose forward runs through that layer too).
* :class:`NonFiniteRecord` keeps the bound and factors of the last non-finite call in a device tensor;
  :meth:`NonFiniteRecord.report` reads it (one synchronisation), off the hot path, and warns.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

Warn = Callable[[float, list[str], list[bool]], None]
"""Told ``(the last non-finite bound, the names of its non-finite factors, the flags read with them)``."""


def zero_gradient_unless(finite: Tensor, tensors: Sequence[Tensor]) -> None:
    """Make the gradient that flows back through each of ``tensors`` exactly 0 where the device flag ``finite`` is
    false, leaving it untouched otherwise: a hook on the autograd node that made each tensor replaces the gradients
    it passes on, ``g``, by ``where(finite, g, 0)`` (no host synchronisation; the forward values are unchanged)."""

    def gate(grad_inputs: tuple[Tensor | None, ...], _: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        return tuple(None if g is None else torch.where(finite, g, 0.0) for g in grad_inputs)

    for tensor in tensors:
        if tensor.grad_fn is not None:
            tensor.grad_fn.register_hook(gate)


def finite_bound(bound: Tensor) -> Tensor:
    """The device flag ``bound < inf``: false for inf and NaN alike (a bound is never negative), in one kernel."""
    return bound < math.inf


class NonFiniteRecord:
    """The last call that gave a non-finite bound, kept on the device: :meth:`record` (two kernels, no
    synchronisation) at every call, :meth:`report` (one synchronisation) when the host may wait. One record per
    graph: the factors recorded are those of the first call."""

    def __init__(self) -> None:
        self.calls = 0
        """Calls recorded since the last report."""
        self._names: list[str] = []
        self._last_bad: Tensor | None = None  # [bound, *factors] of the last non-finite call; finite if none

    def record(self, finite: Tensor, bound: Tensor, factors: dict[str, Tensor]) -> None:
        """Keep ``bound`` and ``factors`` (scalars) where the flag ``finite`` is false."""
        with torch.no_grad():  # the scalars stacked in the widest of their dtypes
            values = torch.stack([bound, *factors.values()])
        if self._last_bad is None or self._last_bad.device != values.device:  # the first call, or a new device
            self._names = list(factors)
            self._last_bad = torch.zeros_like(values)
        self.calls += 1
        self._last_bad = torch.where(finite, self._last_bad, values)

    def report(self, warn: Warn, flags: Callable[[], Tensor] | None = None) -> bool:
        """Whether a call since the last report gave a non-finite bound (one host synchronisation); if so, ``warn``
        is told the bound of the last of them, the names of its non-finite factors and ``flags()`` (device
        booleans that tell the cause, such as which weights are finite), read in the same synchronisation."""
        if self._last_bad is None:
            return False
        extra = flags() if flags is not None else self._last_bad.new_zeros(0)
        values = torch.cat([self._last_bad, extra.to(self._last_bad.dtype)]).tolist()
        bound, factors, read = values[0], values[1:self._last_bad.numel()], values[self._last_bad.numel():]
        self.calls = 0
        self._last_bad.zero_()
        if math.isfinite(bound):
            return False
        warn(bound, [name for name, f in zip(self._names, factors) if not math.isfinite(f)], [bool(f) for f in read])
        return True

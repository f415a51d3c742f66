"""One-shot helpers: build an estimator, converge it, return the bound (a detached 0-dim tensor, as ``est()``)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .estimator import LipschitzEstimator
from .options import Search


def autolip(model: nn.Module, example_input: Tensor, *, n_iter: int = 100, **options: Any) -> Tensor:
    """The AutoLip bound of ``model`` with ``n_iter`` power iterations per operator (an estimate from below of
    the AutoLip bound; see :meth:`LipschitzEstimator.certified_bound` for a certificate)."""
    return LipschitzEstimator(model, example_input, method="autolip", **options)(n_iter=n_iter).detach()


def seqlip(model: nn.Module, example_input: Tensor, *, search: Search = "greedy", n_iter: int = 100,
           **options: Any) -> Tensor:
    """The SeqLip bound (paper eq. 8) of ``model``, AutoLip where no chain applies."""
    return LipschitzEstimator(model, example_input, method="seqlip", search=search, **options)(n_iter=n_iter).detach()

"""One-shot helpers: build an estimator, converge it, return a float."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .estimator import LipschitzEstimator


def autolip(model: nn.Module, example_input: Tensor, n_iter: int = 100, **options: Any) -> float:
    """The AutoLip bound of ``model`` with ``n_iter`` power iterations per operator (an estimate from below of
    the AutoLip bound; see :meth:`LipschitzEstimator.certified_bound` for a certificate)."""
    return float(LipschitzEstimator(model, example_input, method="autolip", **options)(n_iter=n_iter).detach())


def seqlip(model: nn.Module, example_input: Tensor, search: str = "greedy", n_iter: int = 100,
           **options: Any) -> float:
    """The SeqLip bound (paper eq. 8) of ``model``, AutoLip where no chain applies."""
    estimator = LipschitzEstimator(model, example_input, method="seqlip", search=search, **options)
    return float(estimator(n_iter=n_iter).detach())

"""lipreg: estimate, log and penalise the Lipschitz constant of a network while it trains.

Scaman & Virmaux, "Lipschitz regularity of deep neural networks: analysis and efficient estimation",
NeurIPS 2018: AutoLip (Alg. 1), the power method through autograd (Alg. 2) and SeqLip (eq. 8).

The math layer is imported here and needs torch only; the Lightning callback (:mod:`lipreg.lightning`) and the
torchmetrics metrics (:mod:`lipreg.metrics`) load on first use (PEP 562), so ``import lipreg`` costs little more
than ``import torch``.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import ops
from .errors import UnsupportedOpError
from .estimator import LipschitzEstimator
from .penalty import LipschitzPenalty
from .losses import LipschitzMarginLoss
from .margins import MarginCertificate
from .oneshot import autolip, seqlip
from .operator import LinearOperator
from .policy import BoundPolicy
from .linalg.power import power_method
from .ops import register_rule

try:
    __version__ = version("lipreg")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {"LipschitzCallback": ("lipreg.lightning", "LipschitzCallback"), "metrics": ("lipreg.metrics", None),
         "lightning": ("lipreg.lightning", None), "keys": ("lipreg.keys", None)}
"""Names loaded on first access: ``name -> (module, attribute or None for the module itself)``."""

__all__ = ["BoundPolicy", "LinearOperator", "LipschitzCallback", "LipschitzEstimator", "LipschitzMarginLoss",
           "LipschitzPenalty", "MarginCertificate", "UnsupportedOpError", "autolip", "metrics", "ops", "power_method",
           "register_rule", "seqlip"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lipreg' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

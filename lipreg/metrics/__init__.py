r"""Metrics of the Lipschitz constant of a network: functional kernels (:mod:`lipreg.metrics.functional`) and thin
torchmetrics classes over them, as torchmetrics itself is laid out.

* :class:`EmpiricalLipschitz` — running maximum of local Jacobian norms over the batches seen: a valid **lower**
  bound of :math:`L(f)=\sup_x\|J_f(x)\|_2` (Scaman & Virmaux 2018, arXiv:1805.10965, Thm. 1), from
  :func:`lower_bound` / :func:`local_jacobian_norm`.
* :class:`CertifiedRobustAccuracy` — fraction of samples whose prediction is provably constant on an
  :math:`\ell_2` ball, from the logit margin and an upper bound of :math:`L(f)` (Tsuzuku, Sato & Sugiyama 2018,
  "Lipschitz-margin training", NeurIPS, arXiv:1802.04034), over the kernel :func:`certified_accuracy`.
* :func:`certified_accuracy_curve` — the accuracy-vs-radius curve; :func:`upper_over_lower` — the ratio of the two
  brackets of :math:`L(f)`.
"""
from __future__ import annotations

import warnings
from typing import Any

from lipreg.metrics.empirical import EmpiricalLipschitz
from lipreg.metrics.functional import (certified_accuracy, certified_accuracy_curve, certified_radius,
                                       local_jacobian_norm, lower_bound, upper_over_lower)
from lipreg.metrics.robust import CertifiedRobustAccuracy

__all__ = ["CertifiedRobustAccuracy", "EmpiricalLipschitz", "certified_accuracy", "certified_accuracy_curve",
           "certified_radius", "local_jacobian_norm", "lower_bound", "upper_over_lower"]

_RENAMED = {"lipschitz_gap": "upper_over_lower"}
"""Old public names: ``old -> new``, still served with a ``DeprecationWarning``."""


def __getattr__(name: str) -> Any:
    if name not in _RENAMED:
        raise AttributeError(f"module 'lipreg.metrics' has no attribute {name!r}")
    warnings.warn(f"lipreg.metrics.{name} is renamed lipreg.metrics.{_RENAMED[name]}", DeprecationWarning,
                  stacklevel=2)
    return globals()[_RENAMED[name]]

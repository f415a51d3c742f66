"""The choices of the estimator, the penalty and the callback, as ``Literal`` types, their validation, and the
defaults that more than one place needs.

Checked in the constructors (of :class:`~lipreg.LipschitzPenalty` and :class:`~lipreg.LipschitzCallback`), so a
misspelled option fails where it is written, not later inside ``trainer.fit``. The defaults below are the library's
single source: :class:`~lipreg.LipschitzCallback`'s signature and the Hydra schema of ``experiments/`` read them (so the
schema needs no Lightning import).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

Method = Literal["autolip", "seqlip", "liplt"]
PenaltyKind = Literal["linear", "log", "hinge", "squared_hinge"]
Search = Literal["auto", "exact", "greedy", "lowrank"]
OnUnsupported = Literal["raise", "warn"]

METHOD: Method = "autolip"
"""The bound: AutoLip (paper Alg. 1) unless SeqLip (eq. 8) is asked for."""
PENALTY_KIND: PenaltyKind = "log"
"""``h`` in ``weight * h(bound)``: ``log`` penalises deep nets evenly (the gradient is ``dL / L``)."""
N_ITER = 1
"""Warm power iterations per training step (penalty, margin loss, callback) or per call of the estimator."""
LOG_EVERY_N_STEPS = 50
"""How often the callback logs the warm estimate (optimizer steps)."""
CERTIFY_EVERY_N_STEPS = 100
"""How often the callback logs the certified bound and ``lipschitz/gap_percent`` (optimizer steps; 0: never)."""
RECONVERGE_GAP = 1.05
"""The ratio ``certified / estimate`` above which the callback re-converges the warm vectors before logging."""
EVAL_N_ITER = 500
"""The most power iterations of a converged estimate (each validation epoch, the final evaluation)."""
ROBUST_EPS: tuple[float, ...] = (0.1,)
"""The L2 radii of the certified robust accuracy."""
LOWER_BOUND_BATCHES = 1
"""Validation batches the callback's empirical lower bound starts from."""
LOWER_BOUND_ASCENT_STEPS = 0
"""Gradient-ascent steps of the callback's lower bound on its inputs (only smooth activations gain from them)."""


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise a ``ValueError`` naming the option and its choices unless ``value`` is one of the ``Literal``'s."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def validate_method(method: str, estimator_options: Mapping[str, Any]) -> None:
    """``method`` is known, and ``search`` (a SeqLip option) is known and only given with ``method="seqlip"``."""
    check_choice("method", method, Method)
    if "search" in estimator_options:
        if method != "seqlip":
            raise ValueError(f"search={estimator_options['search']!r} is a SeqLip option: use method='seqlip', or "
                             "drop search")
        check_choice("search", estimator_options["search"], Search)


def validate_penalty(kind: str, target: float | None) -> None:
    """``kind`` is known, and the hinge kinds, ``relu(bound - target)``, have a finite target."""
    check_choice("penalty kind", kind, PenaltyKind)
    if kind.endswith("hinge") and (target is None or not math.isfinite(target)):
        raise ValueError(f"kind={kind!r} needs a finite target: the penalty is relu(bound - target); pass "
                         "target=... (the largest bound that is not penalised)")


def robust_radii(robust_eps: float | Sequence[float] | None) -> tuple[float, ...]:
    """The radii of the certified robust accuracy; none (off) for ``None`` or an empty sequence."""
    if robust_eps is None:
        return ()
    radii = tuple(float(e) for e in robust_eps) if isinstance(robust_eps, Sequence) else (float(robust_eps),)
    if any(not e > 0 for e in radii):
        raise ValueError(f"robust_eps must hold positive radii (or be None to turn the robust metrics off), "
                         f"got {robust_eps!r}")
    return radii

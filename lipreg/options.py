"""Every choice set of lipreg, defined once as a ``Literal`` type, the checks of the options, and the defaults that
more than one place needs.

A choice set is written here and nowhere else: the code reads it with ``typing.get_args`` (the estimator's method
dispatch, SeqLip's searches, the penalty and margin-loss kinds), and so does the Hydra schema of ``experiments/``
(its enums are made from these types). Adding a bound method is one line: its name in :data:`Method` (and its
bound in the estimator's dispatch).

Every entry point (:class:`~lipreg.LipschitzEstimator`, :class:`~lipreg.LipschitzPenalty`,
:class:`~lipreg.LipschitzMarginLoss`, :class:`~lipreg.MarginCertificate`, :class:`~lipreg.LipschitzCallback`) checks
its options in its constructor: a misspelled keyword fails where it is written, with the closest valid one
(:func:`check_keywords`), not later inside ``trainer.fit``.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args

Method = Literal["autolip", "seqlip", "liplt"]
"""The bound: AutoLip (paper Alg. 1), SeqLip (eq. 8 on every chain) or LipLT (loop transformation on every chain),
AutoLip elsewhere."""
Search = Literal["auto", "exact", "greedy", "lowrank"]
"""SeqLip's search over activation patterns (:mod:`lipreg.bounds.seqlip`)."""
PenaltyKind = Literal["linear", "log", "hinge", "squared_hinge"]
"""``h`` in ``coefficient * h(bound)`` (:class:`~lipreg.LipschitzPenalty`)."""
MarginKind = Literal["ce", "hinge", "lse"]
"""The margin loss: eq. (2), (3) or (4) of :mod:`lipreg.losses`."""
OnUnsupported = Literal["raise", "warn"]
"""What the callback does with an op without a known Lipschitz constant."""

SEARCHES: tuple[str, ...] = get_args(Search)
PENALTY_KINDS: tuple[str, ...] = get_args(PenaltyKind)

METHOD: Method = "autolip"
"""The bound: AutoLip (paper Alg. 1) unless SeqLip (eq. 8) is asked for."""
PENALTY_KIND: PenaltyKind = "log"
"""``h`` in ``coefficient * h(bound)``: ``log`` penalises deep nets evenly (the gradient is ``dL / L``)."""
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
    """Raise a ``ValueError`` naming the option, its choices and the closest one unless ``value`` is one of the
    ``Literal``'s."""
    allowed = get_args(choices)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}{hint}")


def keyword_names(fn: Callable[..., Any], keyword_only: bool = False) -> tuple[str, ...]:
    """The names ``fn`` takes as keywords (its ``**kwargs`` excluded), or only its keyword-only ones (the options
    after the positional ``model, example_input``)."""
    kinds = {inspect.Parameter.KEYWORD_ONLY}
    if not keyword_only:
        kinds.add(inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(name for name, p in inspect.signature(fn).parameters.items() if p.kind in kinds and name != "self")


def check_keywords(owner: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise a ``TypeError`` for the first of ``given`` that is not ``accepted``, naming the closest accepted one
    (``difflib.get_close_matches``)."""
    accepted = sorted(set(accepted))
    for name in given:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean {close[0]}=...?" if close else ""
            raise TypeError(f"{owner}() got an unknown option {name!r}{hint} (its options: {', '.join(accepted)})")


F = TypeVar("F", bound=Callable[..., Any])


def checked_keywords(forwards_to: Callable[[], Callable[..., Any]] | None = None,
                     renamed: Mapping[str, str] | None = None) -> Callable[[F], F]:
    """Decorate a constructor so that an unknown keyword fails at once, naming the closest valid option.

    ``forwards_to`` returns the callable the constructor's ``**options`` are passed to (the estimator): its keywords
    are valid too. ``renamed`` maps old keywords to new ones, still accepted for one release with a
    ``DeprecationWarning``.
    """
    renamed = dict(renamed or {})

    def decorate(init: F) -> F:
        own = keyword_names(init)

        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
            owner = type(self).__name__
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{owner}() got both {old}= (its old name) and {new}=; pass {new}= only")
                    warnings.warn(f"{owner}({old}=...) is renamed {new}=...; the old name goes in the next release",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            forwarded = keyword_names(forwards_to(), keyword_only=True) if forwards_to is not None else ()
            check_keywords(owner, kwargs, (*own, *forwarded))
            init(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def validate_method(method: str, search: str | None) -> None:
    """``method`` is known, and ``search`` (a SeqLip option) is known and only given with ``method="seqlip"``."""
    check_choice("method", method, Method)
    if search is not None:
        if method != "seqlip":
            raise ValueError(f"search={search!r} is a SeqLip option: use method='seqlip', or drop search")
        check_choice("search", search, Search)


def validate_penalty(kind: str, threshold: float | None) -> None:
    """``kind`` is known, and the hinge kinds, ``relu(bound - threshold)``, have a finite threshold."""
    check_choice("penalty kind", kind, PenaltyKind)
    if kind.endswith("hinge") and (threshold is None or not math.isfinite(threshold)):
        raise ValueError(f"kind={kind!r} needs a finite threshold: the penalty is relu(bound - threshold); pass "
                         "threshold=... (the largest bound that is not penalised)")


def robust_radii(robust_eps: float | Sequence[float] | None) -> tuple[float, ...]:
    """The radii of the certified robust accuracy; none (off) for ``None`` or an empty sequence."""
    if robust_eps is None:
        return ()
    radii = tuple(float(e) for e in robust_eps) if isinstance(robust_eps, Sequence) else (float(robust_eps),)
    if any(not e > 0 for e in radii):
        raise ValueError(f"robust_eps must hold positive radii (or be None to turn the robust metrics off), "
                         f"got {robust_eps!r}")
    return radii

"""Every default is defined once: the Hydra schema (experiments/config_schema.py), the estimate command line and the
library's classes agree, field by field, with the signature that holds each default, and the schema's closed
choices are exactly the library's ``Literal`` values.

Each test reads the two sides independently (a signature against a dataclass field), so it fails when someone
changes one side only.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, get_args

import pytest

import lipreg
from experiments import config_schema, estimate
from lipreg import options
from lipreg.lightning import LipschitzCallback
from lipreg.margins import MarginCertificate


def signature_defaults(fn: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def plain(value: Any) -> Any:
    """A schema value as the library writes it: lists as tuples, enum members as their values."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value.value if hasattr(value, "value") else value


OTHER_MEANING = {("EvalConf", "seqlip")}
"""Fields named like a parameter that mean something else: ``eval.seqlip`` is one extra search (or null), which
``train.py`` turns into ``evaluate_bounds(seqlip=[...])`` with lipreg's own search."""


@pytest.mark.parametrize("schema, fn", [(config_schema.LipregConf, LipschitzCallback),
                                        (config_schema.MarginConf, lipreg.LipschitzMarginLoss),
                                        (config_schema.EvalConf, estimate.evaluate_bounds)])
def test_schema_defaults_are_the_library_defaults(schema: type, fn: Any) -> None:
    library = signature_defaults(fn)
    shared = [f for f in dataclasses.fields(schema) if f.name in library
              and (schema.__name__, f.name) not in OTHER_MEANING]
    assert len(shared) >= 5, f"{schema.__name__} shares too few fields with {fn.__qualname__}"
    for f in shared:
        assert plain(field_default(f)) == plain(library[f.name]), (
            f"{schema.__name__}.{f.name} = {field_default(f)!r}, {fn.__qualname__} default {library[f.name]!r}")


def test_callback_certifies_every_100_steps_in_the_library_and_in_the_composed_config() -> None:
    assert LipschitzCallback().certify_every_n_steps == 100
    assert config_schema.LipregConf().certify_every_n_steps == 100


def test_the_objective_default_is_at_the_first_default_radius() -> None:
    eps = signature_defaults(LipschitzCallback)["robust_eps"][0]
    assert config_schema.ExperimentConf.objective == f"val/certified_acc@{eps:g}"


def test_estimate_command_line_defaults_are_evaluate_bounds_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(estimate, "estimate", lambda args: seen.update(vars(args)))
    estimate.main(["run_dir"])
    library = signature_defaults(estimate.evaluate_bounds)
    assert (seen["n_iter"], seen["exact_max_units"], seen["lower_samples"], seen["ascent_steps"]) == (
        library["n_iter"], library["exact_max_units"], library["lower_bound_samples"],
        library["lower_bound_ascent_steps"])


@pytest.mark.parametrize("fn", [lipreg.LipschitzPenalty, lipreg.LipschitzMarginLoss, lipreg.LipschitzEstimator,
                                MarginCertificate, LipschitzCallback])
def test_shared_library_defaults_are_the_options_constants(fn: Any) -> None:
    """The method and the warm iterations per call/step (and the penalty's kind) are the same everywhere."""
    library = signature_defaults(fn)
    assert library["method"] == options.METHOD == "autolip"
    assert library["n_iter"] == options.N_ITER == 1
    if fn is not lipreg.LipschitzMarginLoss:  # the margin loss's kind is another choice (ce / hinge / lse)
        assert library.get("kind", library.get("penalty_kind")) in (None, options.PENALTY_KIND)


def test_schema_choices_are_the_library_literals() -> None:
    assert [m.value for m in config_schema.Method] == list(get_args(options.Method))
    assert [m.value for m in config_schema.PenaltyKind] == list(get_args(options.PenaltyKind))
    assert config_schema.Method.autolip == "autolip" and str(config_schema.PenaltyKind.log) == "log"

"""Every default is defined once, and reaches the objects a run builds: the Hydra schema
(experiments/config_schema.py) and the estimate command line give the library's classes and functions their own
defaults wherever a config does not choose otherwise, and the schema's closed choices are the library's ``Literal``s.

Each test builds the objects through the real pipeline (composition, OmegaConf, ``instantiate``, ``train.py``'s
builders, ``argparse``) and compares them with the library's objects built with no options, so a field missing,
renamed, mistyped or given another default on the way fails here.
"""
from __future__ import annotations

import inspect
from typing import Any, get_args

import pytest
import torch
from torch import nn

import lipreg
from experiments import config_schema, estimate, train
from lipreg import keys, options
from lipreg.lightning import LipschitzCallback
from tests.experiments.test_hydra import _compose

CALLBACK_OPTIONS = ("method", "n_iter", "per_layer", "certify_every_n_steps", "reconverge_gap", "eval_n_iter",
                    "robust_eps", "lower_bound_batches", "lower_bound_ascent_steps", "estimator_options")
"""The callback's options that ``conf/lipreg/log.yaml`` leaves to the library (it sets ``module`` and
``log_every_n_steps``)."""


def signature_defaults(fn: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_the_composed_config_builds_the_callback_with_the_library_defaults() -> None:
    built, library = train.build_lipreg_callback(_compose(["lipreg=log"])), LipschitzCallback()
    for name in CALLBACK_OPTIONS:
        assert getattr(built, name) == getattr(library, name), name
    assert (built.module_name, built.log_every_n_steps) == ("net", 10)  # what log.yaml chooses


def test_the_composed_config_builds_the_loss_terms_with_the_library_defaults() -> None:
    cfg = _compose(["lipreg=certified", "lipreg.penalty_weight=0.1"])
    net, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.zeros(1, 4)
    penalty, library = train.build_penalty(cfg)(net, x), lipreg.LipschitzPenalty(net, x, coefficient=0.1)
    for name in ("coefficient", "kind", "threshold"):
        assert getattr(penalty, name) == getattr(library, name), name
    margin = train.build_margin_loss(cfg)(net, x)
    library = lipreg.LipschitzMarginLoss(net, x, eps=0.3)  # certified.yaml chooses eps, the rest is the library's
    for name in ("eps", "warmup", "warmup_fraction", "pairwise", "kind", "temperature", "ce_weight"):
        assert getattr(margin, name) == getattr(library, name), name
    for built in (penalty.estimator, margin.certificate.estimator):
        assert (built.method, built.n_iter) == (library.certificate.estimator.method, options.N_ITER)


def test_the_final_evaluation_gets_evaluate_bounds_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    library = signature_defaults(estimate.evaluate_bounds)
    monkeypatch.setattr(estimate, "evaluate_bounds", lambda *args, **kwargs: seen.update(kwargs))
    train.final_evaluation(_compose([]), type("Module", (), {"net": None})(), None)
    for name in ("n_iter", "exact_max_units", "lower_bound_samples"):  # config.yaml leaves these to the library
        assert seen[name] == library[name], name
    assert seen["radii"] == list(LipschitzCallback().robust_eps)  # eval.radii follows lipreg.robust_eps


def test_the_objective_is_a_metric_of_the_final_evaluation_at_its_first_radius() -> None:
    cfg = _compose([])
    assert cfg.objective == keys.certified_acc(cfg.eval.radii[0], "val")
    assert list(cfg.eval.radii) == list(LipschitzCallback().robust_eps)


def test_estimate_command_line_defaults_are_evaluate_bounds_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(estimate, "estimate", lambda args: seen.update(vars(args)))
    estimate.main(["run_dir"])
    library = signature_defaults(estimate.evaluate_bounds)
    assert (seen["n_iter"], seen["exact_max_units"], seen["lower_samples"], seen["ascent_steps"]) == (
        library["n_iter"], library["exact_max_units"], library["lower_bound_samples"],
        library["lower_bound_ascent_steps"])


@pytest.mark.parametrize(("schema_enum", "literal"), [
    (config_schema.Method, options.Method), (config_schema.PenaltyKind, options.PenaltyKind),
    (config_schema.MarginKind, options.MarginKind), (config_schema.Search, options.Search)])
def test_schema_choices_are_the_library_literals(schema_enum: Any, literal: Any) -> None:
    assert [m.value for m in schema_enum] == list(get_args(literal))
    assert all(member == member.value and str(member) == member.value for member in schema_enum)

"""The logged metric names, written out literally: the public interface of the logs (TensorBoard tags,
``metrics.json`` keys, Hydra ``objective=`` values) that README documents, built by :mod:`lipreg.keys`."""
from __future__ import annotations

import torch

from lipreg import keys
from lipreg.metrics import CertifiedRobustAccuracy


def test_bound_and_certificate_keys() -> None:
    assert keys.bound("autolip") == "lipschitz/autolip"
    assert keys.bound("seqlip_greedy") == "lipschitz/seqlip_greedy"
    assert keys.certified("autolip") == "lipschitz/autolip_certified"
    assert keys.certified("seqlip_exact") == "lipschitz/seqlip_exact_certified"
    assert keys.layer("0~2") == "lipschitz/layer/0~2"
    assert (keys.LOWER, keys.UPPER_OVER_LOWER, keys.GAP_PERCENT) == (
        "lipschitz/lower", "lipschitz/upper_over_lower", "lipschitz/gap_percent")
    assert (keys.PENALTY, keys.PROG_BAR) == ("lipschitz/penalty", "lip")
    assert (keys.penalty(), keys.penalty("lip_a")) == ("lipschitz/penalty", "lipschitz/penalty/lip_a")
    assert (keys.LAYER_CHART, keys.RADIUS_CURVE) == ("lipschitz/layers", "robust/certified_acc_vs_radius")
    assert keys.margin("bound") == "lipschitz/margin_bound"
    assert keys.margin("eps", "loss_a") == "lipschitz/margin/loss_a_eps"
    assert keys.hparam("method") == "lipreg/method"


def test_accuracy_keys() -> None:
    assert keys.certified_acc(0.3) == "robust/certified_acc@0.3"
    assert keys.certified_acc(0.1, "val") == "val/certified_acc@0.1"
    assert keys.certified_acc(1.0, "test", pairwise=True) == "test/pairwise_certified_acc@1"
    assert keys.certified_acc("0.50", "test") == "test/certified_acc@0.50"  # a radius read back from a key
    assert keys.accuracy_at(0.25, estimated=True) == "estimated_acc@0.25"
    assert keys.in_group("certified_acc@0.3", pairwise=True) == "robust/pairwise_certified_acc@0.3"
    assert keys.accuracy("test") == "test/acc"
    assert keys.certified_radius_of("test/certified_acc@0.3", "test") == "0.3"
    assert keys.certified_radius_of("test/pairwise_certified_acc@0.3", "test") is None
    assert keys.certified_radius_of("val/certified_acc@0.3", "test") is None


def test_metric_result_names() -> None:
    logits, target = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    metric = CertifiedRobustAccuracy(eps=(0.1, 0.5), allow_estimate=True)
    metric.update(logits, target, 1.0, certified=True)
    assert list(metric.compute()) == ["certified_acc@0.1", "certified_acc@0.5"]
    metric.update(logits, target, 1.0, certified=False)
    assert list(metric.compute()) == ["estimated_acc@0.1", "estimated_acc@0.5"]

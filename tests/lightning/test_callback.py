"""``LipschitzCallback`` wiring, each with a tiny real ``pl.Trainer`` fit on the blobs data (CPU): which estimator it
uses (one on the module, one built from ``example_input_array``, or lazily from the first batch), the error that
shows where a penalty goes instead, what it leaves behind (the module's steps untouched), its checkpoint state, and
that the certified robust accuracy it logs is computed from the certified bound.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lipreg import LipschitzEstimator, LipschitzMarginLoss
from lipreg.lightning import LipschitzCallback
from lipreg.metrics import CertifiedRobustAccuracy
from lipreg.penalty import LipschitzPenalty
from tests.classifiers import EXAMPLE, MLP, BlobsData, Classifier

pytestmark = pytest.mark.slow


def blobs() -> BlobsData:
    return BlobsData(batch_size=32, train=128, evaluation=64)


def classifier(seed: int = 0, with_penalty: bool = False) -> Classifier:
    torch.manual_seed(seed)
    net = MLP(hidden=(16,))
    penalty = LipschitzPenalty(net, EXAMPLE, coefficient=1e-2) if with_penalty else None
    return Classifier(net, lr=1e-2, lip_penalty=penalty)


def fit(tmp_path: Path, module: pl.LightningModule, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=0), log_every_n_steps=1)
    options.update(overrides)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, blobs())
    return trainer


class EstimatorAtFitStart(Callback):
    """Placed after the LipschitzCallback: what it holds once its ``on_fit_start`` ran, before any batch."""

    def __init__(self, lip: LipschitzCallback) -> None:
        self.lip = lip
        self.seen: list[LipschitzEstimator | None] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen.append(self.lip.estimator)


@pytest.mark.parametrize("module_name", [None, "net"])
def test_reuses_the_penalty_already_on_the_module(tmp_path: Path, module_name: str | None) -> None:
    """One warm state: the callback logs with the module's own penalty estimator and checkpoints nothing itself
    (the module's state_dict carries it)."""
    model = classifier(with_penalty=True)
    lip = LipschitzCallback(module=module_name, log_every_n_steps=1, certify_every_n_steps=1)
    probe = EstimatorAtFitStart(lip)
    trainer = fit(tmp_path, model, [lip, probe])
    assert probe.seen == [model.lip_penalty.estimator]
    assert lip.estimator is model.lip_penalty.estimator
    assert lip.state_dict() == {}
    with torch.no_grad():  # the converged value the last validation logged is that estimator's
        assert float(trainer.callback_metrics["lipschitz/autolip"]) == model.lip_penalty.estimator(n_iter=0).item()


def test_logs_the_penalty_on_the_module_and_leaves_its_steps_alone(tmp_path: Path) -> None:
    model = classifier(with_penalty=True)
    trainer = fit(tmp_path, model, [LipschitzCallback(module="net", log_every_n_steps=1)], limit_val_batches=0)
    assert "training_step" not in vars(model)  # the module's own step ran, never a wrapper
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("lipschitz/penalty")]
    assert len(logged) == 3 and logged[-1] == pytest.approx(float(model.lip_penalty.last_value), rel=1e-6)
    assert "lipschitz/task_loss" not in events.Tags()["scalars"]


@pytest.mark.parametrize("option", ["penalty_weight", "penalty_kind", "target"])
def test_a_penalty_option_is_an_error_that_shows_the_two_lines_to_write(option: str) -> None:
    value = "hinge" if option == "penalty_kind" else 0.1
    with pytest.raises(TypeError, match=r"(?s)the loss penalises.*LipschitzPenalty\(self.net, example_input, "
                                        r"coefficient=.*return loss \+ self.lip_penalty\(\)"):
        LipschitzCallback(**{option: value})


def test_builds_from_example_input_array_at_fit_start(tmp_path: Path) -> None:
    model = classifier()
    lip = LipschitzCallback()
    probe = EstimatorAtFitStart(lip)
    fit(tmp_path, model, [lip, probe])
    (estimator,) = probe.seen
    assert estimator is lip.estimator and estimator.model is model
    assert set(lip.state_dict()["estimator"]) == set(estimator.state_dict())


def test_builds_lazily_from_the_first_batch(tmp_path: Path) -> None:
    """No ``example_input_array`` and ``module="net"``: the forward pre-hook captures the first training batch's
    input, builds the estimator for ``net``, and removes itself."""
    model = classifier()
    model.example_input_array = None
    lip = LipschitzCallback(module="net", log_every_n_steps=1)
    probe = EstimatorAtFitStart(lip)
    trainer = fit(tmp_path, model, [lip, probe])
    assert probe.seen == [None]
    assert lip.estimator is not None and lip.estimator.model is model.net
    assert tuple(lip.estimator.example_input.shape) == (1, 1, 8, 8)
    assert not model.net._forward_pre_hooks
    assert trainer.callback_metrics["lipschitz/autolip"] > 0
    assert set(lip.state_dict()["estimator"]) == set(lip.estimator.state_dict())


def test_restored_state_waits_for_a_lazy_build_and_is_checkpointed_meanwhile(tmp_path: Path) -> None:
    model = classifier()
    model.example_input_array = None
    reference = LipschitzEstimator(model.net, EXAMPLE)
    reference(n_iter=7)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    lip = LipschitzCallback(module="net", log_every_n_steps=100, certify_every_n_steps=0)
    lip.load_state_dict({"estimator": state})
    assert lip.state_dict() == {"estimator": state}
    fit(tmp_path, model, [lip], limit_train_batches=1, limit_val_batches=0)
    # built on the first batch from the restored vectors, then one warm iteration on the updated weights
    expected = LipschitzEstimator(model.net, EXAMPLE)
    expected.load_state_dict(state)
    expected()
    for name, buffer in lip.estimator.state_dict().items():
        torch.testing.assert_close(buffer, expected.state_dict()[name], rtol=0, atol=0)


def test_a_second_fit_with_the_same_callback_keeps_the_warm_state(tmp_path: Path) -> None:
    model = classifier()
    lip = LipschitzCallback(log_every_n_steps=100, certify_every_n_steps=0)
    fit(tmp_path, model, [lip], limit_val_batches=0)
    estimator = lip.estimator
    before = {k: v.clone() for k, v in estimator.state_dict().items()}
    fit(tmp_path / "again", model, [lip], limit_val_batches=0, limit_train_batches=1)
    assert lip.estimator is estimator
    expected = LipschitzEstimator(model, EXAMPLE)
    expected.load_state_dict(before)
    expected()  # one more warm step, on the weights after the second fit
    for name, buffer in estimator.state_dict().items():
        assert torch.equal(buffer, expected.state_dict()[name])


def test_certified_robust_accuracy_is_fed_the_certified_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The metric must get ``certified_bound()``, not the estimate. To tell them apart, the certificate is inflated
    threefold; the logged accuracies must be those of the inflated bound, recomputed here from the final weights."""
    original = LipschitzEstimator.certified_bound
    monkeypatch.setattr(LipschitzEstimator, "certified_bound", lambda self: 3.0 * original(self))
    fed: list[tuple[float, bool]] = []
    update = CertifiedRobustAccuracy.update

    def spy(self: CertifiedRobustAccuracy, logits: torch.Tensor, target: torch.Tensor, bound: Any, *,
            certified: bool) -> None:
        if not (isinstance(bound, torch.Tensor) and bound.dim() == 2):  # the global metric (not the per-pair one)
            fed.append((float(bound), certified))
        update(self, logits, target, bound, certified=certified)

    monkeypatch.setattr(CertifiedRobustAccuracy, "update", spy)
    eps = (0.01, 0.03, 0.1)
    model = classifier()
    lip = LipschitzCallback(robust_eps=eps, log_every_n_steps=100, certify_every_n_steps=0)
    trainer = fit(tmp_path, model, [lip], max_epochs=2, limit_val_batches=2)

    certified = original(LipschitzEstimator(model, EXAMPLE)).item()
    assert len(fed) == 4 and all(flag for _, flag in fed)
    assert fed[-1][0] == pytest.approx(3.0 * certified, rel=1e-6)
    x, y = blobs().sets["val"].tensors
    model.eval()
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1)
    true = logits.gather(1, y[:, None]).squeeze(1)
    margin = torch.where(top2.indices[:, 0] == y, true - top2.values[:, 1], torch.zeros_like(true))

    def accuracy(bound: float, radius: float) -> float:
        return float((margin > math.sqrt(2.0) * bound * radius).float().mean())

    for radius in eps:
        logged = float(trainer.callback_metrics[f"robust/certified_acc@{radius:g}"])
        assert logged == pytest.approx(accuracy(3.0 * certified, radius), abs=1e-6)
    assert any(accuracy(3.0 * certified, r) != accuracy(certified, r) for r in eps)  # the check can tell them apart


@pytest.mark.parametrize("search", ["greedy", "exact"])
def test_seqlip_logs_under_its_tag_and_names_whose_certificate_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    search: str) -> None:
    """The certified tag is the method's whichever certificate is the tightest (a stable tag; the estimator's
    ``certificate`` names it). A greedy SeqLip search cannot be certified: the certificate is another method's, and
    the gap certified / SeqLip-estimate (large even when converged) must not re-converge at every certify step."""
    certified_tag = "seqlip_certified"
    converge = LipschitzEstimator.converge
    calls: list[int] = []

    def counted(self: LipschitzEstimator, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return converge(self, *args, **kwargs)

    monkeypatch.setattr(LipschitzEstimator, "converge", counted)
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(8, 8)), lr=1e-2)
    lip = LipschitzCallback(method="seqlip", search=search, log_every_n_steps=1, certify_every_n_steps=1,
                            reconverge_gap=1.0001)
    with pytest.warns(UserWarning) if search == "greedy" else contextlib.nullcontext():
        trainer = fit(tmp_path, model, [lip], limit_val_batches=0)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lipschitz/seqlip", f"lipschitz/{certified_tag}", "lipschitz/gap_percent"} <= tags
    assert "lipschitz/autolip_certified" not in tags
    estimates = [e.value for e in events.Scalars("lipschitz/seqlip")]
    certificates = [e.value for e in events.Scalars(f"lipschitz/{certified_tag}")]
    if search == "exact":  # the tightest certificate is at most exact SeqLip's, which the estimate is (in float32)
        assert all(c <= e * (1 + 1e-5) for e, c in zip(estimates, certificates))
    if search == "greedy":
        assert not calls


def test_a_margin_loss_warmup_fraction_is_planned_from_the_trainer(tmp_path: Path) -> None:
    """3 training batches a epoch, 2 epochs, accumulating 1: 6 calls; a quarter of them ramp eps."""
    model = classifier()
    model.margin = LipschitzMarginLoss(model.net, EXAMPLE, eps=0.3, warmup_fraction=0.25)
    fit(tmp_path, model, [LipschitzCallback(module="net", log_every_n_steps=100)], max_epochs=2,
        limit_val_batches=0)
    assert model.margin.warmup == round(0.25 * 6)

"""The penalty's measured effect on real data: the experiments' MLP on the digits, with and without a
``LipschitzPenalty`` in the Classifier's loss (as ``lipreg=penalty`` builds it), observed by the callback."""
from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl

from experiments.data import DigitsDataModule
from experiments.models import MLP, Classifier
from lipreg import LipschitzCallback, LipschitzPenalty

pytestmark = pytest.mark.slow


def train_for_effect(coefficient: float) -> dict[str, float]:
    pl.seed_everything(0)
    penalty = functools.partial(LipschitzPenalty, coefficient=coefficient, kind="log") if coefficient else None
    model = Classifier(MLP((1, 8, 8), 10, hidden=(64, 64)), lr=1e-2, lip_penalty=penalty)
    lip = LipschitzCallback(module="net", log_every_n_steps=1000, certify_every_n_steps=0, robust_eps=(0.1,))
    trainer = pl.Trainer(callbacks=[lip], accelerator="cpu", max_epochs=8, check_val_every_n_epoch=8, logger=False,
                         num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=64, seed=0))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_penalty_lowers_the_bound_and_raises_certified_accuracy() -> None:
    """Same seed, data order and budget (8 epochs, MLP 64-64 on digits); ``log`` penalty of coefficient 0.3."""
    plain, penalised = train_for_effect(0.0), train_for_effect(0.3)
    bound, acc = "lipschitz/autolip_certified", "robust/certified_acc@0.1"
    assert penalised[bound] * 2 <= plain[bound]
    assert penalised[acc] > plain[acc]
    assert penalised["val/acc"] > 0.9

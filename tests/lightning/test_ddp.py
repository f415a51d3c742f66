"""DDP on CPU: ``strategy="ddp_fork"``, two processes (gloo), the callback building its estimator lazily and logging.

Each rank writes what it holds to a file in ``tmp_path``; the parent compares: training completes on both, the
warm state, bounds and weights are bitwise identical across ranks (the ranks start from *different* warm vectors,
so this also shows the broadcast from rank 0), the logged metrics are the reduction over both ranks' validation
shards (certified accuracy: sums; lower bound: max), and the TensorBoard scalars are written once.
(Plain ``strategy="ddp"`` re-launches the script and hangs a rank under pytest.)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lipreg.lightning import LipschitzCallback
from tests.classifiers import MLP, BlobsData, Classifier

pytestmark = pytest.mark.slow
EPS = 0.05


class PerRank(Callback):
    """Gives each rank its own initial warm vectors (``seed=rank``, before the callback builds its estimator), keeps
    its shard of the last validation epoch and the metrics' local states, and saves everything at fit end."""

    def __init__(self, lip: LipschitzCallback, out: Path) -> None:
        self.lip, self.out = lip, out
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.local: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.lip.estimator_options["seed"] = trainer.global_rank

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, *args: Any) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the LipschitzCallback's compute(): torchmetrics has restored each rank's own (unsynced) states
        robust, lower = self.lip.validation.robust.global_acc, self.lip.validation.lower.metric
        self.local = {"correct": robust.correct_certified.clone(), "total": robust.total.clone(),
                      "lower": lower.value.clone()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        estimator = self.lip.estimator
        with torch.no_grad():
            bound, certified = estimator(n_iter=0), estimator.certified_bound()
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                    "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "warm": {k: v.clone() for k, v in estimator.state_dict().items()},
                    "seed": self.lip.estimator_options["seed"], "bound": bound, "certified": certified,
                    "final": {k: float(v) for k, v in trainer.callback_metrics.items()
                              if k.startswith(("lipschitz/", "robust/"))},
                    "local": self.local, "batches": self.batches},
                   self.out / f"rank{trainer.global_rank}.pt")


def test_ddp_fork_two_cpu_processes(tmp_path: Path) -> None:
    pl.seed_everything(0)
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(32,)), lr=1e-2)
    model.example_input_array = None  # lazily built from the first batch, inside the DDP forward
    lip = LipschitzCallback(module="net", log_every_n_steps=2, certify_every_n_steps=2,
                            robust_eps=(EPS,), lower_bound_batches=1)
    trainer = pl.Trainer(strategy="ddp_fork", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=4,
                         limit_val_batches=2, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=2,
                         logger=TensorBoardLogger(tmp_path, name="", version=0),
                         callbacks=[lip, PerRank(lip, tmp_path)])
    trainer.fit(model, BlobsData(batch_size=32, train=512, evaluation=128))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["global_step"] == 8 for r in ranks)  # training completed on both
    zero, one = ranks
    assert [r["seed"] for r in ranks] == [0, 1]  # different initial vectors: equal below only by the broadcast
    for key in ("params", "warm"):
        assert zero[key].keys() == one[key].keys()
        for name, value in zero[key].items():
            assert torch.equal(value, one[key][name]), (key, name)
    assert torch.equal(zero["bound"], one["bound"]) and torch.equal(zero["certified"], one["certified"])
    assert zero["final"] == one["final"]

    # the metrics are the reduction over the two shards (each rank saw its own, different, validation batches)
    x0, x1 = (torch.cat([x for x, _ in r["batches"]]) for r in ranks)
    assert len(x0) == len(x1) == 64 and not torch.equal(x0, x1)
    correct = zero["local"]["correct"] + one["local"]["correct"]
    total = zero["local"]["total"] + one["local"]["total"]
    assert total == 128
    assert zero["final"][f"robust/certified_acc@{EPS:g}"] == pytest.approx(float(correct[0]) / 128, abs=1e-6)
    assert zero["final"]["lipschitz/lower"] == pytest.approx(max(float(r["local"]["lower"]) for r in ranks), rel=1e-6)
    # recomputed from the final weights and both shards: the certified accuracy at the certified bound
    net = MLP(hidden=(32,))
    net.load_state_dict({k.removeprefix("net."): v for k, v in zero["params"].items() if k.startswith("net.")})
    net.eval()
    hits = 0
    with torch.no_grad():
        for x, y in (b for r in ranks for b in r["batches"]):
            logits = net(x)
            true = logits.gather(1, y[:, None]).squeeze(1)
            runner_up = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            hits += int((true - runner_up > math.sqrt(2.0) * float(zero["certified"]) * EPS).sum())
    assert zero["final"][f"robust/certified_acc@{EPS:g}"] == pytest.approx(hits / 128, abs=1e-6)
    assert zero["final"]["lipschitz/autolip_certified"] == pytest.approx(float(zero["certified"]), rel=1e-6)

    # logged once: one event file, one event per tag and step
    files = list(Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    certified_steps = [e.step for e in events.Scalars("lipschitz/autolip_certified")]
    assert certified_steps == [1, 3, 3, 5, 7, 7]  # every 2 steps, plus each validation (after steps 3 and 7)

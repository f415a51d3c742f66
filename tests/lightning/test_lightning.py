"""``LipschitzCallback`` as a Lightning user meets it: a real fit under ``lightning.pytorch`` and under
``pytorch_lightning`` (the per-layer chart and the HPARAMS session in the TensorBoard event files, test metrics among
the HPARAMS columns), the misuse errors and their fixes, dict batches, regression nets, unsupported ops, the logged
penalty of the module, the SeqLip not-exact warning shown once, and the constructor's validation.
"""
from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context, metadata
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipreg
from lipreg.lightning import LipschitzCallback

pytestmark = pytest.mark.slow
NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def loaders(n: int = 64, dict_batches: bool = False, outputs: int = 10) -> DataLoader:
    torch.manual_seed(1)
    x = torch.randn(n, 8)
    y = torch.randint(0, outputs, (n,)) if outputs > 1 else x.sum(1, keepdim=True)
    if dict_batches:
        return DataLoader([{"image": xi, "label": yi} for xi, yi in zip(x, y)], batch_size=16)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def make_module(ns: ModuleType, outputs: int = 10, dict_batches: bool = False, penalty: float = 0.0) -> Any:
    """A LightningModule of namespace ``ns`` whose steps call ``self.net`` directly (no ``forward``), with a
    ``LipschitzPenalty`` of coefficient ``penalty`` in its training loss when ``penalty > 0``."""

    class Module(ns.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, outputs))
            self.lip = lipreg.LipschitzPenalty(self.net, torch.zeros(1, 8), coefficient=penalty) if penalty else None

        def _xy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return (batch["image"], batch["label"]) if dict_batches else (batch[0], batch[1])

        def _loss(self, batch: Any) -> torch.Tensor:
            x, y = self._xy(batch)
            out = self.net(x)
            return F.cross_entropy(out, y) if outputs > 1 else F.mse_loss(out, y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self._loss(batch)
            self.log("train/loss", loss)
            return loss + self.lip() if self.lip is not None else loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/loss", self._loss(batch))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test/loss", self._loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    return Module()


def trainer(ns: ModuleType, tmp_path: Path, callback: LipschitzCallback, **overrides: Any) -> Any:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        logger=ns.loggers.TensorBoardLogger(tmp_path, name="", version=0), log_every_n_steps=1)
    options.update(overrides)
    return ns.Trainer(callbacks=[callback], **options)


def hparams_tab(logdir: str) -> tuple[dict[str, Any], list[str]]:
    """What TensorBoard's HPARAMS tab shows for ``logdir``: the hyper-parameters of its session and the metric
    columns, read by TensorBoard's own hparams backend."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, logdir)
    context = backend_context.Context(base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider))
    content = context.hparams_metadata(RequestContext(), "")
    experiment = context.experiment_from_metadata(RequestContext(), "", True, content, [])
    (session,) = [tags[metadata.SESSION_START_INFO_TAG] for tags in content.values()
                  if metadata.SESSION_START_INFO_TAG in tags]
    start = metadata.parse_session_start_info_plugin_data(session)
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return params, [m.name.tag for m in experiment.metric_infos]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_fit_and_test_under_each_namespace(tmp_path: Path, namespace: str) -> None:
    """The callback is a proper callback of either namespace; the bar chart and the one HPARAMS session (module,
    callback and extra hparams; metric columns from the scalars, test metrics included) are in the event files."""
    ns = importlib.import_module(namespace)
    callback = LipschitzCallback(module="net", log_every_n_steps=1, certify_every_n_steps=1,
                                 hparams={"experiment": "namespaces", "data": {"batch": 16}})
    assert isinstance(callback, ns.Callback)
    module = make_module(ns)
    fit = trainer(ns, tmp_path, callback)
    fit.fit(module, loaders(), loaders())
    fit.test(module, loaders())
    logdir = fit.logger.log_dir
    events = EventAccumulator(logdir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Images("lipschitz/layers")] == [3]
    assert metadata.EXPERIMENT_TAG not in events.Tags()["tensors"]  # no declared columns: TB reads the scalars
    params, columns = hparams_tab(logdir)
    assert params == {"lr": 0.05, "lipreg/method": "autolip", "experiment": "namespaces", "data/batch": 16}
    assert {"lipschitz/autolip", "lipschitz/autolip_certified", "robust/certified_acc@0.1", "val/loss",
            "test/loss"} <= set(columns)
    assert not [c for c in columns if c.startswith(("hp/", "hp_metric", "final/"))]


def test_per_layer_factors_skip_constants_in_graph_order(tmp_path: Path) -> None:
    """The per-layer scalars and the chart hold the linear layers only (the ReLUs are 1 at every step), in the
    graph's order; their product is the logged bound (the constants being 1)."""
    ns = importlib.import_module("pytorch_lightning")
    callback = LipschitzCallback(module="net", log_every_n_steps=1, per_layer=True, certify_every_n_steps=0)
    fit = trainer(ns, tmp_path, callback, limit_val_batches=0)
    fit.fit(make_module(ns), loaders())
    layers = callback.estimator.layer_factors()
    assert list(layers) == ["0", "2", "4"]  # node names of the bounded module, net
    events = EventAccumulator(fit.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("lipschitz/layer/")]
    assert sorted(tags) == [f"lipschitz/layer/{name}" for name in layers]
    last = {tag: events.Scalars(tag)[-1].value for tag in tags}
    assert math.prod(last.values()) == pytest.approx(events.Scalars("lipschitz/autolip")[-1].value, rel=1e-5)


def test_no_estimator_after_the_first_batch_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    """``training_step`` calls ``self.net``, so a hook on the LightningModule never fires; this used to finish
    ``fit`` silently with ``estimator is None``."""
    ns = importlib.import_module("lightning.pytorch")
    with pytest.raises(RuntimeError, match=r"first training batch.*module='net'.*example_input="):
        trainer(ns, tmp_path, LipschitzCallback()).fit(make_module(ns), loaders())


@pytest.mark.parametrize("source", ["example_input", "batch_to_input"])
def test_example_input_and_dict_batches(tmp_path: Path, source: str) -> None:
    """``example_input=`` builds at fit start; ``batch_to_input`` / ``batch_to_target`` read dict batches, for the
    lazy build and for the robust metrics (dict batches failed with ``KeyError: 0``)."""
    ns = importlib.import_module("lightning.pytorch")
    module = make_module(ns, dict_batches=True)
    lip = LipschitzCallback(module="net", log_every_n_steps=1, batch_to_input=lambda b: b["image"],
                            batch_to_target=lambda b: b["label"],
                            **({"example_input": torch.zeros(2, 8)} if source == "example_input" else {}))
    fit = trainer(ns, tmp_path, lip)
    fit.fit(module, loaders(dict_batches=True), loaders(dict_batches=True))
    assert lip.estimator is not None and lip.estimator.model is module.net
    exact = lipreg.LipschitzEstimator(module.net, torch.zeros(1, 8)).certified_bound().item()
    assert float(fit.callback_metrics["lipschitz/autolip_certified"]) == pytest.approx(exact, rel=1e-6)
    assert "robust/certified_acc@0.1" in fit.callback_metrics


def test_robust_metrics_off_for_a_regression_net(tmp_path: Path) -> None:
    ns = importlib.import_module("pytorch_lightning")
    module = make_module(ns, outputs=1)
    with pytest.raises(ValueError, match="robust_eps=None"):
        trainer(ns, tmp_path, LipschitzCallback(module="net")).fit(module, loaders(outputs=1), loaders(outputs=1))
    for off in (None, ()):
        lip = LipschitzCallback(module="net", robust_eps=off)
        fit = trainer(ns, tmp_path / str(off), lip)
        fit.fit(make_module(ns, outputs=1), loaders(outputs=1), loaders(outputs=1))
        assert "lipschitz/autolip_certified" in fit.callback_metrics
        assert not [k for k in fit.callback_metrics if k.startswith("robust/")]


class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


@pytest.mark.parametrize("on_unsupported", ["raise", "warn"])
def test_on_unsupported(tmp_path: Path, on_unsupported: str) -> None:
    ns = importlib.import_module("pytorch_lightning")
    module = make_module(ns)
    module.net.append(Exp())
    lip = LipschitzCallback(module="net", on_unsupported=on_unsupported)
    fit = trainer(ns, tmp_path, lip)
    if on_unsupported == "raise":
        with pytest.raises(lipreg.UnsupportedOpError, match="exp"):
            fit.fit(module, loaders(), loaders())
        return
    with pytest.warns(RuntimeWarning, match=r"on_unsupported='warn'.*exp.*Training goes on"):
        fit.fit(module, loaders(), loaders())
    assert fit.global_step == 3 and lip.estimator is None
    assert not [k for k in fit.callback_metrics if k.startswith(("lipschitz/", "robust/"))]


def test_the_penalty_on_the_module_is_logged_once_and_the_bound_on_the_progress_bar(tmp_path: Path) -> None:
    ns = importlib.import_module("lightning.pytorch")
    lip = LipschitzCallback(module="net", log_every_n_steps=1, prog_bar=True)
    fit = trainer(ns, tmp_path, lip, limit_val_batches=0)
    module = make_module(ns, penalty=0.3)
    fit.fit(module, loaders())
    assert lip.estimator is module.lip.estimator  # one warm state, iterated by the penalty in training_step
    events = EventAccumulator(fit.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    penalties = [e.value for e in events.Scalars("lipschitz/penalty")]
    assert len(penalties) == 3
    assert penalties[-1] == pytest.approx(0.3 * math.log(float(module.lip.last_bound)), rel=1e-5)
    assert "lipschitz/task_loss" not in events.Tags()["scalars"]  # the module's own loss is logged by the module
    assert "lip" in fit.progress_bar_metrics and "lip" not in events.Tags()["scalars"]


def test_seqlip_not_exact_warning_shown_once(tmp_path: Path) -> None:
    ns = importlib.import_module("pytorch_lightning")
    lip = LipschitzCallback(module="net", method="seqlip", search="greedy", log_every_n_steps=1,
                            certify_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(ns, tmp_path, lip, max_epochs=2).fit(make_module(ns), loaders(), loaders())
    assert sum("SeqLip search is not exact" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "seqlipp"}, "method must be one of 'autolip', 'seqlip', 'liplt'; got 'seqlipp'"),
    ({"search": "greedy"}, "search='greedy' is a SeqLip option"),
    ({"method": "seqlip", "search": "greedyy"}, "search must be one of"),
    ({"on_unsupported": "ignore"}, "on_unsupported must be one of 'raise', 'warn'"),
    ({"robust_eps": (0.1, -1.0)}, "robust_eps must hold positive radii"),
    ({"log_every_n_steps": 0}, "log_every_n_steps must be >= 1"),
])
def test_constructor_validation(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LipschitzCallback(**options)

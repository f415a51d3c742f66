"""The experiment scripts fail fast and clearly, in either Lightning namespace (fast tests; the end-to-end runs
are in tests/experiments/test_hydra.py).

* a launcher or sweeper whose plugin is missing names the extra; a ``+key`` nothing reads is refused;
* closed choices are enums in the schema; ``ckpt_path`` is a key;
* the hyper-parameters and run names of a job come from its choices and overrides;
* ``trainer._target_=lightning.pytorch.Trainer`` builds every Lightning object in that namespace;
* Lightning's messages reach the root handlers (``train.log``) without the tips;
* ``estimate.py`` loads with ``weights_only=True`` and explains a foreign checkpoint in one line;
* a truncated ``.gz`` names its file; ``summarize.py`` reports failed jobs, and its plot and table read well.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
import struct
from enum import Enum
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from tests.experiments.test_hydra import _compose

from experiments import estimate, runtime, summarize, train
from experiments.data import read_idx, read_idx_header


# ------------------------------------------------------------------------------ fail fast
@pytest.mark.parametrize("argv, package", [
    (["-m", "hydra/launcher=joblib", "lipreg.penalty_weight=0,1"], "hydra-joblib-launcher"),
    (["-m", "hydra/launcher=slurm"], "hydra-submitit-launcher"),
    (["-m", "+experiment=tune_penalty"], "hydra-optuna-sweeper"),  # the preset overrides hydra/sweeper
])
def test_missing_plugin_names_the_extra(monkeypatch, argv, package):
    runtime.check_plugins(argv)  # installed here: nothing to say
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit, match=rf"needs the Hydra plugin {package}.*pip install 'lipreg\[sweep\]'"):
        runtime.check_plugins(argv)


def test_plugin_check_ignores_other_overrides(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    runtime.check_plugins(["model=cnn", "lipreg.penalty_weight=0,1", "--cfg", "job"])


@pytest.mark.parametrize("override, hint", [("+ckpt_pth=a.ckpt", "ckpt_path"), ("+model.hiddn=[8]", "hidden"),
                                            ("+totally_unrelated_xyz=1", "drop the override")])
def test_added_key_is_refused(override, hint):
    cfg = _compose([override])  # Hydra lets `+` add to a struct config...
    with pytest.raises(ValueError, match=rf"adds the key.*{hint}"):  # ...train.py does not
        train.runtime.check_added_keys(cfg, [override], ["model", "data", "lipreg", "trainer", "logger"])


def test_added_group_is_fine():
    cfg = _compose(["+experiment=tune_penalty"])
    runtime.check_added_keys(cfg, ["+experiment=tune_penalty"], ["model", "experiment"])


def test_ckpt_path_is_a_key():
    assert _compose([]).ckpt_path is None
    assert _compose(["ckpt_path=run/checkpoints/final.ckpt"]).ckpt_path == "run/checkpoints/final.ckpt"
    cfg = _compose(["ckpt_path=/no/such.ckpt"])
    with pytest.raises(FileNotFoundError, match="ckpt_path=/no/such.ckpt"):
        train.check_resume(cfg)


@pytest.mark.parametrize("override, valid", [("lipreg.method=seqlipp", "autolip"),
                                             ("lipreg.penalty.kind=hinj", "squared_hinge"),
                                             ("eval.seqlip=gredy", "greedy"),
                                             ("trainer.accelerator=gpuu", "cuda")])
def test_closed_choices_fail_at_composition(override, valid):
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override])
    assert valid in str(info.value.__cause__)  # OmegaConf lists the valid values


def test_enum_choices_reach_the_callback_and_the_penalty_as_strings():
    cfg = _compose(["lipreg=seqlip", "lipreg.penalty_weight=0.1", "lipreg.penalty.kind=linear"])
    callback = train.build_lipreg_callback(cfg)
    assert callback.method == "seqlip" and not isinstance(callback.method, Enum)
    penalty = train.build_penalty(cfg)(torch.nn.Linear(4, 3), torch.zeros(1, 4))
    assert penalty.kind == "linear" and not isinstance(penalty.kind, Enum)
    assert penalty.estimator.method == "seqlip" and not isinstance(penalty.estimator.method, Enum)
    assert f"{_compose(['eval.seqlip=exact']).eval.seqlip}" == "exact"  # f-strings build metric names


# ------------------------------------------------------------------------------ comparable sweeps
def test_hparams_are_the_choices_and_overrides():
    task = ["lipreg.penalty_weight=0.01", "model.hidden=[16]", "trainer.max_epochs=1"]
    cfg = _compose(task)
    choices = {"model": "mlp", "data": "digits", "lipreg": "log", "trainer": "cpu", "hydra/launcher": "basic",
               "hydra/sweeper": "basic"}
    params = runtime.run_hparams(cfg, choices, task)
    assert params == {"model": "mlp", "data": "digits", "lipreg": "log", "trainer": "cpu",
                      "lipreg.penalty_weight": 0.01, "model.hidden": "[16]", "trainer.max_epochs": 1}


def test_hparams_reach_the_callback():
    callback = train.build_lipreg_callback(_compose([]), {"model": "mlp", "lipreg.penalty_weight": 0.01})
    assert callback.hparams == {"model": "mlp", "lipreg.penalty_weight": 0.01, "lipreg/penalty_weight": 0.0}


def test_run_name_is_the_overrides():
    task = ["lipreg.penalty_weight=0.0012345678901234567", "model=cnn", "data.data_dir=/a/b", "~seed"]
    assert runtime.run_name(task) == "penalty_weight=0.001235,model=cnn,data_dir=_a_b"
    assert runtime.run_name([]) == "tensorboard"
    assert len(runtime.run_name([f"k{i}=v" for i in range(100)])) <= 120


def test_loggers_take_the_run_name(tmp_path):
    loggers = train.build_loggers(_compose(["logger=[tensorboard,csv]"]), str(tmp_path), name="penalty_weight=0.1")
    assert loggers[0].name == "penalty_weight=0.1" and loggers[1].name == "csv"


# ------------------------------------------------------------------------------ both namespaces
def test_lightning_pytorch_trainer_builds_its_own_objects(tmp_path):
    L = pytest.importorskip("lightning.pytorch")  # noqa: N806
    cfg = _compose(["trainer._target_=lightning.pytorch.Trainer", "logger=[tensorboard,csv]"])
    assert train.lightning_namespace(cfg) is L
    loggers = train.build_loggers(cfg, str(tmp_path))
    assert all(isinstance(lg, L.loggers.Logger) for lg in loggers)
    trainer = train.build_trainer(cfg, [], loggers, str(tmp_path))  # was: "more than one stateful callback"
    assert isinstance(trainer, L.Trainer) and isinstance(trainer.checkpoint_callback, L.callbacks.ModelCheckpoint)
    datamodule = train.build_datamodule(cfg)
    module = train.build_module(cfg, datamodule)
    assert isinstance(module, L.LightningModule) and type(module).__name__ == "Classifier"
    assert set(train.fit_data(datamodule, L, "fit")) == {"train_dataloaders", "val_dataloaders"}


def test_pytorch_lightning_is_the_default(tmp_path):
    import pytorch_lightning as pl

    cfg = _compose([])
    module = train.build_module(cfg, train.build_datamodule(cfg))
    from experiments.models import Classifier

    assert type(module) is Classifier and isinstance(module, pl.LightningModule)
    assert isinstance(train.build_trainer(cfg, [], [], str(tmp_path)), pl.Trainer)


# ------------------------------------------------------------------------------ logging
@pytest.fixture
def root_records():
    """The records the root logger's handlers receive (Hydra's console and train.log are such handlers)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
             for name in runtime._LIGHTNING_LOGGERS}
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def test_lightning_messages_reach_train_log_without_tips(root_records):
    import pytorch_lightning  # noqa: F401 - gives its logger a handler of its own and stops propagation

    runtime.route_logging()
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning_log.info("GPU available: False, used: False")
    lightning_log.info("💡 Tip: For seamless cloud logging, try installing litlogger")
    messages = [r.getMessage() for r in root_records]  # what passed the handler's filters
    assert "GPU available: False, used: False" in messages
    assert not any("Tip:" in m for m in messages)


# ------------------------------------------------------------------------------ estimate.py
def _run_dir(tmp_path: Path, hidden: list[int]) -> Path:
    """A run directory as train.py writes it (config and checkpoint), for an MLP on digits."""
    cfg = _compose([f"model.hidden={hidden}"])
    run = tmp_path / f"run{'_'.join(map(str, hidden))}"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    module = train.build_module(cfg, train.build_datamodule(cfg))
    torch.save({"state_dict": module.state_dict(), "epoch": 0}, run / "checkpoints" / "final.ckpt")
    return run


def test_another_models_checkpoint_is_one_line(tmp_path, capsys):
    run, other = _run_dir(tmp_path, [8]), _run_dir(tmp_path, [12])
    estimate.load_run(run)  # its own checkpoint fits
    with pytest.raises(SystemExit) as info:
        estimate.main([str(run), "--ckpt", str(other / "checkpoints" / "final.ckpt"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "Missing key" not in err
    assert "is the checkpoint of another model" in err and "(12, 64) in the checkpoint and (8, 64)" in err
    assert len(err.strip().splitlines()) == 2  # the error and the --traceback hint


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the file


def test_checkpoint_with_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="weights_only=True.*Unsupported global"):
        estimate.load_checkpoint(path)
    assert not marker.exists()


def test_estimate_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        estimate.main([str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "is not a run directory" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        estimate.main([str(tmp_path / "nowhere"), "--traceback"])


# ------------------------------------------------------------------------------ data
def test_truncated_gz_names_the_file(tmp_path):
    raw = b"\x00\x00\x08\x03" + struct.pack(">3I", 50, 28, 28) + random.Random(0).randbytes(50 * 28 * 28)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw)[:20_000])  # a download cut short
    assert read_idx_header(str(path))[1] == (50, 28, 28)  # the header is intact
    with pytest.raises(ValueError, match=rf"{path}: truncated or corrupt gzip file"):
        read_idx(str(path))


# ------------------------------------------------------------------------------ summarize.py
def _fake_sweep(root: Path, bounds: list[float], failed: int = 0) -> Path:
    for i, bound in enumerate(bounds + [None] * failed):
        run = root / str(i)
        (run / ".hydra").mkdir(parents=True)
        weight = 10.0 ** -(i + 1) * 1.23456789012345
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lipreg.penalty_weight={weight!r}",
                                                                        "trainer.max_epochs=1"]))
        if bound is None:
            (run / "train.log").write_text("[x][__main__][INFO] - start\n[x][__main__][ERROR] - ValueError: boom\n")
            continue
        metrics = {"test/acc": 0.9, "val/acc": 0.9, "lipschitz/autolip": bound * 0.9,
                   "lipschitz/autolip_certified": bound, "lipschitz/lower": bound / 2,
                   "test/certified_acc@0.1": 0.5, "val/certified_acc@0.1": 0.5,
                   "objective": "val/certified_acc@0.1", "objective_value": 0.5, "wall_time_s": 1.0}
        (run / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_summarize_reports_failed_jobs(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep", [8.1, 12.3], failed=1)
    assert summarize.main([str(sweep)]) == 1
    out, err = capsys.readouterr()
    assert "2 runs, 1 failed" in out
    assert "job 2 failed (lipreg.penalty_weight=" in err and "ValueError: boom" in err


def test_summarize_table_is_narrow_and_lists_each_metric_once(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep", [8.1, 8.15, 12.3])
    assert summarize.main([str(sweep)]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert max(map(len, table)) <= 100
    header = table[0].split("  ")
    assert [h.strip() for h in header if h.strip()] == ["run", "penalty_weight", "acc", "L certified", "L lower",
                                                         "cert acc@0.1"]
    assert table[1].split()[1] == "0.1235"  # 4 digits, not 17


def test_plot_ticks_and_legend_read_well(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.setdefault("fig", fig))
    rows = summarize.collect(_fake_sweep(tmp_path / "sweep", [8.1, 8.15, 12.3]))
    summarize.plot(rows, tmp_path / "summary.png")
    fig = saved["fig"]
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert len(labels) >= 3 and float(labels[-1]) >= 12  # ticks reach the largest bound, not only 8-10
    assert not ax.texts and not fig.axes[1].texts  # no job numbers drawn next to (overlapping) points
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["0: penalty_weight=0.1235", "1: penalty_weight=0.01235", "2: penalty_weight=0.001235"]


def test_train_py_refuses_an_added_key_in_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "experiments" / "train.py"), "+ckpt_pth=x.ckpt",
                           f"hydra.run.dir={tmp_path}"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("train.py: error: `+ckpt_pth=x.ckpt` adds the key 'ckpt_pth', which no part of the "
                                   "experiment reads (the schemas in experiments/config_schema.py list the keys); "
                                   "did you mean `ckpt_path=...` (no +)?")

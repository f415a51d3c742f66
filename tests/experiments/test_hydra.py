"""Hydra configs (conf/, experiments/config_schema.py) and the experiment scripts, end to end.

* every option of every config group composes with the compose API and instantiates;
* a misspelled key, on the command line or in a YAML file, fails with Hydra's error at composition;
* plain ``ddp`` under a multirun is refused;
* (slow) multiruns with the basic launcher, joblib and the Optuna sweeper run ``experiments/train.py`` as a
  subprocess and leave run dirs, TensorBoard event files with ``lipschitz/*`` tags (one TensorBoard run per
  job, named after its overrides), ``metrics.json`` files and a ``train.log`` with the summary;
  ``experiments/summarize.py`` turns them into a CSV and a PNG; ``experiments/estimate.py`` bounds a run;
  ``ckpt_path=`` resumes a run; ``trainer._target_=lightning.pytorch.Trainer`` trains and logs the HPARAMS.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from experiments import train
from experiments.config_schema import register_configs

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = {
    "model": ["mlp", "cnn", "lipcnn", "alexnet", "resnet"],
    "data": ["digits", "fashion_mnist", "mnist1d", "synthetic"],
    "lipreg": ["off", "log", "penalty", "seqlip", "certified"],
    "trainer": ["cpu", "ddp", "gpu"],
    "logger": ["tensorboard", "csv"],
}
# what every end-to-end run uses: tiny, quiet, fast
TINY = [
    "model.hidden=[16]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_model_summary=false",
    "progress_bar=false",
    "eval.n_iter=50",
    "eval.lower_bound_samples=16",
    "lipreg.eval_n_iter=50",
]

register_configs()


def _compose(overrides=(), conf_dir: Path = CONF, hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def test_group_options_exist():
    for group, options in GROUPS.items():
        found = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert found == sorted(options), group


# ------------------------------------------------------------------------------ compose + instantiate
@pytest.mark.parametrize("option", GROUPS["data"])
def test_data_options(option):
    cfg = _compose([f"data={option}", "seed=3"])
    assert cfg.data.seed == 3  # interpolated from the global seed
    if option == "fashion_mnist" and not os.path.isdir(cfg.data.data_dir):
        pytest.skip(f"{cfg.data.data_dir} absent (apt-get install dataset-fashion-mnist); composed only")
    dm = train.build_datamodule(cfg)
    assert type(dm).__name__ == cfg.data._target_.rsplit(".", 1)[1]
    assert dm.num_classes >= 2 and len(dm.input_shape) >= 1
    assert dm.seed == 3


@pytest.mark.parametrize("option", GROUPS["model"])
def test_model_options(option):
    cfg = _compose([f"model={option}"])  # digits: (1, 8, 8)
    dm = train.build_datamodule(cfg)
    module = train.build_module(cfg, dm)
    assert type(module.net).__name__ == cfg.model._target_.rsplit(".", 1)[1]
    assert module.lr == cfg.classifier.lr
    module.eval()
    out = module(torch.zeros(2, *dm.input_shape))
    assert out.shape == (2, dm.num_classes)


@pytest.mark.parametrize("data", ["mnist1d", "synthetic"])
def test_mlp_takes_shape_from_any_data(data):
    cfg = _compose(["model=mlp", f"data={data}"])
    dm = train.build_datamodule(cfg)
    net = train.build_module(cfg, dm).net
    assert net.input_shape == tuple(dm.input_shape) and net.num_classes == dm.num_classes


@pytest.mark.parametrize("option", GROUPS["lipreg"])
def test_lipreg_options(option):
    cfg = _compose([f"lipreg={option}"])
    callback = train.build_lipreg_callback(cfg)
    if option == "off":
        assert callback is None
        return
    assert type(callback).__name__ == "LipschitzCallback"
    assert callback.method == ("seqlip" if option == "seqlip" else "autolip")
    assert callback.module_name == "net"
    penalty = train.build_penalty(cfg)
    assert (penalty is None) == (option != "penalty")
    if penalty is not None:
        built = penalty(torch.nn.Linear(4, 3), torch.zeros(1, 4))
        assert (built.coefficient, built.kind, built.estimator.method) == (1e-2, "log", "autolip")
    assert list(callback.robust_eps) == ([0.1, 0.3, 0.5, 1.0] if option == "certified" else [0.1])
    if option == "seqlip":
        assert callback.estimator_options == {"search": "greedy"}


def test_penalty_with_lipreg_off_is_refused():
    cfg = _compose(["lipreg=off", "lipreg.penalty_weight=0.1"])
    with pytest.raises(ValueError, match="lipreg=penalty"):
        train.build_lipreg_callback(cfg)


def test_penalty_weight_override_puts_the_penalty_in_the_module():
    """``lipreg.penalty_weight=...`` (what a sweep turns) builds the penalty on the Classifier's net, in its loss; the
    callback only observes."""
    cfg = _compose(["lipreg.penalty_weight=1e-3", "lipreg.penalty.kind=hinge", "lipreg.penalty.threshold=2.0",
                    "model.hidden=[8]"])
    module = train.build_module(cfg, train.build_datamodule(cfg))
    penalty = module.lip_penalty
    assert (penalty.coefficient, penalty.kind, penalty.threshold) == (1e-3, "hinge", 2.0)
    assert penalty.estimator.model is module.net
    callback = train.build_lipreg_callback(cfg)
    assert not hasattr(callback, "penalty_weight")


@pytest.mark.parametrize("option", GROUPS["trainer"])
def test_trainer_options(option, tmp_path):
    cfg = _compose([f"trainer={option}", "progress_bar=false"])
    assert cfg.trainer.enable_progress_bar is False
    if option == "ddp":
        assert cfg.trainer.strategy == "ddp_fork" and cfg.trainer.devices == 2
    if option == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.accelerator == "gpu"
        pytest.skip("no GPU: trainer=gpu composed only")
    trainer = train.build_trainer(cfg, [], [], str(tmp_path))
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert type(trainer.strategy).__name__ == {"cpu": "SingleDeviceStrategy", "ddp": "DDPStrategy",
                                               "gpu": "SingleDeviceStrategy"}[option]


@pytest.mark.parametrize("options", [["tensorboard"], ["csv"], ["tensorboard", "csv"]])
def test_logger_options(options, tmp_path):
    choice = options[0] if len(options) == 1 else "[" + ",".join(options) + "]"
    cfg = _compose([f"logger={choice}"])
    assert [k for k, v in cfg.logger.items() if v is not None] == options
    loggers = train.build_loggers(cfg, save_dir=str(tmp_path))
    names = {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger"}
    assert [type(lg).__name__ for lg in loggers] == [names[o] for o in options]
    assert all(Path(lg.save_dir) == tmp_path for lg in loggers)


def test_logger_writes_into_the_hydra_run_dir():
    cfg = _compose([], hydra_config=True)
    assert OmegaConf.to_container(cfg.logger.tensorboard)["save_dir"] == "${hydra:runtime.output_dir}"


def test_launcher_and_sweeper_presets():
    cfg = _compose(["hydra/launcher=joblib"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    cfg = _compose(["hydra/launcher=slurm"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 120
    cfg = _compose(["hydra/launcher=submitit_slurm"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    cfg = _compose(["+experiment=tune_penalty"], hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert str(sweeper.direction).endswith("maximize")
    assert sweeper.params["lipreg.penalty_weight"].startswith("tag(log, interval(")
    assert cfg.lipreg.penalty_weight > 0 and cfg.objective == "val/certified_acc@0.1"
    assert cfg.objective == f"val/certified_acc@{cfg.eval.radii[0]:g}"


def test_eval_radii_follow_the_callback():
    cfg = _compose(["lipreg.robust_eps=[0.05,0.2]"])
    assert list(cfg.eval.radii) == [0.05, 0.2]


# ------------------------------------------------------------------------------ typos fail at once
@pytest.mark.parametrize("override, key", [
    ("model.hiden=[8]", "hiden"),
    ("model=cnn model.chanels=[8]", "chanels"),
    ("data.batchsize=8", "batchsize"),
    ("lipreg.penalty_wieght=0.1", "penalty_wieght"),
    ("trainer.max_epoch=2", "max_epoch"),
    ("logger.tensorboard.nme=x", "nme"),
    ("eval.radius=[0.1]", "radius"),
    ("sed=1", "sed"),
])
def test_misspelled_override_fails_with_hydras_error(override, key):
    with pytest.raises(ConfigCompositionException, match=f"Could not override '[^']*{key}'") as info:
        _compose(override.split())
    assert f"Key '{key}' not in" in str(info.value.__cause__)


def test_misspelled_group_option_fails():
    with pytest.raises(Exception, match="Could not find 'model/mpl'"):
        _compose(["model=mpl"])


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        _compose(["trainer.max_epochs=five"])


def test_misspelled_key_in_a_yaml_file_fails(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "typo.yaml").write_text("defaults:\n  - base_mlp\nhiden: [8]\n")
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["model=typo"], conf_dir=conf)
    assert "hiden" in str(info.value) + str(info.value.__cause__)


def test_plain_ddp_refused_under_multirun():
    cfg = _compose(["trainer=ddp", "trainer.strategy=ddp"], hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ValueError, match="ddp_fork"):
            train.check_strategy(cfg)
        cfg.trainer.strategy = "ddp_fork"
        train.check_strategy(cfg)  # fine
    finally:
        HydraConfig.instance().cfg = None


# ------------------------------------------------------------------------------ end to end
def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _scalar_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def _hparam_names(run_dir: Path) -> set[str]:
    """The hyper-parameter names of the HPARAMS session(s) in a run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    names: set[str] = set()
    for path in glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams").values()
        except KeyError:  # no HPARAMS in this file
            continue
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            names |= set(data.session_start_info.hparams)
    return names


def _check_run_dir(run_dir: Path, overrides_contain: str | None = None) -> dict:
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    if overrides_contain:
        assert any(overrides_contain in o for o in overrides), overrides
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "val/acc", "lipschitz/autolip", "lipschitz/autolip_certified", "lipschitz/lower",
                "test/certified_acc@0.1", "val/certified_acc@0.1", "objective_value"):
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["lipschitz/lower"] <= metrics["lipschitz/autolip_certified"] * (1 + 1e-4)
    assert metrics["objective_value"] == metrics[metrics["objective"]]
    tags = _scalar_tags(run_dir)
    assert {"lipschitz/autolip", "lipschitz/autolip_certified", "lipschitz/lower"} <= tags, tags
    assert "robust/certified_acc@0.1" in tags
    assert not any(t.startswith("final/") for t in tags)  # the final evaluation is in metrics.json, not SCALARS
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()
    train_log = (run_dir / "train.log").read_text()
    assert "lipreg run summary" in train_log and "GPU available" in train_log  # ours and Lightning's
    assert "Tip:" not in train_log
    return metrics


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> Path:
    """A 2-job multirun with the basic launcher, run once per session and shared by the pytest-xdist workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # an xdist worker's base is popen-gwN inside the session's: its parent is common to this session's workers only
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    sweep = shared / "hydra_basic_sweep"
    with FileLock(str(shared / "hydra_basic_sweep.lock")):
        if not (sweep / "done").is_file():
            shutil.rmtree(sweep, ignore_errors=True)
            proc = _run("train.py", "-m", "lipreg.penalty_weight=0,0.01", f"hydra.sweep.dir={sweep}", *TINY)
            (sweep / "stdout.txt").write_text(proc.stdout)
            (sweep / "done").write_text("")
    return sweep


@pytest.mark.slow
def test_basic_multirun(basic_sweep):
    runs = sorted(p.name for p in basic_sweep.iterdir() if p.is_dir())
    assert runs == ["0", "1"]
    stdout = (basic_sweep / "stdout.txt").read_text()
    assert stdout.count("lipreg run summary") == 2
    assert f"tensorboard --logdir {basic_sweep}" in stdout  # the whole sweep
    m0 = _check_run_dir(basic_sweep / "0", "lipreg.penalty_weight=0")
    m1 = _check_run_dir(basic_sweep / "1", "lipreg.penalty_weight=0.01")
    assert m0["lipschitz/autolip"] != m1["lipschitz/autolip"]  # the penalty changed the training
    for job, weight in (("0", "0"), ("1", "0.01")):  # TensorBoard lists the job as 0/penalty_weight=0,hidden=...
        (tb_run,) = [p for p in (basic_sweep / job).iterdir() if p.name.startswith(f"penalty_weight={weight},")]
        assert list(tb_run.glob("events.out.tfevents.*")), tb_run
        assert "hidden=[16]" in tb_run.name


@pytest.mark.slow
def test_summarize(basic_sweep):
    proc = _run("summarize.py", str(basic_sweep))
    assert "2 runs" in proc.stdout
    with open(basic_sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1"]
    assert [float(r["lipreg.penalty_weight"]) for r in rows] == [0.0, 1e-2]
    for column in ("test/acc", "lipschitz/autolip", "lipschitz/autolip_certified", "lipschitz/lower",
                   "test/certified_acc@0.1"):
        assert all(float(r[column]) >= 0 for r in rows), column
    png = (basic_sweep / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_estimate_on_a_run_dir(basic_sweep, tmp_path):
    out = tmp_path / "estimate.json"
    proc = _run("estimate.py", str(basic_sweep / "0"), "--n-iter", "50", "--lower-samples", "16",
                "--json", str(out))
    text = proc.stdout
    for line in ("Per-layer factors", "AutoLip estimate", "certified bound", "SeqLip (greedy)", "SeqLip (exact)",
                 "lower bound", "certified acc @ eps=0.1"):
        assert line in text, line
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["layers"] and all(v >= 0 for v in report["layers"].values())
    run_metrics = json.loads((basic_sweep / "0" / "metrics.json").read_text())
    assert m["lipschitz/autolip_certified"] == pytest.approx(run_metrics["lipschitz/autolip_certified"], rel=1e-3)
    assert m["test/acc"] == pytest.approx(run_metrics["test/acc"])
    for search in ("greedy", "exact"):  # hidden=[16] is small enough for exact SeqLip: a number, or lipreg's error
        key = f"lipschitz/seqlip_{search}"
        assert key in m or not report["errors"][key].startswith("skipped"), report["errors"]
        if key in m:
            assert m[key] <= m["lipschitz/autolip"] * (1 + 1e-3)  # SeqLip is never looser than AutoLip


@pytest.mark.slow
def test_resume_from_a_checkpoint(basic_sweep, tmp_path):
    ckpt = basic_sweep / "0" / "checkpoints" / "final.ckpt"
    first = json.loads((basic_sweep / "0" / "metrics.json").read_text())
    tiny = [o for o in TINY if not o.startswith("trainer.max_epochs=")]
    _run("train.py", f"ckpt_path={ckpt}", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}", *tiny)
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(ckpt)
    assert first["global_step"] == 2 and resumed["global_step"] == 4  # one more epoch of 2 batches, not two
    assert torch.load(tmp_path / "checkpoints" / "final.ckpt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_lightning_pytorch_namespace_run(tmp_path):
    pytest.importorskip("lightning.pytorch")
    _run("train.py", "trainer._target_=lightning.pytorch.Trainer", "lipreg=off", f"hydra.run.dir={tmp_path}", *TINY)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["lipschitz/autolip_certified"] > 0
    assert (tmp_path / "checkpoints" / "final.ckpt").is_file()
    # lipreg=off: train.py writes the HPARAMS itself, with the config-group choices and the overrides
    assert {"model", "data", "lipreg", "trainer", "trainer._target_", "eval.n_iter"} <= _hparam_names(tmp_path)


@pytest.mark.slow
def test_joblib_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    _run("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "lipreg.penalty_weight=0,0.01",
         f"hydra.sweep.dir={sweep}", *TINY)
    for job in ("0", "1"):
        _check_run_dir(sweep / job, "lipreg.penalty_weight=")


@pytest.mark.slow
def test_optuna_preset_two_trials(tmp_path):
    sweep = tmp_path / "sweep"
    _run("train.py", "-m", "+experiment=tune_penalty", "hydra.sweeper.n_trials=2",
         f"hydra.sweep.dir={sweep}", *TINY)
    weights = []
    for job in ("0", "1"):
        metrics = _check_run_dir(sweep / job, "lipreg.penalty_weight=")
        assert metrics["objective"] == "val/certified_acc@0.1"
        weights.append(OmegaConf.load(sweep / job / ".hydra" / "config.yaml").lipreg.penalty_weight)
    assert all(1e-4 <= w <= 1.0 for w in weights)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["lipreg.penalty_weight"] in weights
    best = max(json.loads((sweep / j / "metrics.json").read_text())["objective_value"] for j in ("0", "1"))
    assert results["best_value"] == pytest.approx(best)


@pytest.mark.slow
def test_certified_preset_through_train_py(tmp_path: Path) -> None:
    """``lipreg=certified``: the Classifier trains on the margin loss; the callback logs its bound and radius and the
    per-pair certified accuracy; the final evaluation certifies every radius."""
    _run("train.py", "lipreg=certified", "model=lipcnn", "data=digits", "trainer.max_epochs=1",
         "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "eval.n_iter=10", "eval.lower_bound_samples=8",
         "lipreg.margin.warmup=2", "lipreg.margin.kind=lse", "lipreg.log_every_n_steps=2", "progress_bar=false",
         "logger=csv", f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for eps in ("0.1", "0.3", "0.5", "1"):
        assert 0.0 <= metrics[f"test/pairwise_certified_acc@{eps}"] <= metrics["test/acc"]
    assert 0.0 <= metrics["robust/pairwise_certified_acc@0.3"] <= 1.0  # the callback's, at validation
    logged = next(tmp_path.glob("csv/**/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"lipschitz/margin_bound", "lipschitz/margin_eps"} <= set(logged)


@pytest.mark.slow
def test_penalty_preset_puts_the_penalty_in_the_loss_and_the_callback_logs_it(tmp_path: Path) -> None:
    _run("train.py", "lipreg=penalty", "model.hidden=[16]", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
         "trainer.limit_val_batches=1", "eval.n_iter=10", "eval.lower_bound_samples=8", "lipreg.log_every_n_steps=2",
         "progress_bar=false", "logger=csv", f"hydra.run.dir={tmp_path}")
    logged = next(tmp_path.glob("csv/**/metrics.csv")).read_text().splitlines()[0].split(",")
    assert "lipschitz/penalty" in logged and "lipschitz/task_loss" not in logged

#!/usr/bin/env python
"""Train a classifier while lipreg estimates, logs and (optionally) penalises its Lipschitz constant.

    python experiments/train.py                                   # the quick start: CNN on digits, ~1 min on CPU
    python experiments/train.py model=mlp lipreg=penalty trainer.max_epochs=20
    python experiments/train.py -m lipreg.penalty_weight=0,1e-3,1e-2 model=mlp,cnn
    python experiments/train.py -m lipreg.penalty_weight=0,1e-3,1e-2 hydra/launcher=joblib
    python experiments/train.py -m +experiment=tune_penalty       # Optuna search of the penalty weight

Everything is configured in ``conf/`` (schemas: ``experiments/config_schema.py``) and built with
``hydra.utils.instantiate``: the data module (``data/``), the network (``model/``, given the data's
``input_shape``/``num_classes``), ``experiments.models.Classifier``, the ``lipreg.LipschitzCallback``
(``lipreg/``: off, log, penalty, seqlip), the loggers (``logger/``, writing into the Hydra run directory)
and the ``Trainer`` (``trainer/``).

Each run directory gets ``.hydra/`` (the composed config and the overrides), ``tensorboard/`` (event files),
``checkpoints/final.ckpt``, ``train.log`` (Lightning's messages and the run summary) and ``metrics.json``
(the final evaluation: accuracy, AutoLip estimate and certificate, SeqLip when configured, lower bound,
certified accuracy). The return value, ``metrics[cfg.objective]``, is what a sweeper (Optuna) optimises.

``ckpt_path=PATH`` resumes a run from a checkpoint (loaded with ``weights_only=True``). The Lightning classes
(checkpoint callback, loggers, seeding) come from the namespace of ``trainer._target_``: ``pytorch_lightning``
(the default) or ``lightning.pytorch``. In a multirun each job's TensorBoard run is named after its overrides,
and its config-group choices and overrides are logged as hyper-parameters (the HPARAMS tab compares them).
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python experiments/train.py` puts experiments/ on the path, not the root
    sys.path.insert(0, str(_ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments import runtime  # noqa: E402
from experiments.config_schema import register_configs  # noqa: E402

if TYPE_CHECKING:
    import pytorch_lightning as pl

register_configs()
runtime.silence_noise()
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ namespaces
_NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def lightning_namespace(cfg: DictConfig) -> ModuleType:
    """``pytorch_lightning`` or ``lightning.pytorch``: the package of the configured ``trainer._target_``.

    Lightning refuses objects of the other namespace (two ``ModelCheckpoint`` classes count as two stateful
    callbacks), so every Lightning object of a run is built from this one.
    """
    target = str(cfg.trainer._target_)
    return importlib.import_module(next((ns for ns in _NAMESPACES if target.startswith(f"{ns}.")), _NAMESPACES[0]))


def in_namespace(target: str, namespace: ModuleType) -> str:
    """``target`` (a ``_target_`` path) moved into ``namespace`` when it names a class of the other one."""
    for ns in _NAMESPACES:
        if target.startswith(f"{ns}."):
            return f"{namespace.__name__}.{target[len(ns) + 1:]}"
    return target


def rebase(cls: type, namespace: ModuleType) -> type:
    """``cls`` with its direct ``LightningModule`` base of the other namespace replaced by ``namespace``'s.

    The steps live in the other bases (``experiments.models.Classifier`` = ``ClassifierSteps`` + the base), so
    they run unchanged. The class is made here, not imported, so ``ddp_spawn`` cannot pickle it (``ddp_fork``
    and a single process can).
    """
    base = namespace.LightningModule
    if issubclass(cls, base):
        return cls
    foreign = [importlib.import_module(ns).LightningModule for ns in _NAMESPACES if ns != namespace.__name__]
    if not any(b in foreign for b in cls.__bases__):
        raise TypeError(f"{cls.__qualname__} is not a {namespace.__name__}.LightningModule and does not derive from "
                        "the other namespace's LightningModule directly; derive it from the trainer's namespace, or "
                        "use the Trainer of its own namespace (trainer._target_)")
    bases = tuple(base if b in foreign else b for b in cls.__bases__)
    return type(cls.__name__, bases, {"__module__": cls.__module__, "__doc__": cls.__doc__})


def fit_data(datamodule: Any, namespace: ModuleType, stage: str) -> dict[str, Any]:
    """The data arguments of ``trainer.fit`` / ``trainer.test``: the data module itself in its own namespace,
    else its loaders (a Trainer refuses the other namespace's ``LightningDataModule``)."""
    if isinstance(datamodule, namespace.LightningDataModule):
        return {"datamodule": datamodule}
    datamodule.setup(stage)
    if stage == "fit":
        return {"train_dataloaders": datamodule.train_dataloader(), "val_dataloaders": datamodule.val_dataloader()}
    return {"dataloaders": datamodule.test_dataloader()}


# ------------------------------------------------------------------------------------------ builders
def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate(cfg.data)


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The network from ``cfg.model`` (shape from the data module), wrapped in ``cfg.classifier``."""
    from hydra.utils import get_class

    net = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    cls = rebase(get_class(cfg.classifier._target_), lightning_namespace(cfg))
    options: dict[str, Any] = OmegaConf.to_container(cfg.classifier, resolve=True)  # type: ignore[assignment]
    return cls(net=net, lip_penalty=build_penalty(cfg), margin_loss=build_margin_loss(cfg),
               **{k: v for k, v in options.items() if k != "_target_"})


def build_penalty(cfg: DictConfig) -> Any:
    """The ``lipreg.LipschitzPenalty`` partial of ``cfg.lipreg.penalty`` when ``lipreg.penalty_weight > 0``, else
    ``None``: the Classifier builds it on its network and adds it to the loss (the callback only logs it)."""
    if not cfg.lipreg.enabled or not cfg.lipreg.penalty_weight:
        return None
    return _loss_term(cfg, cfg.lipreg.penalty)


def build_margin_loss(cfg: DictConfig) -> Any:
    """The ``lipreg.LipschitzMarginLoss`` partial of ``cfg.lipreg.margin`` (``lipreg=certified``), or ``None``."""
    if not cfg.lipreg.enabled or cfg.lipreg.margin is None:
        return None
    return _loss_term(cfg, cfg.lipreg.margin)


def _loss_term(cfg: DictConfig, node: DictConfig) -> Any:
    """A partial of a lipreg loss term, its enums as strings, with the run's ``estimator_options``."""
    term: dict[str, Any] = OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[assignment]
    estimator_options = OmegaConf.to_container(cfg.lipreg.estimator_options, resolve=True)
    return instantiate({**term, **estimator_options})


def build_lipreg_callback(cfg: DictConfig, hparams: dict[str, Any] | None = None) -> pl.Callback | None:
    """``lipreg.LipschitzCallback`` from ``cfg.lipreg``, or ``None`` for ``lipreg=off`` (``enabled: false``).

    ``estimator_options`` are spread into the callback's ``**estimator_options`` (they go to the estimator);
    ``hparams`` (the job's choices and overrides) join the callback's hyper-parameters. The loss terms
    (``penalty_weight``, ``penalty``, ``margin``) are the Classifier's (:func:`build_penalty`,
    :func:`build_margin_loss`): the callback finds them on the module.
    """
    node: dict[str, Any] = OmegaConf.to_container(cfg.lipreg, resolve=True,  # type: ignore[assignment]
                                                  enum_to_str=True)
    if not node.pop("enabled"):
        if node["penalty_weight"]:
            raise ValueError(f"lipreg=off (enabled: false) with lipreg.penalty_weight={node['penalty_weight']}: the "
                             "penalty would be ignored; use lipreg=penalty (or lipreg=log) to penalise")
        return None
    options = node.pop("estimator_options") or {}
    for term in ("penalty_weight", "penalty", "margin"):  # the Classifier's loss terms, not the callback's options
        node.pop(term, None)
    from lipreg import keys

    # the penalty is the module's, but its weight is what a sweep compares: logged with the callback's options
    node["hparams"] = {**(hparams or {}), keys.hparam("penalty_weight"): cfg.lipreg.penalty_weight}
    return instantiate({**node, **options})


def build_loggers(cfg: DictConfig, save_dir: str | None = None, name: str | None = None) -> list:
    """Every logger filled in ``cfg.logger``, in the trainer's Lightning namespace.

    ``save_dir`` overrides their ``save_dir`` (e.g. in tests); ``name`` the TensorBoard run name.
    """
    namespace = lightning_namespace(cfg)
    loggers = []
    for slot, node in cfg.logger.items():
        if node is None:
            continue
        extra: dict[str, Any] = {"_target_": in_namespace(str(node._target_), namespace)}
        if save_dir is not None:
            extra["save_dir"] = save_dir
        if name is not None and slot == "tensorboard":
            extra["name"] = name
        loggers.append(instantiate(node, **extra))
    return loggers


def check_strategy(cfg: DictConfig) -> None:
    """Refuse plain ``ddp`` under a multirun: its extra ranks re-run this script, hence the whole sweep.

    On SLURM or torchelastic the ranks are started outside, and plain ``ddp`` is right.
    """
    if str(cfg.trainer.strategy) != "ddp" or not HydraConfig.initialized():
        return
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return
    raise ValueError(
        "trainer.strategy=ddp under a Hydra multirun (-m) re-launches this script on every extra rank, which "
        "re-runs the whole sweep there. Use trainer.strategy=ddp_fork (CPU; the default of trainer=ddp) or "
        "trainer.strategy=ddp_spawn (GPU), or launch on SLURM (hydra/launcher=slurm)."
    )


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, run_dir: str) -> pl.Trainer:
    callbacks = list(callbacks)
    if cfg.checkpoint:
        ModelCheckpoint = lightning_namespace(cfg).callbacks.ModelCheckpoint  # noqa: N806

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), filename="final",
                                         save_top_k=1, enable_version_counter=False))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       enable_checkpointing=bool(cfg.checkpoint))


# ------------------------------------------------------------------------------------------ summary
def final_evaluation(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict:
    """``experiments.estimate.evaluate_bounds`` on the trained network (val and test splits)."""
    from experiments.estimate import evaluate_bounds

    searches: list[str] = []
    options: dict[str, Any] = {}
    if cfg.lipreg.enabled and cfg.lipreg.method == "seqlip":
        options = dict(OmegaConf.to_container(cfg.lipreg.estimator_options, resolve=True))  # type: ignore[arg-type]
        searches.append(options.pop("search", "greedy"))
    if cfg.eval.seqlip and cfg.eval.seqlip not in searches:
        searches.append(cfg.eval.seqlip)
    return evaluate_bounds(
        module.net, datamodule, splits=("val", "test"), radii=list(cfg.eval.radii), n_iter=cfg.eval.n_iter,
        seqlip=searches, seqlip_options=options, exact_max_units=cfg.eval.exact_max_units,
        lower_bound_samples=cfg.eval.lower_bound_samples,
        lower_bound_ascent_steps=cfg.eval.lower_bound_ascent_steps, seed=cfg.seed, progress=cfg.progress_bar,
    )


def _rel(path: str | Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_summary(metrics: dict[str, float], report: dict, cfg: DictConfig, choices: dict[str, str], run_dir: str,
                   tensorboard_dir: str | None, sweep_dir: str | None) -> str:
    """The run summary: the job's choices, the rows of the final evaluation (``experiments.report.report_rows``,
    the formatter of ``experiments/estimate.py``'s report, on the test and val splits) and where the run went."""
    from experiments.report import report_rows

    lines = ["", "=" * 78, f"lipreg run summary   model={choices.get('model', '?')} data={choices.get('data', '?')} "
             f"lipreg={choices.get('lipreg', '?')} penalty_weight={cfg.lipreg.penalty_weight:g}", "-" * 78,
             *report_rows(report, ("test", "val"), cfg.eval.radii, metrics), "-" * 78,
             f"  run dir      {_rel(run_dir)}", f"  metrics      {_rel(Path(run_dir) / 'metrics.json')}"]
    if tensorboard_dir:
        lines.append(f"  TensorBoard  tensorboard --logdir {_rel(run_dir)}")
        if sweep_dir:
            lines.append(f"  whole sweep  tensorboard --logdir {_rel(sweep_dir)}")
    lines.append("=" * 78)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the run
def check_resume(cfg: DictConfig) -> None:
    """``ckpt_path`` must name a file (or one of Lightning's ``last`` / ``best`` / ``hpc``) before anything runs."""
    path = cfg.ckpt_path
    if path is not None and path not in ("last", "best", "hpc") and not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint (resume from a run's "
                                "<run dir>/checkpoints/final.ckpt)")


def fit_kwargs(trainer: pl.Trainer, ckpt_path: str | None) -> dict[str, Any]:
    """``ckpt_path`` and, where the Trainer takes it, ``weights_only=True`` (a checkpoint is a pickle)."""
    kwargs: dict[str, Any] = {"ckpt_path": ckpt_path}
    if ckpt_path is not None and "weights_only" in inspect.signature(trainer.fit).parameters:
        kwargs["weights_only"] = True
    return kwargs


def log_without_callback(loggers: list, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """``lipreg=off``: no callback writes the HPARAMS, so the job's choices go with the final metrics here."""
    for logger in loggers:
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(hparams, metrics={f"hp/{k}": v for k, v in metrics.items()})
        else:
            logger.log_hyperparams(hparams)
        logger.save()


def run(cfg: DictConfig) -> float | None:
    """One training run; returns ``metrics[cfg.objective]`` (``None`` on non-zero ranks of a plain ddp run)."""
    started = time.perf_counter()
    runtime.route_logging()
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = hydra_cfg.sweep.dir if multirun else None
    task = list(hydra_cfg.overrides.task)
    try:  # a wrong command line: one line, no stack
        runtime.check_added_keys(cfg, task, hydra_cfg.runtime.choices.keys())
        check_strategy(cfg)
        check_resume(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: {e}") from None
    import torch  # here, not at the top: config-only commands (--cfg job, --help) do not pay for it

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    namespace = lightning_namespace(cfg)
    namespace.seed_everything(cfg.seed, workers=True)

    hparams = runtime.run_hparams(cfg, hydra_cfg.runtime.choices, task)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    lip_callback = build_lipreg_callback(cfg, hparams)
    loggers = build_loggers(cfg, name=runtime.run_name(task) if multirun else None)
    trainer = build_trainer(cfg, [lip_callback] if lip_callback is not None else [], loggers, run_dir)

    trainer.fit(module, **fit_data(datamodule, namespace, "fit"), **fit_kwargs(trainer, cfg.ckpt_path))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    trainer.test(module, **fit_data(datamodule, namespace, "test"), verbose=False)
    logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    if not trainer.is_global_zero:  # plain ddp (single run): rank 0 evaluates and writes
        return None

    module.cpu()
    report = final_evaluation(cfg, module, datamodule)
    metrics = {**logged, **report["metrics"]}
    if lip_callback is None:
        log_without_callback(loggers, hparams, metrics)
    tensorboard_dir = next((lg.log_dir for lg in loggers if isinstance(lg, namespace.loggers.TensorBoardLogger)),
                           None)
    ckpt = os.path.join(run_dir, "checkpoints", "final.ckpt") if cfg.checkpoint else None
    if cfg.objective not in metrics:
        raise KeyError(f"objective {cfg.objective!r} is not among the final metrics {sorted(metrics)}; set "
                       "`objective=` to one of them (its radius must be one of eval.radii)")
    record = {
        **metrics,
        "objective": cfg.objective,
        "objective_value": metrics[cfg.objective],
        "certified_by": report["certified_by"],
        "layers": report["layers"],
        "errors": report["errors"],
        "run_dir": str(Path(run_dir).resolve()),
        "tensorboard_dir": tensorboard_dir,
        "checkpoint": ckpt,
        "resumed_from": cfg.ckpt_path,
        "global_step": trainer.global_step,
        "wall_time_s": time.perf_counter() - started,
    }
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    log.info(format_summary(metrics, report, cfg, hydra_cfg.runtime.choices, run_dir, tensorboard_dir, sweep_dir))
    return float(metrics[cfg.objective])


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    runtime.check_plugins(sys.argv[1:])
    main()

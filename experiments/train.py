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
``checkpoints/final.ckpt``, ``train.log`` and ``metrics.json`` (the final evaluation: accuracy, AutoLip
estimate and certificate, SeqLip when configured, lower bound, certified accuracy). The return value,
``metrics[cfg.objective]``, is what a sweeper (Optuna) optimises.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python experiments/train.py` puts experiments/ on the path, not the root
    sys.path.insert(0, str(_ROOT))

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments.config_schema import register_configs  # noqa: E402

register_configs()
log = logging.getLogger(__name__)

# noise that every small CPU run would print
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")  # Lightning 2.6 on torch >= 2.10


# ------------------------------------------------------------------------------------------ builders
def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate(cfg.data)


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The network from ``cfg.model`` (shape from the data module), wrapped in ``cfg.classifier``."""
    net = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    return instantiate(cfg.classifier, net=net, margin_loss=build_margin_loss(cfg))


def build_margin_loss(cfg: DictConfig) -> Any:
    """The ``lipreg.LipschitzMarginLoss`` partial of ``cfg.lipreg.margin`` (``lipreg=certified``), or ``None``."""
    if not cfg.lipreg.enabled or cfg.lipreg.margin is None:
        return None
    options = OmegaConf.to_container(cfg.lipreg.estimator_options, resolve=True)
    return instantiate(cfg.lipreg.margin, **options)


def build_lipreg_callback(cfg: DictConfig) -> pl.Callback | None:
    """``lipreg.LipschitzCallback`` from ``cfg.lipreg``, or ``None`` for ``lipreg=off`` (``enabled: false``).

    ``estimator_options`` are spread into the callback's ``**estimator_options`` (they go to the estimator).
    """
    node: dict[str, Any] = OmegaConf.to_container(cfg.lipreg, resolve=True)  # type: ignore[assignment]
    if not node.pop("enabled"):
        if node["penalty_weight"]:
            raise ValueError(f"lipreg=off (enabled: false) with lipreg.penalty_weight={node['penalty_weight']}: the "
                             "penalty would be ignored; use lipreg=penalty (or lipreg=log) to penalise")
        return None
    options = node.pop("estimator_options") or {}
    node.pop("margin", None)  # the margin loss is the Classifier's (build_margin_loss), not the callback's
    return instantiate({**node, **options})


def build_loggers(cfg: DictConfig, save_dir: str | None = None) -> list:
    """Every logger filled in ``cfg.logger`` (``save_dir`` overrides their ``save_dir``, e.g. in tests)."""
    extra = {} if save_dir is None else {"save_dir": save_dir}
    return [instantiate(node, **extra) for node in cfg.logger.values() if node is not None]


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
        from pytorch_lightning.callbacks import ModelCheckpoint

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
        lower_bound_ascent_steps=cfg.eval.lower_bound_ascent_steps, seed=cfg.seed,
    )


def _rel(path: str | Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_summary(metrics: dict[str, float], report: dict, cfg: DictConfig, run_dir: str,
                   tensorboard_dir: str | None, sweep_dir: str | None) -> str:
    m = metrics
    lines = ["", "=" * 78, f"lipreg run summary   model={HydraConfig.get().runtime.choices.get('model', '?')}"
             f" data={HydraConfig.get().runtime.choices.get('data', '?')} lipreg="
             f"{HydraConfig.get().runtime.choices.get('lipreg', '?')} penalty_weight={cfg.lipreg.penalty_weight:g}",
             "-" * 78]

    def row(label: str, key: str, note: str = "") -> None:
        if key in m:
            lines.append(f"  {label:<30} {m[key]:>10.4g}  {note}".rstrip())
        elif key in report.get("errors", {}):
            lines.append(f"  {label:<30} {'n/a':>10}  ({report['errors'][key]})")

    row("test accuracy", "test/acc")
    row("val accuracy", "val/acc")
    row("AutoLip estimate", "lipschitz/autolip", "converged power method (from below)")
    row("AutoLip certified", "lipschitz/autolip_certified", "guaranteed upper bound")
    for search in ("greedy", "exact", "lowrank"):
        row(f"SeqLip ({search})", f"lipschitz/seqlip_{search}")
        row(f"SeqLip ({search}) certified", f"lipschitz/seqlip_{search}_certified", "guaranteed upper bound")
    row("lower bound", "lipschitz/lower", "max local Jacobian norm on val inputs")
    row("certified / lower", "lipschitz/upper_over_lower", "tightest certificate / lower bound")
    for eps in cfg.eval.radii:
        for split in ("test", "val"):
            row(f"{split} certified acc @ eps={eps:g}", f"{split}/certified_acc@{eps:g}",
                f"L2 radius, {report.get('certified_by') or '?'} certificate" if split == "test" else "")
            row(f"{split} pairwise cert. @ eps={eps:g}", f"{split}/pairwise_certified_acc@{eps:g}",
                "per-pair (GloRo) margins" if split == "test" else "")
    lines.append("-" * 78)
    lines.append(f"  run dir      {_rel(run_dir)}")
    lines.append(f"  metrics      {_rel(Path(run_dir) / 'metrics.json')}")
    if tensorboard_dir:
        lines.append(f"  TensorBoard  tensorboard --logdir {_rel(run_dir)}")
        if sweep_dir:
            lines.append(f"  whole sweep  tensorboard --logdir {_rel(sweep_dir)}")
    lines.append("=" * 78)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the run
def run(cfg: DictConfig) -> float | None:
    """One training run; returns ``metrics[cfg.objective]`` (``None`` on non-zero ranks of a plain ddp run)."""
    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    check_strategy(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    lip_callback = build_lipreg_callback(cfg)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, [lip_callback] if lip_callback is not None else [], loggers, run_dir)

    trainer.fit(module, datamodule=datamodule)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    trainer.test(module, datamodule=datamodule, verbose=False)
    logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    if not trainer.is_global_zero:  # plain ddp (single run): rank 0 evaluates and writes
        return None

    module.cpu()
    report = final_evaluation(cfg, module, datamodule)
    metrics = {**logged, **report["metrics"]}
    final = {f"final/{k}": v for k, v in report["metrics"].items()}
    for logger in loggers:  # the final evaluation next to the training curves (TensorBoard: final/*)
        logger.log_metrics(final, step=trainer.global_step)
        logger.save()
    tensorboard_dir = next((lg.log_dir for lg in loggers if isinstance(lg, pl.loggers.TensorBoardLogger)), None)
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
        "wall_time_s": time.perf_counter() - started,
    }
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    summary = format_summary(metrics, report, cfg, run_dir, tensorboard_dir, sweep_dir)
    print(summary, flush=True)
    return float(metrics[cfg.objective])


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()

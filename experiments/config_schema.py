"""Structured-config schemas (dataclasses in Hydra's ConfigStore) for ``conf/``.

Every option of every config group merges onto a dataclass, so the composed config is *struct* and *typed*:
a misspelled key (``model.hiden=64``) or a wrong type (``trainer.max_epochs=five``) fails at once with Hydra's
own message, before anything is built or trained.

How the schemas are attached:

* ``model/`` and ``data/``: each option has its own schema, stored in the group as ``base_<option>``
  (``model/base_mlp``, ``data/base_digits``...), and each YAML option starts with ``defaults: [base_<option>]``
  (the pattern of Hydra's "structured config schema" tutorial). The root config types these nodes ``Any``
  because the options have different fields.
* ``lipreg/`` and ``trainer/``: every option shares one schema, stored as ``base_lipreg`` / ``base_trainer``.
* ``logger/``: the root schema types ``logger`` as :class:`LoggersConf`, one optional slot per logger, so
  options can be combined (``'logger=[tensorboard,csv]'``).
* the root: :class:`ExperimentConf` is stored as ``base_config``, first in ``conf/config.yaml``'s defaults.

Model configs carry no data shape: ``experiments/train.py`` passes ``input_shape`` and ``num_classes`` from
the data module at instantiate time (``instantiate(cfg.model, input_shape=..., num_classes=...)``).

Closed choices are ``enum.StrEnum`` fields (OmegaConf's structured configs take enums, not ``Literal``):
``lipreg.method=seqlipp`` fails at composition with the valid values listed, not inside ``trainer.fit``. A
member equals, prints and serialises as its value (``Method.autolip == "autolip"``). The library's choices are made
from its ``Literal`` types (:mod:`lipreg.options`), so the two cannot drift apart.

Defaults are defined once, in the code they configure: the callback's in :mod:`lipreg.options` (which
:class:`lipreg.LipschitzCallback`'s signature uses too), the margin loss's and the final evaluation's in the
signatures of :class:`lipreg.LipschitzMarginLoss` and :func:`experiments.estimate.evaluate_bounds`. A field here
either reads its default there or has none in the library (``enabled``, ``estimator_options``...); a config group
option (``conf/lipreg/log.yaml``) sets only what an experiment chooses differently (``module: net``).

Call :func:`register_configs` before composing (``experiments/train.py`` does it at import time).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from experiments.estimate import evaluate_bounds, library_default
from lipreg import keys, options
from lipreg.losses import LipschitzMarginLoss
from lipreg.penalty import LipschitzPenalty

__all__ = [
    "Method", "PenaltyKind", "MarginKind", "Search", "Accelerator",
    "MLPConf", "CNNConf", "LipCNNConf", "AlexNetConf", "ResNetConf",
    "DigitsConf", "FashionMNISTConf", "MNIST1DConf", "SyntheticConf",
    "LipregConf", "PenaltyConf", "MarginConf", "TrainerConf", "TensorBoardLoggerConf", "CSVLoggerConf", "LoggersConf",
    "ClassifierConf", "EvalConf", "ExperimentConf", "register_configs",
]


# ------------------------------------------------------------------------------------------- defaults
def listed(values: Sequence[Any]) -> Any:
    """A list field whose default is a copy of ``values`` (a library tuple)."""
    return field(default_factory=lambda: list(values))


# -------------------------------------------------------------------------------------------- choices
def literal_choices(name: str, literal: Any, doc: str) -> type[StrEnum]:
    """A ``StrEnum`` whose members are the values of the library's ``Literal`` type."""
    choices = StrEnum(name, [(value, value) for value in get_args(literal)], module=__name__)
    choices.__doc__ = doc
    return choices


Method = literal_choices("Method", options.Method, "``lipreg.method``: AutoLip (paper Alg. 1) or SeqLip (eq. 8).")
PenaltyKind = literal_choices("PenaltyKind", options.PenaltyKind,
                              "``lipreg.penalty.kind``: ``h`` in ``penalty_weight * h(bound)`` (the hinges need "
                              "``threshold``).")
MarginKind = literal_choices("MarginKind", options.MarginKind,
                             "``lipreg.margin.kind``: eq. 2 / 3 / 4 of ``lipreg/losses.py``.")
Search = literal_choices("Search", options.Search, "SeqLip's search over activation patterns (``eval.seqlip``).")


class Accelerator(StrEnum):
    """``trainer.accelerator``: Lightning's accelerator names."""

    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"
    tpu = "tpu"


# --------------------------------------------------------------------------------------------- models
@dataclass
class MLPConf:
    _target_: str = "experiments.models.MLP"
    hidden: List[int] = field(default_factory=lambda: [128, 128])
    activation: str = "relu"


@dataclass
class LipCNNConf:
    _target_: str = "experiments.models.LipCNN"
    channels: List[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 256


@dataclass
class CNNConf:
    _target_: str = "experiments.models.CNN"
    channels: List[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128


@dataclass
class AlexNetConf:
    _target_: str = "experiments.models.AlexNetSmall"
    channels: List[int] = field(default_factory=lambda: [32, 64, 96, 96, 64])
    hidden: int = 256
    dropout: float = 0.5
    avgpool_size: int = 2


@dataclass
class ResNetConf:
    _target_: str = "experiments.models.ResNetSmall"
    width: int = 16
    blocks: int = 2


# ----------------------------------------------------------------------------------------------- data
@dataclass
class _SplitConf:
    batch_size: int = 128
    seed: int = 0
    val_fraction: float = 0.15
    num_workers: int = 0
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None


@dataclass
class DigitsConf(_SplitConf):
    _target_: str = "experiments.data.DigitsDataModule"
    test_fraction: float = 0.15


@dataclass
class FashionMNISTConf(_SplitConf):
    _target_: str = "experiments.data.FashionMNISTDataModule"
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    val_fraction: float = 0.1


@dataclass
class MNIST1DConf(_SplitConf):
    _target_: str = "experiments.data.MNIST1DDataModule"
    num_samples: int = 5000
    train_split: float = 0.8
    generation_seed: int = 42
    shuffle_seq: bool = False


@dataclass
class SyntheticConf(_SplitConf):
    _target_: str = "experiments.data.SyntheticDataModule"
    n_samples: int = 2000
    n_features: int = 16
    n_classes: int = 4
    cluster_std: float = 1.0
    test_fraction: float = 0.15
    center_box: List[float] = field(default_factory=lambda: [-10.0, 10.0])


# --------------------------------------------------------------------------------------------- lipreg
@dataclass
class PenaltyConf:
    """``lipreg.LipschitzPenalty`` as a partial: ``experiments/train.py`` hands it to the Classifier, which builds it
    on the network and adds it to the loss its ``training_step`` returns, whenever ``lipreg.penalty_weight > 0`` (any
    ``lipreg`` option but ``off``). Its coefficient, method and ``n_iter`` are the ``lipreg`` node's, so
    ``lipreg.penalty_weight=...`` is the knob a sweep turns."""
    _target_: str = "lipreg.LipschitzPenalty"
    _partial_: bool = True
    coefficient: float = II("..penalty_weight")
    kind: PenaltyKind = PenaltyKind(library_default(LipschitzPenalty, "kind"))
    threshold: Optional[float] = library_default(LipschitzPenalty, "threshold")  # the hinges' relu(bound - threshold)
    method: Method = II("..method")
    n_iter: int = II("..n_iter")


@dataclass
class MarginConf:
    """``lipreg.LipschitzMarginLoss`` as a partial: ``experiments/train.py`` hands it to the Classifier, which
    builds it on the network (``lipreg=certified``). ``warmup`` is in training steps; unset, ``eps`` ramps over
    ``warmup_fraction`` of the run, which the callback reads from the trainer."""
    _target_: str = "lipreg.LipschitzMarginLoss"
    _partial_: bool = True
    eps: float = MISSING  # the L2 radius trained for: no library default
    pairwise: bool = library_default(LipschitzMarginLoss, "pairwise")
    method: Method = II("..method")
    n_iter: int = II("..n_iter")
    warmup: Optional[int] = library_default(LipschitzMarginLoss, "warmup")  # None: warmup_fraction of the run
    warmup_fraction: Optional[float] = library_default(LipschitzMarginLoss, "warmup_fraction")
    kind: MarginKind = MarginKind(library_default(LipschitzMarginLoss, "kind"))  # lipreg.losses, eq. 2 / 3 / 4
    temperature: Optional[float] = library_default(LipschitzMarginLoss, "temperature")  # None: the kind's default
    ce_weight: float = library_default(LipschitzMarginLoss, "ce_weight")


@dataclass
class LipregConf:
    """``lipreg.LipschitzCallback``'s arguments, ``enabled`` (``lipreg=off`` sets it false: no callback), and the
    loss terms the Classifier builds on its network: ``penalty`` (when ``penalty_weight > 0``) and ``margin``.

    The callback observes; the loss penalises: ``penalty_weight > 0`` puts ``penalty_weight * h(bound)``
    (:class:`PenaltyConf`) in the loss that ``Classifier.training_step`` returns, and the callback finds it there
    and logs it. So ``lipreg.penalty_weight=...`` is the only knob a sweep needs, and the same model class trains with
    or without it. ``estimator_options`` go to every ``lipreg.LipschitzEstimator`` of the run (e.g.
    ``{search: greedy}`` for SeqLip). The defaults are the library's (:mod:`lipreg.options`).
    """

    _target_: str = "lipreg.LipschitzCallback"
    enabled: bool = True
    method: Method = Method(options.METHOD)
    module: Optional[str] = None
    penalty_weight: float = 0.0
    n_iter: int = options.N_ITER
    log_every_n_steps: int = options.LOG_EVERY_N_STEPS
    per_layer: bool = False
    certify_every_n_steps: int = options.CERTIFY_EVERY_N_STEPS
    reconverge_gap: float = options.RECONVERGE_GAP
    eval_n_iter: int = options.EVAL_N_ITER
    robust_eps: List[float] = listed(options.ROBUST_EPS)
    lower_bound_batches: int = options.LOWER_BOUND_BATCHES
    lower_bound_ascent_steps: int = options.LOWER_BOUND_ASCENT_STEPS
    estimator_options: Dict[str, Any] = field(default_factory=dict)
    penalty: PenaltyConf = field(default_factory=PenaltyConf)  # built when penalty_weight > 0
    margin: Optional[MarginConf] = None  # the Lipschitz-margin training loss (instead of cross-entropy)


# -------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConf:
    """The ``Trainer`` arguments a config may set (add a field here to expose another).

    ``_target_`` may be ``lightning.pytorch.Trainer``: ``experiments/train.py`` then builds every Lightning
    object of the run (checkpoint callback, loggers, the LightningModule's base) in that namespace.
    """

    _target_: str = "pytorch_lightning.Trainer"
    accelerator: Accelerator = Accelerator.cpu
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int = 10
    max_steps: int = -1
    min_epochs: Optional[int] = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: Optional[int] = None
    log_every_n_steps: Optional[int] = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    deterministic: Any = None
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_model_summary: Optional[bool] = None
    fast_dev_run: Any = False


# -------------------------------------------------------------------------------------------- loggers
@dataclass
class TensorBoardLoggerConf:
    _target_: str = "pytorch_lightning.loggers.TensorBoardLogger"
    save_dir: str = MISSING
    name: str = "tensorboard"
    version: Any = ""
    default_hp_metric: bool = False
    log_graph: bool = False


@dataclass
class CSVLoggerConf:
    _target_: str = "pytorch_lightning.loggers.CSVLogger"
    save_dir: str = MISSING
    name: str = "csv"
    version: Any = ""


@dataclass
class LoggersConf:
    """One slot per logger; the ``logger/`` options fill them (``'logger=[tensorboard,csv]'`` fills both)."""

    tensorboard: Optional[TensorBoardLoggerConf] = None
    csv: Optional[CSVLoggerConf] = None


# ------------------------------------------------------------------------------------------ the root
@dataclass
class ClassifierConf:
    """``experiments.models.Classifier`` (the network is passed at instantiate time)."""

    _target_: str = "experiments.models.Classifier"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: Optional[str] = None  # null (constant) | cosine (to 0 over the run)


@dataclass
class EvalConf:
    """The final evaluation of the trained network (``experiments/estimate.py``'s ``evaluate_bounds``, whose
    signature holds the defaults)."""

    n_iter: int = library_default(evaluate_bounds, "n_iter")  # most power iterations of the converged estimates
    radii: List[float] = listed(library_default(evaluate_bounds, "radii"))  # L2 radii of the certified accuracy
    lower_bound_samples: int = library_default(evaluate_bounds, "lower_bound_samples")  # inputs it starts from
    lower_bound_ascent_steps: int = library_default(evaluate_bounds, "lower_bound_ascent_steps")
    seqlip: Optional[Search] = None  # extra SeqLip search in the summary: greedy | exact | null (only if lipreg is)
    exact_max_units: int = library_default(evaluate_bounds, "exact_max_units")  # exact SeqLip: widest layer


@dataclass
class ExperimentConf:
    data: Any = MISSING
    model: Any = MISSING
    lipreg: LipregConf = MISSING
    trainer: TrainerConf = MISSING
    logger: LoggersConf = field(default_factory=LoggersConf)
    classifier: ClassifierConf = field(default_factory=ClassifierConf)
    eval: EvalConf = field(default_factory=EvalConf)
    seed: int = 0
    threads: Optional[int] = 1  # torch.set_num_threads; None: torch's default (one per core)
    progress_bar: bool = True
    checkpoint: bool = True
    ckpt_path: Optional[str] = None  # resume training from this checkpoint (Trainer.fit(ckpt_path=...))
    # the metrics.json key that train.py returns (what a sweeper optimises): at the first default radius
    objective: str = keys.certified_acc(options.ROBUST_EPS[0], "val")


def register_configs(cs: ConfigStore | None = None) -> ConfigStore:
    """Store every schema in the ConfigStore (idempotent)."""
    cs = cs or ConfigStore.instance()
    cs.store(name="base_config", node=ExperimentConf)
    for name, node in {"mlp": MLPConf, "cnn": CNNConf, "lipcnn": LipCNNConf, "alexnet": AlexNetConf, "resnet": ResNetConf}.items():
        cs.store(group="model", name=f"base_{name}", node=node)
    for name, node in {"digits": DigitsConf, "fashion_mnist": FashionMNISTConf, "mnist1d": MNIST1DConf,
                       "synthetic": SyntheticConf}.items():
        cs.store(group="data", name=f"base_{name}", node=node)
    cs.store(group="lipreg", name="base_lipreg", node=LipregConf)
    cs.store(group="trainer", name="base_trainer", node=TrainerConf)
    return cs

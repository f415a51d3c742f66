"""``LipschitzCallback``: log and certify the Lipschitz bound of a LightningModule while it trains.

The callback observes; the loss penalises. It never touches the module's steps or its loss: a penalty belongs in
the loss ``training_step`` returns (:class:`~lipreg.LipschitzPenalty`, :class:`~lipreg.LipschitzMarginLoss` on the
module), where gradient accumulation, AMP and DDP treat it as any other term. The callback finds those terms on the
module and logs their last values.

The class holds the options and the hooks; each concern is a module of :mod:`lipreg.lightning`: finding or
building the estimator and its checkpointed warm state (``source``), the step-level logs and certificates
(``steps``), the loss terms on the module (``loss_terms``), the validation-epoch evaluation (``validation``) and its
optional jobs, each small and named for what it does: the certified accuracy (``certified_accuracy``), the lower
bound (``lower_bound``) and the figures (``figures``); the HPARAMS session (``tensorboard``). The key names are
those of :mod:`lipreg.keys`.

One class, a proper callback under ``lightning.pytorch`` and ``pytorch_lightning`` alike (it derives from the
``Callback`` of every installed namespace), using Lightning's public API only. What it does, hook by hook:

* ``setup``: turns off Lightning's own hyper-parameter logging for the run and writes the HPARAMS itself, once
  (the module's and datamodule's hparams, this callback's options and ``hparams=``), so TensorBoard takes the
  metric columns from the scalars: the certified bound and accuracy, validation and ``trainer.test`` metrics.
* ``on_fit_start``: finds the module to bound (the LightningModule, or ``module=`` a submodule name) and reuses the
  estimator of a :class:`~lipreg.LipschitzPenalty` on it (one warm state, not two). Otherwise it builds an estimator
  from ``example_input=``, ``pl_module.example_input_array``, ``batch_to_input`` of the first batch, or the first
  input the module sees (a forward pre-hook). No estimator by the end of the first training batch is an error that
  says what to pass. A :class:`~lipreg.LipschitzMarginLoss` whose warm-up is a fraction of the run
  (``warmup_fraction``) is told the run's length in training calls (``trainer.estimated_stepping_batches``).
* every optimizer step: ``n_iter`` warm power iterations (none when the estimator is a penalty's: ``training_step``
  iterated it); every ``log_every_n_steps`` steps the bound is written to the loggers as ``lipschitz/<method>``
  (and the factor of each linear layer under ``lipschitz/layer/<node>`` with ``per_layer=True``, the penalty's value
  ``lipschitz/penalty``, a margin loss's ``lipschitz/margin_bound`` and ``lipschitz/margin_eps``), at the step
  Lightning uses for its own metrics, and for the weights after that step's optimizer step (those a checkpoint then
  holds). Every ``certify_every_n_steps`` steps it also logs ``lipschitz/<certificate>_certified`` (a guaranteed upper
  bound; AutoLip's, tagged so, for a SeqLip search that is not exact) and ``lipschitz/gap_percent`` =
  ``100 (certified / estimate - 1)``, on the same weights; a ratio ``certified / estimate`` above ``reconverge_gap``
  re-converges the warm vectors first.
* each validation epoch: converges the estimate (``eval_n_iter``), and logs it, the certified bound, the empirical
  lower bound (``lipschitz/lower``), their ratio ``lipschitz/upper_over_lower``, the certified robust accuracy at
  each radius (``robust/certified_acc@<eps>``; off with ``robust_eps=None``), the per-pair (GloRo) certified
  accuracy when the network ends in a linear layer (``robust/pairwise_certified_acc@<eps>``), the certified accuracy
  against the radius and a bar chart of the linear layers' factors in graph order (TensorBoard's IMAGES tab).
* ``state_dict`` / ``load_state_dict``: the warm state of an estimator the callback owns (one on the module is
  checkpointed with the module), so ``trainer.fit(ckpt_path=...)`` resumes exactly. Under DDP the state is
  broadcast from rank 0 once built or restored; loggers write on rank 0 only.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .. import keys, options
from ..estimator import LipschitzEstimator
from ..options import (Method, OnUnsupported, check_choice, check_keywords, keyword_names, robust_radii,
                       validate_method)
from .batches import default_batch_input, default_batch_target
from .compat import callback_bases
from .loss_terms import plan_warmups
from .source import EstimatorSource
from .steps import StepLogger
from .tensorboard import flatten_params, log_hparams_once
from .validation import ValidationEvaluation

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


PENALTY_OPTIONS = ("penalty_weight", "penalty_kind", "target", "penalty", "coefficient", "threshold", "weight")
"""Options of a penalty, which the callback refuses: the penalty belongs in the loss (:func:`refuse_penalty`)."""


def refuse_penalty(given: dict[str, Any]) -> None:
    """A ``TypeError`` that shows the two lines to write instead of a penalty option given to the callback."""
    named = [name for name in PENALTY_OPTIONS if name in given]
    if not named:
        return
    coefficient = given.get("penalty_weight", given.get("coefficient", given.get("weight", 1e-2)))
    kind = given.get("penalty_kind", given.get("kind"))
    extra = f", kind={kind!r}" if kind is not None else ""
    raise TypeError(
        f"LipschitzCallback({named[0]}=...): the callback observes, the loss penalises. Put the penalty in the loss "
        "your LightningModule returns:\n"
        f"    self.lip_penalty = lipreg.LipschitzPenalty(self.net, example_input, coefficient={coefficient!r}{extra})"
        "   # in __init__\n"
        "    return loss + self.lip_penalty()   # in training_step\n"
        "The callback finds the penalty on the module, shares its estimator and logs its value (lipschitz/penalty).")


class LipschitzCallback(*callback_bases()):  # type: ignore[misc]
    """Log and certify the Lipschitz bound during ``trainer.fit``; log the Lipschitz terms of the module's loss.

    Every option is keyword-only; a misspelled one fails here, naming the closest valid option.

    Args:
        method: the bound estimated (:data:`~lipreg.options.Method`: ``"autolip"``, ``"seqlip"``, ``"liplt"``).
        module: name of the submodule to bound (``"net"``); the LightningModule itself when ``None``.
        n_iter: warm power iterations per training step.
        log_every_n_steps: how often the step-level bound is logged.
        per_layer: also log each linear layer's factor.
        certify_every_n_steps: how often the certified bound and the gap are logged (0: never during steps).
        reconverge_gap: the ratio ``certified / estimate`` above which the warm vectors are re-converged before the
            certificate is logged (1.05: ``lipschitz/gap_percent`` above 5).
        eval_n_iter: the most iterations of the convergence at each validation epoch.
        robust_eps: L2 radii of the certified robust accuracy; ``None`` (or ``()``) turns it off, e.g. for a
            regression net.
        lower_bound_batches, lower_bound_ascent_steps: validation batches (and gradient-ascent steps) used for
            the empirical lower bound.
        example_input: an input batch of the bounded module, to build the estimator at fit start.
        batch_to_input, batch_to_target: take the bounded module's input and the label out of a batch
            (default ``batch[0]`` and ``batch[1]``); needed for dict batches.
        on_unsupported: an op without a known Lipschitz constant (:class:`~lipreg.UnsupportedOpError`) stops the
            fit (``"raise"``), or is reported once and training goes on without the bound (``"warn"``).
        prog_bar: also show the bound on the progress bar (as ``lip``).
        hparams: extra hyper-parameters written in the single HPARAMS session (e.g. a Hydra config's choices).
        **estimator_options: the keyword-only options of :class:`~lipreg.LipschitzEstimator` (``fuse``, ``search``...).

    A penalty option (``penalty_weight``...) is a ``TypeError`` that shows the two lines to write instead: the
    penalty is a :class:`~lipreg.LipschitzPenalty` in the loss ``training_step`` returns.
    """

    def __init__(self, *, method: Method = options.METHOD, module: str | None = None, n_iter: int = options.N_ITER,
                 log_every_n_steps: int = options.LOG_EVERY_N_STEPS, per_layer: bool = False,
                 certify_every_n_steps: int = options.CERTIFY_EVERY_N_STEPS,
                 reconverge_gap: float = options.RECONVERGE_GAP, eval_n_iter: int = options.EVAL_N_ITER,
                 robust_eps: float | Sequence[float] | None = options.ROBUST_EPS,
                 lower_bound_batches: int = options.LOWER_BOUND_BATCHES,
                 lower_bound_ascent_steps: int = options.LOWER_BOUND_ASCENT_STEPS, example_input: Tensor | None = None,
                 batch_to_input: Callable[[Any], Tensor] | None = None,
                 batch_to_target: Callable[[Any], Tensor] | None = None, on_unsupported: OnUnsupported = "raise",
                 prog_bar: bool = False, hparams: Mapping[str, Any] | None = None,
                 **estimator_options: Any) -> None:
        super().__init__()
        refuse_penalty(estimator_options)
        check_keywords("LipschitzCallback", estimator_options,
                       (*keyword_names(LipschitzCallback.__init__), *keyword_names(LipschitzEstimator, True)))
        validate_method(method, estimator_options.get("search"))
        check_choice("on_unsupported", on_unsupported, OnUnsupported)
        if log_every_n_steps < 1 or certify_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be >= 1 and certify_every_n_steps >= 0, got "
                             f"{log_every_n_steps} and {certify_every_n_steps}")
        self.method = method
        self.module_name = module
        self.n_iter = n_iter
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.certify_every_n_steps = certify_every_n_steps
        self.reconverge_gap = reconverge_gap
        self.eval_n_iter = eval_n_iter
        self.robust_eps = robust_radii(robust_eps)
        self.lower_bound_batches = lower_bound_batches
        self.lower_bound_ascent_steps = lower_bound_ascent_steps
        self.example_input = example_input
        self.batch_to_input = batch_to_input or default_batch_input
        self.batch_to_target = batch_to_target or default_batch_target
        self.on_unsupported = on_unsupported
        self.prog_bar = prog_bar
        self.hparams = dict(hparams or {})
        self.estimator_options = estimator_options
        self._source = EstimatorSource(module, self._make_estimator, on_unsupported)
        self._steps: StepLogger | None = None  # per fit
        self._validation: ValidationEvaluation | None = None  # per fit
        self._autolog_hparams: bool | None = None  # the trainer's setting, restored at teardown
        self._hparams_written: set[str] = set()  # the log dirs that have our HPARAMS session

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, module=self.module_name)

    @property
    def estimator(self) -> LipschitzEstimator | None:
        """The estimator of the bounded module (``None`` until it is found or built)."""
        return self._source.estimator

    @property
    def validation(self) -> ValidationEvaluation | None:
        """This fit's validation-epoch evaluation (``None`` before the fit starts)."""
        return self._validation

    def _make_estimator(self, target: nn.Module, example_input: Tensor) -> LipschitzEstimator:
        return LipschitzEstimator(target, example_input, method=self.method, n_iter=self.n_iter,
                                  **self.estimator_options)

    # ------------------------------------------------------------ hparams
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Lightning's own hparams logging is turned off for the run (its session declares ``hp_metric`` as the
        only metric column, and TensorBoard keeps a run's first session); ours is written instead, once per run."""
        self._autolog_hparams = trainer.enable_autolog_hparams
        trainer.enable_autolog_hparams = False
        if not trainer.is_global_zero:
            return
        params = flatten_params({**pl_module.hparams, **(trainer.datamodule.hparams if trainer.datamodule else {}),
                                 **self._own_hparams(), **self.hparams})
        log_hparams_once(trainer.loggers, params, self._hparams_written)

    def _own_hparams(self) -> dict[str, Any]:
        own = {"method": self.method, **self.estimator_options}
        return {keys.hparam(k): v for k, v in own.items()}

    # ------------------------------------------------------------ fit
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._steps = StepLogger(self._source, log_every_n_steps=self.log_every_n_steps,
                                 certify_every_n_steps=self.certify_every_n_steps, reconverge_gap=self.reconverge_gap,
                                 eval_n_iter=self.eval_n_iter, per_layer=self.per_layer, prog_bar=self.prog_bar,
                                 last_global_step=trainer.global_step)
        self._validation = ValidationEvaluation(
            self._source, eval_n_iter=self.eval_n_iter, robust_eps=self.robust_eps,
            lower_bound_batches=self.lower_bound_batches, lower_bound_ascent_steps=self.lower_bound_ascent_steps,
            batch_to_input=self.batch_to_input, batch_to_target=self.batch_to_target)
        self._source.start(trainer, pl_module, self.example_input, capture=self.batch_to_input is default_batch_input)
        plan_warmups(pl_module, trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._autolog_hparams is not None:
            trainer.enable_autolog_hparams = self._autolog_hparams
        self._source.remove_hook()

    # ------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        source = self._source
        source.build_captured(trainer, pl_module)
        if source.estimator is None and not source.unsupported and self.batch_to_input is not default_batch_input:
            source.build(trainer, pl_module, self.batch_to_input(batch))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._source.build_captured(trainer, pl_module)
        if self._source.unsupported:
            return
        self._source.require()
        # a penalty on the module iterated the warm state in training_step
        self._steps.after_step(trainer, pl_module, penalised=not self._source.owned)

    # ----------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation is not None and self.estimator is not None and not self._source.unsupported \
                and not trainer.sanity_checking:
            self._validation.start(pl_module)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._measuring(trainer):
            self._validation.update(batch, batch_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measuring(trainer):
            self._validation.end(trainer, pl_module)

    def _measuring(self, trainer: Trainer) -> bool:
        """Whether this validation epoch is measured (it started with a certified bound)."""
        return self._validation is not None and self._validation.bound is not None and not trainer.sanity_checking

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self._source.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the warm state now if the estimator exists, else when it is built (restore happens before
        ``on_fit_start``)."""
        self._source.load_state_dict(state_dict)

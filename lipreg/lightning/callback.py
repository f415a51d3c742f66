"""``LipschitzCallback``: log (and optionally penalise) the Lipschitz bound of a LightningModule while it trains.

One class, a proper callback under ``lightning.pytorch`` and ``pytorch_lightning`` alike (it derives from the
``Callback`` of every installed namespace), using Lightning's public API only. What it does, hook by hook:

* ``setup``: turns off Lightning's own hyper-parameter logging for the run and writes the HPARAMS itself, once
  (the module's and datamodule's hparams, this callback's options and ``hparams=``), so TensorBoard takes the
  metric columns from the scalars: the certified bound and accuracy, validation and ``trainer.test`` metrics.
* ``on_fit_start``: finds the module to bound (the LightningModule, or ``module=`` a submodule name) and reuses the
  estimator of a :class:`~lipreg.LipschitzPenalty` already on it (one warm state, not two; with ``penalty_weight > 0``
  such a penalty is an error: it would penalise twice). Otherwise it builds an estimator from ``example_input=``,
  ``pl_module.example_input_array``, ``batch_to_input`` of the first batch, or the first input the module sees
  (a forward pre-hook). No estimator by the end of the first training batch is an error that says what to pass.
  With ``penalty_weight > 0`` it wraps ``training_step`` so that the returned loss is ``loss + penalty()``:
  gradient accumulation, AMP scaling and DDP averaging then apply to the penalty exactly as to an explicit loss
  term; the task loss and the penalty are logged apart (``lipschitz/task_loss``, ``lipschitz/penalty``).
* every optimizer step: ``n_iter`` warm power iterations (inside the penalty when there is one); every
  ``log_every_n_steps`` steps the bound is written to the loggers as ``lipschitz/<method>`` (and the factor of
  each linear layer under ``lipschitz/layer/<node>`` with ``per_layer=True``), at the step Lightning uses for its
  own metrics, and for the weights after that step's optimizer step (those a checkpoint then holds). Every
  ``certify_every_n_steps`` steps it also logs ``lipschitz/<method>_certified`` (a guaranteed upper bound;
  AutoLip's, tagged so, for a SeqLip search that is not exact) and ``lipschitz/gap_percent`` =
  ``100 (certified / estimate - 1)``, on the same weights, so the estimate never exceeds the certificate; a gap
  above ``reconverge_gap`` re-converges the warm vectors first.
* each validation epoch: converges the estimate (``eval_n_iter``), and logs it, the certified bound, the empirical
  lower bound (``lipschitz/lower``), their ratio ``lipschitz/upper_over_lower``, the certified robust accuracy at
  each radius (``robust/certified_acc@<eps>``, from the certified bound; off with ``robust_eps=None``), the per-pair
  (GloRo) certified accuracy when the network ends in a linear layer (``robust/pairwise_certified_acc@<eps>``, from
  the certified bound of the body), the certified accuracy against the radius and a bar chart of the linear
  layers' factors in graph order (TensorBoard's IMAGES tab). With a :class:`~lipreg.LipschitzMarginLoss` on the
  module, the step-level logs add its bound and radius (``lipschitz/margin_bound``, ``lipschitz/margin_eps``).
* ``state_dict`` / ``load_state_dict``: the warm state of an estimator the callback owns (one on the module is
  checkpointed with the module), so ``trainer.fit(ckpt_path=...)`` resumes exactly. Under DDP the state is
  broadcast from rank 0 once built or restored; loggers write on rank 0 only.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedOpError
from ..estimator import LipschitzEstimator
from ..margins import MarginCertificate
from ..metrics import EmpiricalLipschitz
from ..options import (Method, OnUnsupported, PenaltyKind, check_choice, robust_radii, validate_method,
                       validate_penalty)
from ..penalty import LipschitzPenalty
from ..ops import Activation, Constant
from .batches import default_batch_input, default_batch_target
from .compat import callback_bases
from .robust import RobustEpoch, margin_metrics, radius_curve
from .tensorboard import flatten_params, layer_chart, log_hparams_once, summary_writer

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

NOT_EXACT_WARNING = "this SeqLip search is not exact"
"""The start of the estimator's warning that a SeqLip certificate is AutoLip's: shown once per callback."""


class LipschitzCallback(*callback_bases()):  # type: ignore[misc]
    """Log, certify and optionally penalise the Lipschitz bound during ``trainer.fit``.

    Args:
        method: ``"autolip"`` or ``"seqlip"``.
        module: name of the submodule to bound (``"net"``); the LightningModule itself when ``None``.
        penalty_weight: ``> 0`` adds ``penalty_weight * h(bound)`` to the training loss.
        penalty_kind, target: ``h`` and its target, as in :class:`~lipreg.LipschitzPenalty`.
        n_iter: warm power iterations per training step.
        log_every_n_steps: how often the step-level bound is logged.
        per_layer: also log each linear layer's factor.
        certify_every_n_steps: how often the certified bound and the gap are logged (0: never during steps).
        reconverge_gap: re-converge the warm vectors when certified / estimate exceeds it.
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
        **estimator_options: passed to :class:`~lipreg.LipschitzEstimator` (``fuse``, ``search``...).
    """

    def __init__(self, method: Method = "autolip", module: str | None = None, penalty_weight: float = 0.0,
                 penalty_kind: PenaltyKind = "log", target: float | None = None, n_iter: int = 1,
                 log_every_n_steps: int = 50, per_layer: bool = False, certify_every_n_steps: int = 100,
                 reconverge_gap: float = 1.05, eval_n_iter: int = 500,
                 robust_eps: float | Sequence[float] | None = (0.1,), lower_bound_batches: int = 1,
                 lower_bound_ascent_steps: int = 0, example_input: Tensor | None = None,
                 batch_to_input: Callable[[Any], Tensor] | None = None,
                 batch_to_target: Callable[[Any], Tensor] | None = None, on_unsupported: OnUnsupported = "raise",
                 prog_bar: bool = False, hparams: Mapping[str, Any] | None = None,
                 **estimator_options: Any) -> None:
        super().__init__()
        validate_method(method, estimator_options)
        validate_penalty(penalty_kind, target)
        check_choice("on_unsupported", on_unsupported, OnUnsupported)
        if penalty_weight < 0:
            raise ValueError(f"penalty_weight must be >= 0, got {penalty_weight}")
        if log_every_n_steps < 1 or certify_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be >= 1 and certify_every_n_steps >= 0, got "
                             f"{log_every_n_steps} and {certify_every_n_steps}")
        self.method = method
        self.module_name = module
        self.penalty_weight = float(penalty_weight)
        self.penalty_kind = penalty_kind
        self.target = target
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
        self.estimator: LipschitzEstimator | None = None
        self._penalty: LipschitzPenalty | None = None  # the penalty whose estimator we use
        self._owns_estimator = False
        self._unsupported = False  # an unsupported op was reported (on_unsupported="warn"): nothing to log
        self._pending_state: dict[str, Tensor] | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._captured: Tensor | None = None  # the first input the bounded module saw, until the estimator is built
        self._wrapped: tuple[LightningModule, Any] | None = None  # the module whose training_step we shadow
        self._autolog_hparams: bool | None = None  # the trainer's setting, restored at teardown
        self._hparams_written: set[str] = set()  # the log dirs that have our HPARAMS session
        self._last_global_step = 0
        self._told_not_exact = False
        self._eval_bound: Tensor | None = None
        self._robust: RobustEpoch | None = None
        self._pair_certificate: MarginCertificate | None = None  # per fit, at the first validation epoch
        self._lower: EmpiricalLipschitz | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, module=self.module_name)

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
        return {"lipreg/method": self.method, "lipreg/penalty_weight": self.penalty_weight,
                "lipreg/penalty_kind": self.penalty_kind, "lipreg/target": self.target,
                **{f"lipreg/{k}": v for k, v in self.estimator_options.items()}}

    # ------------------------------------------------------------ building
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self._target(pl_module)
        self._pair_certificate = None  # this fit's model may not be the last one's
        penalties = [m for m in pl_module.modules() if isinstance(m, LipschitzPenalty)]
        if penalties and self.penalty_weight > 0:  # whatever it bounds: a second penalty is never what was meant
            bounded = type(penalties[0].estimator.model).__name__
            raise ValueError(f"the module already has a LipschitzPenalty (on {bounded}) that it adds to its loss; use "
                             "LipschitzCallback(penalty_weight=0.0) to log its bound, not to penalise twice")
        existing = [m for m in penalties if m.estimator.model is target or self.module_name is None]
        if len(existing) > 1:
            raise ValueError(f"the module holds {len(existing)} LipschitzPenalty modules; name the submodule to log "
                             "with LipschitzCallback(module=...)")
        self._last_global_step = trainer.global_step
        if existing:
            self._attach(trainer, existing[0], owned=False)
        elif self._owns_estimator and self.estimator.model is target:
            self._attach(trainer, self._penalty, owned=True)  # a second fit with this callback: keep the warm state
        elif self.example_input is not None:
            self._build(trainer, target, self.example_input.to(pl_module.device))
        elif getattr(pl_module, "example_input_array", None) is not None and target is pl_module:
            self._build(trainer, target, pl_module.example_input_array)
        elif self.batch_to_input is default_batch_input:
            def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
                # kept, and built from at the next training hook: this forward may run under other hooks (Lightning's
                # model summary puts one on every module), which a capture refuses
                self._hook.remove()
                self._hook = None
                self._captured = args[0][:1].detach().clone()

            self._hook = target.register_forward_pre_hook(capture)
        if self.penalty_weight > 0:
            self._wrap_training_step(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._build_captured(trainer, pl_module)
        if self.estimator is None and not self._unsupported and self.batch_to_input is not default_batch_input:
            self._build(trainer, self._target(pl_module), self.batch_to_input(batch))

    def _build_captured(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the estimator from the first input the bounded module saw, once it has seen one."""
        if self.estimator is None and self._captured is not None and not self._unsupported:
            example, self._captured = self._captured, None
            self._build(trainer, self._target(pl_module), example)

    def _target(self, pl_module: LightningModule) -> nn.Module:
        return pl_module if self.module_name is None else pl_module.get_submodule(self.module_name)

    def _build(self, trainer: Trainer, target: nn.Module, example_input: Tensor) -> None:
        try:
            penalty = LipschitzPenalty(target, example_input, weight=self.penalty_weight, kind=self.penalty_kind,
                                       target=self.target, method=self.method, n_iter=self.n_iter,
                                       **self.estimator_options)
        except UnsupportedOpError as error:
            self._report_unsupported(error)
            return
        self._attach(trainer, penalty, owned=True)

    def _report_unsupported(self, error: UnsupportedOpError) -> None:
        if self.on_unsupported == "raise":
            raise error
        self._unsupported = True
        warnings.warn(f"LipschitzCallback(on_unsupported='warn'): {error}. Training goes on without the Lipschitz "
                      "bound.", RuntimeWarning, stacklevel=2)

    def _attach(self, trainer: Trainer, penalty: LipschitzPenalty, owned: bool) -> None:
        self._penalty, self.estimator, self._owns_estimator = penalty, penalty.estimator, owned
        if owned and self._pending_state is not None:
            self.estimator.load_state_dict(self._pending_state)
            self._pending_state = None
        for buffer in self.estimator.buffers():  # one warm state on every rank (no-op on one process)
            buffer.copy_(trainer.strategy.broadcast(buffer, src=0))

    def _no_estimator_error(self) -> RuntimeError:
        bounded = "the LightningModule" if self.module_name is None else f"module {self.module_name!r}"
        return RuntimeError(
            f"LipschitzCallback: no estimator was built by the end of the first training batch: {bounded} was never "
            "called (a training_step that calls self.net(x) bypasses the LightningModule's forward). Pass "
            "module='net' (the submodule training_step calls), example_input=<an input batch>, or "
            "batch_to_input=<a function of the batch>, or set the module's example_input_array")

    def _wrap_training_step(self, pl_module: LightningModule) -> None:
        """Shadow ``training_step`` with an instance attribute (Lightning, and its DDP wrapper, look it up at each
        call): the penalty joins the returned loss, so Lightning scales, accumulates and averages it."""
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            self._build_captured(pl_module.trainer, pl_module)
            if output is None or self._unsupported:
                return output
            if self._penalty is None:
                raise self._no_estimator_error()
            penalty = self._penalty()
            task_loss = output["loss"] if isinstance(output, Mapping) else output
            pl_module.log("lipschitz/task_loss", task_loss.detach(), on_step=True, on_epoch=False)
            pl_module.log("lipschitz/penalty", penalty.detach(), on_step=True, on_epoch=False)
            if isinstance(output, Mapping):
                return {**output, "loss": task_loss + penalty}
            return output + penalty

        pl_module.training_step = training_step
        self._wrapped = (pl_module, training_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._autolog_hparams is not None:
            trainer.enable_autolog_hparams = self._autolog_hparams
        if self._wrapped is not None and vars(self._wrapped[0]).get("training_step") is self._wrapped[1]:
            del self._wrapped[0].training_step
        self._wrapped = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------- training
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._build_captured(trainer, pl_module)
        if self._unsupported:
            return
        if self.estimator is None:
            raise self._no_estimator_error()
        if trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step, the weights did not change
        self._last_global_step = trainer.global_step
        step = trainer.global_step - 1  # the step of Lightning's own train metrics for this batch
        log_now = (step + 1) % self.log_every_n_steps == 0
        certify_now = bool(self.certify_every_n_steps) and (step + 1) % self.certify_every_n_steps == 0
        penalised = self.penalty_weight > 0 or not self._owns_estimator  # training_step iterated the warm state
        if penalised and not (log_now or certify_now):
            return
        with torch.no_grad():
            # After the optimizer step: the logged values are those of the weights a checkpoint at this step holds.
            # A penalty already iterated in training_step (on the weights before the step): only re-evaluate.
            bound = self.estimator(n_iter=0 if penalised else None)
        metrics: dict[str, float] = {}
        if log_now:
            metrics[f"lipschitz/{self.method}"] = float(bound)
            if self.per_layer:
                metrics.update({f"lipschitz/layer/{k}": v for k, v in self._varying_layer_bounds().items()})
            metrics.update(margin_metrics(pl_module))
            if self.prog_bar:
                pl_module.log("lip", bound, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if certify_now and torch.isfinite(bound):  # non-finite weights (warned about) have no certificate
            metrics.update(self._certify(bound))
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _varying_layer_bounds(self) -> dict[str, float]:
        """Each layer's factor from the last call, in graph order, without the constant ones (activations and
        pooling, fixed by the graph: a ReLU stays at 1)."""
        nodes = self.estimator.graph.nodes
        constant = {node.name for node in nodes if isinstance(node.rule, (Activation, Constant))}
        order = {node.name: i for i, node in enumerate(nodes)}
        layers = {k: v for k, v in self.estimator.layer_bounds().items() if k not in constant}
        return dict(sorted(layers.items(), key=lambda item: order.get(item[0].split("~")[0], len(order))))

    @property
    def _certified_method(self) -> str:
        """Whose certificate ``certified_bound()`` gives: this method's, or AutoLip's when a SeqLip search is not
        exact (greedy, low-rank): then it is tagged ``autolip_certified``, never passed off as a SeqLip value."""
        seqlip = self.estimator.seqlip
        return "autolip" if seqlip is not None and not seqlip.certified else self.method

    def _certified_bound(self) -> Tensor | None:
        """``certified_bound()``, with its SeqLip-not-exact warning shown once per callback; ``None`` when an op has
        no certified norm and ``on_unsupported="warn"`` (reported once, then no more certificates)."""
        if self._unsupported:
            return None
        with warnings.catch_warnings():
            if self._told_not_exact:
                warnings.filterwarnings("ignore", message=NOT_EXACT_WARNING)
            self._told_not_exact = True
            try:
                return self.estimator.certified_bound()
            except UnsupportedOpError as error:
                self._report_unsupported(error)
                return None

    @torch.no_grad()
    def _certify(self, estimate: Tensor) -> dict[str, float]:
        """The certified bound and ``gap = certified / estimate``, both on the current weights, logged as
        ``lipschitz/gap_percent`` = ``100 (gap - 1)`` (how far the certificate lies above the estimate: 0.4, 0.8...
        read better on a chart than ratios of 1.004, 1.008 rounded to 1, 1.01); a large gap (the
        warm vector lags behind a switch of the top singular direction) triggers a re-convergence first. Not when
        the certificate is AutoLip's for a SeqLip estimate: that gap stays large once converged."""
        certified = self._certified_bound()
        if certified is None:
            return {}
        gap = float(certified / estimate)
        if gap > self.reconverge_gap and self._certified_method == self.method:
            estimate = self.estimator.converge(max_iter=self.eval_n_iter).detach()
            gap = float(certified / estimate)
        return {f"lipschitz/{self.method}": float(estimate),
                f"lipschitz/{self._certified_method}_certified": float(certified),
                "lipschitz/gap_percent": 100.0 * (gap - 1.0)}

    # ----------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.estimator is None or self._unsupported or trainer.sanity_checking:
            return
        if not torch.isfinite(self.estimator.converge(max_iter=self.eval_n_iter)):
            return  # non-finite weights (the estimator warned): nothing to certify or log this epoch
        with torch.no_grad():
            self._eval_bound = self._certified_bound()
        if self._eval_bound is None:
            return
        device = pl_module.device
        self._robust = RobustEpoch(self._eval_bound, self._pairwise(), self.robust_eps, device) if self.robust_eps \
            else None
        self._lower = EmpiricalLipschitz(self.estimator.model, ascent_steps=self.lower_bound_ascent_steps).to(device)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._eval_bound is None or trainer.sanity_checking:
            return
        x = self.batch_to_input(batch)
        if self._robust is not None:
            with torch.no_grad():
                logits = self.estimator.model(x)  # the logits of the very map the bound is for
            if logits.ndim != 2 or logits.shape[1] < 2:
                raise ValueError(f"LipschitzCallback: the certified robust accuracy needs class logits of shape "
                                 f"(batch, classes >= 2), got {tuple(logits.shape)}; pass robust_eps=None to turn "
                                 "the robust metrics off (e.g. for a regression net)")
            self._robust.update(logits, self.batch_to_target(batch))
        if batch_idx < self.lower_bound_batches:
            self._lower.update(x)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._eval_bound is None or trainer.sanity_checking:
            return
        with torch.no_grad():
            estimate = self.estimator(n_iter=0)
        lower = self._lower.compute()
        certified = self._eval_bound
        metrics = {f"lipschitz/{self.method}": estimate, f"lipschitz/{self._certified_method}_certified": certified,
                   "lipschitz/lower": lower, "lipschitz/upper_over_lower": certified / lower}
        if self._robust is not None:
            metrics.update(self._robust.compute())
        for name, value in metrics.items():  # identical on every rank (synced metrics, broadcast warm state)
            pl_module.log(name, value, on_step=False, on_epoch=True)
        self._eval_bound = None
        self._log_bar_chart(trainer)
        self._log_radius_curve(trainer)

    def _pairwise(self) -> MarginCertificate | None:
        """The per-pair certificate of the bounded model (built once per fit), or ``None`` without a linear head."""
        if self._pair_certificate is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # no linear head: the global metric says it all
                self._pair_certificate = MarginCertificate(self.estimator.model, self.estimator.graph.sample)
        return self._pair_certificate if self._pair_certificate.pairwise else None

    def _log_radius_curve(self, trainer: Trainer) -> None:
        """Certified accuracy against the radius (IMAGES tab), from this process's validation samples."""
        robust = self._robust
        writers = [w for w in map(summary_writer, trainer.loggers) if w is not None] if trainer.is_global_zero else []
        fig = radius_curve(robust.radii(), 2.0 * max(self.robust_eps), robust.kind) if robust and writers else None
        for writer in writers if fig is not None else ():
            writer.add_figure("robust/certified_acc_vs_radius", fig, global_step=trainer.global_step, close=False)

    def _log_bar_chart(self, trainer: Trainer) -> None:
        """The linear layers' factors as a bar chart (TensorBoard's IMAGES tab), to every logger that can show one."""
        if not trainer.is_global_zero:
            return
        writers = [w for w in map(summary_writer, trainer.loggers) if w is not None]
        fig = layer_chart(self._varying_layer_bounds()) if writers else None
        for writer in writers if fig is not None else ():
            writer.add_figure("lipschitz/layers", fig, global_step=trainer.global_step, close=False)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.estimator is not None and self._owns_estimator:
            return {"estimator": {k: v.clone() for k, v in self.estimator.state_dict().items()}}
        if self._pending_state is not None:  # restored, not yet built (lazy build): keep it for the next checkpoint
            return {"estimator": self._pending_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the warm state now if the estimator exists, else when it is built (restore happens before
        ``on_fit_start``)."""
        state = state_dict.get("estimator")
        if state is None:
            return
        if self.estimator is not None and self._owns_estimator:
            self.estimator.load_state_dict(state)
        else:
            self._pending_state = state


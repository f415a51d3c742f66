"""``LipschitzCallback``: log (and optionally penalise) the Lipschitz bound of a LightningModule while it trains.

What it does, hook by hook:

* ``on_fit_start``: finds the module to bound (the LightningModule, or ``module=`` a submodule name) and reuses the
  estimator of a :class:`~lipreg.LipschitzPenalty` already on it (one warm state, not two; with ``penalty_weight > 0``
  such a penalty is an error: it would penalise twice). Otherwise it builds an
  estimator from ``pl_module.example_input_array``, or from the first batch's input captured by a forward
  pre-hook. With ``penalty_weight > 0`` it wraps ``training_step`` so that the returned loss is
  ``loss + penalty()``: gradient accumulation, AMP scaling and DDP averaging then apply to the penalty exactly as
  to an explicit loss term (adding gradients from a later hook, or a second ``backward``, would not).
* every training step: ``n_iter`` warm power iterations (inside the penalty when there is one); every
  ``log_every_n_steps`` steps the bound is written to the loggers as ``lipschitz/<method>`` (and per layer under
  ``lipschitz/layer/<node>`` with ``per_layer=True``), at the step Lightning uses for its own metrics, and for the
  weights after that step's optimizer step (those a checkpoint then holds). Every ``certify_every_n_steps`` steps
  it also logs ``lipschitz/<method>_certified`` (a guaranteed upper bound; AutoLip's, tagged so, for a SeqLip
  search that is not exact) and ``lipschitz/gap`` = certified /
  estimate, on the same weights, so the estimate never exceeds the certificate; a gap above ``reconverge_gap``
  re-converges the warm vectors first.
* each validation epoch: converges the estimate (``eval_n_iter``), and logs it, the certified bound, the empirical
  lower bound (``lipschitz/lower``), their ratio ``lipschitz/upper_over_lower``, the certified robust accuracy at
  each radius (``robust/certified_acc@<eps>``, from the certified bound), the per-pair (GloRo) certified accuracy
  when the network ends in a linear layer (``robust/pairwise_certified_acc@<eps>``, from the certified body bound),
  a certified-accuracy-vs-radius curve and a per-layer bar chart. With a :class:`~lipreg.LipschitzMarginLoss` on
  the module, the step-level logs add its bound and radius (``lipschitz/margin_bound``, ``lipschitz/margin_eps``).
* at fit end: the hyper-parameters with the final metrics (TensorBoard's HPARAMS tab compares a sweep).
* ``state_dict`` / ``load_state_dict``: the warm state of an estimator the callback owns (one on the module is
  checkpointed with the module), so ``trainer.fit(ckpt_path=...)`` resumes exactly. Under DDP the state is
  broadcast from rank 0 once built or restored; loggers write on rank 0 only.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from .estimator import LipschitzEstimator
from .losses import LipschitzMarginLoss
from .margins import MarginCertificate
from .metrics import CertifiedRobustAccuracy, EmpiricalLipschitz, certified_accuracy_curve, certified_radius
from .penalty import LipschitzPenalty


class LipschitzCallback(Callback):
    """Log, certify and optionally penalise the Lipschitz bound during ``trainer.fit``.

    Args:
        method: ``"autolip"`` or ``"seqlip"``.
        module: name of the submodule to bound (``"net"``); the LightningModule itself when ``None``.
        penalty_weight: ``> 0`` adds ``penalty_weight * h(bound)`` to the training loss.
        penalty_kind, target: ``h`` and its target, as in :class:`~lipreg.LipschitzPenalty`.
        n_iter: warm power iterations per training step.
        log_every_n_steps: how often the step-level bound is logged.
        per_layer: also log each layer's factor.
        certify_every_n_steps: how often the certified bound and the gap are logged (0: never during steps).
        reconverge_gap: re-converge the warm vectors when certified / estimate exceeds it.
        eval_n_iter: the most iterations of the convergence at each validation epoch.
        robust_eps: L2 radii of the certified robust accuracy.
        lower_bound_batches, lower_bound_ascent_steps: validation batches (and gradient-ascent steps) used for
            the empirical lower bound.
        **estimator_options: passed to :class:`~lipreg.LipschitzEstimator` (``fuse``, ``search``...).
    """

    def __init__(self, method: str = "autolip", module: str | None = None, penalty_weight: float = 0.0,
                 penalty_kind: str = "log", target: float | None = None, n_iter: int = 1,
                 log_every_n_steps: int = 50, per_layer: bool = False, certify_every_n_steps: int = 100,
                 reconverge_gap: float = 1.05, eval_n_iter: int = 500, robust_eps: float | Sequence[float] = (0.1,),
                 lower_bound_batches: int = 1, lower_bound_ascent_steps: int = 0,
                 **estimator_options: Any) -> None:
        super().__init__()
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
        self.robust_eps = tuple(robust_eps) if isinstance(robust_eps, Sequence) else (float(robust_eps),)
        self.lower_bound_batches = lower_bound_batches
        self.lower_bound_ascent_steps = lower_bound_ascent_steps
        self.estimator_options = estimator_options
        self.estimator: LipschitzEstimator | None = None
        self._penalty: LipschitzPenalty | None = None  # the penalty whose estimator we use
        self._owns_estimator = False
        self._pending_state: dict[str, Tensor] | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._wrapped: tuple[pl.LightningModule, Any] | None = None  # the module whose training_step we shadow
        self._eval_bound: Tensor | None = None
        self._robust: CertifiedRobustAccuracy | None = None
        self._lower: EmpiricalLipschitz | None = None
        self._final: dict[str, float] = {}
        self._pairwise: MarginCertificate | None = None  # per-pair certificate of the bounded model (linear head)
        self._pairwise_K: Tensor | None = None
        self._pairwise_robust: CertifiedRobustAccuracy | None = None
        self._radii: list[Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, module=self.module_name)

    # ------------------------------------------------------------ building
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self._target(pl_module)
        self._pairwise = None  # built on this fit's model at the first validation batch
        penalties = [m for m in pl_module.modules() if isinstance(m, LipschitzPenalty)]
        if penalties and self.penalty_weight > 0:  # whatever it bounds: a second penalty is never what was meant
            bounded = type(penalties[0].estimator.model).__name__
            raise ValueError(f"the module already has a LipschitzPenalty (on {bounded}) that it adds to its loss; use "
                             "LipschitzCallback(penalty_weight=0.0) to log its bound, not to penalise twice")
        existing = [m for m in penalties if m.estimator.model is target or self.module_name is None]
        if len(existing) > 1:
            raise ValueError(f"the module holds {len(existing)} LipschitzPenalty modules; name the submodule to log "
                             "with LipschitzCallback(module=...)")
        if existing:
            self._attach(trainer, existing[0], owned=False)
        elif self._owns_estimator and self.estimator.model is target:
            self._attach(trainer, self._penalty, owned=True)  # a second fit with this callback: keep the warm state
        elif getattr(pl_module, "example_input_array", None) is not None and target is pl_module:
            self._build(trainer, target, pl_module.example_input_array)
        else:
            def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
                self._hook.remove()
                self._hook = None
                self._build(trainer, module, args[0])

            self._hook = target.register_forward_pre_hook(capture)
        if self.penalty_weight > 0:
            self._wrap_training_step(pl_module)

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module if self.module_name is None else pl_module.get_submodule(self.module_name)

    def _build(self, trainer: pl.Trainer, target: nn.Module, example_input: Tensor) -> None:
        penalty = LipschitzPenalty(target, example_input, weight=self.penalty_weight, kind=self.penalty_kind,
                                   target=self.target, method=self.method, n_iter=self.n_iter,
                                   **self.estimator_options)
        self._attach(trainer, penalty, owned=True)

    def _attach(self, trainer: pl.Trainer, penalty: LipschitzPenalty, owned: bool) -> None:
        self._penalty, self.estimator, self._owns_estimator = penalty, penalty.estimator, owned
        if owned and self._pending_state is not None:
            self.estimator.load_state_dict(self._pending_state)
            self._pending_state = None
        for buffer in self.estimator.buffers():  # one warm state on every rank (no-op on one process)
            buffer.copy_(trainer.strategy.broadcast(buffer, src=0))

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        """Shadow ``training_step`` with an instance attribute (Lightning, and its DDP wrapper, look it up at each
        call): the penalty joins the returned loss, so Lightning scales, accumulates and averages it."""
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if output is None:
                return output
            if self._penalty is None:
                raise RuntimeError(f"LipschitzCallback(module={self.module_name!r}): training_step did not call that "
                                   "module, so no input was captured to build the estimator from")
            penalty = self._penalty()
            if isinstance(output, dict):
                return {**output, "loss": output["loss"] + penalty}
            return output + penalty

        pl_module.training_step = training_step
        self._wrapped = (pl_module, training_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None and vars(self._wrapped[0]).get("training_step") is self._wrapped[1]:
            del self._wrapped[0].training_step
        self._wrapped = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------- training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.estimator is None or trainer.fit_loop._should_accumulate():
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step of Lightning's own train metrics
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
                metrics.update({f"lipschitz/layer/{k}": v for k, v in self.estimator.layer_bounds().items()})
            metrics.update(_margin_metrics(pl_module))
        if certify_now and torch.isfinite(bound):  # non-finite weights (warned about) have no certificate
            metrics.update(self._certify(bound))
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @property
    def _certified_method(self) -> str:
        """Whose certificate ``certified_bound()`` gives: this method's, or AutoLip's when a SeqLip search is not
        exact (greedy, low-rank): then it is tagged ``autolip_certified``, never passed off as a SeqLip value."""
        seqlip = self.estimator.seqlip
        return "autolip" if seqlip is not None and not seqlip.certified else self.method

    @torch.no_grad()
    def _certify(self, estimate: Tensor) -> dict[str, float]:
        """The certified bound and ``gap = certified / estimate``, both on the current weights; a large gap (the
        warm vector lags behind a switch of the top singular direction) triggers a re-convergence first. Not when
        the certificate is AutoLip's for a SeqLip estimate: that gap stays large once converged."""
        certified = self.estimator.certified_bound()
        gap = float(certified / estimate)
        if gap > self.reconverge_gap and self._certified_method == self.method:
            estimate = self.estimator.converge(max_iter=self.eval_n_iter).detach()
            gap = float(certified / estimate)
        return {f"lipschitz/{self.method}": float(estimate),
                f"lipschitz/{self._certified_method}_certified": float(certified), "lipschitz/gap": gap}

    # ----------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.estimator is None or trainer.sanity_checking:
            return
        if not torch.isfinite(self.estimator.converge(max_iter=self.eval_n_iter)):
            return  # non-finite weights (the estimator warned): nothing to certify or log this epoch
        with torch.no_grad():
            self._eval_bound = self.estimator.certified_bound()
        device = pl_module.device
        self._robust = CertifiedRobustAccuracy(eps=self.robust_eps).to(device)
        self._lower = EmpiricalLipschitz(self.estimator.model, ascent_steps=self.lower_bound_ascent_steps).to(device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._eval_bound is None or trainer.sanity_checking:
            return
        x, y = batch[0], batch[1]
        with torch.no_grad():
            logits = self.estimator.model(x)  # the logits of the very map the bound is for
        self._robust.update(logits, y, self._eval_bound, certified=True)
        self._update_pairwise(x, logits, y)
        if batch_idx < self.lower_bound_batches:
            self._lower.update(x)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._eval_bound is None or trainer.sanity_checking:
            return
        with torch.no_grad():
            estimate = self.estimator(n_iter=0)
        lower = self._lower.compute()
        certified = self._eval_bound
        metrics = {f"lipschitz/{self.method}": estimate, f"lipschitz/{self._certified_method}_certified": certified,
                   "lipschitz/lower": lower, "lipschitz/upper_over_lower": certified / lower}
        metrics.update({f"robust/{k}": v for k, v in self._robust.compute().items()})
        if self._pairwise_K is not None:
            metrics.update({f"robust/pairwise_{k}": v for k, v in self._pairwise_robust.compute().items()})
        self._log_radius_curve(trainer)
        for name, value in metrics.items():  # identical on every rank (synced metrics, broadcast warm state)
            pl_module.log(name, value, on_step=False, on_epoch=True)
        self._final = {name: float(value) for name, value in metrics.items()}
        self._eval_bound = None
        self._log_bar_chart(trainer)

    @torch.no_grad()
    def _update_pairwise(self, x: Tensor, logits: Tensor, y: Tensor) -> None:
        """Per-pair (GloRo) certified accuracy when the bounded model ends in a linear head, and the certified radii
        of the curve (pairwise when available, global otherwise). The certificate is built on the first batch and
        evaluated once per epoch (``certified()`` has no warm state)."""
        if self._pairwise_K is None and self._pairwise_robust is None:
            if self._pairwise is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # no linear head: the global metric says it all
                    self._pairwise = MarginCertificate(self.estimator.model, x[:1], pairwise=True)
            if self._pairwise.pairwise:
                self._pairwise_K = self._pairwise.certified()
            self._pairwise_robust = CertifiedRobustAccuracy(eps=self.robust_eps).to(logits.device)
        bound = self._pairwise_K if self._pairwise_K is not None else self._eval_bound
        if self._pairwise_K is not None:
            self._pairwise_robust.update(logits, y, bound, certified=True)
        self._radii.append(certified_radius(logits, y, bound).cpu())

    def _log_radius_curve(self, trainer: pl.Trainer) -> None:
        """Certified accuracy against the radius (TensorBoard's IMAGES tab), from this process's validation
        samples; then reset the per-epoch pairwise state."""
        radii, self._radii = torch.cat(self._radii) if self._radii else torch.empty(0), []
        kind = "pairwise" if self._pairwise_K is not None else "global"
        self._pairwise_K, self._pairwise_robust = None, None
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards or not trainer.is_global_zero or not len(radii):
            return
        from matplotlib.figure import Figure

        grid = torch.linspace(0.0, 2.0 * max(self.robust_eps), 41)
        fig = Figure(figsize=(4.0, 3.0))
        ax = fig.add_subplot()
        ax.plot(grid.tolist(), certified_accuracy_curve(radii, grid).tolist())
        ax.set_xlabel("L2 radius")
        ax.set_ylabel(f"certified accuracy ({kind})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        for logger in tensorboards:
            logger.experiment.add_figure("robust/certified_acc_vs_radius", fig, global_step=trainer.global_step,
                                         close=False)

    def _log_bar_chart(self, trainer: pl.Trainer) -> None:
        """Each layer's factor as a bar chart (TensorBoard's IMAGES tab), log scale. A bare ``Figure`` (no pyplot):
        nothing global, such as the user's matplotlib backend, is touched."""
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards or not trainer.is_global_zero:
            return
        from matplotlib.figure import Figure

        layers = self.estimator.layer_bounds()
        fig = Figure(figsize=(max(4.0, 0.5 * len(layers)), 3.0))
        ax = fig.add_subplot()
        ax.bar(range(len(layers)), list(layers.values()))
        ax.set_xticks(range(len(layers)), list(layers), rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("Lipschitz factor")
        fig.tight_layout()
        for logger in tensorboards:
            logger.experiment.add_figure("lipschitz/layers", fig, global_step=trainer.global_step, close=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hyper-parameters (the module's and this callback's) with the final metrics, for the HPARAMS tab.

        The logger also writes the metrics as scalars: under ``hp/<name>`` at the last step (Lightning's pattern),
        since under their own tags they would add a second point to every curve (at step 0 without a step)."""
        final = {**{k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}, **self._final}
        params = {**dict(pl_module.hparams), "lipreg/method": self.method,
                  "lipreg/penalty_weight": self.penalty_weight, "lipreg/penalty_kind": self.penalty_kind}
        metrics = {f"hp/{name}": value for name, value in final.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)

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


def _margin_metrics(pl_module: pl.LightningModule) -> dict[str, float]:
    """The bound (an estimate) and current radius of each :class:`~lipreg.LipschitzMarginLoss` on the module."""
    losses = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, LipschitzMarginLoss)]
    metrics: dict[str, float] = {}
    for name, loss in losses:
        if loss.last_bound is not None:
            tag = "margin" if len(losses) == 1 else f"margin/{name}"
            metrics[f"lipschitz/{tag}_bound"] = float(loss.last_bound)
            metrics[f"lipschitz/{tag}_eps"] = loss.last_eps
    return metrics

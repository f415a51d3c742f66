"""Where the callback's estimator comes from, and the state it keeps across fits and checkpoints.

The estimator bounds the LightningModule, or ``module=`` a submodule of it. It is, in this order of preference:
the estimator of a :class:`~lipreg.LipschitzPenalty` on the module that bounds it (one warm state, not two: the
penalty iterates it in ``training_step``), the one this source built in an earlier fit of the same module, or a new
one built from an example input: ``example_input=``,
the module's ``example_input_array``, ``batch_to_input`` of the first batch, or the first input the bounded module
sees (captured by a forward pre-hook). The warm state of an estimator the source owns is its checkpoint state
(one on the module is checkpointed with the module); once built or restored it is broadcast from rank 0, so every
DDP rank starts from the same warm vectors.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedOpError
from ..estimator import LipschitzEstimator
from ..options import OnUnsupported
from ..penalty import LipschitzPenalty

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

NOT_EXACT_WARNING = "this SeqLip search is not exact"
"""The start of the estimator's warning that a SeqLip certificate is AutoLip's: shown once per callback."""

EstimatorFactory = Callable[[nn.Module, Tensor], LipschitzEstimator]
"""Builds the callback's own :class:`~lipreg.LipschitzEstimator` of a module from an example input."""


class EstimatorSource:
    """The estimator of one callback: found or built, warm state restored and broadcast, unsupported ops reported.

    Args:
        module_name: the submodule to bound (``"net"``); the LightningModule itself when ``None``.
        make_estimator: builds the estimator of the bounded module from an example input.
        on_unsupported: ``"raise"`` an :class:`~lipreg.UnsupportedOpError`, or ``"warn"`` once and go on without a
            bound (then :attr:`unsupported` is true and nothing more is logged).
    """

    def __init__(self, module_name: str | None, make_estimator: EstimatorFactory,
                 on_unsupported: OnUnsupported) -> None:
        self.module_name = module_name
        self.make_estimator = make_estimator
        self.on_unsupported = on_unsupported
        self.estimator: LipschitzEstimator | None = None
        self.owned = False  # built here (its warm state is checkpointed here), not a penalty's on the module
        self.unsupported = False  # an unsupported op was reported (on_unsupported="warn"): nothing to log
        self._pending_state: dict[str, Tensor] | None = None  # restored before the estimator was built
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._captured: Tensor | None = None  # the first input the bounded module saw, until the estimator is built
        self._told_not_exact = False

    # ------------------------------------------------------------ finding and building
    def target(self, pl_module: LightningModule) -> nn.Module:
        """The bounded module."""
        return pl_module if self.module_name is None else pl_module.get_submodule(self.module_name)

    def start(self, trainer: Trainer, pl_module: LightningModule, example_input: Tensor | None,
              capture: bool) -> None:
        """At fit start: reuse the estimator of a penalty on the module, keep this source's own, build one from an
        example input, or (``capture``) wait for the first input of the bounded module."""
        target = self.target(pl_module)
        penalties = [m for m in pl_module.modules() if isinstance(m, LipschitzPenalty)
                     and (m.estimator.model is target or self.module_name is None)]
        if len(penalties) > 1:
            raise ValueError(f"the module holds {len(penalties)} LipschitzPenalty modules; name the submodule to log "
                             "with LipschitzCallback(module=...)")
        if penalties:
            self._attach(trainer, penalties[0].estimator, owned=False)
        elif self.owned and self.estimator.model is target:
            self._attach(trainer, self.estimator, owned=True)  # a second fit with this callback: keep the warm state
        elif example_input is not None:
            self.build(trainer, pl_module, example_input.to(pl_module.device))
        elif getattr(pl_module, "example_input_array", None) is not None and target is pl_module:
            self.build(trainer, pl_module, pl_module.example_input_array)
        elif capture:
            self._hook = target.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Keep the first input, built from at the next training hook: this forward may run under other hooks
        (Lightning's model summary puts one on every module), which a capture refuses."""
        self.remove_hook()
        self._captured = args[0][:1].detach().clone()

    def build_captured(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the estimator from the first input the bounded module saw, once it has seen one."""
        if self.estimator is None and self._captured is not None and not self.unsupported:
            example, self._captured = self._captured, None
            self.build(trainer, pl_module, example)

    def build(self, trainer: Trainer, pl_module: LightningModule, example_input: Tensor) -> None:
        """A new estimator of the bounded module from ``example_input`` (an unsupported op: reported)."""
        try:
            estimator = self.make_estimator(self.target(pl_module), example_input)
        except UnsupportedOpError as error:
            self.report_unsupported(error)
            return
        self._attach(trainer, estimator, owned=True)

    def _attach(self, trainer: Trainer, estimator: LipschitzEstimator, owned: bool) -> None:
        self.estimator, self.owned = estimator, owned
        if owned and self._pending_state is not None:
            self.estimator.load_state_dict(self._pending_state)
            self._pending_state = None
        for buffer in self.estimator.buffers():  # one warm state on every rank (no-op on one process)
            buffer.copy_(trainer.strategy.broadcast(buffer, src=0))

    def report_unsupported(self, error: UnsupportedOpError) -> None:
        if self.on_unsupported == "raise":
            raise error
        self.unsupported = True
        warnings.warn(f"LipschitzCallback(on_unsupported='warn'): {error}. Training goes on without the Lipschitz "
                      "bound.", RuntimeWarning, stacklevel=3)

    def require(self) -> LipschitzEstimator:
        """The estimator; by the end of the first training batch there must be one."""
        if self.estimator is None:
            bounded = "the LightningModule" if self.module_name is None else f"module {self.module_name!r}"
            raise RuntimeError(
                f"LipschitzCallback: no estimator was built by the end of the first training batch: {bounded} was "
                "never called (a training_step that calls self.net(x) bypasses the LightningModule's forward). Pass "
                "module='net' (the submodule training_step calls), example_input=<an input batch>, or "
                "batch_to_input=<a function of the batch>, or set the module's example_input_array")
        return self.estimator

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------ what the callback reads
    def certified_bound(self) -> Tensor | None:
        """``certified_bound()``, with its SeqLip-not-exact warning shown once per callback; ``None`` when an op has
        no certified norm and ``on_unsupported="warn"`` (reported once, then no more certificates)."""
        if self.unsupported:
            return None
        with warnings.catch_warnings():
            if self._told_not_exact:
                warnings.filterwarnings("ignore", message=NOT_EXACT_WARNING)
            self._told_not_exact = True
            try:
                return self.estimator.certified_bound()
            except UnsupportedOpError as error:
                self.report_unsupported(error)
                return None

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.estimator is not None and self.owned:
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
        if self.estimator is not None and self.owned:
            self.estimator.load_state_dict(state)
        else:
            self._pending_state = state

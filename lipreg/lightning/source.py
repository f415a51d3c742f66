"""Where the callback's estimator comes from, and the state it keeps across fits and checkpoints.

The estimator bounds the LightningModule, or ``module=`` a submodule of it. It is, in this order of preference:
the estimator of a :class:`~lipreg.LipschitzPenalty` already on the module (one warm state, not two), the one
this source built in an earlier fit of the same module, or a new one built from an example input: ``example_input=``,
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
from ..ops import Activation, Constant
from ..options import OnUnsupported
from ..penalty import LipschitzPenalty

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

NOT_EXACT_WARNING = "this SeqLip search is not exact"
"""The start of the estimator's warning that a SeqLip certificate is AutoLip's: shown once per callback."""

PenaltyFactory = Callable[[nn.Module, Tensor], LipschitzPenalty]
"""Builds the callback's :class:`~lipreg.LipschitzPenalty` (its estimator, and its weight) on a module."""


class EstimatorSource:
    """The estimator of one callback: found or built, warm state restored and broadcast, unsupported ops reported.

    Args:
        module_name: the submodule to bound (``"net"``); the LightningModule itself when ``None``.
        make_penalty: builds the penalty (and so the estimator) on the bounded module from an example input.
        on_unsupported: ``"raise"`` an :class:`~lipreg.UnsupportedOpError`, or ``"warn"`` once and go on without a
            bound (then :attr:`unsupported` is true and nothing more is logged).
    """

    def __init__(self, module_name: str | None, make_penalty: PenaltyFactory, on_unsupported: OnUnsupported) -> None:
        self.module_name = module_name
        self.make_penalty = make_penalty
        self.on_unsupported = on_unsupported
        self.estimator: LipschitzEstimator | None = None
        self.penalty: LipschitzPenalty | None = None  # the penalty whose estimator this is
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
              penalise: bool, capture: bool) -> None:
        """At fit start: reuse a penalty's estimator, keep this source's own, build one from an example input, or
        (``capture``) wait for the first input of the bounded module. ``penalise``: the callback adds its own
        penalty, so a :class:`~lipreg.LipschitzPenalty` already on the module is an error (it would penalise twice).
        """
        target = self.target(pl_module)
        penalties = [m for m in pl_module.modules() if isinstance(m, LipschitzPenalty)]
        if penalties and penalise:  # whatever it bounds: a second penalty is never what was meant
            bounded = type(penalties[0].estimator.model).__name__
            raise ValueError(f"the module already has a LipschitzPenalty (on {bounded}) that it adds to its loss; use "
                             "LipschitzCallback(penalty_weight=0.0) to log its bound, not to penalise twice")
        existing = [m for m in penalties if m.estimator.model is target or self.module_name is None]
        if len(existing) > 1:
            raise ValueError(f"the module holds {len(existing)} LipschitzPenalty modules; name the submodule to log "
                             "with LipschitzCallback(module=...)")
        if existing:
            self._attach(trainer, existing[0], owned=False)
        elif self.owned and self.estimator.model is target:
            self._attach(trainer, self.penalty, owned=True)  # a second fit with this callback: keep the warm state
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
            penalty = self.make_penalty(self.target(pl_module), example_input)
        except UnsupportedOpError as error:
            self.report_unsupported(error)
            return
        self._attach(trainer, penalty, owned=True)

    def _attach(self, trainer: Trainer, penalty: LipschitzPenalty, owned: bool) -> None:
        self.penalty, self.estimator, self.owned = penalty, penalty.estimator, owned
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
    def certified_method(self, method: str) -> str:
        """Whose certificate ``certified_bound()`` gives: ``method``'s, or AutoLip's when a SeqLip search is not
        exact (greedy, low-rank): then it is tagged ``autolip_certified``, never passed off as a SeqLip value."""
        seqlip = self.estimator.seqlip
        return "autolip" if seqlip is not None and not seqlip.certified else method

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

    def varying_layer_bounds(self) -> dict[str, float]:
        """Each layer's factor from the last call, in graph order, without the constant ones (activations and
        pooling, fixed by the graph: a ReLU stays at 1)."""
        nodes = self.estimator.graph.nodes
        constant = {node.name for node in nodes if isinstance(node.rule, (Activation, Constant))}
        order = {node.name: i for i, node in enumerate(nodes)}
        layers = {k: v for k, v in self.estimator.layer_bounds().items() if k not in constant}
        return dict(sorted(layers.items(), key=lambda item: order.get(item[0].split("~")[0], len(order))))

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

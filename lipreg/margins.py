r"""Margin certificates of a classifier: the constants ``K_yj`` that a logit gap must beat, per pair of classes.

For logits :math:`z = f(x) \in \mathbb{R}^C` and a perturbation :math:`\|\delta\|_2 \le \varepsilon`, the prediction
``y`` cannot change if, for every other class ``j``,

.. math:: z_y(x) - z_j(x) > K_{yj}\, \varepsilon, \qquad K_{yj} \ge \operatorname{Lip}(z_y - z_j).   \tag{1}

* **Global** (Tsuzuku, Sato & Sugiyama 2018, "Lipschitz-margin training", Prop. 1): ``z_y - z_j = (e_y - e_j)^T f``
  with :math:`\|e_y - e_j\|_2 = \sqrt2`, so :math:`K_{yj} = \sqrt2\, L(f)`.                                  (2)
* **Pairwise** (Leino, Wang & Fredrikson 2021, "Globally-robust neural networks", GloRo, eq. 4): when the network
  ends in a linear layer, :math:`f(x) = W h(x) + b`, then :math:`z_y - z_j = (w_y - w_j)^T h(x) + b_y - b_j`, so
  :math:`K_{yj} = \|w_y - w_j\|_2\, L(h)`, with :math:`L(h)` the bound of the body ``h`` (everything before the
  head). As :math:`\|w_y - w_j\|_2 = \|W^T (e_y - e_j)\|_2 \le \sqrt2 \|W\|_2`, (3) is never looser than (2)
  with the AutoLip bound :math:`L(f) \le \|W\|_2 L(h)` of the whole network.                              (3)

The per-sample certified radius is :math:`r(x) = \min_{j \ne y} (z_y - z_j) / K_{yj}` (0 when misclassified).
:class:`MarginCertificate` gives ``K`` differentiably from a warm estimate (for training) and certified (for
reporting: the certified body bound times :math:`\|w_y - w_j\|` in float64, rounded upwards).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, fx, nn

from .bounds.certificates import pairwise_constants, tightest
from .capture.graph import LipGraph
from .capture.trace import eval_mode
from .estimator import LipschitzEstimator
from .linalg.certify import certified_cast
from .options import METHOD, N_ITER, Method, checked_keywords

__all__ = ["MarginCertificate", "global_constants", "logit_classes", "pairwise_constants", "split_linear_head"]


def split_linear_head(model: nn.Module, example_input: Tensor,
                      concrete_args: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Linear] | None:
    """``(body, head)`` with ``model(x) == head(body(x))`` when the traced graph's output is a plain ``nn.Linear``
    applied to a ``(B, features)`` tensor, else ``None``. ``body`` is an ``fx.GraphModule`` that shares the model's
    submodules (and so its parameters); the model itself is not modified."""
    return _split(LipGraph(model, example_input, fuse=False, concrete_args=concrete_args))


def _split(graph: LipGraph) -> tuple[nn.Module, nn.Linear] | None:
    """:func:`split_linear_head` of a traced model."""
    traced = graph.graph_module
    output = next(n for n in traced.graph.nodes if n.op == "output")
    last = output.args[0]
    if not isinstance(last, fx.Node) or last.op != "call_module" or len(last.users) != 1:
        return None
    head = traced.get_submodule(last.target)
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or len(last.args) != 1:
        return None
    features = last.args[0]
    meta = features.meta.get("tensor_meta") if isinstance(features, fx.Node) else None
    if meta is None or len(getattr(meta, "shape", ())) != 2:
        return None
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(traced.graph, values)
    graph.output(values[features])
    body = fx.GraphModule(traced, graph)
    body.graph.eliminate_dead_code()
    body.recompile()
    return body, head


def logit_classes(graph: LipGraph) -> int:
    """The number of classes ``C`` of a traced model that returns one tensor of logits ``(B, C)``, ``C >= 2`` (run
    once on its sample, in eval mode); a ``ValueError`` that names the fix for any other output."""
    with eval_mode(graph.root), torch.no_grad():
        output = graph.graph_module(graph.sample)
    name = type(graph.root).__name__
    if not isinstance(output, Tensor):
        kind = f"a {type(output).__name__} of {len(output)}" if isinstance(output, (tuple, list)) else \
            f"a {type(output).__name__}"
        raise ValueError(f"{name} returns {kind} outputs; margin certificates need one tensor of class logits "
                         "(batch, classes). Give MarginCertificate / LipschitzMarginLoss a module that returns the "
                         "logits alone: the submodule that computes them, or a wrapper whose forward returns "
                         "model(x)[0]")
    if output.ndim != 2 or output.shape[1] < 2:
        raise ValueError(f"{name} returns a tensor of shape {tuple(output.shape)} on one sample; margin certificates "
                         "need class logits of shape (batch, classes >= 2): flatten the output, or use "
                         "LipschitzEstimator for a model that is not a classifier")
    return int(output.shape[1])


def global_constants(bound: Tensor, n_classes: int) -> Tensor:
    """Eq. (2): ``K_yj = sqrt(2) L`` off the diagonal, 0 on it, ``(C, C)``."""
    off_diagonal = 1.0 - torch.eye(n_classes, dtype=bound.dtype, device=bound.device)
    return math.sqrt(2.0) * bound * off_diagonal


class MarginCertificate(nn.Module):
    """The margin constants ``K`` of eq. (1) for ``model``: pairwise (eq. 3) when it ends in a linear head and
    ``pairwise=True``, global (eq. 2) otherwise; ``self.pairwise`` says which.

    ``forward()`` is the training value: the warm estimate of the (body) bound after ``n_iter`` iterations,
    differentiable w.r.t. the weights (power iterations converge from below: not a certificate).
    :meth:`certified` is the certificate: ``certified_bound()`` of the (body) estimator, times ``||w_y - w_j||``
    computed in float64, rounded upwards. The warm vectors are buffers (``state_dict``, ``.to()``).

    Args:
        model, example_input: as for :class:`~lipreg.LipschitzEstimator`.
        pairwise: use eq. (3) when the graph ends in a ``nn.Linear`` on ``(B, features)``.
        method, n_iter, **estimator_options: passed to the estimator of the (body) bound.

    Every option after ``example_input`` is keyword-only; a misspelled one fails here, naming the closest valid one.
    The model must return one tensor of logits ``(B, C)``, ``C >= 2`` (else a ``ValueError`` says what to do).
    """

    @checked_keywords(forwards_to=lambda: LipschitzEstimator)
    def __init__(self, model: nn.Module, example_input: Tensor, *, pairwise: bool = True, method: Method = METHOD,
                 n_iter: int = N_ITER, **estimator_options: Any) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # the user's model, not our state
        self._options = dict(method=method, n_iter=n_iter, **estimator_options)
        self._split_head = pairwise
        # the whole model's trace: its fingerprint says when the split (body, head) no longer describes the model
        self._graph = LipGraph(model, example_input, fuse=False, concrete_args=estimator_options.get("concrete_args"))
        self._build(example_input, warn_global=pairwise)

    def _build(self, example_input: Tensor, warn_global: bool) -> None:
        self.n_classes = logit_classes(self._graph)
        split = _split(self._graph) if self._split_head else None
        if warn_global and split is None:
            warnings.warn(f"{type(self.model).__name__} does not end in a plain nn.Linear on (batch, features): the "
                          "margin uses the global constant sqrt(2) L (eq. 2) instead of per-pair constants",
                          stacklevel=4)
        self.pairwise = split is not None
        bounded = split[0] if split is not None else self.model
        object.__setattr__(self, "head", split[1] if split is not None else None)  # the user's layer, not our state
        self.estimator = LipschitzEstimator(bounded, example_input, **self._options)
        self.certificate: str | None = None
        """The certificates the last :meth:`certified` used (``"autolip"``, ``"liplt+eclipse"``...)."""
        object.__setattr__(self, "_whole", None)  # the whole model's estimator, built at the first certified()

    def _refresh(self) -> None:
        """Split the model again when it changed since it was split (a replaced body module or head): the body's
        own estimator cannot see a change outside the body, nor the head a replacement of itself."""
        change = self._graph.stale()
        if change is None:
            return
        warnings.warn(f"the model changed since this MarginCertificate was built: {change}. It is split again into "
                      "body and head, and the constants are those of the model as it is now", UserWarning, stacklevel=4)
        sample = self._graph.current_sample()
        self._graph = LipGraph(self.model, sample, fuse=False, concrete_args=self._options.get("concrete_args"))
        self._build(sample, warn_global=self._split_head)

    def constants(self, bound: Tensor) -> Tensor:
        """``K`` (``(C, C)``, float64) from a bound of the body (pairwise) or of the whole model (global)."""
        if self.head is None:
            return global_constants(bound.to(torch.float64), self.n_classes)
        return pairwise_constants(self.head.weight, bound)

    def forward(self, n_iter: int | None = None) -> tuple[Tensor, Tensor]:
        """``(K, bound)``: the constants from the warm estimate, and that estimate (both differentiable)."""
        self._refresh()
        bound = self.estimator(n_iter)
        K = self.constants(bound)
        through = self.estimator.pair_constants(self.head.weight) if self.head is not None else None
        return (K if through is None else torch.minimum(K, through.to(K.dtype))), bound

    def certified(self) -> Tensor:
        """Certified ``K`` (float64, detached), rounded upwards: without a head, eq. (2) on ``certified_bound()``;
        with one, the tightest per pair of eq. (3) on the body's tightest bound, the certificates carried through the
        body's last chain (both from ``LipschitzEstimator.certified_pairs``, which certifies the body once) and
        eq. (2) on the whole model's ``certified_bound()`` (whose chains run through the head); :attr:`certificate`
        names those used."""
        self._refresh()
        with torch.no_grad():
            if self.head is None:
                bound = self.estimator.certified_bound().to(torch.float64)
                candidates = {self.estimator.certificate: certified_cast(self.constants(bound), torch.float64)}
            else:
                candidates = dict(self.estimator.certified_pairs(self.head.weight))
                if self._whole is None:  # not a submodule: certificates keep no state worth a checkpoint
                    object.__setattr__(self, "_whole", LipschitzEstimator(
                        self.model, self._graph.sample.to(self._device()), **self._options))
                whole = self._whole
                bound = whole.certified_bound().to(torch.float64)
                candidates[f"global_{whole.certificate}"] = certified_cast(
                    global_constants(bound, self.n_classes), torch.float64)
            self.certificate, K = tightest(candidates)
            return K

    def _device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), self._graph.sample.device)

    def extra_repr(self) -> str:
        return f"pairwise={self.pairwise}, n_classes={self.n_classes}, method={self.estimator.method!r}"

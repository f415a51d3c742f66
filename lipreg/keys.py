"""Every metric name lipreg logs, in one place: the callback, the metrics, the experiments and their summaries
build their keys here, so a renamed metric is renamed everywhere at once.

A key is ``<group>/<name>``: ``lipschitz/...`` for the bounds, ``robust/...`` for the callback's certified
accuracies, ``<split>/...`` (``val``, ``test``) for the final evaluation of ``experiments/``. The names are the
public interface of the logs (TensorBoard tags, ``metrics.json`` keys, Hydra ``objective=`` values); the README
lists them.
"""
from __future__ import annotations

LIPSCHITZ = "lipschitz"
"""The group of the bounds."""
ROBUST = "robust"
"""The group of the callback's certified robust accuracies."""
HPARAMS = "lipreg"
"""The group of the callback's own hyper-parameters (``lipreg/method``...)."""

LOWER = f"{LIPSCHITZ}/lower"
"""The empirical lower bound (the largest local Jacobian norm seen)."""
UPPER_OVER_LOWER = f"{LIPSCHITZ}/upper_over_lower"
"""``certified / lower``: the bracket of the true constant (:func:`lipreg.metrics.upper_over_lower`)."""
GAP_PERCENT = f"{LIPSCHITZ}/gap_percent"
"""``100 (certified / estimate - 1)``: how far the certificate lies above the estimate on the same weights."""
PENALTY = f"{LIPSCHITZ}/penalty"
"""The value ``coefficient * h(bound)`` of the :class:`~lipreg.LipschitzPenalty` on the module (its last call)."""
LAYER_CHART = f"{LIPSCHITZ}/layers"
"""The bar chart of the linear layers' factors (an image)."""
RADIUS_CURVE = f"{ROBUST}/certified_acc_vs_radius"
"""The certified accuracy against the radius (an image)."""
CERTIFICATE = f"{LIPSCHITZ}/certificate"
"""The certificates ``certified_bound()`` used (``LipschitzEstimator.certificate``: ``"liplt+eclipse"``...), a text."""
PROG_BAR = "lip"
"""The bound on the progress bar."""

CERTIFIED_ACC = "certified_acc"
ESTIMATED_ACC = "estimated_acc"
PAIRWISE = "pairwise_"
"""The prefix of the per-pair (GloRo) certified accuracies."""
ACCURACY = "acc"


def bound(method: str) -> str:
    """The estimate of ``method``: ``lipschitz/autolip``, ``lipschitz/seqlip``, ``lipschitz/seqlip_greedy``."""
    return f"{LIPSCHITZ}/{method}"


def certified(method: str) -> str:
    """The certified bound of ``method``: ``lipschitz/autolip_certified``."""
    return f"{bound(method)}_certified"


def layer(node: str) -> str:
    """The factor of one linear node: ``lipschitz/layer/<node>``."""
    return f"{LIPSCHITZ}/layer/{node}"


def penalty(loss: str | None = None) -> str:
    """The value of a :class:`~lipreg.LipschitzPenalty`: ``lipschitz/penalty``, or ``lipschitz/penalty/<loss>`` when the
    module holds several (``loss`` is its module name)."""
    return PENALTY if loss is None else f"{PENALTY}/{loss}"


def margin(quantity: str, loss: str | None = None) -> str:
    """The ``bound`` or ``eps`` of a :class:`~lipreg.LipschitzMarginLoss`: ``lipschitz/margin_bound``, or
    ``lipschitz/margin/<loss>_bound`` when the module holds several (``loss`` is its module name)."""
    tag = "margin" if loss is None else f"margin/{loss}"
    return f"{LIPSCHITZ}/{tag}_{quantity}"


def radius(eps: float | str) -> str:
    """A radius as it appears in a key: ``0.3`` (``{:g}``), or a string as given."""
    return eps if isinstance(eps, str) else f"{eps:g}"


def accuracy_at(eps: float | str, estimated: bool = False) -> str:
    """``certified_acc@<eps>`` (``estimated_acc@<eps>`` from an estimated bound): the names of
    :class:`~lipreg.metrics.CertifiedRobustAccuracy`'s results."""
    return f"{ESTIMATED_ACC if estimated else CERTIFIED_ACC}@{radius(eps)}"


def in_group(name: str, group: str = ROBUST, pairwise: bool = False) -> str:
    """An accuracy name (:func:`accuracy_at`) under its group: ``robust/<name>``, ``test/pairwise_<name>``."""
    return f"{group}/{PAIRWISE if pairwise else ''}{name}"


def certified_acc(eps: float | str, group: str = ROBUST, pairwise: bool = False) -> str:
    """``robust/certified_acc@0.3`` (the callback), ``test/certified_acc@0.3`` (``group="test"``: the final
    evaluation), ``robust/pairwise_certified_acc@0.3`` (``pairwise=True``)."""
    return in_group(accuracy_at(eps), group, pairwise)


def certified_radius_of(key: str, group: str) -> str | None:
    """The radius of a global ``<group>/certified_acc@<eps>`` key, as written in it; ``None`` for another key."""
    prefix = f"{group}/{CERTIFIED_ACC}@"
    return key[len(prefix):] if key.startswith(prefix) else None


def accuracy(group: str) -> str:
    """The plain accuracy of a split: ``test/acc``."""
    return f"{group}/{ACCURACY}"


def hparam(name: str) -> str:
    """One of the callback's hyper-parameters: ``lipreg/method``."""
    return f"{HPARAMS}/{name}"

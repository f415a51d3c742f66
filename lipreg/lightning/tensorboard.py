"""What the callback writes to TensorBoard besides scalars and figures (:mod:`lipreg.lightning.figures`): the
HPARAMS session.

Loggers are recognised by what they can do (an ``experiment`` that adds figures and summaries: Lightning's
``TensorBoardLogger`` under either namespace), not by their class.

HPARAMS: TensorBoard reads a run's hyper-parameters from its ``session_start_info`` and, when no run declares an
experiment, takes the metric columns from the run's scalars (their last values, under their own tags). So the
hyper-parameters are written once, with no experiment summary and no metric copies: every scalar logged later,
``trainer.test`` metrics included, is a column.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HParamValue = bool | int | float | str


def summary_writer(logger: Any) -> Any | None:
    """The TensorBoard ``SummaryWriter`` behind a logger, else ``None``. Rank 0 only: on the other ranks
    Lightning's loggers hand out a dummy experiment that answers to every name."""
    experiment = getattr(logger, "experiment", None)
    capable = all(hasattr(experiment, name) for name in ("add_figure", "add_scalar", "file_writer"))
    return experiment if capable else None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, HParamValue]:
    """Nested mappings flattened to ``"a/b"`` keys; values other than bool, int, float and str as their ``str``
    (TensorBoard's HPARAMS holds only those types)."""
    flat: dict[str, HParamValue] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}/"))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def write_hparams(writer: Any, params: Mapping[str, HParamValue]) -> None:
    """One HPARAMS session (start and end info) in the writer's run, without an experiment summary."""
    from torch.utils.tensorboard.summary import hparams

    _, session_start, session_end = hparams(dict(params), {})
    writer.file_writer.add_summary(session_start)
    writer.file_writer.add_summary(session_end)
    writer.flush()


def log_hparams_once(loggers: Sequence[Any], params: Mapping[str, HParamValue], written: set[str]) -> None:
    """``params`` to every logger whose run (log dir) is not in ``written`` yet: an HPARAMS session for the
    TensorBoard ones (and their ``hparams.yaml``), ``log_hyperparams`` for the others; then marks them written."""
    for logger in loggers:
        key = str(getattr(logger, "log_dir", None) or id(logger))
        if key in written:
            continue
        written.add(key)
        writer = summary_writer(logger)
        if writer is None:
            logger.log_hyperparams(dict(params))
            continue
        write_hparams(writer, params)
        if isinstance(getattr(logger, "hparams", None), dict):  # TensorBoardLogger's hparams.yaml
            logger.hparams.update(params)

"""What a Hydra job of ``experiments/train.py`` needs around the training itself.

* :func:`check_plugins`: a launcher or sweeper whose Hydra plugin is not installed is named, with the extra
  that installs it, before Hydra's own "Could not find 'hydra/launcher/joblib'";
* :func:`check_added_keys`: a ``+key=value`` override adds a key that nothing reads (``+ckpt_path=...`` was
  silently ignored): refused, with the closest known key;
* :func:`run_hparams` and :func:`run_name`: the job's config-group choices and overrides as flat scalars (the
  TensorBoard HPARAMS columns of a sweep) and as a short run name;
* :func:`route_logging` and :func:`silence_noise`: Lightning's messages go through Hydra's handlers (hence into
  ``train.log``), and the known third-party noise is dropped.
"""
from __future__ import annotations

import difflib
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

__all__ = ["check_plugins", "check_added_keys", "run_hparams", "run_name", "short_value", "route_logging",
           "silence_noise"]

CONF = Path(__file__).resolve().parent.parent / "conf"

# Hydra config-group option -> (the plugin module that provides it, its pip package)
_JOBLIB = ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
_OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper")
PLUGINS: dict[tuple[str, str], tuple[str, str]] = {
    ("hydra/launcher", "joblib"): _JOBLIB,
    ("hydra/launcher", "slurm"): _SUBMITIT,  # conf/hydra/launcher/slurm.yaml extends submitit_slurm
    ("hydra/launcher", "submitit_slurm"): _SUBMITIT,
    ("hydra/launcher", "submitit_local"): _SUBMITIT,
    ("hydra/sweeper", "optuna"): _OPTUNA,
}
EXTRA = "sweep"  # pyproject.toml's extra that installs the three plugins

# log records (substrings) and warnings (regexes) every small run would print, and no user acts on
_NOISY_RECORDS = ("💡 Tip:",)
_NOISY_WARNINGS = (".*does not have many workers.*", ".*is smaller than the logging interval.*",
                   ".*isinstance.treespec, LeafSpec.*")  # Lightning 2.6 on torch >= 2.10
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


def _parse(overrides: Iterable[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(overrides))


def _experiment_choices(name: str) -> list[tuple[str, str]]:
    """The ``override /group: option`` entries of ``conf/experiment/<name>.yaml``'s defaults list."""
    path = CONF / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return []
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
    pairs = []
    for entry in defaults:
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            pairs.append((key.removeprefix("override ").strip().lstrip("/"), str(value)))
    return pairs


def check_plugins(argv: Sequence[str]) -> None:
    """Exit with a one-line fix when the command line picks a launcher or sweeper whose plugin is missing.

    Looks at ``hydra/launcher=...``, ``hydra/sweeper=...`` and the presets ``+experiment=...`` pulls in.
    """
    try:
        overrides = _parse(a for a in argv if "=" in a and not a.startswith("-"))
    except Exception:  # noqa: BLE001 - a malformed override: Hydra reports it itself
        return
    for override in overrides:
        if override.is_sweep_override() or override.is_delete():
            continue
        group, option = override.key_or_group, override.get_value_element_as_str()
        pairs = _experiment_choices(option) if group == "experiment" else [(group, option)]
        for pair in pairs:
            module, package = PLUGINS.get(pair, (None, None))
            if module is not None and importlib.util.find_spec(module) is None:
                via = f" (which {override.input_line} selects)" if group == "experiment" else ""
                raise SystemExit(f"{pair[0]}={pair[1]}{via} needs the Hydra plugin {package}, which is not "
                                 f"installed: pip install 'lipreg[{EXTRA}]' (from a checkout: pip install "
                                 f"'.[{EXTRA}]'), or pip install {package}")


def _keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return []
    keys = []
    for key in node.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        keys += _keys(node._get_node(key), f"{path}.")  # no value access: no interpolation is resolved
    return keys


def check_added_keys(cfg: DictConfig, task_overrides: Sequence[str], groups: Iterable[str]) -> None:
    """Refuse ``+key=value`` task overrides that add a key to the config (not a config group like ``+experiment``).

    A key the schemas do not declare is read by nothing, so the run would silently ignore it; Hydra itself
    refuses ``+key`` on a declared key ("an item is already at ..."), so every added key is an unknown one.
    """
    groups = set(groups)
    for override in _parse(task_overrides):
        key = override.key_or_group
        if not override.is_add() or key in groups or key.startswith("hydra."):
            continue
        known = [k for k in _keys(cfg) if k != key and not k.startswith(f"{key}.")]
        close = difflib.get_close_matches(key, known, n=1) or difflib.get_close_matches(
            key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in known], n=1)
        hint = f"; did you mean `{close[0]}=...` (no +)?" if close else "; drop the override"
        raise ValueError(f"`{override.input_line}` adds the key {key!r}, which no part of the experiment reads (the "
                         f"schemas in experiments/config_schema.py list the keys){hint}")


def _scalar(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "null"
    if OmegaConf.is_config(value):
        return str(OmegaConf.to_container(value, resolve=True))
    return str(value)


def run_hparams(cfg: DictConfig, choices: Mapping[str, Any], task_overrides: Sequence[str]) -> dict[str, Any]:
    """The job's config-group choices (``model: mlp``...) and overridden keys with their values, as scalars.

    Hydra's own groups (``hydra/launcher``...) are left out; a key's value is read from ``cfg`` (typed), so a
    sweep's jobs compare in TensorBoard's HPARAMS tab column by column.
    """
    params: dict[str, Any] = {group: _scalar(choice) for group, choice in choices.items()
                              if not group.startswith("hydra") and choice is not None}
    for override in _parse(task_overrides):
        key = override.key_or_group
        if override.is_delete() or key in params:
            continue
        params[key] = _scalar(OmegaConf.select(cfg, key, default=override.get_value_element_as_str()))
    return params


def short_value(value: str) -> str:
    """``0.0012345678`` -> ``0.001235``: a float value cut to 4 significant digits; other values unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "e" not in value.lower() else f"{number:.4g}"


def run_name(task_overrides: Sequence[str], max_chars: int = 120) -> str:
    """``penalty_weight=0.01,model=cnn``: the job's overrides, keys cut to their last part, floats to 4 digits.

    The TensorBoard run of the job (``tensorboard --logdir SWEEP_DIR`` lists ``0/penalty_weight=0.01,...``);
    the overrides that do not fit in ``max_chars`` are left out.
    """
    parts = []
    for override in _parse(task_overrides):
        if not override.is_delete():
            parts.append(f"{override.key_or_group.rsplit('.', 1)[-1].rsplit('/', 1)[-1]}="
                         f"{short_value(override.get_value_element_as_str())}")
    name = ""
    for part in parts:  # whole overrides only, as many as fit in max_chars
        if len(name) + len(part) + 1 > max_chars and name:
            break
        name = f"{name},{part}" if name else part
    return name.replace("/", "_")[:max_chars] or "tensorboard"  # one directory, whatever the values


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOISY_RECORDS)


def silence_noise() -> None:
    """Drop the third-party warnings every small run would print (idempotent)."""
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", pattern)


def route_logging() -> None:
    """Let Lightning's messages through the root logger's handlers (Hydra's console and ``train.log``).

    Lightning gives its loggers a handler of their own and stops propagation when it is imported before any
    logging is configured, which is why ``train.log`` stayed empty; the known noise is dropped on the way
    (Optuna's alembic lines are silenced in ``conf/config.yaml``'s ``hydra.hydra_logging``).
    """
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())
    silence_noise()

"""Training options: defaults, a YAML recipe, and command-line overrides — validated together.

Precedence is defaults < recipe file < flags. Every problem (unknown keys, wrong types, values
out of range) is collected and reported in one error, so a recipe is fixed in one pass.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from adapterkit.errors import ConfigError


@dataclass
class TrainOptions:
    """Everything that shapes a training run (also the keys of a ``--config`` recipe)."""

    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = False
    seed: int = 0
    eval_split: float = 0.0
    #: Render rows with the base's chat template (``None``: when the base has one).
    chat: bool | None = None
    #: General-English text for the forgetting check (a file, or ``general`` for the shipped one).
    general: str | None = None
    #: Largest allowed relative rise of general-text loss, in percent (the forgetting guard).
    forgetting_budget: float | None = None
    #: Weight of the KL term toward the base on anchor text (0 = off; default 0.3 with a budget).
    guard_weight: float | None = None
    #: Anchor text for the KL term (default: the anchor prose shipped with adapterkit).
    anchor: str | None = None
    #: Steps between forgetting checks while training (with a budget).
    guard_every: int = 10
    logging_steps: int = 5
    #: Steps between checkpoints that ``--resume`` continues from.
    save_steps: int = 50
    gradient_checkpointing: bool = False
    #: Trainer-specific options (e.g. ``beta`` for DPO).
    trainer_options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_POSITIVE = ("r", "alpha", "batch_size", "grad_accum", "max_length", "logging_steps",
             "save_steps", "guard_every", "epochs", "learning_rate")


def _coerce(name: str, value: Any, kind: Any, problems: list[str]) -> Any:
    text = str(kind)
    if value is None:
        return None if "None" in text else _fail(name, value, "a value", problems)
    try:
        if "bool" in text:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            return _fail(name, value, "true or false", problems)
        if "dict" in text:
            return dict(value) if isinstance(value, dict) else _fail(name, value, "a mapping", problems)
        if text.startswith("int") or text == "<class 'int'>":
            if isinstance(value, float) and not value.is_integer():
                return _fail(name, value, "an integer", problems)
            return int(value)
        if "float" in text:
            if isinstance(value, str) and value.endswith("%"):
                value = value[:-1]
            return float(value)
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        return str(value)
    except (TypeError, ValueError):
        return _fail(name, value, text.replace("<class '", "").replace("'>", ""), problems)


def _fail(name: str, value: Any, expected: str, problems: list[str]) -> None:
    problems.append(f"{name}: expected {expected}, got {value!r}")
    return None


def build_options(recipe: str | os.PathLike[str] | None = None,
                  overrides: dict[str, Any] | None = None) -> TrainOptions:
    """Merge defaults, a YAML recipe and overrides (``None`` values are ignored); validate all."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    if recipe is not None:
        values.update(_read_recipe(Path(recipe)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = get_type_hints(TrainOptions)
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in known)
    if unknown:
        problems.append(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    clean = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in known:
            clean[name] = _coerce(name, value, hints[name], problems)
    options = TrainOptions(**{k: v for k, v in clean.items() if v is not None})
    for name in _POSITIVE:
        value = getattr(options, name)
        if value is not None and value <= 0:
            problems.append(f"{name}: must be positive, got {value}")
    if not 0 <= options.dropout < 1:
        problems.append(f"dropout: must be in [0, 1), got {options.dropout}")
    if not 0 <= options.eval_split < 1:
        problems.append(f"eval_split: must be in [0, 1), got {options.eval_split}")
    if options.forgetting_budget is not None and options.forgetting_budget <= 0:
        problems.append(f"forgetting_budget: must be a positive percentage, got "
                        f"{options.forgetting_budget}")
    if options.guard_weight is not None and options.guard_weight < 0:
        problems.append(f"guard_weight: must be ≥ 0, got {options.guard_weight}")
    if problems:
        where = f" in {recipe}" if recipe else ""
        raise ConfigError(f"invalid training options{where}: " + "; ".join(problems))
    return options


def _read_recipe(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must be a mapping of option: value")
    return data

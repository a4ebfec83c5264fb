"""The adapterkit metadata stored beside each PEFT adapter (``adapterkit.json``).

The PEFT files stay untouched and standard; everything adapterkit knows about a pocket book —
which base it fits, how it was made, on what data, how well it did — lives in this one file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapterkit.errors import InvalidAdapter

METADATA_FILE = "adapterkit.json"
#: The standard PEFT files of a pocket book's folder, and its model card.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
#: The files whose SHA-256 is recorded in :attr:`PocketBookMeta.files`.
HASHED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
FORMAT_VERSION = 1


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class PocketBookMeta:
    """Everything adapterkit records about one pocket book version."""

    name: str
    version: int
    #: The base it was made on: ``{"name", "fingerprint", "provenance": {...}}``.
    base: dict[str, Any] = field(default_factory=dict)
    method: str = "lora"
    trainer: str | None = None
    #: The training data: ``{"description", "sha256", "rows"}``.
    data: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: ``name@version`` of the pocket books this one was made from (merges, stacks, ``--on``).
    parents: list[str] = field(default_factory=list)
    #: ``name@version`` of the frozen pocket books this one was trained on top of (``--on``),
    #: bottom first: loading it activates them underneath it.
    stacked_on: list[str] = field(default_factory=list)
    #: ``name@version`` → SHA-256 of that pocket book's weights file when this one was trained
    #: on it, or (a stack) saved with it as a member: loading checks that the book under that
    #: name is still the one (a pull can meet a library whose ``triage@1`` is another pocket
    #: book; ``rm --force`` then an import can put another one there). Empty before 0.2, for
    #: imports, and for stacks saved before member hashes were recorded.
    stacked_on_sha256: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    tags: list[str] = field(default_factory=list)
    #: ``adapter`` (a PEFT folder) or ``stack`` (references members; no weights of its own).
    kind: str = "adapter"
    #: Where it came from when not trained here (``import``, ``hub``...).
    source: dict[str, Any] = field(default_factory=dict)
    #: The last ``adapterkit verify``: each path's max logit difference from plain PEFT (or
    #: its refusal), the tolerance, and the library versions checked.
    verification: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 of the files that decide what the pocket book computes (``adapter_config.json``
    #: and ``adapter_model.safetensors``), recorded when it was saved: loading re-checks them,
    #: so a damaged file is refused instead of answering. Empty for entries saved before 0.2.
    files: dict[str, str] = field(default_factory=dict)
    #: Made by a stage of a pipeline recipe (``adapterkit pipeline``): the recipe's file name and
    #: SHA-256, this stage's number, name and fingerprint (a hash of its whole definition, which
    #: ``--resume`` matches to skip it), and the ``lineage`` — every stage up to this one with
    #: its pocket book, metrics and forgetting figure. Empty otherwise.
    pipeline: dict[str, Any] = field(default_factory=dict)
    #: Where the training run's experiment trackers wrote (``--report-to``): per tracker its
    #: place (TensorBoard ``logdir``; trackio ``project``/``run``/``store``; W&B ``run_id``,
    #: ``mode``, ``dir``; MLflow ``tracking_uri``, ``run_id``) and the ``run_name``. Empty
    #: when the run reported to none.
    tracking: dict[str, Any] = field(default_factory=dict)
    #: ``adapterkit eval --harness`` results, per lm-evaluation-harness task: each metric for
    #: the plain base and with the pocket book, the lm-eval version, ``limit``, shots, date.
    harness: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def base_fingerprint(self) -> str:
        return str(self.base.get("fingerprint", ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PocketBookMeta:
        """Build from parsed JSON, refusing (``ValueError``) what would break later: a file is
        written by hand, by older versions or by a crash, so its shape is checked, not trusted."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("name", "version"):
            if key not in values:
                raise ValueError(f"{key!r} is missing")
        if not isinstance(values["name"], str) or not values["name"]:
            raise ValueError("'name' must be a non-empty string")
        version = values["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError("'version' must be a non-negative integer")
        for key, kind in _FIELD_TYPES.items():
            if key not in values or (values[key] is None and key in _MAY_BE_NULL):
                continue
            if not isinstance(values[key], kind):
                raise ValueError(f"{key!r} must be a {_TYPE_WORDS[kind]}")
        for key in ("parents", "stacked_on", "tags"):
            if not all(isinstance(item, str) for item in values.get(key, [])):
                raise ValueError(f"{key!r} must be a list of strings")
        if not all(isinstance(v, str) for v in values.get("stacked_on_sha256", {}).values()):
            raise ValueError("'stacked_on_sha256' must map names to SHA-256 strings")
        if not all(isinstance(v, str) for v in values.get("files", {}).values()):
            raise ValueError("'files' must map file names to SHA-256 strings")
        base = values.get("base", {})
        for key, kind in (("name", str), ("fingerprint", str), ("provenance", dict)):
            if key in base and not isinstance(base[key], kind):
                raise ValueError(f"'base.{key}' must be a {_TYPE_WORDS[kind]}")
        return cls(**values)

    @classmethod
    def read(cls, folder: Path) -> PocketBookMeta:
        path = folder / METADATA_FILE
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidAdapter(f"cannot read {path}: {exc}") from None


_FIELD_TYPES: dict[str, type] = {
    "base": dict, "method": str, "trainer": str, "data": dict, "hyperparameters": dict,
    "metrics": dict, "parents": list, "stacked_on": list, "stacked_on_sha256": dict,
    "created": str, "tags": list,
    "kind": str, "source": dict, "verification": dict, "files": dict, "pipeline": dict,
    "tracking": dict, "harness": dict,
}
_MAY_BE_NULL = {"trainer"}
_TYPE_WORDS: dict[type, str] = {dict: "JSON object", str: "string", list: "list"}

"""Reading training data and bringing it into one of the standard shapes.

Standard shapes (what trainers declare in ``Trainer.data_shapes``):

* ``text`` — ``{"text": str}``: continued pre-training on domain text;
* ``prompt_completion`` — ``{"prompt", "completion"}``: loss on the completion only;
* ``messages`` — ``{"messages": [{"role", "content"}, ...]}``: chat, rendered with the base's
  chat template, loss on the final assistant turn;
* ``preference`` — ``{"prompt", "chosen", "rejected"}``: for DPO and reward models. Read too
  with the prompt implicit (``chosen``/``rejected`` alone, TRL's ``extract_prompt``: the prompt
  is their longest shared beginning), or repeated at the start of conversational answers
  (UltraFeedback: stripped there), so every pair reaches the trainer with its prompt once;
* ``prompt`` — ``{"prompt"}``: prompts alone, for online RL (``rlhf --reward``), which samples
  and scores its own answers.

Files: JSONL (read line by line here, so a broken line is reported by number), JSON (a list of
objects), CSV and Parquet (through ``datasets``), and ``.txt`` (paragraphs separated by blank
lines become ``text`` rows), each with or without a UTF-8 byte order mark. A folder is read as
``datasets`` reads one (its train split: shards, a downloaded dataset, a ``save_to_disk``
folder); anything else that is not a file is tried as a Hub dataset id.
Data-format plugins add shapes (``alpaca``: ``instruction``/``input``/``output``).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import ConfigError, DataFormatError
from adapterkit.files import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.plugin_api.registry import DataFormat, Registry

SHAPES: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt": ("prompt",),  # tried last, after plugin formats: any other shape with a prompt
}                           # (a plugin's prompt/response too) is that shape
GENERAL_TEXT = "general"  # name of the general-prose file shipped with adapterkit
_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
#: What ``datasets``' ``save_to_disk`` writes beside its ``.arrow`` shards: metadata, not rows.
_SAVED_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json"}


@dataclass
class Data:
    """Rows in one standard shape, and what to record about where they came from."""

    rows: list[dict[str, Any]]
    shape: str
    source: str
    sha256: str
    format: str
    columns: list[str] = field(default_factory=list)
    #: Row numbers (from 1) of the rows dropped as malformed (``skip_bad_rows``).
    skipped: list[int] = field(default_factory=list)

    @property
    def unread(self) -> list[str]:
        """The file's columns this shape does not read (an ``id``, or a ``system`` column a
        user meant to train with): said when a run starts, rather than dropped unsaid. Empty
        for a plugin's format, which reads what it converts."""
        if self.format != self.shape:
            return []
        return [c for c in self.columns if c not in SHAPES.get(self.shape, ())]

    def unread_note(self) -> str | None:
        """The line a run (or a search) says about :attr:`unread` columns; None if none."""
        if not self.unread:
            return None
        return (f"Dropped as the data was read: column(s) {', '.join(self.unread)} "
                f"({self.shape} rows keep only {'/'.join(SHAPES[self.shape])})")

    def describe(self) -> dict[str, Any]:
        described = {"description": self.source, "sha256": self.sha256, "rows": len(self.rows),
                     "shape": self.shape, "format": self.format}
        if self.skipped:
            described["skipped_rows"] = len(self.skipped)
        return described


def general_text_path() -> Path:
    """The general-English prose shipped with adapterkit, for forgetting checks."""
    return Path(str(resources.files("adapterkit") / "data" / "general.txt"))


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a :class:`DataFormatError` naming the first bad byte's
    offset (and line), as an editor or ``head -c`` finds it. A leading byte order mark (what
    Windows tools write) is not part of the text."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + bom  # an offset in the file, as the mark is
        line = raw.count(b"\n", 0, start) + 1
        raise DataFormatError(
            f"{path.name} is not UTF-8 text: byte 0x{raw[start]:02x} at offset {start} "
            f"(line {line}); save it as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    # split on "\n" only: JSON strings may hold U+2028 and friends, which splitlines() splits on
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataFormatError(f"{path.name} line {number}: invalid JSON ({exc}); fix the line "
                                  "(--skip-bad-rows skips rows of the wrong shape, not lines "
                                  "that are not JSON)") from None
        if not isinstance(row, dict):
            raise DataFormatError(
                f"{path.name} line {number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except ValueError as exc:
            raise DataFormatError(f"{path.name}: invalid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataFormatError(f"{path.name}: expected a JSON list of objects")
        return data
    if suffix == ".txt":
        text = _read_text(path)
        return [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if suffix in (".csv", ".parquet"):
        from datasets import Dataset

        if suffix == ".csv":
            _read_text(path)  # a bad byte named by its offset in the file, not in a chunk

        try:
            reader = Dataset.from_csv if suffix == ".csv" else Dataset.from_parquet
            return reader(str(path)).to_list()
        except Exception as exc:
            raise DataFormatError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from None
    raise DataFormatError(
        f"unsupported data file {path.name}: use .jsonl, .json, .csv, .parquet or .txt"
    )


def _read_hub(dataset_id: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        return load_dataset(dataset_id, split="train").to_list()
    except Exception as exc:
        raise DataFormatError(
            f"{dataset_id!r} is not a data file here and could not be loaded from the Hub "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _saved_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``datasets``' ``save_to_disk`` wrote (a ``Dataset``: its
    ``state.json`` beside ``.arrow`` shards; a ``DatasetDict``: its ``dataset_dict.json``)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and any(path.glob("*.arrow")))


def _read_saved(path: Path) -> list[dict[str, Any]]:
    """A ``save_to_disk`` folder's rows (a ``DatasetDict``'s train split, or its only one)."""
    from datasets import DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(path))
    except Exception as exc:
        raise DataFormatError(f"cannot read the save_to_disk folder {path}: "
                              f"{type(exc).__name__}: {exc}") from None
    if isinstance(saved, DatasetDict):
        splits = list(saved)
        if "train" not in saved and len(splits) != 1:
            raise DataFormatError(
                f"{path} holds the splits {', '.join(splits)} and none is named train; give "
                f"the folder of one, e.g. {path / splits[0]}")
        saved = saved["train" if "train" in saved else splits[0]]
    return list(saved.to_list())


def _read_folder(path: Path) -> tuple[list[dict[str, Any]], str, str]:
    """A local folder, read as ``datasets`` reads one (its train split; a ``save_to_disk``
    folder with ``load_from_disk``); refused naming the data files in it where that fails (it
    said the folder did not exist, or could not be loaded "from the Hub")."""
    try:
        if _saved_folder(path):
            rows = _read_saved(path)
        else:
            from datasets import load_dataset

            rows = load_dataset(str(path), split="train").to_list()
    except DataFormatError:
        raise
    except Exception as exc:
        inside = sorted(p.name for p in path.iterdir() if p.is_file() and
                        p.suffix.lower() in _SUFFIXES and p.name not in _SAVED_METADATA)[:3]
        raise DataFormatError(
            f"data {path} is a folder that datasets cannot read as one dataset "
            f"({type(exc).__name__}); give one data file"
            + (f", e.g. {' or '.join(str(path / n) for n in inside)}" if inside
               else f" ({', '.join(sorted(_SUFFIXES))})")) from None
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    return rows, f"{path} (folder)", digest


def read_rows(spec: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], str, str]:
    """Read rows from a file or Hub dataset: ``(rows, description, sha256)``."""
    if str(spec) == GENERAL_TEXT:
        spec = general_text_path()
    path = Path(spec).expanduser()
    if path.is_file():
        if _saved_folder(path.parent) and (path.name in _SAVED_METADATA
                                           or path.suffix.lower() == ".arrow"):
            raise DataFormatError(f"{path.name} is part of a datasets save_to_disk folder; give "
                                  f"the folder itself: {path.parent}")
        return _read_file(path), path.name, sha256_file(path)
    text = str(spec)
    if path.is_dir():  # a dataset folder (shards, a Hub download) as datasets reads one
        return _read_folder(path)
    # the data files it may have meant: beginning with its name (or its stem, where it has a
    # data suffix of its own: pc.json → pc.jsonl)
    stem = glob.escape(path.stem if path.suffix.lower() in _SUFFIXES else path.name)
    alike = sorted(p.name for p in path.parent.glob(f"{stem}*")
                   if p.is_file() and p.suffix.lower() in _SUFFIXES) \
        if path.parent.is_dir() else []
    # "data/pc" beside data/pc.jsonl reads as a mistyped path, not a Hub id: the Hub would be
    # asked (retrying for ~25 s) for a dataset nobody meant. A folder named like a Hub owner
    # (huggingface-cli download --local-dir owner/model) alone does not make it a path.
    near = path.parent != Path(".") and any(n.startswith(f"{path.name}.") for n in alike)
    if _HUB_ID.fullmatch(text) and path.suffix.lower() not in _SUFFIXES and not near:
        rows = _read_hub(text)
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        return rows, f"hub:{text}", digest
    alike = alike[:3]
    raise DataFormatError(f"data file {text} does not exist"
                          + (f"; did you mean {' or '.join(str(path.parent / n) for n in alike)}?"
                             if alike else ""))


def _valid_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _valid_field(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return _valid_messages(value)


def _valid_row(row: Any, needed: tuple[str, ...]) -> bool:
    if not isinstance(row, dict) or not all(_valid_field(row.get(k)) for k in needed):
        return False
    if "messages" not in needed:
        return True
    # a conversation (not a string), learnt from its last assistant turn (as_chat): it needs one
    messages = row["messages"]
    return _valid_messages(messages) and any(m["role"] == "assistant" for m in messages)


def detect_shape(columns: set[str], formats: Registry[DataFormat] | None = None
                 ) -> tuple[str, DataFormat | None]:
    """The standard shape (and the converting plugin format, if any) for these columns."""
    for shape, needed in SHAPES.items():
        if shape != "prompt" and set(needed) <= columns:
            return shape, None
    for fmt in formats or []:
        if fmt.matches(columns):
            return fmt.shape, fmt
    if {"chosen", "rejected"} <= columns:  # the prompt implicit in them (_explicit_prompt):
        return "preference", None  # after the plugin formats, whose columns these may be
    if "prompt" in columns:
        return "prompt", None
    plugin = [f"{f.name} ({'+'.join(f.columns)})" for f in formats or []]
    expected = ["+".join(cols) for cols in SHAPES.values()] + ["chosen+rejected"] + plugin
    raise DataFormatError(
        f"missing required columns: expected one of {', '.join(expected)}; "
        f"the data has {', '.join(sorted(columns)) or 'no columns'}"
    )


def load_data(spec: str | os.PathLike[str], *, formats: Registry[DataFormat] | None = None,
              shapes: tuple[str, ...] | None = None, skip_bad_rows: bool = False,
              reader: str = "this trainer") -> Data:
    """Read ``spec``, detect its shape, and convert plugin formats.

    A row of the wrong shape (a needed field missing, empty or malformed) is an error that names
    the first few such rows, so nothing is trained on less than the file holds without a word.

    :param shapes: the shapes the caller (a trainer) accepts; anything else is an error.
    :param skip_bad_rows: drop such rows instead; ``Data.skipped`` lists their numbers.
    :param reader: who accepts only ``shapes``, as the refusal names it.
    """
    rows, source, digest = read_rows(spec)
    if not rows:
        raise DataFormatError(f"{source} has no rows")
    columns = set().union(*(r.keys() for r in rows))
    shape, fmt = detect_shape(columns, formats)
    if shapes is not None and shape not in shapes:
        wanted = " or ".join(f"{s} rows ({'/'.join(SHAPES.get(s, ()))})" for s in shapes)
        raise DataFormatError(f"{source} is {shape} data (columns "
                              f"{', '.join(sorted(columns))}); {reader} reads {wanted}")
    needed = SHAPES[shape]
    if fmt is None and shape != "preference" and "label" in columns:
        # TRL's unpaired preference format (KTO): a completion labelled false is one NOT to
        # learn, and this shape keeps no label — its reader would learn it as any other
        unwanted = [n for n, r in enumerate(rows, 1) if r.get("label") is False]
        if unwanted:
            raise DataFormatError(
                f"{source} has a label column, and row(s) {_first(unwanted)} are labelled "
                f"false (unpaired preferences, as KTO reads them): read as {shape} rows, which "
                "keep no label, they would be learnt as answers to give; drop those rows (or "
                "the column), or use a trainer that reads labels")
    kept: list[dict[str, Any]] = []
    numbers: list[int] = []  # the row number (from 1) of each kept row
    bad: list[int] = []
    unsplit: dict[str, list[int]] = {}  # pairs whose prompt cannot be told apart, by why
    for number, row in enumerate(rows, 1):
        if fmt is not None:
            try:
                row = fmt.convert(row)
            except (KeyError, TypeError, ValueError, AttributeError):
                bad.append(number)  # a row the format cannot read is a row of the wrong shape
                continue
        if shape == "preference":  # implicit only where the data has no prompt column (a
            # prompt cell left empty in one is a malformed row, refused as such)
            row, why = _explicit_prompt(row, implicit="prompt" not in (
                row if fmt is not None else columns))
            if why:
                unsplit.setdefault(why, []).append(number)
                continue
        if _valid_row(row, needed):
            kept.append({k: row[k] for k in needed})
            numbers.append(number)
        else:
            bad.append(number)
    if unsplit and not skip_bad_rows:
        why, numbers_of = next(iter(unsplit.items()))
        raise DataFormatError(f"{source}: row(s) {_first(numbers_of)}: {why} (or pass "
                              "--skip-bad-rows to use the other rows)")
    bad = sorted(bad + [n for numbers_of in unsplit.values() for n in numbers_of])
    what = f"empty or malformed {', '.join(needed)}"
    if not kept:
        raise DataFormatError(
            f"{source}: no usable rows left after dropping {len(rows)} with {what}"
        )
    if bad and not skip_bad_rows:
        raise DataFormatError(
            f"{source}: {len(bad)} of {len(rows)} rows have {what}: row(s) {_first(bad)}; "
            "fix them, or pass --skip-bad-rows to use the others"
        )
    if shape == "preference":
        kept = _check_preferences(kept, numbers, source)
    return Data(kept, shape, f"{source} ({len(kept)} rows)" if not bad
                else f"{source} ({len(kept)} of {len(rows)} rows usable)",
                digest, fmt.name if fmt else shape, sorted(columns), skipped=bad)


def _first(numbers: list[int], count: int = 5) -> str:
    """``1, 4, 9...``: the first few of ``numbers``, for a message."""
    return ", ".join(map(str, numbers[:count])) + ("..." if len(numbers) > count else "")


def _check_preferences(rows: list[dict[str, Any]], numbers: list[int],
                       source: str) -> list[dict[str, Any]]:
    same = [n for n, r in zip(numbers, rows) if r["chosen"] == r["rejected"]]
    if same:
        raise DataFormatError(
            f"{source}: chosen and rejected are identical in row(s) {_first(same)}; "
            "a preference pair must differ"
        )
    return rows


def check_rendering(data: Data, chat: bool | None, *, template: bool = True,
                    flag: str = "--no-chat") -> None:
    """Refuse message rows (a chat ``messages`` list, or a field that is one) that would not go
    through a chat template: TRL renders them with it whatever ``chat`` says, so ``--no-chat``
    would change nothing but the record, and a base without a template cannot render them.

    :param chat: the run's ``chat`` option (``None``: when the base has a template).
    :param template: whether the base's tokenizer has one (before the base loads: ``True``).
    :param flag: how the user said ``chat`` is false (a recipe says ``chat: false``).
    """
    if chat is not False and template:
        return
    if not any(isinstance(value, list) for row in data.rows for value in row.values()):
        return
    if chat is False:
        raise ConfigError(f"{flag}: {data.source} holds message rows, and message rows are "
                          f"always rendered with the chat template; drop {flag} or give "
                          "string rows")
    raise ConfigError(f"{data.source} holds message rows, which are rendered with the chat "
                      "template, and this base's tokenizer has none: give string rows, or a "
                      "base with a chat template")


def _turns(value: Any) -> list[tuple[Any, Any]] | None:
    """A conversation's (role, content) pairs, what a chat template renders; ``None`` for
    anything that is not a list of turns."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        return None
    return [(m.get("role"), m.get("content")) for m in value]


def _explicit_prompt(row: dict[str, Any], *, implicit: bool) -> tuple[dict[str, Any], str]:
    """A preference pair with its prompt given once, as ``prompt`` (and a reason where that
    cannot be done: the row is refused).

    * No prompt column (``implicit``; TRL's implicit-prompt shape, Anthropic HH): the prompt
      is the longest shared beginning of ``chosen`` and ``rejected``, as TRL's
      ``extract_prompt`` takes it.
    * Conversational answers that begin with a turn other than an assistant's (UltraFeedback:
      ``prompt`` a string, ``chosen``/``rejected`` whole conversations): they must begin with
      the prompt's turns (a string prompt is one user turn), which are dropped from them, so
      that the prompt is not rendered twice; the prompt becomes those turns.

    Anything else (malformed rows included, which :func:`_valid_row` then judges) comes back
    as it was.
    """
    chosen: Any = row.get("chosen")
    rejected: Any = row.get("rejected")
    if implicit:
        both_turns = _valid_messages(chosen) and _valid_messages(rejected)
        both_text = isinstance(chosen, str) and isinstance(rejected, str)
        if not (both_turns or both_text):
            return row, ""
        no_prompt = ("chosen and rejected share no beginning to take as the prompt (it is "
                     "implicit in them): add a prompt column")
        if chosen[:1] != rejected[:1]:  # (TRL would take all but the last character of a
            return row, no_prompt       # text chosen ending in a space)
        from trl.data_utils import extract_prompt  # TRL's own rule, not a copy that drifts

        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        found = split["prompt"]
        if not (found.strip() if isinstance(found, str) else found):
            return row, no_prompt
        return {**row, **split}, ""
    prompt = row.get("prompt")
    if prompt is None:
        return row, ""  # a missing prompt in a file that has them: _valid_row refuses it
    prompt_turns = _turns(prompt) if not isinstance(prompt, str) else [("user", prompt)]
    out = dict(row)
    for key in ("chosen", "rejected"):
        turns = _turns(row.get(key))
        if not turns or prompt_turns is None or turns[0][0] == "assistant":
            continue  # an answer alone (or not a conversation: _valid_row judges it)
        if turns[:len(prompt_turns)] != prompt_turns:
            return row, (f"{key} begins with a {turns[0][0]} turn that is not the prompt: "
                         "give the answer alone, or begin it with the prompt's turns")
        out[key] = row[key][len(prompt_turns):]
        out["prompt"] = [{"role": role, "content": content} for role, content in prompt_turns]
    return out, ""


def as_chat(row: dict[str, Any]) -> dict[str, Any]:
    """Render a row conversationally, so an instruct base is trained the way it is prompted.

    Plain prompt/completion strings become a user turn and an assistant turn; ``messages``
    becomes prompt = every turn before the last assistant turn, completion = that turn (so the
    loss falls on the final assistant answer only).
    """
    if "messages" in row:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataFormatError("a messages row has no assistant turn to learn from")
        return {"prompt": messages[:last], "completion": [messages[last]]}
    out = dict(row)
    for key, role in (("prompt", "user"), ("completion", "assistant"), ("chosen", "assistant"),
                      ("rejected", "assistant")):
        if isinstance(out.get(key), str):
            out[key] = [{"role": role, "content": out[key]}]
    return out

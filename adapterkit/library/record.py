"""A pocket book's own record (``adapterkit.json``), read from a folder and checked against it.

An exported folder (``adapterkit export``) and a pushed Hub repo carry the record of the pocket
book they hold — method (``qlora``...), trainer, data hash, hyperparameters, metrics, the base's
name and fingerprint — and the SHA-256 of its files. ``import`` and ``pull`` both reuse it
through these functions, and only after the files it hashes are shown to be those files: a
record is never attached to other weights.

Nothing here opens a file on its own: callers pass the paths they have resolved (a Hub download
follows links inside its cache only), so this module needs nothing from
:mod:`adapterkit.library.peft_folder`, which uses it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.errors import InvalidAdapter
from adapterkit.files import sha256_file
from adapterkit.library.metadata import CARD_FILE, METADATA_FILE, PocketBookMeta

#: files shown, never loaded: a mismatch there is an edit (editing a model card on the Hub is
#: routine), warned about; one in the files that are loaded is refused
PROSE = (CARD_FILE, ".png")


@dataclass(frozen=True)
class Origin:
    """Where a folder with a record comes from, for what is said about it.

    :param label: how the folder is named in messages (``owner/name``, or its path).
    :param made: how the record was written (``"pushed"``, ``"exported"``).
    :param changed: the likely causes of a file that differs from its record.
    :param advice: what to do when it is refused, appended after "nothing was imported".
    :param edit_hint: said after a card or picture that changed since (where it was likely
        edited).
    :param category: the warning class said with (``HubWarning`` for a pull).
    :param fetch: how the pocket books it was trained on are brought here (``pull``, ``add``).
    """

    label: str
    made: str
    changed: str
    advice: str = ""
    edit_hint: str = ""
    category: type[Warning] = UserWarning
    fetch: str = "add"


def read_record(path: Path | None, origin: Origin) -> dict[str, Any] | None:
    """The record at ``path`` as a JSON object, None where there is none (``path`` None);
    refused (one line) where it is not one: what it records (base, hashes) cannot be read."""
    if path is None:
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{origin.label}: its {METADATA_FILE} is not valid JSON ({exc}); "
                             f"nothing was imported{origin.advice}") from None
    if not isinstance(recorded, dict):
        raise InvalidAdapter(f"{origin.label}: its {METADATA_FILE} is not a JSON object, so the "
                             "base and hashes it should record cannot be read; nothing was "
                             f"imported{origin.advice}")
    return recorded


def record_meta(recorded: dict[str, Any], origin: Origin) -> PocketBookMeta:
    """The pocket-book metadata ``recorded`` holds, refused (one line) where it is not that."""
    try:
        meta = PocketBookMeta.from_dict(recorded)
    except (TypeError, ValueError) as exc:
        raise InvalidAdapter(f"{origin.label}: its {METADATA_FILE} is not pocket-book metadata "
                             f"({exc}); nothing was imported{origin.advice}") from None
    if not isinstance(meta.base, dict) or not isinstance(meta.stacked_on, list):
        raise InvalidAdapter(f"{origin.label}: its {METADATA_FILE} is not pocket-book metadata "
                             f"(base, stacked_on); nothing was imported{origin.advice}")
    return meta


def verify_record(recorded: dict[str, Any], files: dict[str, Path | None], origin: Origin, *,
                  cover: tuple[str, ...] | None = None) -> None:
    """Check the SHA-256 ``recorded`` holds for each of ``files`` (name → the path to read,
    those that will join the library): a loaded file that differs is refused, a card or
    picture that differs is warned about. Warn, naming them, about those among ``cover``
    (default: all of ``files``) it records no hash for: they could not be checked."""
    hashes = recorded.get("files")
    checked, edited = set(), []
    for name, digest in (hashes.items() if isinstance(hashes, dict) else ()):
        if not isinstance(digest, str) or name not in files:
            continue  # not a file that joins the library (or not a hash): nothing to check
        path = files[name]
        if path is not None and sha256_file(path) != digest:
            if not name.endswith(PROSE):
                raise InvalidAdapter(f"{origin.label}: {name} differs from what was "
                                     f"{origin.made} (the SHA-256 its {METADATA_FILE} records): "
                                     f"{origin.changed}; nothing was imported{origin.advice}")
            edited.append(name)
        checked.add(name)
    if edited:
        warnings.warn(f"{origin.label}: {', '.join(edited)} changed since it was {origin.made}"
                      f"{origin.edit_hint}; it is "
                      "imported as it is now — the adapter's weights and config match what was "
                      f"{origin.made}", origin.category, stacklevel=4)
    unchecked = [n for n in (files if cover is None else cover) if n in files
                 and n not in checked]
    if unchecked:
        warnings.warn(f"{origin.label}: its {METADATA_FILE} records no SHA-256 for "
                      f"{', '.join(unchecked)}, so they could not be checked against what was "
                      f"{origin.made}", origin.category, stacklevel=4)

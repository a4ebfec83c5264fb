"""The library's folders as the source of truth, and the catalog kept in line with them.

``library/<name>/<version>/`` folders hold the pocket books; the catalog is an index over them.
Every command that reads the library first :func:`reconcile`\\ s the two, cheaply: two
directory listings deep and one ``stat`` of each ``adapterkit.json``, no file read unless
something changed. That is what heals the crash windows no transaction can close — a folder
renamed into place whose catalog commit never came, a metadata write whose commit never came,
a folder deleted by hand.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from pathlib import Path

from adapterkit.errors import InvalidAdapter, InvalidName
from adapterkit.library.catalog import Catalog, meta_stamp
from adapterkit.library.metadata import METADATA_FILE, PocketBookMeta
from adapterkit.library.names import MAX_VERSION, validate_name


class DamagedBookWarning(UserWarning):
    """A pocket-book folder whose metadata cannot be read was skipped (``adapterkit doctor``
    moves it aside)."""


def warn_damaged(exc: InvalidAdapter) -> None:
    # One location for every caller: Python then says it once per command.
    warnings.warn(f"skipped a damaged pocket book: {exc}; `adapterkit doctor` moves it aside",
                  DamagedBookWarning, stacklevel=1)


def _is_name(text: str) -> bool:
    try:
        validate_name(text)
    except InvalidName:
        return False
    return True


_MAX_DIGITS = len(str(MAX_VERSION))


def _version_of(text: str) -> int | None:
    # str methods, not a regex or int() of anything: this runs for every folder on every list
    if not (text.isascii() and text.isdigit()) or text[0] == "0" or len(text) > _MAX_DIGITS:
        return None
    version = int(text)
    return version if version <= MAX_VERSION else None


def _version_folders(name_folder: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    try:
        with os.scandir(name_folder) as entries:
            for entry in entries:
                version = _version_of(entry.name)
                if version is not None and entry.is_dir():  # no stat unless it is a link
                    found.append((version, entry.path))
    except OSError:
        return []
    return found


def versions_on_disk(name_folder: Path) -> list[int]:
    """The version folders of one name folder (links the user made are followed)."""
    return sorted(v for v, _ in _version_folders(str(name_folder)))


def _folder_paths(root: Path) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    try:
        with os.scandir(root) as entries:
            names = [(e.name, e.path) for e in entries if e.is_dir() and _is_name(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name, path in names:
        for version, folder in _version_folders(path):
            out[(name, version)] = folder
    return out


def folders(root: Path) -> dict[tuple[str, int], Path]:
    """Every ``<root>/<name>/<version>/`` folder, keyed by ``(name, version)``."""
    return {key: Path(path) for key, path in _folder_paths(root).items()}


def read_entry(folder: Path) -> PocketBookMeta:
    """The metadata of one library folder, refused (:class:`InvalidAdapter`, naming the file)
    when it cannot be read or does not belong where it lies."""
    meta = PocketBookMeta.read(folder)
    if meta.name != folder.parent.name or str(meta.version) != folder.name:
        raise InvalidAdapter(
            f"{folder / METADATA_FILE} says it is {meta.name}@{meta.version}, but it lies in "
            f"the folder of {folder.parent.name}@{folder.name}")
    return meta


def index(conn: sqlite3.Connection, folder: Path) -> bool:
    """Index ``folder`` as it is now, inside the caller's write transaction (so the file read
    is the file recorded: every metadata write happens under the same lock). False, with a
    warning, when it cannot be read."""
    try:
        meta = read_entry(folder)
    except InvalidAdapter as exc:
        if folder.is_dir():  # not merely removed meanwhile
            warn_damaged(exc)
        return False
    Catalog.upsert(conn, meta, folder)
    return True


def reconcile(root: Path, catalog: Catalog) -> None:
    """Bring ``catalog`` in line with the folders under ``root``.

    Valid folders missing from the index are added, rows without a folder are dropped, rows
    whose ``adapterkit.json`` changed since they were indexed are re-read; damaged folders are
    reported, never guessed at. Each change is re-checked inside the write transaction, so a
    save, removal or tag in flight in another process is left alone.
    """
    paths = _folder_paths(root)
    indexed: dict[tuple[str, int], str] = catalog.read(Catalog.stamps)
    gone = indexed.keys() - paths.keys()
    changed = []
    for key, path in paths.items():
        if indexed.get(key) == meta_stamp(path):
            continue
        try:
            read_entry(Path(path))
        except InvalidAdapter as exc:
            if os.path.isdir(path):
                warn_damaged(exc)
            continue
        changed.append(key)
    changed.sort()
    disk = {key: Path(paths[key]) for key in changed}
    if not gone and not changed:
        return

    def fix(conn: sqlite3.Connection) -> None:
        now = Catalog.stamps(conn)
        for key in changed:
            if disk[key].is_dir() and now.get(key) != meta_stamp(disk[key]):
                index(conn, disk[key])
        for name, version in gone & now.keys():
            if not (root / name / str(version)).is_dir():
                Catalog.delete(conn, name, version)

    catalog.write(fix, index_only=True)

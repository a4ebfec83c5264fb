"""The local library of pocket books: save, find, list, tag, remove, import and export.

Layout under the adapterkit home::

    library/<name>/<version>/adapter_config.json       # standard PEFT files, untouched
    library/<name>/<version>/adapter_model.safetensors
    library/<name>/<version>/adapterkit.json           # our metadata (see metadata.py)
    library/<name>/<version>/README.md                 # model card, when there is one
    catalog.sqlite                                     # index over the folders
    tmp/                                               # staging; never read as entries

A save is staged in ``tmp/``, fsynced, then renamed into place inside a catalog write
transaction: a crash leaves either no entry or a complete one, never half of one.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterkitError,
    ConfigError,
    InvalidAdapter,
    NameTaken,
    PocketBookNotFound,
)
from adapterkit.files import atomic_write_text, fsync_dir, fsync_tree, new_folder, sha256_file
from adapterkit.home import resolve_home
from adapterkit.library.catalog import Catalog
from adapterkit.library.metadata import (
    CONFIG_FILE,
    HASHED_FILES,
    METADATA_FILE,
    WEIGHTS_FILE,
    PocketBookMeta,
)
from adapterkit.library.names import Ref, parse_ref, validate_name

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.plugin_api.manager import PluginManager

_STALE_STAGING_SECONDS = 24 * 3600


@dataclass
class PocketBook:
    """One version of a pocket book in the library."""

    meta: PocketBookMeta
    path: Path

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> int:
        return self.meta.version

    @property
    def ref(self) -> str:
        return f"{self.meta.name}@{self.meta.version}"

    def as_dict(self) -> dict[str, Any]:
        data = json.loads(self.meta.to_json())
        data["path"] = str(self.path)
        data["ref"] = self.ref
        return data


@dataclass
class Summary:
    """A catalog row: enough for ``adapterkit list`` without reading any folder."""

    name: str
    version: int
    base_fingerprint: str
    base_name: str
    method: str | None
    trainer: str | None
    kind: str
    created: str
    size: int
    tags: list[str]
    versions: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_free(ref: Ref, taken: set[int]) -> None:
    """Raise :class:`NameTaken`, suggesting the next free version, if ``ref`` is taken."""
    if not taken or (ref.version is not None and ref.version not in taken):
        return
    latest, nxt = max(taken), max(taken) + 1
    if ref.version is None:
        raise NameTaken(
            f"a pocket book named {ref.name!r} already exists (latest {ref.name}@{latest}); "
            f"save as a new version with --name {ref.name}@{nxt}, or pick another name"
        )
    raise NameTaken(f"{ref} already exists; use {ref.name}@{nxt} for a new version")


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Library:
    """A pocket-book library rooted at an adapterkit home.

    :param home: the adapterkit home (default: ``$ADAPTERKIT_HOME`` or the per-user folder).
    :param plugins: plugin manager whose lifecycle hooks are called (default: none are called).
    """

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 plugins: PluginManager | None = None) -> None:
        self.home = resolve_home(home)
        self.root = self.home / "library"
        self.staging = self.home / "tmp"
        self.plugins = plugins
        self.catalog = Catalog(self.home / "catalog.sqlite", self._scan)

    # -- reading ----------------------------------------------------------------------------

    def _scan(self) -> Iterator[tuple[PocketBookMeta, int]]:
        if not self.root.is_dir():
            return
        for meta_file in sorted(self.root.glob(f"*/*/{METADATA_FILE}")):
            folder = meta_file.parent
            try:
                meta = PocketBookMeta.read(folder)
            except InvalidAdapter:
                continue
            if meta.name == folder.parent.name and str(meta.version) == folder.name:
                yield meta, _folder_size(folder)

    def path_of(self, name: str, version: int) -> Path:
        return self.root / validate_name(name) / str(int(version))

    def list(self, *, base: str | None = None, tag: str | None = None,
             all_versions: bool = False) -> builtins.list[Summary]:
        """Pocket books, latest version of each unless ``all_versions``.

        :param base: keep those made on this base: its name, or a prefix of its fingerprint.
        :param tag: keep those carrying this tag.
        """
        clauses, params = [], []
        if base:
            clauses.append("base_name = ? OR base_fingerprint LIKE ?")
            params += [base, f"{base}%"]
        if tag:
            clauses.append(
                "EXISTS (SELECT 1 FROM tags t WHERE t.name = p.name "
                "AND t.version = p.version AND t.tag = ?)"
            )
            params.append(tag)
        where = " AND ".join(f"({c})" for c in clauses)

        def query(conn: sqlite3.Connection) -> builtins.list[Summary]:
            rows = Catalog.rows(conn, where=where, params=tuple(params),
                                latest_only=not all_versions)
            return [
                Summary(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]),
                        r[10])
                for r in rows
            ]

        return self.catalog.read(query)

    def get(self, ref: str | Ref) -> PocketBook:
        """The pocket book ``name`` (latest) or ``name@N``; :class:`PocketBookNotFound` if absent."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref

        def lookup(conn: sqlite3.Connection) -> tuple[builtins.list[int], PocketBookMeta | None]:
            versions = Catalog.versions(conn, ref.name)
            version = ref.version if ref.version is not None else (versions or [0])[-1]
            return versions, Catalog.meta(conn, ref.name, version)

        versions, meta = self.catalog.read(lookup)
        if meta is None or not self.path_of(meta.name, meta.version).is_dir():
            if not versions:
                raise PocketBookNotFound(
                    f"no pocket book named {ref.name!r}; `adapterkit list` shows what there is"
                )
            have = ", ".join(f"{ref.name}@{v}" for v in versions)
            raise PocketBookNotFound(f"no version {ref} in the library; it has {have}")
        return PocketBook(meta, self.path_of(meta.name, meta.version))

    def exists(self, ref: str | Ref) -> bool:
        try:
            self.get(ref)
        except PocketBookNotFound:
            return False
        return True

    # -- writing ----------------------------------------------------------------------------

    @contextmanager
    def draft(self) -> Iterator[Path]:
        """A fresh folder on the library's file system to write a new pocket book into.

        Pass it to :meth:`commit` inside the ``with`` block; whatever is not committed —
        because of an error, Ctrl-C or a crash — is removed (or swept up on a later run).
        """
        self.staging.mkdir(parents=True, exist_ok=True)
        self._sweep_staging()
        folder = self.staging / f"stage-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _sweep_staging(self) -> None:
        cutoff = time.time() - _STALE_STAGING_SECONDS
        for old in self.staging.iterdir():
            try:
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass

    def reserve(self, name_or_ref: str) -> Ref:
        """Check that ``name`` (new) or ``name@N`` (an explicit new version) can be saved.

        Raises :class:`NameTaken` with the next free version when plain ``name`` exists, so long
        jobs fail before they start rather than after.
        """
        ref = parse_ref(name_or_ref)
        _check_free(ref, set(self._all_versions(ref.name)))
        return ref

    def _all_versions(self, name: str) -> builtins.list[int]:
        """Versions of ``name`` in the catalog or on disk (a crash can leave either behind)."""
        versions = self.catalog.read(lambda conn: Catalog.versions(conn, name))
        return sorted(set(versions) | set(self._disk_versions(name)))

    def _disk_versions(self, name: str) -> builtins.list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def commit(self, staged: Path, meta: PocketBookMeta, *, name: str | None = None,
               new_version: bool = False) -> PocketBook:
        """Move a staged folder into the library as one new entry, atomically.

        :param staged: a folder from :meth:`stage` holding the PEFT files.
        :param meta: metadata to record; its ``name``/``version`` are set here.
        :param name: ``name`` or ``name@N`` (default: ``meta.name``).
        :param new_version: with a plain ``name`` that exists, take the next free version
            instead of raising :class:`NameTaken` (used by API callers that want that).
        """
        ref = parse_ref(name or meta.name)
        if meta.kind == "adapter":
            for required in (CONFIG_FILE, WEIGHTS_FILE):
                if not (staged / required).is_file():
                    raise InvalidAdapter(f"cannot save {ref}: {required} is missing")
        meta.files = {f: sha256_file(staged / f) for f in HASHED_FILES if (staged / f).is_file()}
        self.root.mkdir(parents=True, exist_ok=True)

        def insert(conn: sqlite3.Connection) -> PocketBook:
            taken = set(Catalog.versions(conn, ref.name)) | set(self._disk_versions(ref.name))
            if ref.version is None and new_version:
                version = max(taken, default=0) + 1
            else:
                _check_free(ref, taken)
                version = ref.version or 1
            meta.name, meta.version = ref.name, version
            atomic_write_text(staged / METADATA_FILE, meta.to_json())
            fsync_tree(staged)
            final = self.path_of(ref.name, version)
            final.parent.mkdir(parents=True, exist_ok=True)
            Catalog.upsert(conn, meta, _folder_size(staged))
            os.rename(staged, final)
            fsync_dir(final.parent)
            return PocketBook(meta, final)

        book = self.catalog.write(insert)
        if self.plugins is not None:
            self.plugins.call_each("pocket_book_saved", pocket_book=book)
        return book

    def save_folder(self, folder: Path, meta: PocketBookMeta, *, name: str | None = None,
                    new_version: bool = False) -> PocketBook:
        """Copy a PEFT folder's files into the library as a new entry (atomic)."""
        with self.draft() as staged:
            for item in folder.iterdir():
                if item.is_file() and item.name != METADATA_FILE:
                    shutil.copy2(item, staged / item.name)
            return self.commit(staged, meta, name=name, new_version=new_version)

    def dependents(self, refs: set[str]) -> builtins.list[str]:
        """Pocket books that need one of ``refs`` (``name@N``) to work: trained on top of it
        (``--on``) or a saved stack of it."""
        out = []
        for summary in self.list(all_versions=True):
            ref = f"{summary.name}@{summary.version}"
            if ref in refs:
                continue
            try:
                meta = self.get(ref).meta
            except AdapterkitError:
                continue
            members = set(meta.stacked_on)
            if meta.kind == "stack":
                members |= set(dict(meta.hyperparameters.get("weights", {})))
            if members & refs:
                out.append(ref)
        return out

    def remove(self, ref: str | Ref, *, all_versions: bool = False,
               force: bool = False) -> builtins.list[int]:
        """Remove one version (``name@N``; plain ``name`` is the latest), or with
        ``all_versions`` every version of ``name``. Returns the versions removed.

        Refuses while other pocket books are trained on top of it or stack it (they would stop
        working), unless ``force``.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        book = self.get(ref)
        versions = None if all_versions else [book.version]
        if not force:
            doomed = {f"{ref.name}@{v}" for v in (versions or self._all_versions(ref.name))}
            needed_by = self.dependents(doomed)
            if needed_by:
                raise ConfigError(
                    f"{', '.join(sorted(doomed))} is needed by {', '.join(needed_by)} (trained "
                    "on top of it, or a stack of it); remove those first, or pass --force")
        self.staging.mkdir(parents=True, exist_ok=True)
        trash = self.staging / f"trash-{uuid.uuid4().hex[:12]}"
        trash.mkdir()

        def delete(conn: sqlite3.Connection) -> builtins.list[int]:
            gone = versions or Catalog.versions(conn, ref.name)
            for v in gone:
                Catalog.delete(conn, ref.name, v)
                src = self.path_of(ref.name, v)
                if src.exists():
                    os.rename(src, trash / str(v))
            return gone

        gone = self.catalog.write(delete)
        shutil.rmtree(trash, ignore_errors=True)
        parent = self.root / ref.name
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        if self.plugins is not None:
            for v in gone:
                self.plugins.call_each("pocket_book_removed", name=ref.name, version=v)
        return gone

    def tag(self, ref: str | Ref, tag: str, *, remove: bool = False) -> PocketBook:
        """Add (or with ``remove=True`` drop) a tag on one pocket-book version."""
        validate_name(tag)

        def change(meta: PocketBookMeta) -> None:
            tags = [t for t in meta.tags if t != tag]
            meta.tags = tags if remove else tags + [tag]

        return self.update_meta(ref, change)

    def update_meta(self, ref: str | Ref, change: Callable[[PocketBookMeta], None]
                    ) -> PocketBook:
        """Change one pocket-book version's metadata in place (atomically, catalog too)."""
        book = self.get(ref)

        def update(conn: sqlite3.Connection) -> PocketBook:
            meta = PocketBookMeta.read(book.path)
            change(meta)
            atomic_write_text(book.path / METADATA_FILE, meta.to_json())
            Catalog.upsert(conn, meta, _folder_size(book.path))
            return PocketBook(meta, book.path)

        return self.catalog.write(update)

    def rebuild_catalog(self) -> int:
        """Re-index the library from its folders; returns the number of entries."""
        return self.catalog.rebuild()

    # -- moving in and out --------------------------------------------------------------------

    def import_peft(self, folder: str | os.PathLike[str], name: str, *, base: str | None = None,
                    trust_pickle: bool = False) -> PocketBook:
        """Add an adapter made with plain PEFT, after checking that it really fits ``base``.

        See :func:`adapterkit.library.peft_folder.import_peft_folder` for what is checked.
        """
        from adapterkit.library.peft_folder import import_peft_folder

        return import_peft_folder(self, Path(folder), name, base=base, trust_pickle=trust_pickle)

    def export(self, ref: str | Ref, dest: str | os.PathLike[str]) -> Path:
        """Write a pocket book as a plain PEFT folder (loadable by PEFT, vLLM, TGI, LoRAX)."""
        book = self.get(ref)
        if book.meta.kind != "adapter":
            raise InvalidAdapter(f"{book.ref} is a {book.meta.kind}, not a single adapter")
        dest = Path(dest)
        with new_folder(dest) as tmp:
            for item in book.path.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        return dest

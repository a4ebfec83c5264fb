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
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterkit.errors import (
    AdapterWarning,
    ConfigError,
    InvalidAdapter,
    InvalidName,
    NameTaken,
    PocketBookNotFound,
)
from adapterkit.files import (
    NO_SPACE,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    give_file_modes,
    move_back,
    new_folder,
    owned_name,
    remove_tree,
    sha256_file,
    stale_reason,
)
from adapterkit.home import file_in_the_way, resolve_home
from adapterkit.library import layout
from adapterkit.library.catalog import Catalog, CatalogWarning, meta_stamp
from adapterkit.library.metadata import (
    CARD_FILE,
    CONFIG_FILE,
    HASHED_FILES,
    METADATA_FILE,
    WEIGHTS_FILE,
    PocketBookMeta,
)
from adapterkit.library.names import MAX_VERSION, Ref, parse_ref, validate_name
from adapterkit.library.run_locks import handed_here, training_now

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.plugin_api.manager import PluginManager



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


#: In ``library/``, written when versions leave the library (``rm``, doctor's quarantine): each
#: name's highest version, so that a plain ``NAME`` saved later takes the next number instead
#: of one that named other weights in cards, logs, stacks and ``--on`` records (``NAME@N``
#: given explicitly still may, to put the same weights back). One file, not one per name: a
#: name's folder goes with its last version, as before.
VERSIONS_USED_FILE = ".versions-used.json"


def _check_free(ref: Ref, taken: set[int], indexed: set[int] | None = None,
                used: int = 0, option: str = "--name") -> None:
    """Raise :class:`NameTaken`, suggesting the next free version, if ``ref`` is taken.

    :param option: how the caller's user names what is saved (``--name``, a recipe's
        ``name:``), in the suggestion.
    :param indexed: the versions the catalog knows; a taken version it does not know is a
        folder on disk that could not be indexed (damaged), and the message says so.
    :param used: the highest version the name ever had (:data:`VERSIONS_USED_FILE`).
    """
    if not taken or (ref.version is not None and ref.version not in taken):
        return
    latest, nxt = max(taken), max(max(taken), used) + 1
    clash = {ref.version} if ref.version is not None else taken
    if indexed is not None and not clash & indexed:
        damaged = f"{ref.name}@{latest if ref.version is None else ref.version} has a folder " \
            "in the library that cannot be read (damaged)"
        raise NameTaken(f"{damaged}; run `adapterkit doctor` to move it aside, or save as "
                        f"{ref.name}@{nxt}", reason=f"{damaged}, which `adapterkit doctor` "
                        "moves aside")
    if ref.version is None:
        raise NameTaken(
            f"a pocket book named {ref.name!r} already exists (latest {ref.name}@{latest}); "
            f"save as a new version with {option} {ref.name}@{nxt}, or pick another name"
        )
    raise NameTaken(f"{ref} already exists; use {ref.name}@{nxt} for a new version")


class Library:
    """A pocket-book library rooted at an adapterkit home.

    :param home: the adapterkit home (default: ``$ADAPTERKIT_HOME`` or the per-user folder).
    :param plugins: plugin manager whose lifecycle hooks are called (default: none are called).
    """

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 plugins: PluginManager | None = None) -> None:
        if home is not None and not isinstance(home, (str, os.PathLike)):
            raise ConfigError(f"home must be the path of a folder (a str or pathlib.Path), got "
                              f"{home!r}")
        self.home = resolve_home(home)
        _refuse_file_home(self.home)
        self.root = self.home / "library"
        self.staging = self.home / "tmp"
        self.plugins = plugins
        self.catalog = Catalog(self.home / "catalog.sqlite", self._scan)

    # -- reading ----------------------------------------------------------------------------

    def folders(self) -> dict[tuple[str, int], Path]:
        """Every ``library/<name>/<version>/`` folder on disk (see :mod:`.layout`)."""
        return layout.folders(self.root)

    def read_entry(self, folder: Path) -> PocketBookMeta:
        """The metadata of one library folder, refused (:class:`InvalidAdapter`) when it cannot
        be read or does not belong where it lies."""
        return layout.read_entry(folder)

    def _scan(self) -> Iterator[tuple[PocketBookMeta, Path]]:
        for _key, folder in sorted(self.folders().items()):
            try:
                meta = layout.read_entry(folder)
            except InvalidAdapter as exc:
                layout.warn_damaged(exc)
                continue
            yield meta, folder

    def reconcile(self) -> None:
        """Bring the catalog in line with the folders, the source of truth (see
        :func:`adapterkit.library.layout.reconcile`): what a crash or a hand edit left behind
        is healed before it is read."""
        layout.reconcile(self.root, self.catalog)

    def path_of(self, name: str, version: int) -> Path:
        return self.root / validate_name(name) / str(int(version))

    def list(self, *, base: str | None = None, tag: str | None = None,
             all_versions: bool = False) -> builtins.list[Summary]:
        """Pocket books, latest version of each unless ``all_versions``.

        :param base: keep those made on this base: its name (every book of a fingerprint
            some book records under that name), or a prefix of its fingerprint.
        :param tag: keep those carrying this tag.

        A filter keeps versions first: without ``all_versions`` each name shows its latest
        version that matches (``tag="prod"`` finds ``tri@1`` when ``tri@2`` is untagged).
        """
        for label, value in (("base", base), ("tag", tag)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"the {label} filter must be a string, got {value!r}")
            if value is not None and not value.strip():
                raise ConfigError(f"the {label} filter is empty: give a {label} to keep, or "
                                  "leave it out")
        self.reconcile()
        clauses, params = [], []
        if base:
            # a name keeps every book of the fingerprints it names: one base may be recorded
            # under two names (an alias, and the folder or file an import was pointed at)
            clauses.append("base_name = ? OR base_fingerprint IN (SELECT q.base_fingerprint "
                           "FROM pocket_books q WHERE q.base_name = ? AND q.base_fingerprint "
                           "!= '') OR base_fingerprint LIKE ? ESCAPE '\\'")
            escaped = base.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params += [base, base, f"{escaped}%"]
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
        ref = parse_ref(ref)

        def lookup(conn: sqlite3.Connection
                   ) -> tuple[builtins.list[int], PocketBookMeta | None, str]:
            versions = Catalog.versions(conn, ref.name)
            version = ref.version if ref.version is not None else (versions or [0])[-1]
            return versions, Catalog.meta(conn, ref.name, version), Catalog.stamps(
                conn, ref.name, version).get((ref.name, version), "")

        def current(meta: PocketBookMeta | None, stamp: str) -> bool:
            return meta is not None and stamp == meta_stamp(self.path_of(meta.name,
                                                                         meta.version))

        versions, meta, stamp = self.catalog.read(lookup)
        stale = not current(meta, stamp)
        if not stale and ref.version is None:  # a newer version may lie on disk unindexed
            on_disk = self._disk_versions(ref.name)
            stale = bool(on_disk) and on_disk[-1] not in versions
        if stale:
            self.reconcile()  # a crash or a hand edit may have left the index behind
            versions, meta, stamp = self.catalog.read(lookup)
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
        self.sweep_staging()
        folder = self.staging / owned_name("stage")
        folder.mkdir()
        try:
            yield folder
        except OSError as exc:
            if exc.errno in NO_SPACE:  # raised while writing: the library's device is full
                raise OSError(exc.errno, exc.strerror, str(self.home)) from None
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def sweep_staging(self, *, dry_run: bool = False) -> builtins.list[tuple[Path, str]]:
        """Remove work folders left under ``tmp/`` by dead processes (or over a day old);
        returns each with the reason."""
        swept: builtins.list[tuple[Path, str]] = []
        try:
            leftovers = builtins.list(self.staging.iterdir())
        except OSError:
            return swept
        for old in leftovers:
            reason = stale_reason(old)
            if reason is None:
                continue
            swept.append((old, reason))
            if not dry_run:
                remove_tree(old)
        return swept

    def reserve(self, name_or_ref: str, *, option: str = "--name") -> Ref:
        """Check that ``name`` (new) or ``name@N`` (an explicit new version) can be saved.

        Raises :class:`NameTaken` with the next free version when plain ``name`` exists, so long
        jobs fail before they start rather than after; ``option`` is how the caller's user
        names it (``--name``; a recipe's ``name:``), said in that suggestion.
        """
        ref = parse_ref(name_or_ref)
        self.reconcile()
        self.catalog.read(lambda conn: self._refuse_case_clash(conn, ref.name))
        indexed = set(self.catalog.read(lambda conn: Catalog.versions(conn, ref.name)))
        _check_free(ref, indexed | set(self._disk_versions(ref.name)), indexed,
                    self._versions_used(ref.name), option)
        return ref

    def _refuse_case_clash(self, conn: sqlite3.Connection, name: str) -> None:
        """Refuse ``name`` where another name differs from it only in case: on a
        case-insensitive file system (macOS's and Windows' defaults) both would share one
        folder, and the library would read one's versions as the other's damaged ones. A name
        the library already holds is not new: its versions go on (a library made on a
        case-sensitive disk before this check may hold both spellings)."""
        folders = set(os.listdir(self.root)) if self.root.is_dir() else set()  # as spelt
        if Catalog.versions(conn, name) or name in folders:
            return
        others = {r[0] for r in conn.execute(
            "SELECT DISTINCT name FROM pocket_books WHERE name != ? AND lower(name) = lower(?)",
            (name, name))}
        others |= {f for f in folders if f != name and f.lower() == name.lower()}
        if others:
            clash = f"{name!r} differs from the pocket book {sorted(others)[0]!r} only in " \
                "case, which some file systems do not tell apart"
            raise NameTaken(f"{clash}; use that name (NAME@N for a new version) or another one",
                            reason=clash)

    def _all_versions(self, name: str) -> builtins.list[int]:
        """Versions of ``name`` in the catalog or on disk (a crash can leave either behind)."""
        versions = self.catalog.read(lambda conn: Catalog.versions(conn, name))
        return sorted(set(versions) | set(self._disk_versions(name)))

    def _disk_versions(self, name: str) -> builtins.list[int]:
        return layout.versions_on_disk(self.root / name)

    def _read_marks(self) -> tuple[dict[str, int], bool]:
        """The marks (:data:`VERSIONS_USED_FILE`), and whether the file read as marks whole
        (True also where there is none). Entries that are not a name's version number are left
        out, and make the file one that does not read: kept beside at the next write
        (:meth:`_mark_used`), reported by doctor."""
        return self._read_marks_raw()[:2]

    def _read_marks_raw(self) -> tuple[dict[str, int], bool, bytes | None]:
        """:meth:`_read_marks`, and the file's bytes where it was read (None: none, or unread)."""
        try:
            raw = (self.root / VERSIONS_USED_FILE).read_bytes()
        except FileNotFoundError:
            return {}, True, None
        except OSError:
            return {}, False, None
        try:
            data = json.loads(raw)
        except ValueError:
            return {}, False, raw
        if not isinstance(data, dict):
            return {}, False, raw
        marks = {k: v for k, v in data.items()
                 if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)}
        return marks, len(marks) == len(data), raw

    def _versions_used(self, name: str, *, say: bool = False) -> int:
        """The highest version ``name`` had before its removals (0: none marked). ``say``: a
        plain NAME's number is chosen from it now, so a marks file that does not read is said
        (:meth:`_say_marks_unread`)."""
        used, readable = self._used_and_readable(name)
        if say and not readable:
            self._say_marks_unread(stacklevel=4)
        return used

    def _used_and_readable(self, name: str) -> tuple[int, bool]:
        """:meth:`_versions_used`, and whether the marks file read whole (one read)."""
        marks, readable = self._read_marks()
        return min(max(marks.get(name, 0), 0), MAX_VERSION), readable

    def _say_marks_unread(self, *, stacklevel: int) -> None:
        """Warn that the marks file does not read, once per process and state of the file: a
        save goes on (from the entries that read and the versions present), and a plain NAME
        may take a removed version's number again."""
        path = self.root / VERSIONS_USED_FILE
        try:
            found = os.stat(path)
            state: Any = (found.st_ino, found.st_mtime_ns, found.st_size)
        except OSError:
            state = "unstatable"
        key = os.path.abspath(path)
        if _MARKS_SAID.get(key) == state:
            return
        _MARKS_SAID[key] = state
        warnings.warn(
            f"{path} does not read as the version numbers `rm` records, so a plain NAME is "
            "numbered from the entries that read and the versions present, and may take a "
            "removed version's number again: run `adapterkit doctor` to keep the file beside "
            "and write the entries that read again (give NAME@V to choose meanwhile)",
            CatalogWarning, stacklevel=stacklevel)

    def _mark_used(self, highest: dict[str, int], said: builtins.list[str],
                   kept_at: builtins.list[Path] | None = None) -> Callable[[], None]:
        """Record ``highest`` (name → version) as used, under the catalog's write lock; returns
        what puts the file back as it was (for a removal that fails after it). A file that
        does not read as marks whole is kept beside it (``.corrupt-TIME``), never overwritten
        unseen: the entries that read are written again, the rest are lost to the library,
        and what to tell the user is appended to ``said`` (for the caller to say once its
        write is committed: a removal that fails puts the file back), the file kept to
        ``kept_at``."""
        path = self.root / VERSIONS_USED_FILE
        marks, readable, before = self._read_marks_raw()
        kept: Path | None = None
        if not readable:  # kept beside by a rename: that needs no right to read it
            kept = path.with_name(f"{VERSIONS_USED_FILE}.corrupt-{int(time.time())}")
            os.rename(path, kept)
            if kept_at is not None:
                kept_at.append(kept)
            said.append(
                f"{path} did not read as the version numbers `rm` and doctor record (kept as "
                f"{kept.name}); it is written afresh"
                + (f" with its {len(marks)} readable entr{'y' if len(marks) == 1 else 'ies'}"
                   if marks else "")
                + ", and a plain NAME whose removed versions it recorded may take one of their "
                "numbers again: give NAME@V to choose")
        for name, version in highest.items():
            marks[name] = max(marks.get(name, 0), version)
        atomic_write_text(path, json.dumps(dict(sorted(marks.items())), indent=1) + "\n")

        def undo() -> None:
            if kept is not None:
                os.replace(kept, path)  # the unreadable file back where it was
            elif before is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, before)
        return undo

    def next_version(self, name: str) -> int:
        """The version a plain ``name`` saved now as a new version takes: one past the highest
        it has or ever had (1 for a new name)."""
        validate_name(name)
        version = max(max(self._all_versions(name), default=0),
                      self._versions_used(name, say=True)) + 1
        if version > MAX_VERSION:
            raise NameTaken(_all_numbers_used(name))
        return version

    def version_to_save(self, name_or_ref: str | Ref) -> int:
        """The version a save of a free ``name_or_ref`` records: its own ``@N``, else one past
        the highest the name ever had (1 for a new name). For cards written before the commit."""
        ref = parse_ref(name_or_ref)
        if ref.version is not None:
            return ref.version
        used = self._versions_used(ref.name, say=True)
        if used >= MAX_VERSION:
            raise NameTaken(_all_numbers_used(ref.name))
        return used + 1

    def commit(self, staged: Path, meta: PocketBookMeta, *, name: str | None = None,
               new_version: bool = False, members_here: bool = False,
               run: bool = False) -> PocketBook:
        """Move a staged folder into the library as one new entry, atomically.

        :param staged: a folder from :meth:`draft` holding the PEFT files.
        :param meta: metadata to record; its ``name``/``version`` are set here.
        :param name: ``name`` or ``name@N`` (default: ``meta.name``).
        :param new_version: with a plain ``name`` that exists, take the next free version
            instead of raising :class:`NameTaken` (used by API callers that want that).
        :param members_here: refuse (:class:`PocketBookNotFound`) when a pocket book the entry
            needs (under it, or a stack's member) is no longer in the library, checked under
            the catalog's lock (an ``rm`` since they were read). A saved stack asks for it; a
            trained pocket book does not (its weights are kept either way; loading it names
            what is missing), nor a pull (its underlays may come later; it warns).

        :param run: the caller is the training run of this name, holding its run lock.
            Any other save under a name a run is training is refused (:class:`NameTaken`;
            :mod:`.run_locks`): the run would find the name taken at its end.
        """
        ref = parse_ref(name or meta.name)
        if meta.kind == "adapter":
            for required in (CONFIG_FILE, WEIGHTS_FILE):
                if not (staged / required).is_file():
                    raise InvalidAdapter(f"cannot save {ref}: {required} is missing")
        meta.files = {f: sha256_file(staged / f) for f in HASHED_FILES if (staged / f).is_file()}
        self.root.mkdir(parents=True, exist_ok=True)
        give_file_modes(staged)  # safetensors writes 0o600; the library reads as the umask says
        fsync_tree(staged)  # the weights reach the disk before the lock is taken
        moved: builtins.list[tuple[Path, Path]] = []
        marks_read = [True]  # (whether the marks file read, as the save's number was chosen)

        def insert(conn: sqlite3.Connection) -> PocketBook:
            self._refuse_case_clash(conn, ref.name)
            holder = None if run or handed_here(self.home, ref.name) else \
                training_now(self.home, ref.name)
            if holder is not None:
                raise NameTaken(f"a run training {ref.name} in {self.home} ({holder}) will save "
                                f"under that name when it ends, so {ref} was not saved: wait "
                                "for the run to finish, or save this one under another name")
            gone = [r for r in sorted(needed_refs(meta)) if not Catalog.has(conn, r)] \
                if members_here else []
            if gone:  # removed since they were read (rm checks its side under this lock too)
                raise PocketBookNotFound(f"cannot save {ref}: {', '.join(gone)}, which it needs, "
                                         "was removed meanwhile; nothing was saved")
            indexed = set(Catalog.versions(conn, ref.name))
            taken = indexed | set(self._disk_versions(ref.name))
            used, marks_read[0] = self._used_and_readable(ref.name)
            if ref.version is None and new_version:
                version = max(max(taken, default=0), used) + 1
            else:
                _check_free(ref, taken, indexed, used)
                version = ref.version or used + 1
            if version > MAX_VERSION:
                raise NameTaken(_all_numbers_used(ref.name))
            meta.name, meta.version = ref.name, version
            atomic_write_text(staged / METADATA_FILE, meta.to_json())  # fsynced
            final = self.path_of(ref.name, version)
            final.parent.mkdir(parents=True, exist_ok=True)
            Catalog.upsert(conn, meta, staged)
            os.rename(staged, final)
            moved.append((final, staged))
            fsync_dir(final.parent)
            return PocketBook(meta, final)

        self.reconcile()  # so a folder left by a crash is seen as the pocket book it is
        book = self.catalog.write(insert, undo=lambda: move_back(moved))
        if ref.version is None and not marks_read[0]:  # its number came from them
            self._say_marks_unread(stacklevel=3)
        if meta.name == meta.base.get("name"):  # imported, pulled, trained, stacked: all here
            warnings.warn(f"{book.ref} has its base's name, which `adapterkit serve` reads as "
                          f"the plain base: name it {book.ref} in requests and stacks there",
                          AdapterWarning, stacklevel=2)
        if self.plugins is not None:
            self.plugins.call_each("pocket_book_saved", pocket_book=book)
        return book

    def save_folder(self, folder: Path, meta: PocketBookMeta, *, name: str | None = None,
                    new_version: bool = False) -> PocketBook:
        """Copy a PEFT folder's files into the library as a new entry (atomic).

        Only regular files are copied: a link is refused (:class:`InvalidAdapter`), since the
        file it points at — anywhere on this machine — would join the library, and from there
        exports and the Hub.
        """
        links = sorted(item.name for item in folder.iterdir() if item.is_symlink())
        if links:
            raise InvalidAdapter(f"cannot save {folder}: {', '.join(links)} is a link; copy the "
                                 "file itself into the folder")
        with self.draft() as staged:
            for item in folder.iterdir():
                if item.is_file() and item.name != METADATA_FILE:
                    shutil.copy2(item, staged / item.name)
            return self.commit(staged, meta, name=name, new_version=new_version)

    def dependents(self, refs: set[str]) -> dict[str, builtins.list[str]]:
        """Pocket books that need one of ``refs`` (``name@N``) to work — trained on top of it
        (``--on``) or a saved stack of it — each with those of ``refs`` it needs. One catalog
        query, whatever the library's size (:meth:`remove`, its caller, has reconciled the
        catalog with the folders)."""
        return self.catalog.read(lambda conn: _dependents(conn, refs))

    def remove(self, ref: str | Ref, *, all_versions: bool = False,
               force: bool = False) -> builtins.list[int]:
        """Remove one version (``name@N``; plain ``name`` is the latest), or with
        ``all_versions`` every version of ``name``. Returns the versions removed.

        Refuses while other pocket books are trained on top of it or stack it (they would stop
        working), unless ``force``. The name's highest version is recorded
        (:data:`VERSIONS_USED_FILE`), so a plain ``name`` saved later never takes a removed
        number.
        """
        ref = parse_ref(ref)
        if all_versions and ref.version is not None:
            raise ConfigError(f"{ref} names one version, --all-versions every version: remove "
                              f"{ref} alone, or every version with {ref.name} --all-versions")
        self.reconcile()  # versions a crash left unindexed go too with --all-versions
        book = self.get(ref)
        versions = None if all_versions else [book.version]
        doomed = {f"{ref.name}@{v}" for v in (versions or self._all_versions(ref.name))}
        if not force:  # before anything moves (asked again under the lock below)
            _refuse_needed(self.dependents(doomed))
        self.staging.mkdir(parents=True, exist_ok=True)
        trash = self.staging / owned_name("trash")
        trash.mkdir()

        moved: builtins.list[tuple[Path, Path]] = []
        unmark: builtins.list[Callable[[], None]] = []
        said: builtins.list[str] = []  # said once the removal is committed

        def undo() -> None:  # a failed removal leaves everything as it found it
            move_back(moved)
            for put_back in reversed(unmark):
                put_back()
            unmark.clear()
            said.clear()  # (what the undone attempt would have said: a retry says its own)

        def delete(conn: sqlite3.Connection) -> builtins.list[int]:
            # Re-read inside the lock: another command may have removed some meanwhile.
            present = Catalog.versions(conn, ref.name)
            gone = [v for v in (versions or present) if v in present]
            if not gone:
                raise PocketBookNotFound(
                    f"{ref} was removed by another command meanwhile; nothing left to remove")
            if not force:  # again under the lock: a stack or --on run may have saved meanwhile
                going = {f"{ref.name}@{v}" for v in gone}
                _refuse_needed(_dependents(conn, going))
            unmark.append(self._mark_used(
                {ref.name: max(*present, *self._disk_versions(ref.name))}, said))
            for v in gone:
                Catalog.delete(conn, ref.name, v)
                src = self.path_of(ref.name, v)
                if src.exists():
                    os.rename(src, trash / str(v))
                    moved.append((trash / str(v), src))
            parent = self.root / ref.name
            try:  # under the lock, so a save of a new version cannot lose its parent folder
                parent.rmdir()
            except OSError:
                pass  # other versions remain (or it is already gone)
            return gone

        try:
            gone = self.catalog.write(delete, undo=undo)
        except BaseException:
            try:
                trash.rmdir()  # empty once every folder is back; otherwise kept for doctor
            except OSError:
                pass
            raise
        shutil.rmtree(trash, ignore_errors=True)
        for message in said:
            warnings.warn(message, CatalogWarning, stacklevel=2)
        if self.plugins is not None:
            for v in gone:
                self.plugins.call_each("pocket_book_removed", name=ref.name, version=v)
        return gone

    def tag(self, ref: str | Ref, tag: str, *, remove: bool = False) -> PocketBook:
        """Add (or with ``remove=True`` drop) a tag on one pocket-book version; removing a tag
        it does not carry is refused (a mistyped tag would otherwise stay on)."""
        try:
            validate_name(tag)
        except InvalidName as exc:
            raise InvalidName(str(exc).replace("pocket-book name", "tag")) from None

        def change(meta: PocketBookMeta) -> None:
            if remove and tag not in meta.tags:
                raise ConfigError(f"{meta.name}@{meta.version} has no tag {tag!r}; its tags: "
                                  f"{', '.join(meta.tags) or 'none'}")
            tags = [t for t in meta.tags if t != tag]
            meta.tags = tags if remove else tags + [tag]

        book = self.update_meta(ref, change)
        from adapterkit.library.card import OUR_CARD, write_card

        card = book.path / CARD_FILE  # its YAML header lists the tags (an author's card stays)
        if card.exists() and OUR_CARD in card.read_text(encoding="utf-8", errors="replace"):
            write_card(book.path, book.meta)
        return book

    def update_meta(self, ref: str | Ref, change: Callable[[PocketBookMeta], None]
                    ) -> PocketBook:
        """Change one pocket-book version's metadata in place (atomically, catalog too: where
        the catalog does not commit, the file is put back, so an error means nothing changed)."""
        book = self.get(ref)
        path = book.path / METADATA_FILE
        before: list[str] = []  # the file as it was, once this call has replaced it

        def update(conn: sqlite3.Connection) -> PocketBook:
            text = path.read_text(encoding="utf-8")
            meta = PocketBookMeta.read(book.path)
            change(meta)
            atomic_write_text(path, meta.to_json())
            before[:] = [text]
            Catalog.upsert(conn, meta, book.path)
            return PocketBook(meta, book.path)

        def undo() -> None:
            if before:
                atomic_write_text(path, before[0])

        return self.catalog.write(update, undo=undo)

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

        _check_path("folder", folder)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"base must be a base's name, folder or file as a string, got "
                              f"{base!r}")
        return import_peft_folder(self, Path(folder), name, base=base, trust_pickle=trust_pickle)

    def check_export_dest(self, dest: str | os.PathLike[str]) -> None:
        """Refuse an export folder inside this home: the library, its catalog and runs are
        adapterkit's to manage, and a PEFT folder written as ``library/NAME/V`` would be
        read as a pocket book of its own (every export writes a new folder, so ``dest`` is
        never the home itself)."""
        _check_path("dest", dest)
        where = Path(dest).expanduser()
        # by every path: as written, and with links followed (a link to the home or into it)
        paths = (Path(os.path.abspath(where)), Path(os.path.realpath(where)))
        homes = (Path(os.path.abspath(self.home)), Path(os.path.realpath(self.home)))
        if any(p.is_relative_to(h) for p in paths for h in homes) or \
                _below_by_identity(paths[0], self.home):
            raise ConfigError(f"{dest} is inside the adapterkit home {self.home}, whose "
                              "folders adapterkit manages: export to a folder outside it")

    def export(self, ref: str | Ref, dest: str | os.PathLike[str]) -> Path:
        """Write a pocket book as a plain PEFT folder (loadable by PEFT, vLLM, TGI, LoRAX).

        Its files are checked first (:func:`adapterkit.library.integrity.check_book`): a
        damaged pocket book is refused, never exported; so is a ``dest`` inside this home
        (:meth:`check_export_dest`).
        """
        from adapterkit.library.integrity import check_book

        self.check_export_dest(dest)
        book = self.get(ref)
        if book.meta.kind == "stack":  # its members' folders, weighted: no one PEFT folder
            weights = book.meta.hyperparameters.get("weights", {})
            members = " ".join(weights)
            from adapterkit.library.names import weight_text

            values = ",".join(weight_text(w) for w in weights.values())
            raise InvalidAdapter(
                f"{book.ref} is a stack, not a single adapter: save it as one with `adapterkit "
                f"stack {members} --weights {values} --flatten --name NAME` and export NAME, "
                "or use `export --merged` or `--format gguf`, which take a stack")
        if book.meta.kind != "adapter":
            raise InvalidAdapter(f"{book.ref} is a {book.meta.kind}, not a single adapter")
        if book.meta.stacked_on:  # PEFT, vLLM... would load the folder without them
            under = " ".join(book.meta.stacked_on)
            raise ConfigError(
                f"{book.ref} is trained on top of {', '.join(book.meta.stacked_on)}, which a "
                "PEFT folder of it alone leaves out (PEFT and vLLM would answer without it): "
                f"fold them into one adapter with `adapterkit stack {under} {book.ref} "
                "--flatten --name NAME` and export NAME, or use `export --merged` or "
                "`--format gguf`, which include what it was trained on")
        check_book(book)
        try:  # its record travels with it: an unreadable one would be copied as it is, and no
            self.read_entry(book.path)  # import could read the export (the catalog's copy ok)
        except InvalidAdapter as exc:
            raise InvalidAdapter(f"{book.ref} cannot be exported: {exc}; `adapterkit doctor` "
                                 "moves a damaged pocket book to quarantine") from None
        dest = Path(dest)
        with new_folder(dest) as tmp:
            for item in book.path.iterdir():
                if item.is_file() and not item.is_symlink():
                    shutil.copy2(item, tmp / item.name)
        return dest


def _check_path(label: str, value: Any) -> None:
    """Refuse a ``value`` that cannot be a path (``Path(5)`` would raise a TypeError)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{label} must be a path (a str or pathlib.Path), got {value!r}")


def _refuse_file_home(home: Path) -> None:
    """Refuse a ``home`` that is a file, or lies under one: the library could make none of
    its folders there (``mkdir`` would fail deep inside a first read or save)."""
    where = file_in_the_way(home)
    if where:
        raise ConfigError(f"the adapterkit home {home} {where}, not a folder: give the path of "
                          "a folder (home=... or $ADAPTERKIT_HOME)")


def _dependents(conn: sqlite3.Connection, refs: set[str]) -> dict[str, list[str]]:
    """See :meth:`Library.dependents` (here on an open connection: :meth:`Library.remove`
    asks again under the write lock, so a stack saved meanwhile is not left without them)."""
    rows = conn.execute("SELECT name, version, meta FROM pocket_books ORDER BY name, version"
                        ).fetchall()
    out = {}
    for name, version, text in rows:
        ref = f"{name}@{version}"
        if ref in refs:
            continue
        try:
            meta = PocketBookMeta.from_dict(json.loads(text))
        except (ValueError, TypeError):
            continue
        needed = needed_refs(meta) & refs
        if needed:
            out[ref] = sorted(needed)
    return out


def needed_refs(meta: PocketBookMeta) -> set[str]:
    """The pocket books (``name@N``) ``meta``'s entry needs: those under it, a stack's own."""
    found = set(meta.stacked_on)
    if meta.kind == "stack":
        found |= set(dict(meta.hyperparameters.get("weights", {})))
    return found


def _refuse_needed(needs: dict[str, list[str]]) -> None:
    """Refuse a removal that ``needs`` (dependent → the doomed refs it needs) says would
    break other pocket books, naming each needed version and what needs it."""
    if needs:
        by: dict[str, list[str]] = {}
        for dependent, needed in needs.items():
            for ref in needed:
                by.setdefault(ref, []).append(dependent)
        raise ConfigError(
            "; ".join(f"{ref} is needed by {', '.join(deps)}" for ref, deps in sorted(by.items()))
            + " (trained on top of it, or a stack of it); remove those first, or pass --force")


#: The state of each marks file last said not to read (:meth:`Library._say_marks_unread`).
_MARKS_SAID: dict[str, Any] = {}


def _below_by_identity(path: Path, folder: Path) -> bool:
    """Whether ``folder`` is ``path`` or one of its existing ancestors by the file system's
    own identity (device and inode), where no spelling of the two paths shows it: a
    case-insensitive file system (``~/AdapterKit`` for ``~/adapterkit``), a bind mount."""
    try:
        wanted = os.stat(folder)
    except OSError:  # no such folder: nothing can be inside it
        return False
    for ancestor in (path, *path.parents):
        try:
            found = os.stat(ancestor)
        except OSError:  # not made yet (export makes it): its parent may be the home
            continue
        if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


def _all_numbers_used(name: str) -> str:
    return f"{name} has had every version number up to {MAX_VERSION}; save under another name"

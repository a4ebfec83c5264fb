"""The SQLite catalog that makes listing and filtering a large library fast.

The pocket-book folders are the source of truth; the catalog is an index over them. So a catalog
that cannot be read is never fatal: it is moved aside and rebuilt from the folders, with a
warning. Writers serialise through ``BEGIN IMMEDIATE``, which is what lets two processes save at
once without losing either entry.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from adapterkit.errors import CatalogError
from adapterkit.library.metadata import METADATA_FILE, PocketBookMeta

SCHEMA_VERSION = 2  # 2: meta_stamp, so a crash between a metadata write and its commit heals
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pocket_books (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_fingerprint TEXT NOT NULL,
    base_name TEXT NOT NULL,
    method TEXT,
    trainer TEXT,
    kind TEXT NOT NULL,
    created TEXT NOT NULL,
    size INTEGER NOT NULL,
    tags TEXT NOT NULL,
    meta TEXT NOT NULL,
    meta_stamp TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL, version INTEGER NOT NULL, tag TEXT NOT NULL,
    PRIMARY KEY (name, version, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags (tag);
CREATE INDEX IF NOT EXISTS books_by_base ON pocket_books (base_fingerprint);
"""


def uri(path: Path, query: str) -> str:
    """A SQLite URI for ``path`` with ``query`` (``mode=ro``, ``immutable=1``), quoted so that
    a home with ``#`` or ``?`` in its path opens the right file."""
    return f"file:{quote(str(path.resolve()))}?{query}"


def folder_size(path: Path) -> int:
    """Bytes of every file below ``path`` (the size ``list`` shows)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def meta_stamp(folder: str | os.PathLike[str]) -> str:
    """When and how big the folder's ``adapterkit.json`` is: a cheap way to see, on every
    ``list``, that the file changed without the catalog (a crash between the two writes).
    Plain ``os.path``: at 10,000 books, Path arithmetic would cost more than the stat."""
    try:
        st = os.stat(os.path.join(folder, METADATA_FILE))
    except OSError:
        return ""
    return f"{st.st_mtime_ns}:{st.st_size}"


def _wal(conn: sqlite3.Connection, *, patience: float = 60.0) -> None:
    """Switch a new catalog to WAL mode. SQLite answers "locked" at once, without waiting
    for its busy timeout, while another process is creating the same file (two ranks of one
    training run, say): wait and try again instead of failing."""
    deadline = time.monotonic() + patience
    delay = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class CatalogWarning(UserWarning):
    """The catalog was unreadable and has been rebuilt from the pocket-book folders."""


#: SQLite messages that mean the file itself is damaged (so rebuilding it from the folders is
#: right). Anything else — locked, busy, read-only, disk full, I/O error — is not the file's
#: fault: moving the catalog aside would turn a full disk into a lost index.
_CORRUPTION_WORDS = ("malformed", "not a database", "corrupt", "no such table", "no such column")
_FULL_WORDS = ("database or disk is full", "disk is full")


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in _CORRUPTION_WORDS)


def _unusable(path: Path, exc: BaseException) -> CatalogError:
    text = str(exc)
    if any(word in text.lower() for word in _FULL_WORDS):
        return CatalogError(
            f"no space left on the device holding {path.parent}: free some space and run the "
            "command again (nothing was changed)")
    if "readonly" in text.lower() or "read-only" in text.lower():
        return CatalogError(
            f"the library catalog {path} is read-only: this command changes the library, so "
            "run it as a user who can write to that folder")
    if "disk i/o error" in text.lower():
        return CatalogError(
            f"cannot write the library catalog {path}: disk I/O error (a full disk, a "
            "file-size limit such as `ulimit -f`, or a failing device); fix that and run the "
            "command again (nothing was changed)")
    return CatalogError(f"library catalog {path} is unusable: {text}")


class Catalog:
    """Index of pocket books: ``(name, version) → summary + metadata JSON``.

    :param path: the SQLite file.
    :param scan: yields ``(meta, folder)`` for every pocket-book folder; used to rebuild.

    A home that cannot be written (a read-only mount, another user's library) is still
    readable: the catalog is then opened ``immutable`` (WAL mode would otherwise need a
    writable ``-shm`` file), or — when there is none, or it disagrees with the folders — built
    in memory from the folders for this process. Writes then fail with one clear line.
    """

    def __init__(self, path: Path, scan: Callable[[], Iterable[tuple[PocketBookMeta, Path]]]):
        self.path = path
        self._scan = scan
        self._memory: sqlite3.Connection | None = None

    @property
    def read_only(self) -> bool:
        """True when this process cannot write the catalog (the home is not writable)."""
        folder = self.path.parent
        if not folder.exists():
            return not os.access(folder.parent if folder.parent.exists() else Path("."),
                                 os.W_OK)
        if not os.access(folder, os.W_OK):
            return True
        return self.path.exists() and not os.access(self.path, os.W_OK)

    # -- connection and recovery -------------------------------------------------------------

    def use_memory(self) -> None:
        """Serve reads from an in-memory index built from the folders (read-only homes whose
        catalog is missing or stale)."""
        if self._memory is None:
            conn = sqlite3.connect(":memory:", isolation_level=None)
            conn.executescript(_SCHEMA)
            self._fill(conn)
            self._memory = conn

    def _open(self) -> sqlite3.Connection:
        if self._memory is not None:
            return self._memory
        if self.read_only:
            if not self.path.exists():
                self.use_memory()
                assert self._memory is not None
                return self._memory
            conn = sqlite3.connect(uri(self.path, "immutable=1"), uri=True,
                                   isolation_level=None)
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    conn.close()
                    self.use_memory()
                    assert self._memory is not None
                    return self._memory
            except BaseException:
                conn.close()
                raise
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                _wal(conn)
                self._fill(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _fill(self, conn: sqlite3.Connection) -> None:
        """Create and index a new catalog in one transaction: the schema version is recorded
        only together with the rows, so a fill that fails is never taken for a finished one."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # New, or written by another version: rebuilt from the folders, the truth.
                conn.execute("DROP TABLE IF EXISTS pocket_books")
                conn.execute("DROP TABLE IF EXISTS tags")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                for meta, folder in self._scan():
                    self.upsert(conn, meta, folder)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _recover(self, exc: BaseException) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.replace(Path(str(aside) + suffix))
        warnings.warn(
            f"the library catalog could not be read ({exc}); it was rebuilt from the "
            f"pocket-book folders (the old file is kept as {aside.name})",
            CatalogWarning,
            stacklevel=4,
        )

    def _give_up_or_recover(self, exc: sqlite3.DatabaseError, attempt: int) -> None:
        """A damaged catalog is rebuilt once (in memory when the home is read-only); any other
        database error becomes one :class:`CatalogError` line."""
        if attempt or not _is_corruption(exc) or self._memory is not None:
            raise _unusable(self.path, exc) from None
        if self.read_only:
            self.use_memory()
        else:
            self._recover(exc)

    def _close(self, conn: sqlite3.Connection) -> None:
        if conn is not self._memory:
            conn.close()

    def _run(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool,
             undo: Callable[[], None] | None = None) -> Any:
        for attempt in (0, 1):
            try:
                conn = self._open()
            except sqlite3.DatabaseError as exc:
                self._give_up_or_recover(exc, attempt)
                continue
            try:
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                    committed = False
                    try:
                        result = fn(conn)
                        conn.execute("COMMIT")
                        committed = True
                    finally:
                        if not committed:
                            try:
                                if undo is not None:
                                    # what fn did beside the catalog (folders, the version
                                    # marks), put back while the write lock is still held: after
                                    # ROLLBACK another writer could change them first
                                    undo()
                            finally:
                                if conn.in_transaction:
                                    conn.execute("ROLLBACK")
                    return result
                return fn(conn)
            except sqlite3.DatabaseError as exc:
                self._close(conn)
                self._give_up_or_recover(exc, attempt)
            finally:
                self._close(conn)
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read-only query function against the catalog. A home that does not exist
        is read as the empty library it is, and left uncreated: a read writes nothing."""
        if self._memory is None and not self.path.parent.exists():
            return self._read_empty(fn)
        return self._run(fn, write=False)

    @staticmethod
    def _read_empty(fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """``fn`` run on an empty catalog in memory, for this one read (a later save creates
        the real one)."""
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            conn.executescript(_SCHEMA)
            return fn(conn)
        finally:
            conn.close()

    def write(self, fn: Callable[[sqlite3.Connection], Any], *, index_only: bool = False,
              undo: Callable[[], None] | None = None) -> Any:
        """Run ``fn`` inside one ``BEGIN IMMEDIATE`` transaction (serialised across processes).

        :param index_only: ``fn`` only brings the index in line with the folders. On a
            read-only home that is done in this process's in-memory index instead of refused.
        :param undo: puts back what ``fn`` did outside the database (folder renames) when the
            transaction does not commit — ``fn`` failed, or the COMMIT itself did (a full disk
            fails exactly there in WAL mode) — so an error always means nothing changed.
        """
        if self.read_only:
            if not index_only:
                raise _unusable(self.path, sqlite3.OperationalError("readonly"))
            self.use_memory()
        return self._run(fn, write=True, undo=undo)

    def peek(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a query on the catalog file as it is: read-only, no recovery, no migration, no
        fill (what ``doctor --dry-run`` needs). Raises :class:`CatalogError` when the file is
        missing, unreadable or of another schema version.

        On a home this process cannot write it is opened ``immutable``, as every read there
        is: ``mode=ro`` still needs the WAL's ``-shm`` file, which a read-only home cannot
        give, and a healthy catalog would be reported as damaged."""
        if not self.path.exists():
            raise CatalogError(f"there is no catalog file {self.path}")
        query = "immutable=1" if self.read_only else "mode=ro"
        try:
            conn = sqlite3.connect(uri(self.path, query), uri=True)
        except sqlite3.DatabaseError as exc:
            raise _unusable(self.path, exc) from None
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                raise CatalogError(f"{self.path} has another schema version")
            return fn(conn)
        except sqlite3.DatabaseError as exc:
            raise _unusable(self.path, exc) from None
        finally:
            conn.close()

    def rebuild(self) -> int:
        """Drop the index and rebuild it from the folders; return how many entries it holds."""
        def refill(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM pocket_books")
            conn.execute("DELETE FROM tags")
            count = 0
            for meta, folder in self._scan():
                self.upsert(conn, meta, folder)
                count += 1
            return count

        return int(self.write(refill))

    # -- rows -------------------------------------------------------------------------------

    @staticmethod
    def upsert(conn: sqlite3.Connection, meta: PocketBookMeta, folder: Path) -> None:
        """Index ``meta``, the metadata of the pocket-book folder ``folder``."""
        conn.execute(
            "INSERT OR REPLACE INTO pocket_books VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                meta.name, meta.version, meta.base_fingerprint, str(meta.base.get("name", "")),
                meta.method, meta.trainer, meta.kind, meta.created, folder_size(folder),
                json.dumps(meta.tags), meta.to_json(), meta_stamp(folder),
            ),
        )
        conn.execute("DELETE FROM tags WHERE name=? AND version=?", (meta.name, meta.version))
        conn.executemany(
            "INSERT OR IGNORE INTO tags VALUES (?,?,?)",
            [(meta.name, meta.version, tag) for tag in meta.tags],
        )

    @staticmethod
    def stamps(conn: sqlite3.Connection, name: str | None = None, version: int | None = None
               ) -> dict[tuple[str, int], str]:
        """``(name, version) → meta_stamp`` of every entry (or of one)."""
        if name is None:
            rows = conn.execute("SELECT name, version, meta_stamp FROM pocket_books")
        else:
            rows = conn.execute("SELECT name, version, meta_stamp FROM pocket_books "
                                "WHERE name=? AND version=?", (name, version))
        return {(r[0], r[1]): r[2] for r in rows}

    @staticmethod
    def delete(conn: sqlite3.Connection, name: str, version: int) -> None:
        conn.execute("DELETE FROM pocket_books WHERE name=? AND version=?", (name, version))
        conn.execute("DELETE FROM tags WHERE name=? AND version=?", (name, version))

    @staticmethod
    def entries(conn: sqlite3.Connection) -> set[tuple[str, int]]:
        """Every ``(name, version)`` the catalog holds."""
        return {(r[0], r[1]) for r in conn.execute("SELECT name, version FROM pocket_books")}

    @staticmethod
    def has(conn: sqlite3.Connection, ref: str) -> bool:
        """Whether the catalog holds ``ref`` (``name@N``)."""
        name, _, version = ref.rpartition("@")
        return version.isdigit() and conn.execute(
            "SELECT 1 FROM pocket_books WHERE name=? AND version=?", (name, int(version))
        ).fetchone() is not None

    @staticmethod
    def versions(conn: sqlite3.Connection, name: str) -> list[int]:
        rows = conn.execute(
            "SELECT version FROM pocket_books WHERE name=? ORDER BY version", (name,)
        )
        return [r[0] for r in rows]

    @staticmethod
    def rows(conn: sqlite3.Connection, *, where: str = "", params: tuple = (),
             latest_only: bool = False) -> Iterator[sqlite3.Row]:
        """Summary rows of the entries ``where`` keeps (its columns those of ``pocket_books``,
        aliased ``p``); with ``latest_only`` the latest version of each name among them — a
        filter picks versions first, so ``tag=prod`` finds ``tri@1`` when only it is tagged."""
        matching = "SELECT * FROM pocket_books p" + (f" WHERE ({where})" if where else "")
        sql = (
            f"WITH m AS ({matching}) "
            "SELECT name, version, base_fingerprint, base_name, method, trainer, kind, created, "
            "size, tags, (SELECT COUNT(*) FROM pocket_books p2 WHERE p2.name = p.name) "
            "FROM m p"
        )
        if latest_only:
            sql += " WHERE version = (SELECT MAX(version) FROM m p3 WHERE p3.name = p.name)"
        sql += " ORDER BY name, version"
        return conn.execute(sql, params)

    @staticmethod
    def meta(conn: sqlite3.Connection, name: str, version: int) -> PocketBookMeta | None:
        row = conn.execute(
            "SELECT meta FROM pocket_books WHERE name=? AND version=?", (name, version)
        ).fetchone()
        return None if row is None else PocketBookMeta.from_dict(json.loads(row[0]))

"""The SQLite catalog that makes listing and filtering a large library fast.

The pocket-book folders are the source of truth; the catalog is an index over them. So a catalog
that cannot be read is never fatal: it is moved aside and rebuilt from the folders, with a
warning. Writers serialise through ``BEGIN IMMEDIATE``, which is what lets two processes save at
once without losing either entry.
"""

from __future__ import annotations

import json
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from adapterkit.errors import CatalogError
from adapterkit.library.metadata import PocketBookMeta

SCHEMA_VERSION = 1
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
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL, version INTEGER NOT NULL, tag TEXT NOT NULL,
    PRIMARY KEY (name, version, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags (tag);
CREATE INDEX IF NOT EXISTS books_by_base ON pocket_books (base_fingerprint);
"""


class CatalogWarning(UserWarning):
    """The catalog was unreadable and has been rebuilt from the pocket-book folders."""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return not any(word in text for word in ("locked", "busy", "readonly", "unable to open"))


class Catalog:
    """Index of pocket books: ``(name, version) → summary + metadata JSON``.

    :param path: the SQLite file.
    :param scan: yields ``(meta, size)`` for every pocket-book folder; used to rebuild.
    """

    def __init__(self, path: Path, scan: Callable[[], Iterable[tuple[PocketBookMeta, int]]]):
        self.path = path
        self._scan = scan

    # -- connection and recovery -------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._fill(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _fill(self, conn: sqlite3.Connection) -> None:
        """Index the folders into a new (empty) catalog."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT COUNT(*) FROM pocket_books").fetchone()[0] == 0:
                for meta, size in self._scan():
                    self.upsert(conn, meta, size)
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

    def _run(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        for attempt in (0, 1):
            try:
                conn = self._open()
            except sqlite3.DatabaseError as exc:
                if attempt or not _is_corruption(exc):
                    raise CatalogError(f"library catalog {self.path} is unusable: {exc}") from None
                self._recover(exc)
                continue
            try:
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(conn)
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    return result
                return fn(conn)
            except sqlite3.DatabaseError as exc:
                if attempt or not _is_corruption(exc):
                    raise CatalogError(f"library catalog {self.path} is unusable: {exc}") from None
                conn.close()
                self._recover(exc)
            finally:
                conn.close()
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read-only query function against the catalog."""
        return self._run(fn, write=False)

    def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` inside one ``BEGIN IMMEDIATE`` transaction (serialised across processes)."""
        return self._run(fn, write=True)

    def rebuild(self) -> int:
        """Drop the index and rebuild it from the folders; return how many entries it holds."""
        def refill(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM pocket_books")
            conn.execute("DELETE FROM tags")
            count = 0
            for meta, size in self._scan():
                self.upsert(conn, meta, size)
                count += 1
            return count

        return int(self.write(refill))

    # -- rows -------------------------------------------------------------------------------

    @staticmethod
    def upsert(conn: sqlite3.Connection, meta: PocketBookMeta, size: int) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO pocket_books VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                meta.name, meta.version, meta.base_fingerprint, str(meta.base.get("name", "")),
                meta.method, meta.trainer, meta.kind, meta.created, size,
                json.dumps(meta.tags), meta.to_json(),
            ),
        )
        conn.execute("DELETE FROM tags WHERE name=? AND version=?", (meta.name, meta.version))
        conn.executemany(
            "INSERT OR IGNORE INTO tags VALUES (?,?,?)",
            [(meta.name, meta.version, tag) for tag in meta.tags],
        )

    @staticmethod
    def delete(conn: sqlite3.Connection, name: str, version: int) -> None:
        conn.execute("DELETE FROM pocket_books WHERE name=? AND version=?", (name, version))
        conn.execute("DELETE FROM tags WHERE name=? AND version=?", (name, version))

    @staticmethod
    def versions(conn: sqlite3.Connection, name: str) -> list[int]:
        rows = conn.execute(
            "SELECT version FROM pocket_books WHERE name=? ORDER BY version", (name,)
        )
        return [r[0] for r in rows]

    @staticmethod
    def rows(conn: sqlite3.Connection, *, where: str = "", params: tuple = (),
             latest_only: bool = False) -> Iterator[sqlite3.Row]:
        sql = (
            "SELECT name, version, base_fingerprint, base_name, method, trainer, kind, created, "
            "size, tags, (SELECT COUNT(*) FROM pocket_books p2 WHERE p2.name = p.name) "
            "FROM pocket_books p"
        )
        clauses = [where] if where else []
        if latest_only:
            clauses.append(
                "version = (SELECT MAX(version) FROM pocket_books p3 WHERE p3.name = p.name)"
            )
        if clauses:
            sql += " WHERE " + " AND ".join(f"({c})" for c in clauses)
        sql += " ORDER BY name, version"
        return conn.execute(sql, params)

    @staticmethod
    def meta(conn: sqlite3.Connection, name: str, version: int) -> PocketBookMeta | None:
        row = conn.execute(
            "SELECT meta FROM pocket_books WHERE name=? AND version=?", (name, version)
        ).fetchone()
        return None if row is None else PocketBookMeta.from_dict(json.loads(row[0]))

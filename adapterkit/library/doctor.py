"""``adapterkit doctor``: find, and with consent repair, what crashes and hand edits leave.

The folders are the source of truth and the catalog an index over them; every command already
heals the index where it is sure (see :meth:`Library.reconcile`). The doctor goes further, and
reads every entry:

* ``orphan`` — a complete folder the catalog does not list: indexed.
* ``missing`` — a catalog row whose folder is gone: the row is dropped.
* ``outdated`` — a row that disagrees with its folder's ``adapterkit.json`` (a crash between
  writing the file and the catalog): re-indexed from the file.
* ``damaged`` — a folder whose metadata cannot be read, or that fails the check every load
  runs (:func:`~adapterkit.library.integrity.check_book`: missing files, a SHA-256 that no
  longer matches the one recorded at save time, a broken safetensors header, a planted pickle
  or link): moved to ``<home>/quarantine/``, never deleted, so nothing is lost.
* ``stale`` — a work folder under ``tmp/`` left by a process that is no longer running (or over
  a day old): removed.
* ``catalog`` — the SQLite file fails its own integrity check: rebuilt from the folders.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import InvalidAdapter
from adapterkit.files import fsync_dir
from adapterkit.library.catalog import Catalog
from adapterkit.library.integrity import REPAIR, check_book
from adapterkit.library.metadata import PocketBookMeta
from adapterkit.library.store import Library, PocketBook

QUARANTINE = "quarantine"


@dataclass
class Problem:
    """One thing the doctor found, and what it did (or would do) about it."""

    kind: str
    path: str
    detail: str
    action: str
    ref: str | None = None


@dataclass
class Report:
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "repaired": self.repaired,
                "problems": [asdict(p) for p in self.problems]}


def examine(library: Library, *, repair: bool) -> Report:
    """Check the whole library; with ``repair``, fix what was found."""
    report = Report()
    _check_catalog_file(library, report, repair)
    disk = library.folders()
    indexed: dict[tuple[str, int], PocketBookMeta | None] = library.catalog.read(
        lambda conn: {key: Catalog.meta(conn, *key) for key in Catalog.entries(conn)})
    report.checked = len(disk)
    reindex: list[tuple[PocketBookMeta, Path]] = []
    drop: list[tuple[str, int]] = []
    quarantine: list[tuple[str, int, Path]] = []
    for key, folder in sorted(disk.items()):
        ref = f"{key[0]}@{key[1]}"
        problem: str | None
        try:
            meta = library.read_entry(folder)
        except InvalidAdapter as exc:
            problem = str(exc)
        else:
            try:
                check_book(PocketBook(meta, folder))
                problem = None
            except InvalidAdapter as exc:
                problem = str(exc).removesuffix(f"; {REPAIR}")
            if problem is None:
                recorded = indexed.get(key)
                if key not in indexed:
                    _add(report, "orphan", ref, folder, "a complete pocket book the catalog "
                         "does not list", "index it", repair)
                    reindex.append((meta, folder))
                elif recorded is None or recorded.to_json() != meta.to_json():
                    _add(report, "outdated", ref, folder, "the catalog disagrees with its "
                         "adapterkit.json", "re-index it from the folder", repair)
                    reindex.append((meta, folder))
                continue
        where = library.home / QUARANTINE
        _add(report, "damaged", ref, folder, problem,
             f"move it to {where} (kept, not deleted)", repair)
        quarantine.append((key[0], key[1], folder))
    for key in sorted(indexed.keys() - disk.keys()):
        path = library.root / key[0] / str(key[1])
        _add(report, "missing", f"{key[0]}@{key[1]}", path, "listed in the catalog, but its "
             "folder is gone", "drop it from the catalog", repair)
        drop.append(key)
    for folder, reason in library.sweep_staging(dry_run=True):
        _add(report, "stale", None, folder, f"work folder {reason}", "remove it", repair)
    if repair and report.problems:
        _repair(library, reindex, drop, quarantine)
        report.repaired = True
    return report


def _add(report: Report, kind: str, ref: str | None, path: Path, detail: str, action: str,
         repair: bool) -> None:
    report.problems.append(Problem(kind, str(path), detail,
                                   action if repair else f"would {action}", ref))


def _check_catalog_file(library: Library, report: Report, repair: bool) -> None:
    path = library.catalog.path
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        result = str(exc)
    if result == "ok":
        return
    _add(report, "catalog", None, path, f"fails SQLite's integrity check ({result})",
         "rebuild it from the folders", repair)
    if repair:
        library.rebuild_catalog()


def _repair(library: Library, reindex: list[tuple[PocketBookMeta, Path]],
            drop: list[tuple[str, int]], quarantine: list[tuple[str, int, Path]]) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = library.home / QUARANTINE

    def fix(conn: sqlite3.Connection) -> None:
        for meta, folder in reindex:
            if folder.is_dir():
                Catalog.upsert(conn, meta, folder)
        for name, version in drop:
            if not (library.root / name / str(version)).is_dir():
                Catalog.delete(conn, name, version)
        for name, version, folder in quarantine:
            Catalog.delete(conn, name, version)
            if folder.is_dir():
                aside.mkdir(parents=True, exist_ok=True)
                os.rename(folder, aside / f"{name}@{version}-{stamp}")
                fsync_dir(aside)
                try:
                    folder.parent.rmdir()
                except OSError:
                    pass

    library.catalog.write(fix)
    library.sweep_staging()


def render(report: Report) -> str:
    """The report as plain lines for the terminal."""
    if not report.problems:
        return f"The library is healthy: {report.checked} pocket book(s) checked, nothing to do."
    lines = [f"{len(report.problems)} problem(s) in {report.checked} pocket book(s) checked:"]
    for p in report.problems:
        lines.append(f"  {p.kind:<9} {p.ref or p.path}: {p.detail} — {p.action}")
    if not report.repaired:
        lines.append("Run `adapterkit doctor` without --dry-run to repair.")
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, sort_keys=True)

"""``adapterkit doctor``: find, and with consent repair, what crashes and hand edits leave.

The folders are the source of truth and the catalog an index over them; every command already
heals the index where it is sure (see :meth:`Library.reconcile`). The doctor goes further, and
reads every entry:

* ``orphan`` — a complete folder the catalog does not list: indexed.
* ``missing`` — a catalog row whose folder is gone: the row is dropped.
* ``outdated`` — a row that disagrees with its folder's ``adapterkit.json`` (a crash between
  writing the file and the catalog): re-indexed from the file.
* ``damaged`` — a folder whose metadata cannot be read, or that fails the file checks every
  load runs (:func:`~adapterkit.library.integrity.check_book` without a base: missing files,
  a SHA-256 that no longer matches the one recorded at save time, a broken safetensors
  header, a planted pickle or link; the fit to the base is checked when a base is loaded):
  moved to ``<home>/quarantine/``, never deleted, so nothing is lost.
* ``dangling`` — a saved stack naming a member the library no longer holds (removed with
  ``rm --force``, or damaged), or holds with other weights than the stack was saved with
  (another pocket book under that name): moved to ``<home>/quarantine/``, like a damaged
  folder.
* ``replaced`` — a pocket book trained on top of another whose name holds other weights than
  it was trained on (``rm --force``, then another saved as that version; or pulled so): every
  use refuses it. Reported only: it is whole, and works again once the one it was trained on
  is back under that name.
* ``leftover`` — a ``ref/`` folder in a pocket book: TRL's frozen copy of the adapter it
  started from (DPO's reference), which earlier versions saved beside a ``dpo`` pocket book
  (and pushed with it). Not part of the pocket book: moved to ``<home>/quarantine/``.
* ``stale`` — a work folder under ``tmp/`` left by a process that is no longer running (or over
  a day old), or the temporary file of a metadata write that was killed: removed.
* ``catalog`` — the SQLite file is missing, of another version or fails its own integrity
  check: rebuilt from the folders.
* ``marks`` — ``library/.versions-used.json`` (each name's highest version before its
  removals) does not read: kept beside as ``.corrupt-TIME``, the entries that read written again.

``--dry-run`` writes nothing at all: it reads the catalog file as it is (read-only, no
recovery), which an ordinary command would already have healed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.errors import CatalogError, InvalidAdapter
from adapterkit.files import fsync_dir, move_back
from adapterkit.library.catalog import Catalog, CatalogWarning
from adapterkit.library.integrity import REPAIR, check_book, held_weights
from adapterkit.library.layout import DamagedBookWarning, index
from adapterkit.library.metadata import CONFIG_FILE, METADATA_FILE, PocketBookMeta
from adapterkit.library.store import VERSIONS_USED_FILE, Library, PocketBook, needed_refs

QUARANTINE = "quarantine"
#: The subfolder earlier versions saved TRL's reference copy of the adapter in (``dpo``).
REFERENCE_COPY = "ref"


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
    """What one run of the doctor found (``checked``: pocket-book folders read)."""

    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "repaired": self.repaired,
                "problems": [asdict(p) for p in self.problems]}


def examine(library: Library, *, repair: bool) -> Report:
    """Check the whole library; with ``repair``, fix what was found. Without it nothing is
    written — not even the catalog recovery or migration an ordinary command would do."""
    report = Report()
    catalog_ok = _check_catalog_file(library, report, repair)
    disk = library.folders()
    indexed: dict[tuple[str, int], PocketBookMeta | None] = {}
    if catalog_ok:
        def metas(conn: sqlite3.Connection) -> dict[tuple[str, int], PocketBookMeta | None]:
            return {key: Catalog.meta(conn, *key) for key in Catalog.entries(conn)}

        indexed = library.catalog.read(metas) if repair else library.catalog.peek(metas)
    report.checked = len(disk)
    reindex: list[Path] = []
    drop: list[tuple[str, int]] = []
    quarantine: list[tuple[str, int, Path]] = []
    leftovers: list[tuple[str, int, Path]] = []
    healthy: dict[tuple[str, int], tuple[PocketBookMeta, Path]] = {}
    for key, folder in sorted(disk.items()):
        ref = f"{key[0]}@{key[1]}"
        for left in _stray_temp_files(folder):
            _add(report, "stale", ref, left, "temporary file of an interrupted metadata write",
                 "remove it", repair)
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
                healthy[key] = (meta, folder)
                copy = folder / REFERENCE_COPY
                if (copy / CONFIG_FILE).is_file():
                    _add(report, "leftover", ref, copy, "TRL's frozen copy of the adapter this "
                         "one started from, saved beside it by an earlier version (not part "
                         "of the pocket book)",
                         f"move it to {library.home / QUARANTINE} (kept, not deleted)", repair)
                    leftovers.append((key[0], key[1], copy))
                if catalog_ok and key not in indexed:
                    _add(report, "orphan", ref, folder, "a complete pocket book the catalog "
                         "does not list", "index it", repair)
                    reindex.append(folder)
                elif catalog_ok and (indexed[key] is None
                                     or indexed[key].to_json() != meta.to_json()):  # type: ignore[union-attr]
                    _add(report, "outdated", ref, folder, "the catalog disagrees with its "
                         "adapterkit.json", "re-index it from the folder", repair)
                    reindex.append(folder)
                continue
        where = library.home / QUARANTINE
        _add(report, "damaged", ref, folder, problem,
             f"move it to {where} (kept, not deleted)", repair)
        quarantine.append((key[0], key[1], folder))
    _check_stacks(library, report, healthy, quarantine, repair)
    for left in _stray_mark_files(library):
        _add(report, "stale", None, left, "temporary file of an interrupted write of the "
             "names' highest version numbers", "remove it", repair)
    marks = library.root / VERSIONS_USED_FILE
    unreadable_marks = marks.exists() and not library._read_marks()[1]
    if unreadable_marks:  # read as none: a plain NAME may be given a removed number again
        _add(report, "marks", None, marks, "does not read as the names' highest version "
             "numbers that rm and doctor record, so a plain NAME may take a removed version's "
             "number again (give NAME@V to choose)",
             _marks_action(f"{VERSIONS_USED_FILE}.corrupt-TIME"), repair)
    for key in sorted(indexed.keys() - disk.keys()):
        path = library.root / key[0] / str(key[1])
        _add(report, "missing", f"{key[0]}@{key[1]}", path, "listed in the catalog, but its "
             "folder is gone", "drop it from the catalog", repair)
        drop.append(key)
    for folder, reason in library.sweep_staging(dry_run=True):
        _add(report, "stale", None, folder, f"work folder {reason}", "remove it", repair)
    if repair and _repairable(report):
        kept = _repair(library, reindex, drop, quarantine, leftovers, marks=unreadable_marks)
        report.repaired = True
        for found in report.problems:  # the name it was kept under, not the template
            if found.kind == "marks":
                found.action = _marks_action(kept.name) if kept is not None else \
                    "nothing to do: it reads now (mended meanwhile)"
    return report


#: Kinds the doctor reports and never repairs: no move of its own would make them usable.
REPORTED_ONLY = ("replaced",)


def _marks_action(kept_as: str) -> str:
    """What the repair does with a marks file that does not read (``kept_as``: its name)."""
    return f"keep it beside as {kept_as} and write the entries that read again"


def _repairable(report: Report) -> bool:
    return any(p.kind not in REPORTED_ONLY for p in report.problems)


def _check_stacks(library: Library, report: Report,
                  healthy: dict[tuple[str, int], tuple[PocketBookMeta, Path]],
                  quarantine: list[tuple[str, int, Path]], repair: bool) -> None:
    """A saved stack whose member is gone (``rm --force``, or damaged and quarantined), or
    holds other weights than the stack recorded, fails on every use: it is moved to
    quarantine like a damaged folder. A pocket book trained on top of a missing one is left
    alone: a pull warns of that and lets it come later. One trained on top of a pocket book
    whose name now holds other weights (``rm --force``, then another saved under that
    version) fails on every use too: it is reported, and left where it is — a trained book,
    whole, that works again once the one it was trained on is back under its name."""
    held = {f"{name}@{version}": PocketBook(meta, folder)
            for (name, version), (meta, folder) in healthy.items()}
    damaged = {f"{name}@{version}" for name, version, _ in quarantine}  # found just before
    for (name, version), (meta, folder) in sorted(healthy.items()):
        members = needed_refs(meta)
        # the same name, other weights (`rm --force`, then an import under that name): every
        # use refuses it, as it would a missing member (compared as `check_under` does)
        replaced = sorted(ref for ref in members & set(held)
                          if meta.stacked_on_sha256.get(ref)
                          and meta.stacked_on_sha256[ref] != held_weights(held[ref]))
        if meta.kind != "stack":
            if replaced:  # (or pulled so: a pull lets it in with a warning)
                report.problems.append(Problem(
                    "replaced", str(folder),
                    f"trained on top of {', '.join(replaced)} with other weights than this "
                    f"library's {', '.join(replaced)} (every use refuses it)",
                    f"left as it is: it works again with the pocket book it was trained on "
                    f"back as {replaced[0]}; `adapterkit rm {name}@{version}` removes it",
                    f"{name}@{version}"))
            continue
        gone = sorted(members - set(held))
        if gone:  # removed, or damaged (a dry run still holds that one: said as it is)
            lost, hurt = [g for g in gone if g not in damaged], [g for g in gone if g in damaged]
            parts = ([f"{', '.join(lost)}, which the library no longer holds"] if lost else []) \
                + ([f"{', '.join(hurt)}, which {'is' if len(hurt) == 1 else 'are'} damaged"]
                   if hurt else [])
            detail = f"a stack of {' and '.join(parts)} (it fails on every use)"
        elif replaced:
            detail = (f"a stack of {', '.join(replaced)} with other weights than this "
                      f"library's {', '.join(replaced)} now holds (another pocket book under "
                      "that name; it fails on every use)")
        else:
            continue
        _add(report, "dangling", f"{name}@{version}", folder, detail,
             f"move it to {library.home / QUARANTINE} (kept, not deleted)", repair)
        quarantine.append((name, version, folder))


def _stray_temp_files(folder: Path) -> list[Path]:
    """``.adapterkit.json.*.tmp`` files: what a process killed inside an atomic write leaves."""
    return sorted(folder.glob(f".{METADATA_FILE}.*.tmp"))


def _stray_mark_files(library: Library) -> list[Path]:
    """The same, of :data:`~adapterkit.library.store.VERSIONS_USED_FILE` (``rm``, doctor)."""
    return sorted(library.root.glob(f".{VERSIONS_USED_FILE}.*.tmp"))


def _add(report: Report, kind: str, ref: str | None, path: Path, detail: str, action: str,
         repair: bool) -> None:
    report.problems.append(Problem(kind, str(path), detail,
                                   action if repair else f"would {action}", ref))


def _check_catalog_file(library: Library, report: Report, repair: bool) -> bool:
    """SQLite's own check of the catalog file; False when it is unusable (and, with
    ``repair``, rebuilt — then True again)."""
    path = library.catalog.path
    if not path.exists():  # not a problem: the next command builds it from the folders
        if repair:
            _quietly(lambda: library.catalog.read(Catalog.entries))
        return repair
    else:
        try:
            result = library.catalog.peek(
                lambda conn: conn.execute("PRAGMA quick_check").fetchone()[0])
        except CatalogError as exc:
            result = str(exc)
    if result == "ok":
        return True
    _add(report, "catalog", None, path, f"cannot be used as it is ({result})",
         "rebuild it from the folders", repair)
    if repair:
        _quietly(library.rebuild_catalog)
        return True
    return False


def _quietly(fn: Any) -> Any:
    # The doctor reports damaged entries itself; the scan's own warnings would say it twice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedBookWarning)
        warnings.simplefilter("ignore", CatalogWarning)
        return fn()


def _repair(library: Library, reindex: list[Path], drop: list[tuple[str, int]],
            quarantine: list[tuple[str, int, Path]],
            leftovers: list[tuple[str, int, Path]], *, marks: bool = False) -> Path | None:
    """Make the repairs, in one catalog write; the file an unreadable marks file was kept
    as (None: none was)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = library.home / QUARANTINE
    moved: list[tuple[Path, Path]] = []

    def set_aside(folder: Path, name: str) -> None:
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{name}-{stamp}"
        os.rename(folder, target)
        moved.append((target, folder))
        fsync_dir(aside)

    def fix(conn: sqlite3.Connection) -> None:
        for folder in library.folders().values():  # under the lock: no metadata write runs
            for left in _stray_temp_files(folder):
                left.unlink(missing_ok=True)
        for left in _stray_mark_files(library):  # (written by rm under this lock too)
            left.unlink(missing_ok=True)
        for folder in reindex:
            if folder.is_dir():
                index(conn, folder)  # read again under the lock: what is indexed is current
        for name, version in drop:
            if not (library.root / name / str(version)).is_dir():
                Catalog.delete(conn, name, version)
        for name, version, copy in leftovers:
            if copy.is_dir():
                set_aside(copy, f"{name}@{version}-{REFERENCE_COPY}")
        if quarantine or marks:  # their numbers are not given to a plain NAME again, as after
            highest: dict[str, int] = {}  # rm; an unreadable file kept beside (reported above)
            for name, version, _ in quarantine:
                highest[name] = max(highest.get(name, 0), version)
            unmark.append(library._mark_used(highest, [], kept))  # (reported above)
        for name, version, folder in quarantine:
            Catalog.delete(conn, name, version)
            if folder.is_dir():
                set_aside(folder, f"{name}@{version}")
                try:
                    folder.parent.rmdir()
                except OSError:
                    pass

    unmark: list[Any] = []
    kept: list[Path] = []  # where an unreadable marks file was kept

    def undo() -> None:
        move_back(moved)
        for put_back in reversed(unmark):
            put_back()
        unmark.clear()
        kept.clear()

    _quietly(lambda: library.catalog.write(fix, undo=undo))
    library.sweep_staging()
    return kept[-1] if kept else None


def render(report: Report) -> str:
    """The report as plain lines for the terminal."""
    if not report.problems:
        return f"The library is healthy: {report.checked} pocket book(s) checked, nothing to do."
    lines = [f"{len(report.problems)} problem(s) in {report.checked} pocket book(s) checked:"]
    for p in report.problems:
        lines.append(f"  {p.kind:<9} {p.ref or p.path}: {p.detail} — {p.action}")
    if not report.repaired and _repairable(report):
        lines.append("Run `adapterkit doctor` without --dry-run to repair.")
    return "\n".join(lines)


def to_json(report: Report) -> str:
    """The report as ``adapterkit doctor --json`` prints it."""
    return json.dumps(report.as_dict(), indent=2, sort_keys=True)

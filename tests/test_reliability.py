"""Issue #17, library side: catalog rebuilds that keep good entries, crash windows that heal,
`adapterkit doctor`, out-of-space and read-only homes, filters and racing removals.

Each test reproduces a defect found by the fault campaign on the 0.1 code and fails there.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapterkit import Library, NameTaken, PocketBookMeta, PocketBookNotFound
from adapterkit.errors import CatalogError
from adapterkit.files import owned_name
from adapterkit.library import store as store_module
from adapterkit.library.catalog import SCHEMA_VERSION, Catalog
from adapterkit.library.layout import DamagedBookWarning


def tensors(n: int = 4) -> bytes:
    """A valid safetensors file (loading re-checks the weights file, so it must parse)."""
    import numpy as np
    from safetensors.numpy import save as save_tensors

    return save_tensors({"w": np.zeros(n, dtype=np.float32)})


def save(library, name, *, tags=(), base="b1", payload=None):
    payload = tensors() if payload is None else payload
    with library.draft() as staged:
        (staged / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (staged / "adapter_model.safetensors").write_bytes(payload)
        meta = PocketBookMeta(name="", version=0, base={"name": base, "fingerprint": f"fp{base}"},
                              tags=list(tags))
        return library.commit(staged, meta, name=name)


def drop_catalog(library):
    for suffix in ("", "-wal", "-shm"):
        Path(str(library.catalog.path) + suffix).unlink(missing_ok=True)


def run_cli(home: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTERKIT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "adapterkit", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


# -- 1. one malformed adapterkit.json must not empty the library ------------------------------

@pytest.mark.parametrize("bad", ["[]", "{not json", '{"name": 3, "version": 1}', "null",
                                 '{"name": "b", "version": "one"}',
                                 '{"name": "b", "version": 1, "base": null}',
                                 '{"name": "b", "version": 1, "kind": null}',
                                 '{"name": "b", "version": 1, "created": null}',
                                 '{"name": "b", "version": 1, "tags": [["x"]]}'])
def test_rebuild_skips_a_malformed_entry_and_keeps_the_rest(adapterkit_cli, library, bad):
    save(library, "a")
    save(library, "b")
    (library.path_of("b", 1) / "adapterkit.json").write_text(bad)
    drop_catalog(library)
    for _ in range(2):  # 0.1: a traceback, then "No pocket books yet" for good
        with pytest.warns(DamagedBookWarning, match="damaged.*b/1/adapterkit.json.*doctor"):
            result = adapterkit_cli("list", "--json")
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        listed = [row["name"] for row in json.loads(result.stdout)]
        assert listed == ["a"]
    # The vanished name is explained, not "already exists".
    with pytest.raises(NameTaken, match="cannot be read.*doctor"):
        library.reserve("b")


def test_a_failed_fill_is_never_recorded_as_done(tmp_path):
    def scan():
        raise RuntimeError("disk went away mid-scan")
        yield  # pragma: no cover

    catalog = Catalog(tmp_path / "catalog.sqlite", scan)
    with pytest.raises(RuntimeError):
        catalog.read(Catalog.entries)
    conn = sqlite3.connect(tmp_path / "catalog.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION
    conn.close()
    ok = Catalog(tmp_path / "catalog.sqlite", lambda: iter(()))
    assert ok.read(Catalog.entries) == set()


# -- 2. a crash between the folder rename and the catalog commit -------------------------------

def crash_after_rename(library, monkeypatch, name):
    """Run a save that dies right after its folder is renamed into place (as kill -9 would:
    the catalog transaction is never committed)."""
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        if Path(dst).parent.parent == library.root:
            raise KeyboardInterrupt  # not caught by the library: the transaction rolls back

    monkeypatch.setattr(store_module.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        save(library, name)
    monkeypatch.setattr(store_module.os, "rename", real_rename)


def test_a_book_left_by_a_crash_is_visible_and_removable(library, monkeypatch):
    save(library, "a")
    crash_after_rename(library, monkeypatch, "x")
    assert library.catalog.read(lambda c: Catalog.versions(c, "x")) == []  # the crash state
    assert library.get("x").version == 1  # 0.1: "no pocket book named 'x'"
    assert library.remove("x") == [1]
    assert not (library.root / "x").exists()
    assert save(library, "x").ref == "x@2"  # 0.1: "already exists"; numbers are not reused


def test_list_shows_a_crashed_save_and_forgets_a_deleted_folder(library, monkeypatch):
    save(library, "a")
    crash_after_rename(library, monkeypatch, "x")
    shutil.rmtree(library.path_of("a", 1))
    assert [s.name for s in library.list()] == ["x"]
    with pytest.raises(PocketBookNotFound):
        library.get("a")


# -- doctor -------------------------------------------------------------------------------

def test_doctor_reports_then_repairs_every_kind(adapterkit_cli, library, monkeypatch):
    save(library, "good")
    save(library, "gone")
    save(library, "hurt")
    save(library, "edited", tags=["old"])
    crash_after_rename(library, monkeypatch, "orphan")
    shutil.rmtree(library.path_of("gone", 1))
    (library.path_of("hurt", 1) / "adapter_model.safetensors").write_bytes(b"")
    meta_file = library.path_of("edited", 1) / "adapterkit.json"
    meta_file.write_text(meta_file.read_text().replace('"old"', '"new"'))
    library.staging.mkdir(exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = library.staging / owned_name("stage").replace(f"-{os.getpid()}-",
                                                                 f"-{dead.pid}-")
    stale.mkdir()
    live = library.staging / owned_name("stage")  # this process: still in use
    live.mkdir()
    before = sorted(str(p) for p in library.home.rglob("*") if "catalog" not in p.name)

    result = adapterkit_cli("doctor", "--dry-run", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    found = {(p["kind"], p["ref"]) for p in report["problems"]}
    assert found == {("orphan", "orphan@1"), ("missing", "gone@1"), ("damaged", "hurt@1"),
                     ("outdated", "edited@1"), ("stale", None)}
    assert all(p["action"].startswith("would ") for p in report["problems"])
    assert report["repaired"] is False
    assert sorted(str(p) for p in library.home.rglob("*") if "catalog" not in p.name) == before

    result = adapterkit_cli("doctor")
    assert result.exit_code == 0, result.output
    assert "5 problem(s)" in result.stdout
    assert not stale.exists() and live.exists()
    quarantined = list((library.home / "quarantine").iterdir())
    assert [p.name.split("-")[0] for p in quarantined] == ["hurt@1"]  # kept, not deleted
    assert (quarantined[0] / "adapterkit.json").is_file()
    assert {s.name for s in library.list()} == {"good", "edited", "orphan"}
    assert library.list(tag="new")[0].name == "edited"
    result = adapterkit_cli("doctor")
    assert result.exit_code == 0 and "healthy" in result.stdout


def test_doctor_rebuilds_a_catalog_that_fails_its_integrity_check(adapterkit_cli, library):
    save(library, "a")
    drop_catalog(library)
    library.catalog.path.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    result = adapterkit_cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    assert [s.name for s in library.list()] == ["a"]


# -- 5. out of space is an I/O error, not corruption ------------------------------------------

def test_a_full_disk_is_not_treated_as_corruption(library, monkeypatch):
    save(library, "a")

    def full(conn):
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(CatalogError, match="no space left"):
        library.catalog.write(full)
    assert not [p for p in library.home.iterdir() if ".corrupt-" in p.name]
    assert [s.name for s in library.list()] == ["a"]


def test_out_of_space_while_saving_is_one_line_and_leaves_nothing(adapterkit_cli, library,
                                                                 peft_adapter, tiny_base,
                                                                 monkeypatch):
    import errno

    for copier in ("copy2", "copyfile"):
        def copy_then_full(src, dst, *args, _real=getattr(shutil, copier), **kwargs):
            if str(src).endswith(".safetensors"):
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(shutil, copier, copy_then_full)
    result = adapterkit_cli("import", peft_adapter, "--name", "x", "--base", tiny_base)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: no space left")
    assert "Traceback" not in result.output
    assert not (library.root / "x").exists()
    assert not list(library.staging.iterdir())
    assert not [p for p in library.home.iterdir() if ".corrupt-" in p.name]


def test_export_past_the_file_size_limit_is_one_line(library, tmp_path):
    """A real EFBIG: the export runs in a process whose `ulimit -f` is smaller than the
    weights file (and larger than the others, and than what the catalog needs)."""
    save(library, "a", payload=tensors(100_000))
    limit = 200_000
    dest = tmp_path / "out"
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from adapterkit.cli import main
        main(sys.argv[1:])
    """)
    env = {**os.environ, "ADAPTERKIT_HOME": str(library.home)}
    result = subprocess.run([sys.executable, "-c", code, "export", "a", str(dest)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: file too large")
    assert not dest.exists() and not list(tmp_path.glob(".out.partial-*"))


# -- 6. a read-only home can be read -------------------------------------------------------

def _read_only(home: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI against ``home`` made read-only: a read-only bind mount when we are root
    (permissions do not stop root), else plain permission bits."""
    cmd = [sys.executable, "-m", "adapterkit", *args]
    env = {**os.environ, "ADAPTERKIT_HOME": str(home)}
    if os.geteuid() != 0:
        for p in [home, *home.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        finally:
            for p in [home, *home.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount the home read-only as root")
    script = ('mount --bind "$H" "$H" && mount -o remount,bind,ro "$H" && exec "$@"')
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", "true"],
                           env={**env, "H": str(home)}, capture_output=True)
    if probe.returncode:
        pytest.skip("cannot mount read-only here: " + probe.stderr.decode()[-200:])
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd],
                          env={**env, "H": str(home)}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_a_read_only_home_can_be_listed_shown_and_exported(library, tmp_path):
    save(library, "a", tags=["t"])
    save(library, "b")
    library.list()  # leave a WAL-mode catalog behind, as real use does
    listed = _read_only(library.home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == ["a", "b"]
    shown = _read_only(library.home, "show", "a")
    assert shown.returncode == 0 and "a@1" in shown.stdout, shown.stderr
    exported = _read_only(library.home, "export", "a", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    refused = _read_only(library.home, "tag", "a", "new")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "read-only" in refused.stderr
    drop_catalog(library)  # no catalog at all: built in memory for the command
    listed = _read_only(library.home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == ["a", "b"]
    assert not library.catalog.path.exists()


@pytest.mark.slow
def test_doctor_dry_run_finds_a_healthy_read_only_home_healthy(library):
    """Before: ``mode=ro`` cannot open a WAL catalog without its ``-shm`` file, which a
    read-only home cannot give, so a healthy catalog was reported as damaged (exit 1)."""
    save(library, "a")
    library.list()  # a WAL-mode catalog, as real use leaves it
    before = library.catalog.path.read_bytes()
    checked = _read_only(library.home, "doctor", "--dry-run")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "The library is healthy: 1 pocket book(s) checked" in checked.stdout
    assert library.catalog.path.read_bytes() == before


# -- 8. filters and races -------------------------------------------------------------------

def test_list_base_treats_like_wildcards_literally(adapterkit_cli, library):
    save(library, "a", base="b1")
    assert library.list(base="%") == []
    assert library.list(base="fp_") == []
    assert [s.name for s in library.list(base="fpb")] == ["a"]
    result = adapterkit_cli("list", "--base", "%")
    assert result.exit_code == 0
    assert "No pocket book matches base '%'" in result.stderr
    # a folder (what import/train take as --base) matches nothing here: the line says why
    assert "--base takes a base's name or a prefix of its fingerprint" in result.stderr
    empty = adapterkit_cli("list", "--tag", "")
    assert empty.exit_code == 1 and "the tag filter is empty" in empty.stderr
    assert "No pocket books yet" not in result.output


def test_a_racing_remove_says_so_instead_of_removing_nothing(library, monkeypatch):
    save(library, "a")
    save(library, "a@2")
    other = Library(library.home)
    real_get = Library.get

    def get_then_race(self, ref):
        book = real_get(self, ref)
        if self is library:
            other.remove("a", all_versions=True)  # another process wins the race
        return book

    monkeypatch.setattr(Library, "get", get_then_race)
    with pytest.raises(PocketBookNotFound, match="removed by another command"):
        library.remove("a", all_versions=True, force=True)
    monkeypatch.setattr(Library, "get", real_get)
    assert not list(library.staging.iterdir())  # its trash folder is gone too


# -- found by the fault benchmark ---------------------------------------------------------

def kill_before_commit(monkeypatch, write) -> None:
    """Run ``write`` and die (as kill -9 would) after it changed the folder and before the
    catalog row was written: the transaction never commits, and no undo runs (an exception
    or Ctrl-C would run the write's undo, which a kill does not)."""
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    real_write = Catalog.write
    monkeypatch.setattr(Catalog, "write",
                        lambda self, fn, **kw: real_write(self, fn, **{**kw, "undo": None}))
    monkeypatch.setattr(Catalog, "upsert", staticmethod(die))
    with pytest.raises(KeyboardInterrupt):
        write()
    monkeypatch.undo()


def test_a_tag_killed_before_its_commit_heals_on_the_next_list(library, monkeypatch):
    """update_meta writes adapterkit.json, then commits the catalog; a kill in between left
    `list --tag` wrong until `doctor` ran. (A kill -9 runs no undo; an exception or Ctrl-C
    puts the file back: test_library's catalog-failure test.)"""
    save(library, "a")
    kill_before_commit(monkeypatch, lambda: library.tag("a", "urgent"))
    assert "urgent" in json.loads((library.path_of("a", 1) / "adapterkit.json").read_text())["tags"]
    assert [s.name for s in library.list(tag="urgent")] == ["a"]


def test_an_export_killed_midway_is_swept_by_the_next_export(library, tmp_path):
    save(library, "a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / owned_name(".out.partial").replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    left.mkdir()
    (left / "adapter_model.safetensors").write_bytes(b"half")
    other = tmp_path / owned_name(".other.partial").replace(f"-{os.getpid()}-",
                                                            f"-{dead.pid}-")
    other.mkdir()  # a killed export to another destination in the same folder
    live = tmp_path / owned_name(".third.partial")  # an export still running: kept
    live.mkdir()
    mine = tmp_path / f".notes.partial-x-{dead.pid}-0"  # not a name we give: kept
    mine.mkdir()
    library.export("a", tmp_path / "out")
    assert not left.exists() and not other.exists()
    assert live.exists() and mine.exists()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_out_of_space_names_the_full_destination_not_the_source(library, tmp_path,
                                                                monkeypatch):
    import errno

    save(library, "a")

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(shutil, "copyfile", full)
    monkeypatch.setattr(shutil, "copy2", full)
    with pytest.raises(OSError) as caught:
        library.export("a", tmp_path / "out")
    assert caught.value.filename == str(tmp_path / "out")


def test_export_onto_a_file_says_it_is_a_file(library, tmp_path):
    save(library, "a")
    (tmp_path / "out").write_text("mine")
    with pytest.raises(NameTaken, match="is a file"):
        library.export("a", tmp_path / "out")


# -- found by review -----------------------------------------------------------------------

class _FailingCommit:
    """A catalog connection whose COMMIT fails as on a full disk in WAL mode (pages reach
    the disk only then)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def failing_commits(monkeypatch):
    real_open = Catalog._open
    monkeypatch.setattr(Catalog, "_open", lambda self: _FailingCommit(real_open(self)))


def test_a_save_whose_commit_fails_leaves_nothing(library, monkeypatch):
    save(library, "a")
    failing_commits(monkeypatch)
    with pytest.raises(CatalogError, match="no space left"):
        save(library, "x")
    monkeypatch.undo()
    assert not (library.root / "x").exists() or not any((library.root / "x").iterdir())
    assert [s.name for s in library.list()] == ["a"]
    save(library, "x")  # the name is free: the failure changed nothing


def test_a_removal_whose_commit_fails_keeps_every_version(library, monkeypatch):
    save(library, "a")
    save(library, "a@2")
    before = {p: p.read_bytes() for p in library.root.rglob("*") if p.is_file()}
    failing_commits(monkeypatch)
    with pytest.raises(CatalogError, match="no space left"):
        library.remove("a", all_versions=True)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in library.root.rglob("*") if p.is_file()} == before
    assert [s.version for s in library.list(all_versions=True)] == [1, 2]


def test_a_name_folder_linked_elsewhere_stays_in_the_library(library, tmp_path):
    """Users move big books to another disk and link them back; a rebuild keeps them."""
    save(library, "big")
    elsewhere = tmp_path / "other-disk" / "big"
    elsewhere.parent.mkdir()
    shutil.move(str(library.root / "big"), elsewhere)
    (library.root / "big").symlink_to(elsewhere, target_is_directory=True)
    library.rebuild_catalog()
    assert [s.name for s in library.list()] == ["big"]
    assert library.get("big").version == 1


def test_the_largest_version_survives_a_rebuild(library):
    from adapterkit.library.names import MAX_VERSION

    save(library, f"a@{MAX_VERSION}")
    assert library.rebuild_catalog() == 1
    assert library.get("a").version == MAX_VERSION
    # no number past it is offered (the quickstart builds NAME@V from it), nor taken
    with pytest.raises(NameTaken, match=f"every version number up to {MAX_VERSION}"):
        library.next_version("a")


def test_show_sees_a_tag_whose_commit_was_killed(adapterkit_cli, library, monkeypatch):
    save(library, "a")
    kill_before_commit(monkeypatch, lambda: library.tag("a", "urgent"))
    assert "urgent" in library.get("a").meta.tags


def test_doctor_dry_run_writes_nothing_even_to_a_damaged_catalog(adapterkit_cli, library):
    save(library, "a")
    library.list()
    drop_catalog(library)
    library.catalog.path.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    before = {str(p): p.read_bytes() for p in library.home.rglob("*") if p.is_file()}
    result = adapterkit_cli("doctor", "--dry-run", "--json")
    assert result.exit_code == 1, result.output
    kinds = [p["kind"] for p in json.loads(result.stdout)["problems"]]
    assert kinds == ["catalog"]
    assert {str(p): p.read_bytes() for p in library.home.rglob("*") if p.is_file()} == before


def test_doctor_removes_the_temp_file_of_a_killed_metadata_write(adapterkit_cli, library):
    book = save(library, "a")
    stray = book.path / ".adapterkit.json.abc123.tmp"
    stray.write_text("{half")
    result = adapterkit_cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    assert not stray.exists()
    assert [p["kind"] for p in json.loads(result.stdout)["problems"]] == ["stale"]


def test_doctor_removes_the_temp_file_of_a_killed_write_of_the_version_marks(
        adapterkit_cli, library):
    """`rm` writes the names' highest version numbers (``library/.versions-used.json``)
    atomically; a kill inside that write leaves its temporary file, which doctor reports and
    removes."""
    save(library, "a")
    save(library, "a@2")
    library.remove("a@2")
    stray = library.root / "..versions-used.json.abc123.tmp"
    stray.write_text("{")
    dry = adapterkit_cli("doctor", "--dry-run", "--json")
    assert [p["kind"] for p in json.loads(dry.stdout)["problems"]] == ["stale"]
    result = adapterkit_cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    assert not stray.exists()
    assert json.loads((library.root / ".versions-used.json").read_text()) == {"a": 2}


def test_doctor_reports_an_unreadable_version_marks_file_and_keeps_it_beside(adapterkit_cli,
                                                                            library):
    """An unreadable marks file reads as none (a plain NAME may take a removed number again):
    ``--dry-run`` said the library was healthy; doctor now reports it, keeps it beside as
    ``.corrupt-TIME`` and starts the file afresh."""
    save(library, "a")
    marks = library.root / ".versions-used.json"
    marks.write_bytes(b'{"a": ')
    dry = adapterkit_cli("doctor", "--dry-run", "--json")
    assert dry.exit_code == 1
    [problem] = json.loads(dry.stdout)["problems"]
    assert problem["kind"] == "marks" and "NAME@V" in problem["detail"]
    assert marks.read_bytes() == b'{"a": '  # the dry run wrote nothing
    result = adapterkit_cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    [kept] = library.root.glob(".versions-used.json.corrupt-*")
    assert kept.read_bytes() == b'{"a": ' and json.loads(marks.read_bytes()) == {}
    [done] = json.loads(result.stdout)["problems"]  # the file it was kept as, by its name
    assert done["action"] == f"keep it beside as {kept.name} and write the entries that read " \
        "again", done
    assert adapterkit_cli("doctor").exit_code == 0


def test_a_version_doctor_quarantines_is_not_given_out_again(adapterkit_cli, library):
    """As after `rm`: doctor moved u@1 and u@2 aside, and a plain save took u@1 again."""
    save(library, "u")
    save(library, "u@2")
    for version in (1, 2):
        (library.root / "u" / str(version) / "adapter_model.safetensors").write_bytes(b"x")
    assert adapterkit_cli("doctor").exit_code == 0
    assert not library.exists("u")
    assert save(library, "u").ref == "u@3"

def test_doctor_moves_aside_the_reference_copy_earlier_versions_saved(adapterkit_cli, library):
    """Earlier versions saved TRL's frozen copy of a DPO pocket book's starting adapter as a
    ``ref/`` PEFT folder inside it: reported as a leftover, moved to the quarantine (kept), and
    the pocket book is whole without it."""
    from adapterkit.library.integrity import check_book

    book = save(library, "polite")
    copy = book.path / "ref"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(book.path / name, copy / name)
    before = sorted(str(p) for p in library.home.rglob("*") if "catalog" not in p.name)

    result = adapterkit_cli("doctor", "--dry-run", "--json")
    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["problems"]
    assert [(p["kind"], p["ref"], p["path"]) for p in problems] == [
        ("leftover", "polite@1", str(copy))]
    assert problems[0]["action"].startswith("would move it to ")
    assert sorted(str(p) for p in library.home.rglob("*") if "catalog" not in p.name) == before

    result = adapterkit_cli("doctor")
    assert result.exit_code == 0, result.output
    assert not copy.exists()
    (aside,) = (library.home / "quarantine").iterdir()
    assert aside.name.startswith("polite@1-ref-")
    assert sorted(p.name for p in aside.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    check_book(library.get("polite"))  # the pocket book itself: untouched and whole
    assert "healthy" in adapterkit_cli("doctor").stdout


def _open_fresh(home, barrier, results):
    barrier.wait()
    try:
        Library(home).list()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports whatever went wrong
        results.put(repr(exc))


def test_processes_creating_the_catalog_at_once_all_succeed(tmp_path):
    """Two ranks of one training run open a fresh library together; 0.1 answered one of them
    "database is locked" (WAL mode is set without SQLite's busy wait)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(20):
        home = tmp_path / f"home{trial}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_fresh, args=(home, barrier, results))
                 for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=10) for _ in procs]
    assert [o for o in outcomes if o != "ok"] == []

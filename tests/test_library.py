"""The pocket-book library: versions, atomic saves, concurrency, catalog recovery."""

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from adapterkit import ConfigError, Library, NameTaken, PocketBookMeta, PocketBookNotFound
from adapterkit.library.catalog import CatalogWarning


def _weights() -> bytes:
    """A whole safetensors file of one tensor: export and load re-check the file's header."""
    import torch
    from safetensors.torch import save

    return save({"base_model.model.x.lora_A.weight": torch.zeros(1, 1)})


def save(library, name, *, tags=(), base="b1", new_version=False, payload=None):
    payload = _weights() if payload is None else payload
    with library.draft() as staged:
        (staged / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (staged / "adapter_model.safetensors").write_bytes(payload)
        meta = PocketBookMeta(name="", version=0, base={"name": base, "fingerprint": f"fp-{base}"},
                              tags=list(tags))
        return library.commit(staged, meta, name=name, new_version=new_version)


def test_save_get_versions(library):
    book = save(library, "law")
    assert book.ref == "law@1"
    assert (book.path / "adapterkit.json").is_file()
    with pytest.raises(NameTaken, match="--name law@2"):
        save(library, "law")
    assert save(library, "law@2").version == 2
    assert library.get("law").version == 2
    assert library.get("law@1").version == 1
    with pytest.raises(NameTaken, match="law@3"):
        save(library, "law@2")
    assert save(library, "law", new_version=True).version == 3


def test_unknown_names_and_versions(library):
    with pytest.raises(PocketBookNotFound, match="no pocket book named 'ghost'"):
        library.get("ghost")
    save(library, "law")
    with pytest.raises(PocketBookNotFound, match="it has law@1"):
        library.get("law@7")


def test_list_filters(library):
    save(library, "a", tags=["med"], base="b1")
    save(library, "b", base="b2")
    save(library, "a@2", base="b1")
    assert [(s.name, s.version, s.versions) for s in library.list()] == [("a", 2, 2), ("b", 1, 1)]
    assert len(library.list(all_versions=True)) == 3
    assert [s.name for s in library.list(base="b2")] == ["b"]
    assert [s.name for s in library.list(base="fp-b1")] == ["a"]
    assert [(s.name, s.version) for s in library.list(tag="med", all_versions=True)] == [("a", 1)]


def test_tag_and_remove(library):
    save(library, "a")
    save(library, "a@2")
    library.tag("a@1", "prod")
    assert library.get("a@1").meta.tags == ["prod"]
    assert [s.version for s in library.list(tag="prod", all_versions=True)] == [1]
    library.tag("a@1", "prod", remove=True)
    assert library.list(tag="prod") == []
    assert library.remove("a") == [2]  # plain name = latest
    assert library.get("a").version == 1
    assert library.remove("a", all_versions=True) == [1]
    assert not (library.root / "a").exists()
    with pytest.raises(PocketBookNotFound):
        library.remove("a")


def test_a_removed_version_number_is_not_given_to_other_weights(library, tmp_path):
    """Found by a library-ops user: `rm t --force` then `import --name t` gave t@1 again with
    other weights, so t@1 in a card, a log, a stack or an --on record named different weights.
    A plain NAME goes on from the highest version the name ever had, across removals and
    catalog rebuilds; NAME@N given explicitly may still put weights back under their number."""
    save(library, "t")
    save(library, "t@2")
    assert library.remove("t@2") == [2]
    assert library.version_to_save("t") == 3 and library.next_version("t") == 3
    with pytest.raises(NameTaken, match="--name t@3"):
        library.reserve("t")  # the advice every long command gives first
    with pytest.raises(NameTaken, match="--name t@3"):
        save(library, "t")
    assert save(library, "t", new_version=True).version == 3
    assert library.remove("t", all_versions=True) == [1, 3]
    assert not (library.root / "t").exists()  # the name's folder goes, as before
    assert library.version_to_save("t") == 4
    assert save(library, "t").ref == "t@4"  # a free plain name: the next number, not 1
    library.rebuild_catalog()  # the mark is on disk beside the folders, not in the index
    assert Library(library.home).next_version("t") == 5
    assert save(library, "t@2").ref == "t@2"  # explicit: the same number, on purpose
    assert [s.version for s in library.list(all_versions=True)] == [2, 4]
    assert library.remove("t@4") == [4]
    with pytest.raises(NameTaken, match="latest t@2\\); save as a new version with --name t@5"):
        save(library, "t")  # t@2 is there: plain t is taken, and the next number is 5
    assert save(library, "t", new_version=True).ref == "t@5"
    assert save(library, "fresh").ref == "fresh@1"
    library.remove("fresh", all_versions=True)
    assert save(library, "Fresh").ref == "Fresh@1"  # another name; no folder left to clash
    with pytest.raises(NameTaken, match="only in case"):  # refused while Fresh is held
        save(library, "fresh")


def test_a_failed_removal_leaves_the_version_marks_as_they_were(library, monkeypatch):
    """The removal would add m's mark beside a's; it fails after writing it, and the file is
    put back byte for byte, while the catalog's write lock is still held (after ROLLBACK
    another writer could write its own mark first, and the put-back would erase it)."""
    import sqlite3

    import adapterkit.library.store as store

    save(library, "a")
    library.remove("a")  # the marks file now holds a's mark only
    save(library, "m")
    save(library, "m@2")
    marks = (library.root / ".versions-used.json").read_bytes()
    real_mark_used = store.Library._mark_used
    lock_held_at_undo = []

    def mark_used(self, highest, said):
        undo = real_mark_used(self, highest, said)
        assert b'"m": 2' in (library.root / ".versions-used.json").read_bytes()

        def checked_undo():
            other = sqlite3.connect(library.catalog.path, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                lock_held_at_undo.append(False)
            except sqlite3.OperationalError as exc:
                lock_held_at_undo.append("locked" in str(exc))
            finally:
                other.close()
            undo()
        return checked_undo

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.Library, "_mark_used", mark_used)
    monkeypatch.setattr(store.os, "rename", fail)
    with pytest.raises(OSError):
        library.remove("m@1")
    monkeypatch.undo()
    assert lock_held_at_undo == [True]
    assert (library.root / ".versions-used.json").read_bytes() == marks
    assert [s.version for s in library.list(all_versions=True)] == [1, 2]


def test_a_marks_file_that_does_not_read_is_kept_aside_not_overwritten(library):
    """A damaged version-marks file read as no marks was overwritten by the next ``rm`` with
    only that removal's mark, unseen: it is kept beside as ``.corrupt-TIME`` and the user told."""
    marks = library.root / ".versions-used.json"
    save(library, "m")
    save(library, "m@2")
    marks.write_bytes(b'{"old": 7, "m": ')  # cut short mid-write by another tool, say
    with pytest.warns(CatalogWarning, match="did not read as the version numbers.*NAME@V"):
        library.remove("m@2")
    [kept] = library.root.glob(".versions-used.json.corrupt-*")
    assert kept.read_bytes() == b'{"old": 7, "m": '
    assert json.loads(marks.read_bytes()) == {"m": 2}
    assert library.next_version("m") == 3


def test_a_marks_file_that_cannot_be_read_at_all_is_moved_aside_whole(library):
    """Not only bad JSON: a path that cannot be read (here a folder in its place; no read
    permission reads the same) is renamed aside whole, never written over."""
    marks = library.root / ".versions-used.json"
    save(library, "m")
    save(library, "m@2")
    marks.mkdir()
    (marks / "inside").write_text("kept")
    with pytest.warns(CatalogWarning, match="kept as .versions-used.json.corrupt-"):
        library.remove("m@2")
    [kept] = library.root.glob(".versions-used.json.corrupt-*")
    assert (kept / "inside").read_text() == "kept"
    assert json.loads(marks.read_bytes()) == {"m": 2}


def test_a_failed_removal_says_nothing_of_a_marks_file_it_put_back(library, monkeypatch):
    """The warning that an unreadable marks file was "written afresh" came from inside the
    removal's transaction: a removal that then failed had said so, and put the file back."""
    import warnings

    import adapterkit.library.store as store

    marks = library.root / ".versions-used.json"
    save(library, "m")
    save(library, "m@2")
    marks.write_bytes(b'{"old": 7, "m": ')
    real_rename = store.os.rename

    def rename(src, dst):  # the folder's move to the trash fails; the marks' rename does not
        if "trash" in str(dst):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", rename)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OSError):
            library.remove("m@2")
    assert [str(w.message) for w in caught if w.category is CatalogWarning] == []
    assert marks.read_bytes() == b'{"old": 7, "m": '
    assert list(library.root.glob(".versions-used.json.corrupt-*")) == []


def test_a_removal_retried_on_a_damaged_catalog_says_only_what_its_retry_did(library,
                                                                             monkeypatch):
    """A damaged catalog makes the removal's transaction run again (after undoing the first
    attempt, which put the marks file back): only the retry's words are said, naming the file
    kept beside that exists."""
    import sqlite3
    import warnings

    from adapterkit.library.catalog import Catalog

    save(library, "m")
    save(library, "m@2")
    (library.root / ".versions-used.json").write_bytes(b"{not json")
    real_delete, calls = Catalog.delete, []

    def delete(conn, name, version):
        calls.append(version)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real_delete(conn, name, version)

    monkeypatch.setattr(Catalog, "delete", staticmethod(delete))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library.remove("m@2")
    said = [str(w.message) for w in caught if w.category is CatalogWarning
            and "did not read as the version numbers" in str(w.message)]
    [kept] = library.root.glob(".versions-used.json.corrupt-*")
    assert len(said) == 1 and f"kept as {kept.name}" in said[0], said
    assert kept.read_bytes() == b"{not json" and len(calls) >= 2


def test_marks_entries_that_are_not_version_numbers_are_said_and_the_rest_kept(library):
    """``{"old": 7, "x": "3"}``: the entry that is not a number was dropped silently at the
    next write, and the file counted as read. It is kept beside whole; "old" is written again."""
    marks = library.root / ".versions-used.json"
    save(library, "m")
    marks.write_text('{"old": 7, "x": "3"}')
    assert library._read_marks() == ({"old": 7}, False)  # (doctor reports it: kind marks)
    with pytest.warns(CatalogWarning, match="written afresh with its 1 readable entry"):
        library.remove("m")
    assert json.loads(marks.read_bytes()) == {"m": 1, "old": 7}
    [kept] = library.root.glob(".versions-used.json.corrupt-*")
    assert kept.read_text() == '{"old": 7, "x": "3"}'


def test_a_save_says_when_the_marks_file_does_not_read(library):
    """A save read an unreadable marks file as no marks, silently: a plain NAME could take a
    removed version's number again unseen. It is said once, where a plain NAME's number is
    chosen from it; never for NAME@V, whose number is its own."""
    import warnings

    save(library, "m")
    library.remove("m")  # m@1's number is marked used
    (library.root / ".versions-used.json").write_bytes(b"{not json")

    def said(action) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action()
        return [str(w.message) for w in caught if w.category is CatalogWarning]

    books = []
    first = said(lambda: books.append(save(library, "m")))
    assert len(first) == 1 and "run `adapterkit doctor`" in first[0], first
    assert books[0].version == 1  # what it can still tell: the versions present (none)
    assert said(lambda: save(library, "pinned@4")) == []
    assert said(lambda: save(library, "other")) == []  # the same file: said already
    again = Library(library.home)  # another Library on the same home: the same file, said
    assert said(lambda: save(again, "third")) == []  # already in this process
    assert said(lambda: library.version_to_save("m@7")) == []


def test_the_marks_warning_follows_the_file_the_number_was_chosen_from(library, monkeypatch):
    """The save chose its number from an unreadable marks file, which another process mended
    just after the commit: the save read the file again after it, found it readable and said
    nothing. It says what held when the number was chosen (and reads the file once)."""
    save(library, "m")
    library.remove("m")
    marks = library.root / ".versions-used.json"
    marks.write_bytes(b"{not json")
    real_write = library.catalog.write

    def write(fn, **kwargs):
        out = real_write(fn, **kwargs)
        if fn.__name__ == "insert":  # the save's commit: mended right after it
            marks.write_text('{"m": 1}')
        return out

    monkeypatch.setattr(library.catalog, "write", write)
    with pytest.warns(CatalogWarning, match="does not read as the version numbers"):
        book = save(library, "m")
    assert book.version == 1  # (what it could tell then: the versions present, none)


def test_version_to_save_refuses_past_the_last_number(library):
    from adapterkit.library.names import MAX_VERSION

    (library.root).mkdir(parents=True, exist_ok=True)
    (library.root / ".versions-used.json").write_text(json.dumps({"m": MAX_VERSION}))
    with pytest.raises(NameTaken, match=f"every version number up to {MAX_VERSION}"):
        library.version_to_save("m")
    assert library.version_to_save("m@3") == 3


def test_a_filter_picks_versions_before_the_latest_is_taken(library):
    """``list --tag prod`` with only a@1 tagged found nothing (the filter was ANDed with
    "a's latest version") and said no pocket book matched."""
    save(library, "a", tags=["prod"], base="b1")
    save(library, "a@2", base="b2")
    assert [(s.name, s.version, s.versions) for s in library.list(tag="prod")] == [("a", 1, 2)]
    assert [(s.name, s.version) for s in library.list(base="b1")] == [("a", 1)]
    assert [(s.name, s.version) for s in library.list(base="b2")] == [("a", 2)]
    for empty in ({"tag": ""}, {"base": " "}):
        with pytest.raises(ConfigError, match="filter is empty"):
            library.list(**empty)


def test_removing_a_tag_it_does_not_carry_is_refused_and_our_card_follows_tags(library):
    from adapterkit.library.card import write_card
    from adapterkit.library.names import InvalidName

    book = save(library, "a", tags=["prod"])
    write_card(book.path, book.meta)
    with pytest.raises(ConfigError, match="a@1 has no tag 'prdo'; its tags: prod"):
        library.tag("a", "prdo", remove=True)
    with pytest.raises(InvalidName, match="invalid tag 'my tag'"):
        library.tag("a", "my tag")
    library.tag("a", "staging")
    header = (book.path / "README.md").read_text().split("---")[1]
    assert "- prod" in header and "- staging" in header
    library.tag("a", "prod", remove=True)
    assert "- prod" not in (book.path / "README.md").read_text().split("---")[1]


def test_a_metadata_change_the_catalog_refuses_leaves_the_file_as_it_was(library, monkeypatch):
    """A full disk fails at the catalog's COMMIT: ``tag`` said "nothing was changed" while
    adapterkit.json already carried the tag (and the next ``list`` indexed it)."""
    import sqlite3

    from adapterkit.errors import CatalogError
    from adapterkit.library.catalog import Catalog

    book = save(library, "a")
    before = (book.path / "adapterkit.json").read_bytes()

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "upsert", staticmethod(full))
    with pytest.raises(CatalogError):
        library.tag("a", "x")
    monkeypatch.undo()
    assert (book.path / "adapterkit.json").read_bytes() == before
    assert library.rebuild_catalog() == 1 and library.get("a").meta.tags == []


def test_a_name_differing_only_in_case_is_refused(library):
    """On macOS's and Windows' default file systems ``PE`` and ``pe`` share one folder."""
    save(library, "pe")
    for name in ("PE", "Pe@2"):
        with pytest.raises(NameTaken, match="'PE' differs from the pocket book 'pe' only in "
                                            "case|'Pe' differs"):
            library.reserve(name)
        with pytest.raises(NameTaken, match="only in case"):
            save(library, name)
    assert [s.name for s in library.list()] == ["pe"]


def test_a_library_holding_both_spellings_goes_on_with_each(library, monkeypatch):
    """Made on a case-sensitive disk before the check: their new versions are not refused
    (the check's first version refused both, and told the user to do what it refused)."""
    save(library, "pe")
    with monkeypatch.context() as m:  # as an older adapterkit saved it
        m.setattr(Library, "_refuse_case_clash", lambda self, conn, name: None)
        save(library, "PE")
    assert save(library, "pe@2").version == 2 and save(library, "PE@2").version == 2
    with pytest.raises(NameTaken, match="only in case"):
        save(library, "Pe")


def test_rm_asks_again_under_the_lock_and_a_stack_of_a_removed_book_is_not_saved(library,
                                                                                monkeypatch):
    """A stack saved between rm's check and its delete was left naming a removed pocket
    book; a stack whose member was removed after it was read was saved anyway."""
    save(library, "a")
    save(library, "b")
    check = Library.dependents

    def then_a_stack_is_saved(self, refs):
        found = check(self, refs)
        with library.draft() as staged:
            meta = PocketBookMeta(name="", version=0, base={"name": "b1", "fingerprint": "fp-b1"},
                                  kind="stack", hyperparameters={"weights": {"a@1": 1.0}})
            (staged / "README.md").write_text("stack")
            library.commit(staged, meta, name="s", members_here=True)
        return found

    monkeypatch.setattr(Library, "dependents", then_a_stack_is_saved)
    with pytest.raises(ConfigError, match="a@1 is needed by s@1"):
        library.remove("a")
    monkeypatch.undo()
    assert library.get("a").version == 1
    with library.draft() as staged:
        meta = PocketBookMeta(name="", version=0, base={"name": "b1", "fingerprint": "fp-b1"},
                              kind="stack", hyperparameters={"weights": {"b@1": 1.0}})
        library.remove("b")  # after the stack read its members
        with pytest.raises(PocketBookNotFound, match="b@1, which it needs, was removed"):
            library.commit(staged, meta, name="t", members_here=True)
    assert not library.exists("t")


def test_export_of_a_book_trained_on_another_is_refused_naming_the_way(library, tmp_path):
    """PEFT and vLLM load the exported folder alone: without the pocket book underneath."""
    save(library, "under")
    save(library, "top")
    library.update_meta("top", lambda meta: setattr(meta, "stacked_on", ["under@1"]))
    with pytest.raises(ConfigError, match=r"top@1 is trained on top of under@1, which a PEFT "
                                          r"folder of it alone leaves out.*`adapterkit stack "
                                          r"under@1 top@1 --flatten --name NAME`"):
        library.export("top", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metadata_with_nested_values_of_the_wrong_type_is_damaged_not_a_traceback():
    """``show`` read ``base.provenance`` as a mapping and failed with AttributeError."""
    good = {"name": "a", "version": 1, "base": {"name": "b", "fingerprint": "f",
                                                "provenance": {"kind": "folder"}}}
    assert PocketBookMeta.from_dict(good).base["provenance"] == {"kind": "folder"}
    for base in ({"provenance": "x"}, {"name": 3}, {"fingerprint": ["f"]}):
        with pytest.raises(ValueError, match="'base."):
            PocketBookMeta.from_dict({**good, "base": base})
    with pytest.raises(ValueError, match="'files' must map"):
        PocketBookMeta.from_dict({**good, "files": {"adapter_model.safetensors": 1}})


def test_remove_of_a_named_version_with_all_versions_is_refused(library):
    """Before: ``rm a@1 --all-versions`` removed every version of a."""
    save(library, "a")
    save(library, "a@2")
    with pytest.raises(ConfigError, match="a@1 names one version, --all-versions every "
                                          "version: remove a@1 alone, or every version with "
                                          "a --all-versions"):
        library.remove("a@1", all_versions=True)
    assert [s.version for s in library.list(all_versions=True)] == [1, 2]


def test_failed_save_leaves_nothing(library):
    with pytest.raises(RuntimeError):
        with library.draft() as staged:
            (staged / "adapter_config.json").write_text("{}")
            raise RuntimeError("crash while writing weights")
    assert library.list() == []
    assert list(library.staging.iterdir()) == []
    assert not library.root.exists() or list(library.root.iterdir()) == []


def test_missing_weights_are_refused(library):
    from adapterkit import InvalidAdapter

    with library.draft() as staged:
        (staged / "adapter_config.json").write_text("{}")
        with pytest.raises(InvalidAdapter, match="adapter_model.safetensors is missing"):
            library.commit(staged, PocketBookMeta(name="x", version=1))
    assert library.list() == []


def _save_many(home, prefix, n):
    lib = Library(home)
    for i in range(n):
        save(lib, f"{prefix}{i}")
        save(lib, "shared", new_version=True)


def test_two_processes_saving_at_once_lose_nothing(home):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(home, p, 15)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lib = Library(home)
    names = {s.name for s in lib.list()}
    assert {f"x{i}" for i in range(15)} | {f"y{i}" for i in range(15)} <= names
    assert [s.version for s in lib.list(all_versions=True) if s.name == "shared"] == list(range(1, 31))


def test_corrupt_catalog_is_rebuilt_from_folders(library):
    save(library, "a", tags=["t"])
    save(library, "b")
    library.catalog.path.write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(library.catalog.path) + suffix).unlink(missing_ok=True)
    with pytest.warns(CatalogWarning, match="rebuilt from the pocket-book folders"):
        books = library.list()
    assert [b.name for b in books] == ["a", "b"]
    assert library.list(tag="t")[0].name == "a"
    assert any(p.name.startswith("catalog.sqlite.corrupt-") for p in library.home.iterdir())


def test_crash_between_rename_and_commit_is_adopted(library):
    """A complete folder that the catalog does not know (crash after rename) is not overwritten."""
    book = save(library, "a")
    library.catalog.write(lambda conn: conn.execute("DELETE FROM pocket_books"))
    with pytest.raises(NameTaken):
        save(library, "a")
    assert library.rebuild_catalog() == 1
    assert library.get("a").path == book.path


def test_export_refuses_non_empty_destination(library, tmp_path):
    save(library, "a")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(NameTaken, match="not empty"):
        library.export("a", dest)
    assert os.listdir(dest) == ["keep.txt"]
    assert (library.export("a", tmp_path / "new") / "adapter_model.safetensors").is_file()


def test_a_pocket_book_named_like_its_base_is_saved_with_a_warning(library, tiny_base,
                                                                    peft_adapter):
    """`import ... --name BASE` was accepted silently, and the server then read model BASE as
    the plain base: saving it still works, and says how to reach it (NAME@V)."""
    import warnings

    from adapterkit.errors import AdapterWarning

    with pytest.warns(AdapterWarning, match=rf"^{tiny_base.name}@1 has its base's name, which "
                                            r"`adapterkit serve` reads as the plain base: name "
                                            rf"it {tiny_base.name}@1 in requests"):
        same = library.import_peft(peft_adapter, tiny_base.name, base=str(tiny_base))
    assert same.meta.base["name"] == tiny_base.name and same.ref == f"{tiny_base.name}@1"
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)
        library.import_peft(peft_adapter, "other", base=str(tiny_base))

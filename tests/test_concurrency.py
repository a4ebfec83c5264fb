"""Eight processes share one library (issue #17): imports under distinct and the same names,
tags, removals (two of them racing for the same pocket book), lists and shows, at once.

Afterwards the catalog and the folders must agree exactly, every entry must be whole (its files
hash to what its ``adapterkit.json`` records), every import that said it succeeded must be
there and every removal that said it succeeded must be gone, no tag may be lost, and no process
may ever have seen "database is locked".
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sqlite3
import traceback
from pathlib import Path

import pytest

from adapterkit.library.catalog import meta_stamp

WORKERS = 8
#: what a worker may meet in a race it is meant to lose; anything else fails the test
EXPECTED_REFUSALS = {"NameTaken", "PocketBookNotFound"}


def _worker(index: int, home: str, adapter: str, base: str, barrier, out: str) -> None:
    """Run one worker's script, recording every operation's outcome (never raising)."""
    from adapterkit import Library

    log: list[dict] = []

    def op(name: str, target: str, fn) -> None:
        try:
            value = fn()
        except Exception as exc:
            log.append({"op": name, "target": target, "ok": False, "error": type(exc).__name__,
                        "message": str(exc), "traceback": traceback.format_exc()})
        else:
            log.append({"op": name, "target": target, "ok": True, "value": value})

    def do_import(name: str) -> None:
        op("import", name, lambda: library.import_peft(adapter, name, base=base).ref)

    def do_tag(ref: str, tag: str, remove: bool = False) -> None:
        op("untag" if remove else "tag", ref,
           lambda: library.tag(ref, tag, remove=remove).ref)

    library = Library(home)
    mine = f"w{index}"
    try:
        # phase 1: everyone imports its own pocket book, and everyone tries to take "shared"
        do_import(mine)
        do_import("shared")
        op("list", "", lambda: len(library.list()))
        barrier.wait(timeout=120)
        # phase 2: tags on one book from all sides, a racing removal, new versions, removals
        do_tag(mine, f"t{index}")
        do_tag("shared", f"t{index}")
        neighbour = f"w{index | 1}@1"  # an odd one: it keeps its first version
        op("show", neighbour, lambda: library.get(neighbour).ref)
        op("rm", "racer", lambda: library.remove("racer", all_versions=True))
        if index % 2:
            do_import(f"{mine}@2")
        else:
            op("rm", f"{mine}@1", lambda: [f"{mine}@{v}" for v in library.remove(f"{mine}@1")])
        op("list", "", lambda: len(library.list(all_versions=True)))
        barrier.wait(timeout=120)
        # phase 3: half of the shared tags go again
        if index < WORKERS // 2:
            do_tag("shared", f"t{index}", remove=True)
        op("show", "shared", lambda: library.get("shared").ref)
    finally:
        Path(out).write_text(json.dumps(log), encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_eight_processes_lose_nothing(library, home, tiny_base, peft_adapter, tmp_path):
    library.import_peft(peft_adapter, "racer", base=str(tiny_base))
    library.import_peft(peft_adapter, "racer@2", base=str(tiny_base))

    # one interpreter imports what import_peft needs once; the workers are forked from it
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["adapterkit", "adapterkit.library.peft_folder",
                                "adapterkit.base.load", "torch", "accelerate",
                                "transformers.modeling_utils",
                                "transformers.models.llama.modeling_llama",
                                "tests.test_concurrency"])
    barrier = ctx.Barrier(WORKERS)
    outs = [tmp_path / f"worker-{i}.json" for i in range(WORKERS)]
    procs = [ctx.Process(target=_worker, args=(i, str(home), str(peft_adapter), str(tiny_base),
                                               barrier, str(outs[i])))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    logs = [json.loads(o.read_text()) for o in outs]
    records = [r for log in logs for r in log]

    # no surprises: nothing locked, only the refusals a race is meant to produce
    assert not [r for r in records if "locked" in r.get("message", "").lower()]
    surprises = [r for r in records if not r["ok"] and r["error"] not in EXPECTED_REFUSALS]
    assert not surprises, surprises[0]["traceback"]

    def outcomes(op: str, target: str) -> list[dict]:
        return [r for r in records if r["op"] == op and r["target"] == target]

    # exactly one process got "shared"; exactly one removed "racer", and it removed both
    shared = outcomes("import", "shared")
    assert [r["value"] for r in shared if r["ok"]] == ["shared@1"]
    assert {r["error"] for r in shared if not r["ok"]} == {"NameTaken"}
    racers = outcomes("rm", "racer")
    assert [r["value"] for r in racers if r["ok"]] == [[1, 2]]
    assert {r["error"] for r in racers if not r["ok"]} == {"PocketBookNotFound"}
    # no other operation failed
    assert [r for r in records if not r["ok"]
            and (r["op"], r["target"]) not in {("import", "shared"), ("rm", "racer")}] == []

    # what the processes said happened is what is there
    expected = {"shared@1"} | {f"w{i}@{v}" for i in range(1, WORKERS, 2) for v in (1, 2)}
    imported = {r["value"] for r in records if r["op"] == "import" and r["ok"]}
    removed = {r["target"] for r in records if r["op"] == "rm" and r["ok"]}
    assert imported - removed == expected
    # the raw catalog, read before any adapterkit call could heal it, agrees with the disk:
    # the processes left it right, not the next command
    conn = sqlite3.connect(home / "catalog.sqlite")
    raw = {f"{n}@{v}": (json.loads(tags), stamp) for n, v, tags, stamp in
           conn.execute("SELECT name, version, tags, meta_stamp FROM pocket_books")}
    conn.close()
    on_disk = {f"{p.parent.name}@{p.name}" for p in (home / "library").glob("*/*") if p.is_dir()}
    assert set(raw) == on_disk == expected
    for ref, (tags, stamp) in raw.items():
        folder = home / "library" / ref.replace("@", "/")
        assert tags == json.loads((folder / "adapterkit.json").read_text())["tags"]
        assert stamp == meta_stamp(folder)
    catalog = {f"{s.name}@{s.version}" for s in library.list(all_versions=True)}
    assert catalog == expected

    # every entry whole, every tag kept (t0-t3 were taken off "shared" again)
    for ref in sorted(on_disk):
        name, version = ref.split("@")
        folder = home / "library" / name / version
        meta = json.loads((folder / "adapterkit.json").read_text())
        assert (meta["name"], meta["version"]) == (name, int(version))
        assert meta["files"] and all(_sha256(folder / f) == h for f, h in meta["files"].items())
        shown = library.get(ref).meta
        assert sorted(shown.tags) == sorted(meta["tags"])
    assert sorted(library.get("shared").meta.tags) == [f"t{i}" for i in range(4, WORKERS)]
    for i in range(1, WORKERS, 2):
        assert library.get(f"w{i}@1").meta.tags == [f"t{i}"]
    # and nothing left half-done
    assert [p.name for p in (home / "tmp").iterdir()] == []

"""Fault benchmark (issue #17): kill -9 at random moments of `train`, `import`, `export`, `rm`,
`tag` and `pull`, against one library home kept between trials so that damage accumulates,
and count what the crashes left behind.

Every command runs through ``benchmarks/fault_shim.py``, which holds each rename and catalog
COMMIT open for a few tens of milliseconds, so kills land in the commit window and not only
around it. Half the kills (``--aim mixed``, the default) come at a moment drawn uniformly over
the command's duration (measured once, unkilled); the other half wait for the n-th window the
shim announces (n drawn over the windows the unkilled run opened) and strike inside it.

After each trial the library is checked independently of adapterkit's own checks: every
``library/<name>/<version>/`` folder's ``adapterkit.json`` is parsed and the SHA-256 of its
files compared with ``meta["files"]``; the folders are compared with the raw catalog (read with
sqlite3, before any adapterkit command can heal it), with ``adapterkit list --json
--all-versions`` and with ``adapterkit show NAME@V``. At the end ``adapterkit doctor --dry-run``,
``adapterkit doctor`` and ``adapterkit list`` run, and the check again.

    python benchmarks/bench_faults.py [--trials 50] [--ops train,import,...] [--quick]

Columns: corrupt = a library folder failing those checks; invisible = a whole folder that
`list` or `show` does not see; orphans = catalog rows without a folder (as `list` shows them) +
work folders left in ``tmp/`` by killed processes (the next write, or `doctor`, sweeps these),
or for export hidden ``.partial`` folders next to the destination (the next export into that
folder sweeps these; one runs before the end); drift = a row whose tags
differ from its folder's as `list` shows them (a half-landed metadata change that the next
command did not heal); healed = raw catalog and folders disagreed after the kill, and the
next command put it right (the recovery working, not a fault); left after doctor = any of
those still there at the very end. Goal: 0 corrupt, 0 invisible, 0 orphan rows and 0 left
after doctor (exit status 1 otherwise); the work folders and drift are reported, since the
next write or `doctor` is meant to clear them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "benchmarks" / "fault_shim.py"
OPS = ("train", "import", "export", "rm", "tag", "pull")
#: which op a pocket book belongs to, by its name's prefix
PREFIXES = {"tr": "train", "im": "import", "ex": "export", "rmv": "rm", "tagme": "tag",
            "pl": "pull", "seed": "export"}
PAUSE = (0.01, 0.05)
_WORK_FOLDER = re.compile(r"-(?P<pid>[0-9]+)-[0-9a-f]+$")
HASHED = ("adapter_config.json", "adapter_model.safetensors")


def op_of(name: str) -> str:
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            return PREFIXES[prefix]
    return "?"


@dataclass
class Tally:
    """What one operation's trials left; sets hold distinct refs or paths."""

    trials: int = 0
    landed: int = 0
    corrupt: set[str] = field(default_factory=set)
    invisible: set[str] = field(default_factory=set)
    orphan_rows: set[str] = field(default_factory=set)
    orphan_tmp: set[str] = field(default_factory=set)
    drift: set[str] = field(default_factory=set)
    healed: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)
    failures: dict[str, int] = field(default_factory=dict)  # unkilled runs that failed

    def as_dict(self) -> dict[str, Any]:
        return {k: sorted(v) if isinstance(v, set) else v for k, v in self.__dict__.items()}


@dataclass
class Survey:
    """The library as this script sees it, with the problems found."""

    corrupt: dict[str, str] = field(default_factory=dict)  # ref → why
    invisible: set[str] = field(default_factory=set)
    orphan_rows: set[str] = field(default_factory=set)
    orphan_tmp: set[str] = field(default_factory=set)  # work folders of dead processes
    drift: set[str] = field(default_factory=set)
    raw_drift: set[str] = field(default_factory=set)  # raw catalog vs folders, before healing
    partial_exports: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def whole(folder: Path, name: str, version: int) -> tuple[str | None, dict | None]:
    """Why ``folder`` is not a whole pocket book (``None`` if it is), and its metadata."""
    try:
        meta = json.loads((folder / "adapterkit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"adapterkit.json unreadable ({type(exc).__name__})", None
    if not isinstance(meta, dict):
        return "adapterkit.json is not an object", None
    if (meta.get("name"), meta.get("version")) != (name, version):
        return f"adapterkit.json says {meta.get('name')}@{meta.get('version')}", meta
    files = meta.get("files")
    if not isinstance(files, dict) or not set(HASHED) <= set(files):
        return "adapterkit.json records no hashes for the PEFT files", meta
    for fname, digest in files.items():
        try:
            if sha256(folder / fname) != digest:
                return f"{fname} does not match its recorded SHA-256", meta
        except OSError:
            return f"{fname} is missing", meta
    try:
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError:
        return "adapter_config.json is not JSON", meta
    return None, meta


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-faults-"))
        self.home = self.work / "home"
        self.out = self.work / "exports"
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, ADAPTERKIT_HOME=str(self.home), HF_HUB_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1",
                        ADAPTERKIT_FAULT_PAUSE=f"{PAUSE[0]},{PAUSE[1]}")
        self.rng = random.Random(args.seed)
        self.tallies = {op: Tally() for op in args.ops}
        self.pids: dict[int, str] = {}  # every trial process → its op
        self.shown: set[tuple[str, float]] = set()  # (ref, mtime) that `show` accepted
        self.duration: dict[str, float] = {}
        self.windows: dict[str, int] = {}
        self.hub = None

    # -- setting up -------------------------------------------------------------------------

    def setup(self) -> None:
        from adapterkit import Library
        from adapterkit.plugin_api.testing import make_peft_adapter, make_tiny_base

        self.base = Path(self.args.base) if self.args.base else make_tiny_base(self.work / "base")
        self.adapter = (Path(self.args.adapter) if self.args.adapter
                        else make_peft_adapter(self.base, self.work / "adapter"))
        self.data = self.work / "data.jsonl"
        self.data.write_text("".join(
            json.dumps({"text": f"The river {w} flows past the old mill."}) + "\n"
            for w in ("north", "south", "east", "west") * 4), encoding="utf-8")
        library = Library(self.home)
        self.seed = library.import_peft(self.adapter, "seed", base=str(self.base))
        library.save_folder(self.seed.path, self._meta_copy(), name="tagme")
        if "pull" in self.args.ops:
            self._serve_hub()

    def _meta_copy(self) -> Any:
        from adapterkit import PocketBookMeta

        meta = PocketBookMeta.from_dict(json.loads(self.seed.meta.to_json()))
        meta.tags = []
        return meta

    def _serve_hub(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.hub_server import FakeHub

        self.hub = FakeHub({"tok-alice": "alice"}).__enter__()
        files = {n: (self.seed.path / n).read_bytes()
                 for n in (*HASHED, "adapterkit.json")}
        self.hub.add_repo("alice/seed", "alice", files)
        self.env.pop("HF_HUB_OFFLINE")
        self.env.update(HF_ENDPOINT=self.hub.endpoint, HF_TOKEN="tok-alice",
                        HF_HUB_CACHE=str(self.work / "hub-cache"),
                        HF_HUB_DISABLE_PROGRESS_BARS="1")

    def close(self) -> None:
        if self.hub is not None:
            self.hub.__exit__(None, None, None)

    # -- one trial ----------------------------------------------------------------------------

    def argv(self, op: str, k: int) -> list[str]:
        """The command of trial ``k`` of ``op``, after planting what it needs."""
        if op == "train":
            return ["train", "sft", "--base", str(self.base), "--data", str(self.data),
                    "--name", f"tr{k}", "--max-steps", "2"]
        if op == "import":
            return ["import", str(self.adapter), "--name", f"im{k}", "--base", str(self.base)]
        if op == "export":
            return ["export", "seed", str(self.out / f"ex{k}")]
        if op == "rm":
            from adapterkit import Library

            library = Library(self.home)
            for version in (1, 2) if k % 2 else (1,):
                library.save_folder(self.seed.path, self._meta_copy(), name=f"rmv{k}@{version}")
            return ["rm", f"rmv{k}"] + (["--all-versions"] if k % 2 else [])
        if op == "tag":
            return ["tag", "tagme", f"t{k % 4}"] + (["--remove"] if (k // 4) % 2 else [])
        if op == "pull":
            return ["pull", "alice/seed", "--name", f"pl{k}"]
        raise ValueError(op)

    def run(self, op: str, k: int, *, kill: str | None) -> tuple[bool, int, str]:
        """Run trial ``k``; with ``kill`` ("uniform" or "window") kill -9 it on the way.
        Returns (killed while running, exit status, last stderr line)."""
        read, write = os.pipe()
        env = dict(self.env, ADAPTERKIT_FAULT_FD=str(write))
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, str(SHIM), *self.argv(op, k)], env=env,
                                    pass_fds=(write,), stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)
            os.close(write)
            self.pids[proc.pid] = op
            events = 0
            if kill == "window" and self.windows.get(op):
                events = self._strike_in_window(proc, read, self.rng.randint(1, self.windows[op]),
                                                deadline=4 * self.duration[op] + 10)
            elif kill:
                time.sleep(self.rng.uniform(0, self.duration[op]))
            landed = kill is not None and proc.poll() is None
            if landed:
                proc.kill()
            try:
                code = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            events += _drain(read)
            os.close(read)
            err.seek(0)
            lines = [line for line in err.read().decode(errors="replace").splitlines()
                     if line.strip()]
        if kill is None:
            self.windows[op] = events
        return landed, code, lines[-1] if lines else ""

    def _strike_in_window(self, proc: subprocess.Popen, read: int, nth: int, *,
                          deadline: float) -> int:
        """Wait until the shim opens its ``nth`` window, then kill inside it (the window is the
        pause before the step, the step, and the pause after)."""
        seen, deadline = 0, time.monotonic() + deadline
        while seen < nth and proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], 0.05)
            if ready:
                seen += len(os.read(read, 1024))
        time.sleep(self.rng.uniform(0, 2 * PAUSE[1]))
        return seen

    def calibrate(self, op: str) -> None:
        start = time.perf_counter()
        _, code, last = self.run(op, 0, kill=None)
        self.duration[op] = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"{op} fails even without a kill: {last}")

    # -- checking -------------------------------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "adapterkit", *args], env=self.env,
                              capture_output=True, text=True, timeout=600)

    def survey(self) -> Survey:
        s = Survey()
        folders: dict[str, Path] = {}
        metas: dict[str, dict] = {}
        for folder in sorted((self.home / "library").glob("*/*")):
            if folder.is_dir() and folder.name.isascii() and folder.name.isdigit():
                ref = f"{folder.parent.name}@{int(folder.name)}"
                folders[ref] = folder
                why, meta = whole(folder, folder.parent.name, int(folder.name))
                if why:
                    s.corrupt[ref] = why
                elif meta is not None:
                    metas[ref] = meta
        s.raw_drift = self._raw_catalog_drift(set(folders))
        listing = self.cli("list", "--json", "--all-versions")
        if listing.returncode != 0:
            s.notes.append(f"list failed: {listing.stderr.strip()[-200:]}")
            rows: dict[str, dict] = {}
        else:
            rows = {f"{r['name']}@{r['version']}": r for r in json.loads(listing.stdout)}
        s.orphan_rows = set(rows) - set(folders)
        s.drift = {ref for ref in set(rows) & set(metas)
                   if sorted(rows[ref]["tags"]) != sorted(metas[ref].get("tags", []))}
        unseen = self._show_failures(metas, folders)
        s.invisible = {ref for ref in metas if ref not in rows} | unseen
        s.orphan_tmp = {p.name for p in _dead_work_folders(self.home / "tmp")}
        s.partial_exports = {p.name for p in self.out.glob(".*.partial-*")}
        s.corrupt.update(self._bad_exports())
        return s

    def _raw_catalog_drift(self, folders: set[str]) -> set[str]:
        path = self.home / "catalog.sqlite"
        if not path.exists():
            return set(folders)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = {f"{n}@{v}" for n, v in
                        conn.execute("SELECT name, version FROM pocket_books")}
            finally:
                conn.close()
        except sqlite3.Error:
            return {"<catalog unreadable>"}
        return rows ^ folders

    def _show_failures(self, metas: dict[str, dict], folders: dict[str, Path]) -> set[str]:
        """Refs that `adapterkit show` refuses, asking only about folders new or changed
        since `show` last accepted them (one process for all of them)."""
        todo = [ref for ref in metas
                if (ref, (folders[ref] / "adapterkit.json").stat().st_mtime) not in self.shown]
        if not todo:
            return set()
        code = ("import json, sys\nfrom adapterkit.cli import main\nbad = []\n"
                "for ref in json.loads(sys.argv[1]):\n"
                "    try:\n        main(['show', ref, '--json'])\n"
                "    except SystemExit as exc:\n"
                "        if exc.code:\n            bad.append(ref)\n"
                "print('BAD=' + json.dumps(bad), file=sys.stderr)\n")
        out = subprocess.run([sys.executable, "-c", code, json.dumps(todo)], env=self.env,
                             capture_output=True, text=True, timeout=600)
        found = [line for line in out.stderr.splitlines() if line.startswith("BAD=")]
        bad = set(json.loads(found[-1][4:])) if found else set(todo)
        for ref in set(todo) - bad:
            self.shown.add((ref, (folders[ref] / "adapterkit.json").stat().st_mtime))
        return bad

    def _bad_exports(self) -> dict[str, str]:
        bad = {}
        for dest in self.out.glob("ex*"):
            for fname in HASHED:
                path = dest / fname
                if not path.is_file() or sha256(path) != self.seed.meta.files[fname]:
                    bad[f"exports/{dest.name}"] = f"{fname} missing or not the pocket book's"
        return bad

    def tally_for(self, thing: str) -> Tally:
        """The tally of the operation that made ``thing``: a ref, ``exports/<dest>`` or a work
        folder's name (by the process that owned it); "other" when it is none of this run's."""
        if thing.startswith(("stage-", "trash-")):
            owner = _WORK_FOLDER.search(thing)
            op = self.pids.get(int(owner["pid"]), "other") if owner else "other"
        else:
            op = op_of(thing.split("@")[0].split("/")[-1])
        return self.tallies[op] if op in self.tallies else self.tallies.setdefault("other", Tally())

    def record(self, s: Survey) -> None:
        """Charge what ``s`` found to the operation that made each thing."""
        for attr in ("corrupt", "invisible", "orphan_rows", "orphan_tmp", "drift"):
            for thing in getattr(s, attr):
                getattr(self.tally_for(thing), attr).add(thing)
        for ref in s.raw_drift - s.invisible - s.orphan_rows:
            self.tally_for(ref).healed.add(ref)
        for name in s.partial_exports:
            self.tally_for(f"exports/{name.split('.')[1]}").orphan_tmp.add(f"exports/{name}")

    # -- the whole benchmark --------------------------------------------------------------------

    def series(self, op: str) -> None:
        self.calibrate(op)
        tally = self.tallies[op]
        print(f"{op}: unkilled run {self.duration[op]:.2f} s, {self.windows[op]} commit "
              f"window(s); {self.args.trials} trials", flush=True)
        for k in range(1, self.args.trials + 1):
            aim = self.args.aim if self.args.aim != "mixed" else ("window", "uniform")[k % 2]
            landed, code, last = self.run(op, k, kill=aim)
            tally.trials += 1
            tally.landed += landed
            if not landed and code != 0:
                key = re.sub(r"\d+", "N", last)[:160]
                tally.failures[key] = tally.failures.get(key, 0) + 1
            if k % self.args.check_every == 0 or k == self.args.trials:
                self.record(self.survey())

    def finish(self) -> dict[str, Any]:
        # Partial exports lie in the user's folder, outside the library: doctor cannot know
        # them; the next export into the same folder removes those of dead processes.
        self.cli("export", "seed", str(self.out / "final-export"))
        dry = self.cli("doctor", "--dry-run", "--json")
        fixed = self.cli("doctor", "--json")
        listing = self.cli("list")
        final = self.survey()
        for attr in ("corrupt", "invisible", "orphan_rows", "orphan_tmp", "drift"):
            for thing in getattr(final, attr):
                self.tally_for(thing).left.add(thing)
        for name in final.partial_exports:
            self.tally_for(f"exports/{name.split('.')[1]}").left.add(f"exports/{name}")
        return {"doctor_dry_run": _doctor_summary(dry), "doctor": _doctor_summary(fixed),
                "list_exit": listing.returncode,
                "quarantined": sorted(p.name for p in (self.home / "quarantine").glob("*/*")),
                "notes": final.notes}


def _drain(fd: int) -> int:
    os.set_blocking(fd, False)
    count = 0
    try:
        while chunk := os.read(fd, 4096):
            count += len(chunk)
    except BlockingIOError:
        pass
    return count


def _dead_work_folders(tmp: Path) -> list[Path]:
    out = []
    for path in tmp.glob("*") if tmp.is_dir() else []:
        owner = _WORK_FOLDER.search(path.name)
        if owner is None:
            out.append(path)
            continue
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            out.append(path)
        except OSError:
            pass
    return out


def _doctor_summary(result: subprocess.CompletedProcess) -> dict[str, Any]:
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return {"exit": result.returncode, "error": (result.stderr.strip() or "no output")[-300:]}
    kinds: dict[str, int] = {}
    for problem in report.get("problems", []):
        kinds[problem["kind"]] = kinds.get(problem["kind"], 0) + 1
    return {"exit": result.returncode, "checked": report.get("checked"), "problems": kinds,
            "repaired": report.get("repaired")}


def print_table(bench: Bench, end: dict[str, Any], wall: float) -> bool:
    headers = ["operation", "trials", "kills landed", "corrupt", "invisible",
               "orphans (rows+tmp)", "drift", "healed", "left after doctor"]
    rows, total = [], Tally()
    for op, t in bench.tallies.items():
        rows.append([op, t.trials, t.landed, len(t.corrupt), len(t.invisible),
                     f"{len(t.orphan_rows)}+{len(t.orphan_tmp)}", len(t.drift), len(t.healed),
                     len(t.left)])
        total.trials += t.trials
        total.landed += t.landed
        for attr in ("corrupt", "invisible", "orphan_rows", "orphan_tmp", "drift", "healed",
                     "left"):
            getattr(total, attr).update(f"{op}:{x}" for x in getattr(t, attr))
    rows.append(["all", total.trials, total.landed, len(total.corrupt), len(total.invisible),
                 f"{len(total.orphan_rows)}+{len(total.orphan_tmp)}", len(total.drift),
                 len(total.healed), len(total.left)])
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\ndoctor --dry-run: {end['doctor_dry_run']}")
    print(f"doctor:           {end['doctor']}")
    print(f"list exit status: {end['list_exit']}; quarantined by doctor: "
          f"{len(end['quarantined'])}")
    for note in end["notes"]:
        print(f"note: {note}")
    for op, t in bench.tallies.items():
        for line, n in sorted(t.failures.items()):
            print(f"{op}: {n} run(s) that no kill reached failed: {line}")
        for attr in ("corrupt", "invisible", "orphan_rows", "drift", "left"):
            if getattr(t, attr):
                print(f"{op} {attr}: {', '.join(sorted(getattr(t, attr))[:8])}")
    kept = bench.args.keep or bench.args.workdir
    print(f"\nwall time {wall:.1f} s" + (f" (library and exports kept in {bench.work})"
                                         if kept else ""))
    return not (total.corrupt or total.invisible or total.orphan_rows or total.left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50, help="Trials per operation.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 3 trials each.")
    parser.add_argument("--ops", default=",".join(OPS), help="Comma-separated operations.")
    parser.add_argument("--aim", choices=("mixed", "uniform", "window"), default="mixed")
    parser.add_argument("--check-every", type=int, default=1, help="Check every k trials.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="A tiny base folder to use (default: build one).")
    parser.add_argument("--adapter", help="A PEFT adapter for --base (default: build one).")
    parser.add_argument("--workdir", help="Where the library lives (default: a new temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    parser.add_argument("--json", dest="json_out", help="Also write the figures here.")
    args = parser.parse_args(argv)
    args.trials = 3 if args.quick else args.trials
    args.ops = [op for op in args.ops.split(",") if op]
    unknown = set(args.ops) - set(OPS)
    if unknown:
        parser.error(f"unknown operation(s) {', '.join(sorted(unknown))}; use {', '.join(OPS)}")
    start = time.perf_counter()
    bench = Bench(args)
    try:
        bench.setup()
        for op in args.ops:
            bench.series(op)
        end = bench.finish()
        ok = print_table(bench, end, time.perf_counter() - start)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(
                {"ops": {op: t.as_dict() for op, t in bench.tallies.items()}, **end,
                 "ok": ok, "wall_s": time.perf_counter() - start}, indent=2))
    finally:
        bench.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(bench.work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

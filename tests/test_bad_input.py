"""The bad-input corpus of issue #17 ("Nothing lost, nothing silent").

Every way a careless or hostile user can call the CLI wrongly, against a library holding one
imported pocket book (``pe@1``), must end the same way: exit code ≠ 0, exactly one ``Error:``
line (plus the ``adapterkit: warning:`` lines a case names, and the ``Loading base ...``
progress lines a case allows), no traceback, and nothing written — neither in the home (paths,
sizes and mtimes of every file; the catalog rows) nor next to the command's inputs and outputs.

A case is data: its arguments (``{base}``, ``{adapter}``, ``{data}``, ``{work}``, ``{home}`` are
filled in), a setup that plants what it needs, and how it runs (in-process through click's
runner, or a real process where the process matters: plugins loaded at start-up, file-size
limits, a full disk — a small tmpfs, so those cases are skipped where mounting one is not
allowed). Click's own refusals (unknown command, missing option) keep click's three-line shape,
checked as such. The cases marked ``# 17.N`` are the defects of that item of the issue.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapterkit.library.metadata import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE

WARNING = "adapterkit: warning: "
PROGRESS = ("Loading base ", "Converting ")
#: SQLite's side files come and go with every connection; they are not the library's content.
SIDE_FILES = ("catalog.sqlite-wal", "catalog.sqlite-shm")


# -- the world a case runs in -------------------------------------------------------------------

@dataclass
class World:
    """What a case's setup and arguments can refer to."""

    home: Path
    work: Path  # inputs the case plants and outputs it asks for; snapshotted like the home
    base: Path
    adapter: Path
    data: Path  # a small, valid sft data file
    request: pytest.FixtureRequest
    env: dict[str, str] = field(default_factory=dict)

    @property
    def book(self) -> Path:
        return self.home / "library" / "pe" / "1"

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def fill(self, text: str) -> str:
        return text.format(base=self.base, adapter=self.adapter, data=self.data, work=self.work,
                           home=self.home)

    def adapter_copy(self, name: str = "bad") -> Path:
        dest = self.work / name
        shutil.copytree(self.adapter, dest)
        return dest


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    setup: Callable[[World], None] | None = None
    mentions: tuple[str, ...] = ()  # the error line names these
    process: bool = False  # run `python -m adapterkit` rather than in-process
    warnings: tuple[str, ...] = ()  # one warning line naming each of these is expected
    progress: bool = False  # `Loading base ...` lines may come before the error
    usage: bool = False  # a click usage error: Usage/Try/Error, exit 2
    file_limit: int | None = None  # RLIMIT_FSIZE in bytes for the process (`ulimit -f`)
    small_disk: str | None = None  # "home" or "dest": put it on a full tmpfs...
    room: int = 0  # ...with this many bytes left
    hub: bool = False  # serve the fake Hub to this case


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_FILE).read_text())


def _write_config(folder: Path, config: Any) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _safetensors(path: Path, header: Any, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _first_tensor_header(adapter: Path) -> tuple[dict[str, Any], bytes]:
    raw = (adapter / WEIGHTS_FILE).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


class _Pwn:
    """Unpickling this would run a shell command (it must never get the chance)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# -- setups: each plants one problem ------------------------------------------------------------

def _edit_adapter(edit: Callable[[Path, World], None]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        edit(w.adapter_copy(), w)
    return setup


def _edit_book(edit: Callable[[Path, World], None]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        edit(w.book, w)
    return setup


def _no_base_named(folder: Path, w: World) -> None:
    config = _config(folder)
    config.pop("base_model_name_or_path", None)
    _write_config(folder, config)


def _peft_type(folder: Path, w: World) -> None:
    _write_config(folder, dict(_config(folder), peft_type="IA3"))


def _targets(value: Any) -> Callable[[Path, World], None]:
    def edit(folder: Path, w: World) -> None:
        _write_config(folder, dict(_config(folder), target_modules=value))
    return edit


def _truncate(fraction: float) -> Callable[[Path, World], None]:
    def edit(folder: Path, w: World) -> None:
        path = folder / WEIGHTS_FILE
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return edit


def _header_without_shape(folder: Path, w: World) -> None:
    header, data = _first_tensor_header(folder)
    first = next(k for k in header if k != "__metadata__")
    del header[first]["shape"]
    _safetensors(folder / WEIGHTS_FILE, header, data)


def _header_garbage(folder: Path, w: World) -> None:
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 10**12) + b"{}")


def _header_not_object(folder: Path, w: World) -> None:
    _safetensors(folder / WEIGHTS_FILE, ["not", "an", "object"])


def _pickle_only(folder: Path, w: World) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _malicious_pickle(folder: Path, w: World) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Pwn(w.work / "pwned")))


def _readme_link(folder: Path, w: World) -> None:
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").symlink_to("/etc/passwd")


def _weights_link_outside(folder: Path, w: World) -> None:
    elsewhere = w.work / "elsewhere"
    elsewhere.mkdir()
    (folder / WEIGHTS_FILE).rename(elsewhere / WEIGHTS_FILE)
    (folder / WEIGHTS_FILE).symlink_to(elsewhere / WEIGHTS_FILE)


def _foreign_weights(folder: Path, w: World) -> None:
    """Weights made for another base (other hidden size), under the right file name."""
    shutil.copy(w.fixture("foreign_adapter") / WEIGHTS_FILE, folder / WEIGHTS_FILE)


def _big_adapter(w: World) -> None:
    shutil.copytree(w.fixture("big_adapter"), w.work / "big")


def _big_book(w: World) -> None:
    from adapterkit.library.store import Library

    Library(w.home).import_peft(w.fixture("big_adapter"), "big", base=str(w.base))


def _foreign_adapter(w: World) -> None:
    shutil.copytree(w.fixture("foreign_adapter"), w.work / "bad")


def _planted_bin(folder: Path, w: World) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _bad_json(folder: Path, w: World) -> None:
    (folder / CONFIG_FILE).write_text("{ not json")


def _config_not_object(folder: Path, w: World) -> None:
    (folder / CONFIG_FILE).write_text("[]")


def _config_value(**values: Any) -> Callable[[Path, World], None]:
    """Config values of the wrong type: they passed import and broke PEFT's load later (a
    TypeError from inside PEFT on every `generate`), or import itself with a traceback."""
    def edit(folder: Path, w: World) -> None:
        _write_config(folder, {**_config(folder), **values})
    return edit


def _infinite_factor(folder: Path, w: World) -> None:
    """A LoRA factor holding an infinity: every answer through it would be NaN."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    b = next(name for name in sorted(tensors) if "lora_B" in name)
    tensors[b][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS_FILE)


def _only(name: str) -> Callable[[Path, World], None]:
    def edit(folder: Path, w: World) -> None:
        for item in folder.iterdir():
            if item.name != name:
                item.unlink()
    return edit


def _file(relative: str, content: bytes | str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        path = w.work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return setup


def _rows(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _plugin(source: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        path = w.work / "plugins" / "rogue.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
        w.env["ADAPTERKIT_LOAD_PLUGINS"] = str(path)
    return setup


def _hub_repo(repo_id: str, edit: Callable[[dict[str, bytes], World], None] | None = None
              ) -> Callable[[World], None]:
    """Publish a copy of ``pe@1`` (its PEFT files and the adapterkit.json that hashes them) on
    the fake Hub, after ``edit`` has had its way with the files."""
    def setup(w: World) -> None:
        files = {n: (w.book / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE)}
        if edit is not None:
            edit(files, w)
        owner = repo_id.split("/")[0]
        w.fixture("fake_hub").add_repo(repo_id, owner, files)
    return setup


def _hub_meta(text: bytes) -> Callable[[dict[str, bytes], World], None]:
    def edit(files: dict[str, bytes], w: World) -> None:
        files[METADATA_FILE] = text
    return edit


def _hub_foreign_weights(files: dict[str, bytes], w: World) -> None:
    """Weights for another base, with an adapterkit.json that claims ours and hashes them: the
    hashes prove the files are what the repo says, not that they fit."""
    import hashlib

    weights = (w.fixture("foreign_adapter") / WEIGHTS_FILE).read_bytes()
    files[WEIGHTS_FILE] = weights
    meta = json.loads(files[METADATA_FILE])
    meta["files"][WEIGHTS_FILE] = hashlib.sha256(weights).hexdigest()
    files[METADATA_FILE] = json.dumps(meta).encode()


def _hub_tampered(files: dict[str, bytes], w: World) -> None:
    weights = bytearray(files[WEIGHTS_FILE])
    weights[-1] ^= 0xFF
    files[WEIGHTS_FILE] = bytes(weights)


def _hub_pickle(files: dict[str, bytes], w: World) -> None:
    del files[WEIGHTS_FILE], files[METADATA_FILE]
    files["adapter_model.bin"] = pickle.dumps({"weights": [1]})


def _hub_not_lora(files: dict[str, bytes], w: World) -> None:
    config = json.loads(files[CONFIG_FILE])
    files[CONFIG_FILE] = json.dumps(dict(config, peft_type="IA3")).encode()
    del files[METADATA_FILE]


def _recipe(**stage: Any) -> Callable[[World], None]:
    """A one-stage pipeline recipe on the tiny base, with ``stage`` overriding its keys
    (``stages=None`` leaves the stages out)."""
    def setup(w: World) -> None:
        import yaml

        shutil.copy(w.data, w.work / "d.jsonl")
        recipe: dict[str, Any] = {"base": str(w.base), "max_steps": 1}
        if "stages" not in stage:
            recipe["stages"] = [{"name": "s1", "trainer": "sft", "data": "d.jsonl", **stage}]
        (w.work / "p.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return setup


_SYS_EXIT_PLUGIN = "import sys\nsys.exit(3)\n"
_HIJACK_PLUGIN = """\
import click
from adapterkit import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command("show")
    @click.argument("ref")
    def show(ref):
        click.echo("hijacked")
"""

# -- the corpus ---------------------------------------------------------------------------------

T = ("train", "sft", "--base", "{base}", "--name", "t", "--max-steps", "1")
G = ("generate", "hi", "--adapter", "pe", "--max-new-tokens", "2")

CASES: list[Case] = [
    # names and references
    Case("show-traversal", ("show", "../x"), mentions=("../x",)),
    Case("show-slash", ("show", "a/b"), mentions=("a/b",)),
    Case("show-empty-name", ("show", ""), mentions=("empty",)),
    Case("show-name-too-long", ("show", "x" * 101), mentions=("100",)),
    Case("show-leading-dot", ("show", ".pe")),
    Case("show-unknown", ("show", "ghost"), mentions=("ghost",)),
    Case("show-missing-version", ("show", "pe@2"), mentions=("pe@2", "pe@1")),
    Case("show-version-zero", ("show", "pe@0")),
    Case("show-version-negative", ("show", "pe@-1")),
    Case("show-version-empty", ("show", "pe@")),
    Case("show-version-word", ("show", "pe@latest")),
    Case("show-version-superscript", ("show", "pe@²")),  # 17.7
    Case("show-version-arabic-indic", ("show", "pe@١")),  # 17.7: never read as pe@1
    Case("show-version-huge", ("show", "pe@99999999999999999999")),  # 17.7
    Case("show-version-5000-digits", ("show", "pe@" + "9" * 5000)),  # 17.7
    Case("show-json-unknown", ("show", "ghost", "--json"), mentions=("ghost",)),
    Case("rm-unknown", ("rm", "ghost"), mentions=("ghost",)),
    Case("rm-traversal", ("rm", "../pe")),
    Case("rm-missing-version", ("rm", "pe@2"), mentions=("pe@2",)),
    Case("rm-all-versions-unknown", ("rm", "ghost", "--all-versions"), mentions=("ghost",)),
    Case("tag-unknown", ("tag", "ghost", "t"), mentions=("ghost",)),
    Case("tag-traversal-ref", ("tag", "../pe", "t")),
    Case("tag-traversal-tag", ("tag", "pe", "../t"), mentions=("../t",)),
    Case("tag-slash-tag", ("tag", "pe", "a/b")),
    Case("tag-empty-tag", ("tag", "pe", "")),
    Case("tag-missing-version", ("tag", "pe@9", "t"), mentions=("pe@9",)),
    # export
    Case("export-unknown", ("export", "ghost", "{work}/out"), mentions=("ghost",)),
    Case("export-traversal", ("export", "../pe", "{work}/out")),
    Case("export-missing-version", ("export", "pe@3", "{work}/out"), mentions=("pe@3",)),
    Case("export-nonempty-destination", ("export", "pe", "{work}/out"),
         setup=_file("out/keep.txt", "mine"), mentions=("not empty",)),
    Case("export-destination-is-a-file", ("export", "pe", "{work}/out"),
         setup=_file("out", "a file")),
    Case("export-destination-under-a-file", ("export", "pe", "{work}/afile/out"),
         setup=_file("afile", "a file"), mentions=("afile", "which is a file")),
    Case("export-destination-name-too-long", ("export", "pe", "{work}/" + "x" * 300),
         mentions=("too long",)),
    Case("home-under-a-file", ("--home", "{work}/afile/home", "list"),
         setup=_file("afile", "a file"), mentions=("afile", "not a folder")),
    Case("export-zero-byte-weights", ("export", "pe", "{work}/out"),  # 17.3
         setup=_edit_book(_truncate(0)), mentions=(WEIGHTS_FILE,)),
    Case("export-file-size-limit", ("export", "pe", "{work}/out"),  # 17.5 (`ulimit -f`)
         process=True, file_limit=4096),
    Case("export-disk-full", ("export", "pe", "{work}/disk/out"),  # 17.5
         process=True, small_disk="dest"),
    # import: names
    Case("import-missing-folder", ("import", "{work}/nowhere", "--name", "x", "--base", "{base}"),
         mentions=("nowhere",)),
    Case("import-file-not-folder",
         ("import", "{adapter}/adapter_config.json", "--name", "x", "--base", "{base}")),
    Case("import-empty-name", ("import", "{adapter}", "--name", "", "--base", "{base}")),
    Case("import-traversal-name", ("import", "{adapter}", "--name", "../x", "--base", "{base}")),
    Case("import-slash-name", ("import", "{adapter}", "--name", "a/b", "--base", "{base}")),
    Case("import-name-taken", ("import", "{adapter}", "--name", "pe", "--base", "{base}"),
         mentions=("pe@2",)),
    Case("import-version-taken", ("import", "{adapter}", "--name", "pe@1", "--base", "{base}"),
         mentions=("pe@1",)),
    Case("import-version-zero", ("import", "{adapter}", "--name", "x@0", "--base", "{base}")),
    Case("import-version-huge",  # 17.7
         ("import", "{adapter}", "--name", "x@99999999999999999999999", "--base", "{base}")),
    Case("import-version-arabic-indic",  # 17.7: was silently saved as x@1
         ("import", "{adapter}", "--name", "x@١", "--base", "{base}")),
    # import: the base
    Case("import-unknown-base", ("import", "{adapter}", "--name", "x", "--base", "no-such-base"),
         mentions=("no-such-base",)),
    Case("import-base-folder-missing",
         ("import", "{adapter}", "--name", "x", "--base", "{work}/nobase")),
    Case("import-base-not-a-model", ("import", "{adapter}", "--name", "x", "--base", "{work}/empty"),
         setup=_file("empty/notes.txt", "no model here")),
    Case("import-no-base-named", ("import", "{work}/bad", "--name", "x"),
         setup=_edit_adapter(_no_base_named), mentions=("--base",)),
    # import: the adapter folder
    Case("import-no-config", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_only(WEIGHTS_FILE)), mentions=(CONFIG_FILE,)),
    Case("import-config-bad-json", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_bad_json), mentions=(CONFIG_FILE,)),
    Case("import-config-not-object", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_config_not_object), mentions=(CONFIG_FILE,)),
    Case("import-not-lora", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_peft_type), mentions=("IA3",)),
    Case("import-config-target-modules-a-number",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_config_value(target_modules=5)), mentions=("target_modules",)),
    Case("import-config-target-modules-numbers",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_config_value(target_modules=[1, 2])), mentions=("target_modules",)),
    Case("import-config-rank-pattern-text",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_config_value(rank_pattern="x")), mentions=("rank_pattern",)),
    Case("import-config-rank-pattern-text-rank",  # was imported, then every load failed
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_config_value(rank_pattern={"q_proj": "abc"})),
         mentions=("rank_pattern",)),
    Case("import-config-modules-to-save-a-number",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_config_value(task_type="SEQ_CLS", modules_to_save=5)),
         mentions=("modules_to_save",)),
    Case("import-weights-not-finite",  # was imported; answers through it were NaN
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_infinite_factor), mentions=("not finite", "lora_B")),
    Case("import-no-weights", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_only(CONFIG_FILE)), mentions=(WEIGHTS_FILE,)),
    Case("import-zero-byte-weights", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_truncate(0))),
    Case("import-truncated-weights", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_truncate(0.6))),
    Case("import-header-length-garbage",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_header_garbage)),
    Case("import-header-not-object",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_header_not_object)),
    Case("import-header-entry-without-shape",  # 17.7
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_header_without_shape), mentions=("shape",)),
    Case("import-target-modules-bad-regex",  # 17.7
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_targets("(["))),
    Case("import-target-modules-unknown",
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_targets(["nosuch_proj"])), mentions=("nosuch_proj",)),
    Case("import-foreign-shapes", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_foreign_adapter),
    Case("import-pickle-refused", ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_pickle_only), mentions=("--trust-pickle",)),
    Case("import-malicious-pickle-trusted",  # 17.7
         ("import", "{work}/bad", "--name", "x", "--base", "{base}", "--trust-pickle"),
         setup=_edit_adapter(_malicious_pickle)),
    Case("import-readme-links-outside",  # 17.10
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_readme_link), mentions=("README.md",)),
    Case("import-weights-link-outside",  # 17.10
         ("import", "{work}/bad", "--name", "x", "--base", "{base}"),
         setup=_edit_adapter(_weights_link_outside), mentions=(WEIGHTS_FILE,)),
    Case("import-file-size-limit",  # 17.5
         ("import", "{adapter}", "--name", "x", "--base", "{base}"),
         process=True, file_limit=4096),
    Case("import-disk-full",  # 17.5
         ("import", "{adapter}", "--name", "x", "--base", "{base}"),
         process=True, small_disk="home"),
    # a 512 KB adapter, so that the copy itself (not only the catalog) meets the limit
    Case("import-big-file-size-limit",  # 17.5
         ("import", "{work}/big", "--name", "big", "--base", "{base}"),
         setup=_big_adapter, process=True, file_limit=64 * 1024),
    Case("import-big-disk-nearly-full",  # 17.5
         ("import", "{work}/big", "--name", "big", "--base", "{base}"),
         setup=_big_adapter, process=True, small_disk="home", room=128 * 1024),
    Case("export-big-file-size-limit", ("export", "big", "{work}/out"),  # 17.5
         setup=_big_book, process=True, file_limit=64 * 1024),
    Case("export-big-disk-nearly-full", ("export", "big", "{work}/disk/out"),  # 17.5
         setup=_big_book, process=True, small_disk="dest", room=128 * 1024),
    # tag on a full disk: the catalog is not corrupt, it is out of space
    Case("tag-file-size-limit", ("tag", "pe@1", "t"), process=True, file_limit=256),  # 17.5
    Case("tag-disk-full", ("tag", "pe@1", "t"), process=True, small_disk="home"),  # 17.5
    # train: options and names (refused before any step)
    Case("train-unknown-trainer",
         ("train", "nosuch", "--base", "{base}", "--data", "{data}", "--name", "t"),
         mentions=("nosuch",)),
    Case("train-unknown-method", T + ("--data", "{data}", "--method", "nosuch"),
         mentions=("nosuch",)),
    Case("train-traversal-name",
         ("train", "sft", "--base", "{base}", "--data", "{data}", "--name", "../t")),
    Case("train-name-taken", ("train", "sft", "--base", "{base}", "--data", "{data}",
                              "--name", "pe"), mentions=("pe@2",)),
    Case("train-lr-nan", T + ("--data", "{data}", "--lr", "nan"), mentions=("nan",)),  # 17.7
    Case("train-lr-infinite", T + ("--data", "{data}", "--lr", "inf")),
    Case("train-lr-negative", T + ("--data", "{data}", "--lr", "-0.1")),
    Case("train-max-steps-zero",  # 17.8
         ("train", "sft", "--base", "{base}", "--name", "t", "--data", "{data}",
          "--max-steps", "0"), mentions=("max_steps",)),
    Case("train-rank-zero", T + ("--data", "{data}", "--rank", "0")),
    Case("train-dropout-one", T + ("--data", "{data}", "--dropout", "1.5")),
    Case("train-eval-split-one", T + ("--data", "{data}", "--eval-split", "1")),
    Case("train-batch-size-zero", T + ("--data", "{data}", "--batch-size", "0")),
    Case("train-bad-forgetting-budget", T + ("--data", "{data}", "--forgetting-budget", "lots")),
    Case("train-set-unknown-key", T + ("--data", "{data}", "--set", "nosuchkey=1"),  # 17.8
         mentions=("nosuchkey",)),
    Case("train-set-without-equals", T + ("--data", "{data}", "--set", "novalue"),
         mentions=("novalue",)),
    Case("train-recipe-missing", T + ("--data", "{data}", "--config", "{work}/none.yaml"),
         mentions=("none.yaml",)),
    Case("train-recipe-bad-yaml", T + ("--data", "{data}", "--config", "{work}/r.yaml"),
         setup=_file("r.yaml", "lr: [unclosed\n"), mentions=("r.yaml",)),
    Case("train-recipe-unknown-option", T + ("--data", "{data}", "--config", "{work}/r.yaml"),
         setup=_file("r.yaml", "nosuch_option: 1\n"), mentions=("nosuch_option",)),
    Case("train-budget-for-reward",
         ("train", "reward", "--base", "{base}", "--name", "t", "--data", "{work}/p.jsonl",
          "--forgetting-budget", "1%", "--max-steps", "1"),
         setup=_file("p.jsonl", _rows({"prompt": "a", "chosen": "b", "rejected": "c"})),
         mentions=("reward trainer does not apply the forgetting guard",)),
    # train: what is trained on and from
    Case("train-unknown-base", ("train", "sft", "--base", "no-such-base", "--data", "{data}",
                                "--name", "t"), progress=True, mentions=("no-such-base",)),
    Case("train-missing-data", T + ("--data", "{work}/none.jsonl",), mentions=("none.jsonl",)),
    Case("train-empty-data", T + ("--data", "{work}/d.jsonl",), setup=_file("d.jsonl", ""),
         progress=True),
    Case("train-bad-json-data", T + ("--data", "{work}/d.jsonl",),
         setup=_file("d.jsonl", _rows({"text": "fine"}, "{oops")), progress=True,
         mentions=("d.jsonl",)),
    Case("train-non-utf8-data", T + ("--data", "{work}/d.jsonl",),  # 17.7
         setup=_file("d.jsonl", b'{"text": "caf\xe9 au lait"}\n'), progress=True,
         mentions=("d.jsonl",)),
    Case("train-wrong-shape-rows", T + ("--data", "{work}/d.jsonl",),  # 17.8
         setup=_file("d.jsonl", _rows({"text": "the river flows"}, {"colour": "red"})),
         progress=True, mentions=("--skip-bad-rows",)),
    Case("train-dpo-on-text-rows",
         ("train", "dpo", "--base", "{base}", "--name", "t", "--data", "{data}",
          "--max-steps", "1"), progress=True),
    Case("train-rank-wider-than-layers", T + ("--data", "{data}", "--rank", "65"),  # 17.8
         progress=True, mentions=("65",)),
    Case("train-unknown-target-module", T + ("--data", "{data}", "--target-modules", "nosuch_proj"),
         progress=True, mentions=("nosuch_proj",)),
    Case("train-on-unknown", T + ("--data", "{data}", "--on", "ghost"), progress=True,
         mentions=("ghost",)),
    Case("train-from-unknown", T + ("--data", "{data}", "--from", "ghost"), progress=True,
         mentions=("ghost",)),
    # pipeline: the whole recipe is checked before the first stage trains
    Case("pipeline-recipe-missing", ("pipeline", "{work}/none.yaml"), mentions=("none.yaml",)),
    Case("pipeline-recipe-bad-yaml", ("pipeline", "{work}/p.yaml"),
         setup=_file("p.yaml", "stages: [unclosed\n"), mentions=("p.yaml",)),
    Case("pipeline-no-stages", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(stages=None), mentions=("stages",)),
    Case("pipeline-unknown-trainer", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(trainer="nosuch"), mentions=("nosuch",)),
    Case("pipeline-traversal-name", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(name="../s"), mentions=("../s",)),
    Case("pipeline-name-taken", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(name="pe"), mentions=("pe@1",)),
    Case("pipeline-on-unknown", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(on="ghost"), mentions=("ghost",)),
    Case("pipeline-missing-data", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(data="none.jsonl"), mentions=("none.jsonl",)),
    Case("pipeline-max-steps-zero", ("pipeline", "{work}/p.yaml"),
         setup=_recipe(max_steps=0), mentions=("max_steps",)),
    # generate, eval, swap, stack, merge, verify, chat
    Case("generate-nothing-to-answer-with", ("generate", "hi"), mentions=("--base",)),
    Case("generate-unknown-adapter", ("generate", "hi", "--adapter", "ghost"),
         mentions=("ghost",)),
    Case("generate-unknown-base", ("generate", "hi", "--base", "no-such-base"), progress=True,
         mentions=("no-such-base",)),
    Case("generate-zero-new-tokens", ("generate", "hi", "--adapter", "pe",
                                      "--max-new-tokens", "0")),
    Case("generate-negative-temperature", G + ("--temperature", "-1"),  # 17.8
         progress=True, mentions=("temperature",)),
    Case("generate-zero-byte-weights", G, setup=_edit_book(_truncate(0)),  # 17.3
         progress=True, mentions=(WEIGHTS_FILE,)),
    Case("generate-truncated-weights", G, setup=_edit_book(_truncate(0.6)),  # 17.3
         progress=True, mentions=(WEIGHTS_FILE,)),
    Case("generate-config-bad-json", G, setup=_edit_book(_bad_json),  # 17.3
         progress=True, mentions=(CONFIG_FILE,)),
    Case("generate-wrong-shapes", G, setup=_edit_book(_foreign_weights),  # 17.3
         progress=True, mentions=(WEIGHTS_FILE,)),
    Case("generate-planted-bin", G, setup=_edit_book(_planted_bin),  # 17.3
         progress=True, mentions=("adapter_model",)),
    Case("swap-zero-byte-weights", ("swap", "pe", "--prompt", "hi", "--max-new-tokens", "2"),
         setup=_edit_book(_truncate(0)), progress=True, mentions=(WEIGHTS_FILE,)),  # 17.3
    Case("eval-unknown-book", ("eval", "ghost", "--data", "{data}"), mentions=("ghost",)),
    Case("eval-missing-data", ("eval", "pe", "--data", "{work}/none.jsonl"),
         mentions=("none.jsonl",)),
    Case("eval-unknown-scorer", ("eval", "pe", "--data", "{data}", "--scorer", "nosuch"),
         mentions=("nosuch",)),
    Case("swap-unknown", ("swap", "ghost", "--prompt", "hi"), mentions=("ghost",)),
    Case("swap-zero-new-tokens", ("swap", "pe", "--prompt", "hi", "--max-new-tokens", "0")),
    Case("chat-unknown-adapter", ("chat", "--adapter", "ghost"), mentions=("ghost",)),
    Case("stack-of-one", ("stack", "pe", "--name", "s")),
    Case("stack-unknown-member", ("stack", "pe", "ghost", "--name", "s"), mentions=("ghost",)),
    Case("stack-weights-count", ("stack", "pe", "pe@1", "--name", "s", "--weights", "1")),
    Case("stack-weights-not-numbers", ("stack", "pe", "pe@1", "--name", "s",
                                       "--weights", "a,b")),
    Case("stack-traversal-name", ("stack", "pe", "pe@1", "--name", "../s")),
    Case("merge-unknown-member", ("merge", "pe", "ghost", "--name", "m"), mentions=("ghost",)),
    Case("merge-unknown-method", ("merge", "pe", "pe@1", "--name", "m", "--method", "nosuch"),
         mentions=("nosuch",)),
    Case("verify-unknown", ("verify", "ghost"), mentions=("ghost",)),
    # the Hub
    Case("push-unknown", ("push", "ghost", "--repo", "alice/x"), mentions=("ghost",)),
    Case("push-bad-repo-id", ("push", "pe", "--repo", "no repo id")),
    Case("pull-bad-repo-id", ("pull", "no repo id")),
    Case("pull-traversal-name", ("pull", "alice/x", "--name", "../x")),
    Case("pull-name-taken", ("pull", "alice/pe"), mentions=("pe@2",)),
    Case("pull-repo-not-found", ("pull", "alice/nope", "--name", "x"), hub=True,
         mentions=("alice/nope",)),
    Case("pull-tampered-weights", ("pull", "alice/tampered"), hub=True,
         setup=_hub_repo("alice/tampered", _hub_tampered), mentions=(WEIGHTS_FILE,)),
    Case("pull-pickle-refused", ("pull", "alice/pickled"), hub=True,
         setup=_hub_repo("alice/pickled", _hub_pickle), mentions=("--trust-pickle",)),
    Case("pull-not-lora", ("pull", "alice/ia3"), hub=True,
         setup=_hub_repo("alice/ia3", _hub_not_lora), mentions=("IA3",)),
    Case("pull-metadata-not-object", ("pull", "alice/listmeta"), hub=True,  # 17.4
         setup=_hub_repo("alice/listmeta", _hub_meta(b"[]")), mentions=(METADATA_FILE,)),
    Case("pull-metadata-bad-json", ("pull", "alice/badmeta"), hub=True,  # 17.4
         setup=_hub_repo("alice/badmeta", _hub_meta(b"{ nope")), mentions=(METADATA_FILE,)),
    Case("pull-wrong-shapes", ("pull", "alice/foreign"), hub=True,  # 17.4
         setup=_hub_repo("alice/foreign", _hub_foreign_weights)),
    # bases
    Case("base-show-unknown", ("base", "show", "no-such-base"), mentions=("no-such-base",)),
    Case("base-show-missing-gguf", ("base", "show", "{work}/m.gguf"), mentions=("m.gguf",)),
    Case("base-show-not-a-model", ("base", "show", "{work}/empty"),
         setup=_file("empty/notes.txt", "no model here")),
    Case("base-show-truncated-gguf", ("base", "show", "{work}/m.gguf"),
         setup=_file("m.gguf", b"GGUF\x03\x00\x00\x00"), progress=True, mentions=("m.gguf",)),
    # plugins
    Case("plugin-new-bad-name", ("plugin", "new", "Bad Name!", "--dir", "{work}")),
    Case("plugin-new-existing-folder", ("plugin", "new", "x", "--dir", "{work}"),
         setup=_file("adapterkit-x/mine.txt", "mine")),
    Case("plugin-new-unknown-kind", ("plugin", "new", "x", "--kind", "nosuch", "--dir", "{work}"),
         usage=True),
    Case("plugin-sys-exit-at-import", ("show", "ghost"), process=True,  # 17.9
         setup=_plugin(_SYS_EXIT_PLUGIN), warnings=("rogue",), mentions=("ghost",)),
    Case("plugin-replaces-core-command", ("show", "ghost"), process=True,  # 17.9
         setup=_plugin(_HIJACK_PLUGIN), warnings=("rogue",), mentions=("ghost",)),
    # click's own refusals: Usage / Try / Error, exit 2
    Case("unknown-command", ("frobnicate",), usage=True),
    Case("import-without-name", ("import", "{adapter}"), usage=True),
    Case("train-lr-not-a-number", T + ("--data", "{data}", "--lr", "fast"), usage=True),
    Case("home-is-a-file", ("--home", "{work}/f", "list"), setup=_file("f", "x"), usage=True),
]


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_book_home(tiny_base, peft_adapter, tmp_path_factory) -> Path:
    """A library holding ``pe@1`` (the PEFT adapter, imported on the tiny base); copied per case."""
    from adapterkit.library.store import Library

    path = tmp_path_factory.mktemp("one-book") / "home"
    Library(path).import_peft(peft_adapter, "pe", base=str(tiny_base))
    return path


@pytest.fixture(scope="session")
def foreign_adapter(other_base, tmp_path_factory) -> Path:
    from adapterkit.plugin_api.testing import make_peft_adapter

    return make_peft_adapter(other_base, tmp_path_factory.mktemp("foreign") / "adapter")


@pytest.fixture(scope="session")
def big_adapter(tiny_base, tmp_path_factory) -> Path:
    """Rank 64 on every linear layer: 512 KB of weights."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("big") / "adapter",
                             target_modules="all-linear", r=64)


@pytest.fixture(scope="module")
def fake_hub():
    from tests.hub_server import FakeHub

    with FakeHub({"tok-alice": "alice"}) as server:
        yield server


@pytest.fixture
def no_progress_bars():
    """As in a real run, where `main()` turns them off before the libraries load: no download or
    weight-loading bars on stderr."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
    yield
    enable_progress_bars()
    logging.enable_progress_bar()


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs, for the disk-full cases; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
        capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root): no full disk to test")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, room: int) -> None:
    """Fill ``disk`` to the last byte, then free ``room`` bytes."""
    for name, block in (("filler", 4096), ("filler-tail", 1)):
        with open(disk / name, "wb", buffering=0) as fh:
            try:
                while fh.write(b"\0" * block):
                    pass
            except OSError:
                pass
    if room:
        filler = disk / "filler"
        os.truncate(filler, max(0, filler.stat().st_size - room))


# -- what a run looks like, and the checks --------------------------------------------------------

@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    traceback: str = ""


def _in_process(cli: Callable[..., Any], args: list[str]) -> Outcome:
    """Run the CLI in this process; adapterkit's own warnings become the lines `main()` prints."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli(*args)
    lines = [f"{WARNING}{w.message}" for w in caught
             if type(w.message).__module__.startswith("adapterkit.")]
    tb = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
    stderr = "".join(line + "\n" for line in lines) + result.stderr
    return Outcome(result.exit_code, result.stdout, stderr, tb)


def _process(args: list[str], env: dict[str, str], file_limit: int | None) -> Outcome:
    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    out = subprocess.run([sys.executable, "-m", "adapterkit", *args], env=env,
                         capture_output=True, text=True, timeout=300, preexec_fn=limit)
    return Outcome(out.returncode, out.stdout, out.stderr)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and mtime — the home's own mtime and that
    of ``tmp/`` aside (SQLite's side files and staging folders come and go in them)."""
    if not root.exists():
        return {}
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if name in SIDE_FILES and Path(folder) == root:
                continue
            st = path.lstat()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",) if rel == "tmp" else ("dir", st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_size, st.st_mtime_ns)
    return out


def _rows_of(cli: Callable[..., Any], home: Path) -> Any:
    result = cli("--home", str(home), "list", "--json", "--all-versions")
    assert result.exit_code == 0, f"`list` fails after the case: {result.output}"
    return json.loads(result.stdout)


def _diff(before: dict, after: dict) -> list[str]:
    return sorted([f"+ {p}" for p in after.keys() - before.keys()]
                  + [f"- {p}" for p in before.keys() - after.keys()]
                  + [f"~ {p}" for p in before.keys() & after.keys() if before[p] != after[p]])


def check(case: Case, out: Outcome) -> None:
    shown = f"exit {out.code}\n--- stdout\n{out.stdout}--- stderr\n{out.stderr}{out.traceback}"
    assert not out.traceback and "Traceback" not in out.stdout + out.stderr, shown
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    if case.usage:
        assert out.code == 2, shown
        assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error: "), shown
        assert len(lines) == 3 and lines[1].startswith("Try "), shown
        return
    assert out.code != 0, shown
    assert out.stdout.strip() == "", shown
    warned = [line for line in lines if line.startswith(WARNING)]
    progress = [line for line in lines if case.progress and line.startswith(PROGRESS)]
    errors = [line for line in lines if line not in warned and line not in progress]
    assert len(errors) == 1 and errors[0].startswith("Error: "), shown
    for word in case.mentions:
        assert word in errors[0], f"the error does not name {word!r}\n{shown}"
    assert len(warned) == len(case.warnings), shown
    for word in case.warnings:
        assert any(word in line for line in warned), shown


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, request, home, one_book_home, tiny_base,
                                                  peft_adapter, adapterkit_cli, tmp_path,
                                                  monkeypatch, no_progress_bars):
    shutil.copytree(one_book_home, home, symlinks=True)
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "data" / "sft.jsonl"
    data.parent.mkdir()
    data.write_text(_rows(*({"text": f"The river {w} flows past the mill."}
                            for w in ("north", "south", "east", "west"))), encoding="utf-8")
    world = World(home, work, tiny_base, peft_adapter, data, request)
    if case.small_disk:
        disk = request.getfixturevalue("small_disk")
        if case.small_disk == "home":
            world.home = disk / "home"
            shutil.copytree(home, world.home, symlinks=True)
        else:
            (work / "disk").symlink_to(disk)
    if case.setup is not None:
        case.setup(world)
    if case.hub:
        from tests.hub_server import point_client_at

        point_client_at(request.getfixturevalue("fake_hub"), monkeypatch,
                        str(tmp_path / "hub-cache"))
    args = [world.fill(a) for a in case.args]

    rows = _rows_of(adapterkit_cli, world.home)
    if case.small_disk:
        _fill(disk, case.room)
    before = snapshot(world.home), snapshot(work)
    if case.process:
        env = dict(os.environ, ADAPTERKIT_HOME=str(world.home), HF_HUB_OFFLINE="1",
                   PYTHONDONTWRITEBYTECODE="1", **world.env)
        outcome = _process(args, env, case.file_limit)
    else:
        if world.home != home:
            args = ["--home", str(world.home), *args]
        outcome = _in_process(adapterkit_cli, args)
    after = snapshot(world.home), snapshot(work)

    check(case, outcome)
    assert _diff(before[0], after[0]) == [], "the home changed"
    assert _diff(before[1], after[1]) == [], "files were written next to the inputs"
    if case.small_disk:
        for filler in ("filler", "filler-tail"):
            (disk / filler).unlink()
    assert _rows_of(adapterkit_cli, world.home) == rows, "the catalog changed"


# -- the same promises where the answer is not an error -----------------------------------------

def test_a_filter_matching_nothing_says_so(home, one_book_home, adapterkit_cli):  # 17.8
    shutil.copytree(one_book_home, home)
    result = adapterkit_cli("list", "--tag", "nosuch")
    assert result.exit_code == 0, result.output
    assert "No pocket books yet" not in result.output
    assert "nosuch" in result.output, result.output


@pytest.mark.parametrize("pattern", ["%", "_", "%%"])
def test_list_base_is_not_a_wildcard(home, one_book_home, adapterkit_cli, pattern):  # 17.8
    shutil.copytree(one_book_home, home)
    result = adapterkit_cli("list", "--base", pattern, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_one_malformed_metadata_file_does_not_empty_the_library(home, one_book_home,
                                                                adapterkit_cli, peft_adapter,
                                                                tiny_base):  # 17.1
    shutil.copytree(one_book_home, home)
    assert adapterkit_cli("import", peft_adapter, "--name", "good",
                          "--base", tiny_base).exit_code == 0
    (home / "library" / "pe" / "1" / METADATA_FILE).write_text("[]")
    for side in home.glob("catalog.sqlite*"):
        side.unlink()
    outs = [_in_process(adapterkit_cli, ["list", "--json", "--all-versions"]) for _ in (1, 2)]
    for out in outs:
        assert out.code == 0 and not out.traceback, out
        assert [b["name"] for b in json.loads(out.stdout)] == ["good"], out
    # the rebuild said which entry it skipped
    assert f"pe/1/{METADATA_FILE}" in outs[0].stderr, outs[0]

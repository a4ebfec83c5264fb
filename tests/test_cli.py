"""The CLI: each command end to end, one-line errors, and a start-up that never imports torch."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from adapterkit.cli import build_cli
from adapterkit.plugin_api.manager import get_plugin_manager


@pytest.fixture
def run(home):
    cli = build_cli(get_plugin_manager(env=False))

    def invoke(*args, ok=True):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def snapshot(home):
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if "tmp" not in p.parts and "catalog.sqlite" not in p.name)


def test_library_commands_end_to_end(run, home, tiny_base, peft_adapter, tmp_path):
    out = run("import", peft_adapter, "--name", "pe", "--base", tiny_base).output
    assert out.startswith("Imported pe@1 (base tiny, fingerprint ")
    run("import", peft_adapter, "--name", "pe@2", "--base", tiny_base)
    listing = run("list").output.splitlines()
    assert listing[0].split()[:3] == ["POCKET", "BOOK", "VERSIONS"]
    assert listing[1].split()[:3] == ["pe@2", "2", "tiny"]
    assert len(run("list", "--all-versions").output.splitlines()) == 3
    run("tag", "pe@1", "triage")
    data = json.loads(run("list", "--tag", "triage", "--all-versions", "--json").output)
    assert [(d["name"], d["version"], d["tags"]) for d in data] == [("pe", 1, ["triage"])]
    shown = json.loads(run("show", "pe@1", "--json").output)
    assert shown["base"]["provenance"] == {"kind": "folder", "folder": "tiny"}
    assert "fingerprint" in run("show", "pe").output
    run("export", "pe@1", tmp_path / "exp")
    assert (tmp_path / "exp" / "adapter_config.json").is_file()
    assert run("rm", "pe").output.strip() == "Removed pe@2"
    assert run("rm", "pe", "--all-versions").output.strip() == "Removed pe@1"
    assert json.loads(run("list", "--json").output) == []


def test_base_show(run, tiny_base):
    info = json.loads(run("base", "show", tiny_base, "--json").output)
    assert info["architecture"] == "LlamaForCausalLM" and len(info["fingerprint"]) == 32
    text = run("base", "show", tiny_base).output
    assert "LoRA targets:  down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text


def test_base_show_help_says_what_it_downloads_and_converts(run):
    """Before: "No weights are loaded", yet a Hub id is downloaded and a .gguf file is
    dequantised on first use."""
    text = " ".join(run("base", "show", "--help").output.split())
    assert "No weights are loaded" not in text
    assert "a Hub id is downloaded first" in text
    assert "a .gguf file or alias is dequantised to a safetensors folder on first use" in text


def test_plugins_command(run):
    data = json.loads(run("plugins", "--json").output)
    by_name = {p["name"]: p for p in data}
    assert by_name["qlora"]["registers"] == {"method": ["qlora"]}
    assert "method: lora" in run("plugins").output


def test_plugins_says_a_registration_hook_added_nothing(home):
    """A plugin whose every trainer was refused (a name another plugin holds) was listed as
    REGISTERS "register_trainers", as if it had added one. It says it added nothing, and its
    other hooks are listed beside what it registered."""
    from adapterkit import hookimpl

    class Shadow:
        @hookimpl
        def register_trainers(self, register):
            from adapterkit.plugin_api.registry import Trainer

            register(type("T", (Trainer,), {"name": "sft", "train": lambda self, job: None})())

        @hookimpl
        def register_scorers(self, register):
            from adapterkit.plugin_api.registry import Scorer

            register(type("S", (Scorer,), {"name": "shadow_score",
                                           "score": lambda self, prediction, reference: 1.0})())

        @hookimpl
        def pocket_book_saved(self, pocket_book):
            pass

    with pytest.warns(UserWarning, match="already"):
        pm = get_plugin_manager(env=False, plugins={"shadow": Shadow()})
    out = CliRunner().invoke(build_cli(pm), ["plugins"]).output
    [row] = [line for line in out.splitlines() if line.startswith("shadow ")]
    assert row.split(None, 2)[2] == ("scorer: shadow_score; nothing registered by "
                                     "register_trainers; hooks: pocket_book_saved"), row


@pytest.mark.parametrize("args,message", [
    (["show", "ghost"], "no pocket book named 'ghost'"),
    (["show", "../x"], "invalid pocket-book name '../x'"),
    (["rm", "ghost"], "no pocket book named 'ghost'"),
    (["tag", "a/b", "x"], "invalid pocket-book name 'a/b'"),
    (["import", "/nonexistent", "--name", "x", "--base", "x"], "is not a folder"),
    (["import", ".", "--name", "", "--base", "x"], "cannot be empty"),
    (["import", ".", "--name", "x" * 300, "--base", "x"], "use at most 100"),
    (["base", "show", "no-such-base"], "unknown base 'no-such-base'"),
    (["base", "show", "smollm2-13m"], "unknown base 'smollm2-13m'; did you mean smollm2-135m?"),
    (["base", "show", "/nope/m.gguf"], "does not exist"),
    (["export", "ghost", "out"], "no pocket book named 'ghost'"),
])
def test_bad_input_is_one_line_and_changes_nothing(run, home, args, message):
    before = snapshot(home) if home.exists() else []
    result = run(*args, ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert (snapshot(home) if home.exists() else []) == before


def test_refused_import_changes_nothing(run, home, tiny_base, other_base, tmp_path):
    from adapterkit.plugin_api.testing import make_peft_adapter

    run("import", make_peft_adapter(tiny_base, tmp_path / "ok"), "--name", "ok")
    before = snapshot(home)
    foreign = make_peft_adapter(other_base, tmp_path / "foreign")
    result = run("import", foreign, "--name", "foreign", "--base", tiny_base, ok=False)
    assert result.exit_code == 1 and "does not fit base" in result.output
    result = run("import", tmp_path / "ok", "--name", "ok", ok=False)
    assert "--name ok@2" in result.output
    assert snapshot(home) == before


@pytest.mark.parametrize("args", [["--help"], ["list"], ["show", "x"], ["plugins"],
                                  ["plugins", "--json"]])
def test_fast_commands_never_import_torch(args, home):
    code = (
        "import sys\n"
        "from adapterkit.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in out.stderr, out.stderr


def test_command_name_skips_root_options():
    from adapterkit.cli import _command_name

    assert _command_name(["--home", "/x", "uninstall", "pkg"]) == "uninstall"
    assert _command_name(["--home=/x", "install", "-e", "."]) == "install"
    assert _command_name(["--help"]) is None


def _own_commands(module):
    """Every click command a CLI module defines, with the subcommands of its groups."""
    import click

    found = [c for c in vars(module).values() if isinstance(c, click.Command)]
    for command in list(found):
        if isinstance(command, click.Group):
            found += list(command.commands.values())
    return found


def test_every_library_and_plugin_command_shows_examples():
    """As `train --help` and `eval --help` do: a user reads how to call it, not only what."""
    import click

    from adapterkit.cli import library as library_cli
    from adapterkit.cli import plugins as plugins_cli

    commands = _own_commands(library_cli) + _own_commands(plugins_cli)
    assert len(commands) >= 14
    missing = []
    for command in commands:
        ctx = click.Context(command, info_name=command.name)
        text = command.get_help(ctx)
        if "Examples:\n    adapterkit " not in text:  # \b keeps the lines as written
            missing.append(command.name)
    assert not missing, missing


def test_list_and_show_on_a_home_that_does_not_exist_write_nothing(run, tmp_path):
    """Before: a read-only command made the folders and an empty catalog.sqlite."""
    home = tmp_path / "nonexist" / "deep"
    listed = run("--home", home, "list")
    assert f"the adapterkit home {home} does not exist" in listed.output
    assert json.loads(run("--home", home, "list", "--json").output) == []
    shown = run("--home", home, "show", "x", ok=False)
    assert shown.exit_code == 1 and "no pocket book named 'x'" in shown.output
    assert not (tmp_path / "nonexist").exists()


def test_a_home_that_is_a_file_names_where_it_was_given(run, tmp_path):
    """Before: "Invalid value for '--home'" when no --home was typed."""
    afile = tmp_path / "homefile"
    afile.write_text("")
    cli = build_cli(get_plugin_manager(env=False))
    from_env = CliRunner().invoke(cli, ["list"], env={"ADAPTERKIT_HOME": str(afile)})
    assert from_env.exit_code == 1
    assert from_env.output.strip() == (
        f"Error: the adapterkit home {afile} (from $ADAPTERKIT_HOME) is a file, not a folder: "
        "set $ADAPTERKIT_HOME to the path of a folder")
    under = CliRunner().invoke(cli, ["list"], env={"ADAPTERKIT_HOME": str(afile / "sub")})
    assert under.exit_code == 1 and "(from $ADAPTERKIT_HOME) lies under" in under.output
    given = run("--home", afile / "sub", "list", ok=False)
    assert given.exit_code == 1 and "(from --home)" in given.output and "$ADAPTERKIT_HOME" not \
        in given.output and f"lies under {afile}, which is a file" in given.output


def test_ctrl_c_during_export_says_nothing_was_written(run, home, tiny_base, peft_adapter,
                                                        tmp_path, monkeypatch):
    """Before: click's bare "Aborted!" and exit 1; as train does: what is true, exit 130."""
    from adapterkit.library import store

    run("import", peft_adapter, "--name", "pe", "--base", tiny_base)
    copied, real_copy = [], shutil.copy2

    def interrupted(src, dst, *args, **kwargs):
        if copied:  # the second file: midway through the export
            raise KeyboardInterrupt
        copied.append(src)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "copy2", interrupted)
    dest = tmp_path / "out" / "pe"
    result = run("export", "pe", dest, ok=False)
    monkeypatch.setattr(store.shutil, "copy2", real_copy)
    assert result.exit_code == 130, result.output
    assert result.output.strip() == f"Interrupted: nothing was written to {dest}"
    assert copied and not dest.exists() and not list(dest.parent.glob(".pe.partial*"))

    # a DEST that was there (and not empty) before is no sign that this export wrote it
    dest.mkdir(parents=True)
    (dest / "mine.txt").write_text("the user's")

    def checking(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adapterkit.library.integrity.check_book", checking)
    result = run("export", "pe", dest, ok=False)
    assert result.exit_code == 130, result.output
    assert result.output.strip() == f"Interrupted: nothing was written to {dest}"

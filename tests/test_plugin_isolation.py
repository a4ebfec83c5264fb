"""Plugin isolation (issue #17, defect 9): a plugin that exits, or claims a command it does not
own, is contained with one warning naming it; the warning names what `adapterkit uninstall`
takes, and `uninstall` finds a plugin by any of its names without loading it."""

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import click
import pytest
from click.testing import CliRunner

from adapterkit import AdapterMethod, NameTaken, PluginError, hookimpl
from adapterkit.cli import build_cli
from adapterkit.plugin_api.manager import PluginWarning, get_plugin_manager, uninstall_name
from adapterkit.plugin_api.scaffold import plugin_name, scaffold
from tests.test_plugins import PLUGIN_SOURCE


class Method(AdapterMethod):
    def __init__(self, name):
        self.name = name


class Good:
    @hookimpl
    def register_methods(self, register):
        register(Method("good"))


def fake_distribution(site, name, entry_points):
    """An installed distribution as pip leaves it: metadata and entry points in ``site``, and
    its module wherever the test puts it (or nowhere: its files are gone)."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[adapterkit]\n" + "".join(f"{ep} = {target}\n" for ep, target in entry_points.items()))
    return site


# -- 1. sys.exit() and other BaseExceptions -----------------------------------------------------

EXITS = {
    "sys.exit()": "import sys\nsys.exit(3)\n",
    "SystemExit": "raise SystemExit('bye')\n",
    "BaseException subclass": "class Stop(BaseException):\n    pass\n\nraise Stop('halt')\n",
}


@pytest.mark.parametrize("source", EXITS.values(), ids=EXITS.keys())
def test_entry_point_plugin_exiting_at_import_is_skipped_with_a_warning(source, tmp_path,
                                                                         monkeypatch):
    site = fake_distribution(tmp_path, "adapterkit-quitter", {"quitter": "adapterkit_quitter"})
    (site / "adapterkit_quitter.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "adapterkit_quitter", raising=False)
    with pytest.warns(PluginWarning, match=r"plugin 'quitter' failed to import \((it called "
                                           r"sys.exit\(3\)|it called sys.exit\('bye'\)|Stop: "
                                           r"halt)\); it is skipped") as caught:
        pm = get_plugin_manager(env=False)
    assert len([w for w in caught if "quitter" in str(w.message)]) == 1
    assert "quitter" not in pm.info and {"lora", "qlora"} <= set(pm.methods.names())


@pytest.mark.parametrize("source", EXITS.values(), ids=EXITS.keys())
def test_env_plugin_exiting_at_import_is_skipped_with_a_warning(source, tmp_path, monkeypatch):
    (tmp_path / "quitter.py").write_text(source)
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", str(tmp_path / "quitter.py"))
    with pytest.warns(PluginWarning, match=r"plugin '.*quitter.py' from ADAPTERKIT_LOAD_PLUGINS "
                                           r"failed to load \((it called sys.exit|Stop: halt)"):
        pm = get_plugin_manager()
    assert "quitter" not in pm.info and "lora" in pm.methods


def test_hook_calling_sys_exit_warns_and_others_keep_working():
    class Quitter:
        @hookimpl
        def register_methods(self, register):
            sys.exit(2)

        @hookimpl
        def pocket_book_removed(self, name, version):
            raise SystemExit("gone")

    with pytest.warns(PluginWarning, match=r"plugin 'quitter' failed in hook register_methods: "
                                           r"it called sys.exit\(2\)"):
        pm = get_plugin_manager(entry_points=False, env=False,
                                plugins={"quitter": Quitter(), "good": Good()})
    assert pm.methods.names() == ["good"]
    with pytest.warns(PluginWarning, match=r"'quitter' failed in hook pocket_book_removed: "
                                           r"it called sys.exit\('gone'\)"):
        assert pm.call_each("pocket_book_removed", name="x", version=1) == [None]


def test_keyboard_interrupt_still_stops_adapterkit(tmp_path, monkeypatch):
    """Ctrl-C is the user's, not a plugin failure: it is never turned into a warning."""
    class Interrupted:
        @hookimpl
        def register_methods(self, register):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        get_plugin_manager(entry_points=False, env=False, plugins={"i": Interrupted()})
    (tmp_path / "slow.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", str(tmp_path / "slow.py"))
    with pytest.raises(KeyboardInterrupt):
        get_plugin_manager(entry_points=False)


def test_every_command_keeps_working_when_a_plugin_calls_sys_exit(tmp_path):
    """The user's view: an installed plugin that exits at import ends no command, and the one
    line on stderr names it and how to remove it."""
    site = fake_distribution(tmp_path / "site", "adapterkit-quitter",
                             {"quitter": "adapterkit_quitter"})
    (site / "adapterkit_quitter.py").write_text("import sys\nsys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(site), ADAPTERKIT_HOME=str(tmp_path / "home"))
    for command in (["list", "--json"], ["plugins", "--json"]):
        out = subprocess.run([sys.executable, "-m", "adapterkit", *command], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stderr == (
            "adapterkit: warning: plugin 'quitter' failed to import (it called sys.exit(3)); it "
            "is skipped. Fix it, uninstall it with `adapterkit uninstall adapterkit-quitter`, or "
            "disable it with ADAPTERKIT_DISABLE_PLUGINS=quitter\n")
    assert {p["name"] for p in json.loads(out.stdout)} >= {"lora", "qlora"}


# -- 2. commands a plugin does not own ---------------------------------------------------------

def _core(name):
    from adapterkit.cli import library, plugins

    return {"list": library.list_cmd, "rm": library.rm_cmd, "push": library.push_cmd,
            "uninstall": plugins.uninstall_cmd}[name]


@pytest.mark.parametrize("name", ["list", "rm", "push", "uninstall"])
def test_plugin_cannot_replace_a_core_command(name, tmp_path):
    class Hijack:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name=name)
            def hijacked():
                click.echo("hijacked")

            @cli.command()
            def extra():
                click.echo("extra")

    pm = get_plugin_manager(entry_points=False, env=False, plugins={"hijack": Hijack()})
    with pytest.warns(PluginWarning, match=rf"plugin 'hijack' defines its command name as "
                                           rf"`{name}` but that name is already used by adapterkit "
                                           rf"\(a core command\), which stays.*"
                                           rf"ADAPTERKIT_DISABLE_PLUGINS=hijack"):
        cli = build_cli(pm)
    assert cli.commands[name] is _core(name)
    assert CliRunner().invoke(cli, ["extra"]).output == "extra\n"  # its own command is kept
    if name == "list":
        out = CliRunner().invoke(cli, ["--home", str(tmp_path), "list", "--json"])
        assert out.exit_code == 0 and json.loads(out.output) == []


def test_plugin_cannot_replace_or_remove_core_commands_by_other_means():
    class Sneaky:
        @hookimpl
        def register_commands(self, cli):
            cli.add_command(click.Command("push", callback=lambda: None))
            cli.commands["rm"] = click.Command("rm", callback=lambda: None)
            del cli.commands["list"]

    pm = get_plugin_manager(entry_points=False, env=False, plugins={"sneaky": Sneaky()})
    with pytest.warns(PluginWarning) as caught:
        cli = build_cli(pm)
    messages = sorted(str(w.message).split(", which stays")[0] for w in caught)
    assert messages == [
        "plugin 'sneaky' defines its command name as `push` but that name is already used by "
        "adapterkit (a core command)",
        "plugin 'sneaky' defines its command name as `rm` but that name is already used by "
        "adapterkit (a core command)",
        "plugin 'sneaky' removed the command `list` of adapterkit (a core command)",
    ]
    assert [cli.commands[n] for n in ("list", "rm", "push")] == [_core(n) for n in
                                                                 ("list", "rm", "push")]


def test_plugin_cannot_replace_another_plugins_command():
    def plugin(says):
        class P:
            @hookimpl
            def register_commands(self, cli):
                @cli.command()
                def hello():
                    click.echo(says)

        return P()

    pm = get_plugin_manager(entry_points=False, env=False,
                            plugins={"first": plugin("first"), "second": plugin("second")})
    with pytest.warns(PluginWarning, match="plugin 'second' defines its command name as `hello` "
                                           "but that name is already used by plugin 'first', "
                                           "which stays"):
        cli = build_cli(pm)
    assert CliRunner().invoke(cli, ["hello"]).output == "first\n"


# -- 3. the names a user is given and can type -------------------------------------------------

@pytest.mark.parametrize("given", ["x", "adapterkit-x", "adapterkit_x"])
def test_scaffold_never_doubles_the_prefix(given, tmp_path):
    root = scaffold(given, "scorer", tmp_path)
    assert root == tmp_path / "adapterkit-x"
    pyproject = (root / "pyproject.toml").read_text()
    assert 'name = "adapterkit-x"\n' in pyproject
    assert '[project.entry-points.adapterkit]\nx = "adapterkit_x"\n' in pyproject
    assert (root / "adapterkit_x.py").is_file()


def test_plugin_new_cli_never_doubles_the_prefix(tmp_path):
    pm = get_plugin_manager(entry_points=False, env=False)
    out = CliRunner().invoke(build_cli(pm), ["plugin", "new", "adapterkit-x", "--dir",
                                             str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert [p.name for p in tmp_path.iterdir()] == ["adapterkit-x"]


def test_import_failure_warning_names_what_uninstall_takes(tmp_path, monkeypatch):
    """The reported case: `plugin new adapterkit-x` from before the fix (package
    adapterkit-adapterkit-x, plugin adapterkit-x), installed editable, folder deleted."""
    site = fake_distribution(tmp_path, "adapterkit-adapterkit-x",
                             {"adapterkit-x": "adapterkit_adapterkit_x"})
    monkeypatch.syspath_prepend(str(site))  # metadata only: the module is gone
    with pytest.warns(PluginWarning, match=r"plugin 'adapterkit-x' failed to import "
                                           r"\(ModuleNotFoundError.*\); it is skipped. Fix it, "
                                           r"uninstall it with `adapterkit uninstall "
                                           r"adapterkit-adapterkit-x`") as caught:
        get_plugin_manager(env=False)
    named = str(caught[0].message).split("`adapterkit uninstall ")[1].split("`")[0]
    assert uninstall_name(named) == "adapterkit-adapterkit-x"
    assert uninstall_name("adapterkit-x") == "adapterkit-adapterkit-x"  # the plugin's name too


def test_uninstall_name_accepts_plugin_and_package_names(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "adapterkit-shout", {"shout": "adapterkit_shout"})
    fake_distribution(tmp_path, "adapterkit-loud", {"noisy": "adapterkit_loud"})
    monkeypatch.syspath_prepend(str(tmp_path))
    for typed in ("shout", "adapterkit-shout", "Adapterkit_Shout"):
        assert uninstall_name(typed) == "adapterkit-shout", typed
    assert uninstall_name("noisy") == "adapterkit-loud"  # entry-point name
    assert uninstall_name("loud") == "adapterkit-loud"  # package name without the prefix
    assert uninstall_name("click") == "click"  # any other installed package, as install takes
    with pytest.raises(PluginError, match="'lora' is part of adapterkit itself"):
        uninstall_name("lora")
    with pytest.raises(PluginError, match=r"no installed adapterkit plugin or package is called "
                                          r"'nope-xyz'; installed plugins: .*adapterkit-shout "
                                          r"\(plugin shout\)"):
        uninstall_name("nope-xyz")


def test_uninstall_command_passes_pip_the_package_name(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "adapterkit-shout", {"shout": "adapterkit_shout"})
    monkeypatch.syspath_prepend(str(tmp_path))
    ran = []
    monkeypatch.setattr("adapterkit.cli.plugins._pip", ran.append)
    cli = build_cli(get_plugin_manager(entry_points=False, env=False))
    out = CliRunner().invoke(cli, ["uninstall", "shout", "adapterkit-shout"])
    assert out.exit_code == 0, out.output
    assert ran == [["uninstall", "-y", "adapterkit-shout"]]
    out = CliRunner().invoke(cli, ["uninstall", "nope-xyz"])
    assert out.exit_code == 1 and ran == [["uninstall", "-y", "adapterkit-shout"]]
    assert textwrap.dedent(out.output).startswith("Error: no installed adapterkit plugin")


# -- 4. one name, one plugin ----------------------------------------------------------------

def test_two_distributions_with_one_plugin_name_warn_naming_both(tmp_path, monkeypatch):
    """Before: the second plugin of a name was dropped without a word."""
    for dist, module in (("adapterkit-twin-a", "adapterkit_twin_a"),
                         ("adapterkit-twin-b", "adapterkit_twin_b")):
        fake_distribution(tmp_path, dist, {"twin": module})
        (tmp_path / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=module))
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match=r"the plugin of adapterkit-twin-[ab] defines its name "
                                           r"as 'twin' but that name is already used by the "
                                           r"plugin of adapterkit-twin-[ab], which stays") as caught:
        pm = get_plugin_manager(env=False)
    [warning] = [str(w.message) for w in caught if "twin" in str(w.message)]
    skipped, kept = re.search(r"the plugin of (\S+) defines .* the plugin of (\S+), which "
                              r"stays", warning).groups()
    assert {skipped, kept} == {"adapterkit-twin-a", "adapterkit-twin-b"}
    assert "`adapterkit uninstall adapterkit-twin-a` or `adapterkit uninstall " \
           "adapterkit-twin-b`" in warning or "`adapterkit uninstall adapterkit-twin-b` or " \
           "`adapterkit uninstall adapterkit-twin-a`" in warning
    kept_method = kept.replace("-", "_")
    assert kept_method in pm.methods.names()
    assert skipped.replace("-", "_") not in pm.methods.names()


def test_a_plugin_named_like_a_builtin_is_named_and_never_advises_uninstalling_adapterkit(
        tmp_path, monkeypatch):
    fake_distribution(tmp_path, "adapterkit-mysft", {"sft": "adapterkit_mysft"})
    (tmp_path / "adapterkit_mysft.py").write_text(PLUGIN_SOURCE.format(name="mysft"))
    monkeypatch.delitem(sys.modules, "adapterkit_mysft", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match="name as 'sft'") as caught:
        get_plugin_manager(env=False)
    [warning] = [str(w.message) for w in caught if "'sft'" in str(w.message)]
    assert "adapterkit-mysft" in warning and "the plugin of adapterkit" in warning
    assert "`adapterkit uninstall adapterkit-mysft`" in warning
    assert "uninstall adapterkit`" not in warning


@pytest.mark.parametrize("given,owner", [("sft", "adapterkit itself"),
                                         ("adapterkit-lora", "adapterkit itself"),
                                         ("shout", "the installed package adapterkit-shout"),
                                         ("adapterkit_shout", "adapterkit-shout")])
def test_scaffold_refuses_a_name_an_installed_plugin_has(given, owner, tmp_path, monkeypatch):
    """Before: `plugin new sft` wrote a plugin that every load would skip."""
    site = tmp_path / "site"
    fake_distribution(site, "adapterkit-shout", {"shout": "adapterkit_shout"})
    monkeypatch.syspath_prepend(str(site))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(NameTaken, match=f"plugin name '{plugin_name(given)}' is already used by "
                                        f".*{owner}.*; choose another name"):
        scaffold(given, "trainer", work)
    assert list(work.iterdir()) == []
    out = CliRunner().invoke(build_cli(get_plugin_manager(entry_points=False, env=False)),
                             ["plugin", "new", given, "--dir", str(work)])
    assert out.exit_code == 1 and out.output.startswith("Error: plugin name")
    assert len(out.output.strip().splitlines()) == 1 and list(work.iterdir()) == []


@pytest.mark.parametrize("name,kind,owner", [("exact_match", "scorer", "scorers"),
                                             ("reward", "trainer", "rlhf"),
                                             ("linear", "merge", "merges")])
def test_scaffold_refuses_the_name_of_an_item_a_plugin_registers(name, kind, owner, tmp_path):
    """`plugin new exact_match` (a scorer) wrote a package whose own test failed: the scorer
    ``exact_match`` is the built-in one's, and a second is refused at every load."""
    with pytest.raises(NameTaken, match=rf"^the {kind} name '{name}' is already registered by "
                                        rf"the plugin '{owner}'.*choose another name"):
        scaffold(name, kind, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert scaffold(name, "command", tmp_path).name == f"adapterkit-{name}"  # a command may


def _shout_module(tmp_path, monkeypatch):
    """An installed plugin ``shout`` (distribution adapterkit-shout, module adapterkit_shout),
    imported as its tests import it."""
    import importlib.util

    fake_distribution(tmp_path, "adapterkit-shout", {"shout": "adapterkit_shout"})
    path = tmp_path / "adapterkit_shout.py"
    path.write_text(PLUGIN_SOURCE.format(name="shout"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("adapterkit_shout", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "adapterkit_shout", module)  # removed after the test
    spec.loader.exec_module(module)
    return module


def test_plugin_manager_fixture_registers_an_installed_plugin_once_by_its_name(
        tmp_path, monkeypatch, adapterkit_plugin_manager):
    """Before: the fixture registered the module under its module name, then its entry point
    loaded the same module: a PluginWarning on every test, and `plugins` listed
    ``adapterkit_shout``."""
    module = _shout_module(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        pm = adapterkit_plugin_manager(module)
    assert "shout" in pm.info and "adapterkit_shout" not in pm.info
    assert pm.methods.names().count("shout") == 1


def test_an_entry_point_whose_module_is_registered_already_is_not_loaded_again(tmp_path,
                                                                              monkeypatch):
    module = _shout_module(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        pm = get_plugin_manager(env=False, plugins={"mine": module})
    assert "mine" in pm.info and "shout" not in pm.info
    assert pm.methods.names().count("shout") == 1


def test_a_plugin_under_test_that_reuses_a_builtin_name_loses_it_as_it_will_for_users(
        adapterkit_plugin_manager, tmp_path, monkeypatch):
    """The fixture registers the plugin under test after the installed ones, as the command
    line does with an installed or ``ADAPTERKIT_LOAD_PLUGINS`` plugin: a trainer it names
    ``sft`` is refused in its tests too, not only once users install it."""
    from adapterkit import Trainer

    class Mine(Trainer):
        name = "sft"
        data_shapes = ("text",)

    class Dup:
        @hookimpl
        def register_trainers(self, register):
            register(Mine())

    with pytest.raises(PluginError, match="not registered as written: plugin 'Dup' defines its "
                                          "trainer name as `sft` but that name is already used "
                                          "by 'sft'"):
        adapterkit_plugin_manager(Dup())  # strict: the plugin's own test fails
    with pytest.warns(PluginWarning, match="name as `sft` but that name is already used by 'sft'"):
        pm = adapterkit_plugin_manager(Dup(), strict=False)
    assert pm.trainers.entries["sft"].plugin == "sft"  # the built-in
    (tmp_path / "dup.py").write_text(textwrap.dedent('''
        from adapterkit import Trainer, hookimpl

        class Mine(Trainer):
            name = "sft"
            data_shapes = ("text",)

        @hookimpl
        def register_trainers(register):
            register(Mine())
    '''), encoding="utf-8")
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", str(tmp_path / "dup.py"))
    with pytest.warns(PluginWarning, match="already used by 'sft'"):
        assert get_plugin_manager().trainers.entries["sft"].plugin == "sft"  # the same for users


def test_a_hook_without_its_marker_is_named_rather_than_silently_never_called():
    class Forgot:
        def register_trainers(self, register):  # no @hookimpl
            raise AssertionError("pluggy never calls it")

    with pytest.warns(PluginWarning, match="plugin 'forgot' defines register_trainers without "
                                           "@hookimpl, so adapterkit never calls it"):
        get_plugin_manager(entry_points=False, env=False, plugins={"forgot": Forgot()})


def test_a_plugin_that_imports_torch_when_it_loads_is_named(tmp_path):
    """Start-up stays fast only while plugins import heavy libraries inside their methods;
    one that does not is named (run in a fresh process: this one has torch already)."""
    (tmp_path / "heavy.py").write_text("import time\ntime.sleep(0.5)\n"
                                       "import torch  # at module level: every command pays\n",
                                       encoding="utf-8")
    (tmp_path / "light.py").write_text("from adapterkit import hookimpl\n", encoding="utf-8")
    env = {**os.environ, "ADAPTERKIT_LOAD_PLUGINS": f"{tmp_path / 'light.py'}"}
    out = subprocess.run([sys.executable, "-m", "adapterkit", "plugins"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "imports" not in out.stderr, out.stderr
    env["ADAPTERKIT_LOAD_PLUGINS"] = f"{tmp_path / 'heavy.py'}"
    out = subprocess.run([sys.executable, "-m", "adapterkit", "plugins"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # the time is this load's, measured (it said "about a second" where it took 22 s)
    took = re.search(r"plugin 'heavy' imports torch when it loads, which took ([\d.e+-]+) s "
                     r"here and is paid by every adapterkit command", out.stderr)
    assert took and float(took.group(1)) >= 0.5, out.stderr  # its sleep, at least
    assert "ADAPTERKIT_DISABLE_PLUGINS=heavy skips it" in out.stderr


def test_a_disabled_name_no_plugin_has_is_named(monkeypatch):
    """A typo in ``ADAPTERKIT_DISABLE_PLUGINS`` left the plugin it meant loaded without a
    word: the unknown name is warned about, with the names it could be."""
    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGINS", "lora,sftt")
    with pytest.warns(PluginWarning, match=r"ADAPTERKIT_DISABLE_PLUGINS names 'sftt', but no "
                                           r"plugin is called that, so it disabled nothing; "
                                           r"plugins: .*\bdpo\b.*\bsft\b"):
        pm = get_plugin_manager()
    assert "lora" not in pm.methods and "sft" in pm.trainers
    with warnings.catch_warnings():  # no false alarm: `*`, a plugin given in code, or a
        # manager that loads no entry points (it cannot tell which names exist)
        warnings.simplefilter("error", PluginWarning)
        monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGINS", "*,lora,mine")
        get_plugin_manager(plugins={"mine": object()})
        monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGINS", "sftt")
        get_plugin_manager(entry_points=False)


def test_loading_an_installed_plugins_module_again_by_name_is_quiet(monkeypatch):
    """A plugin under development is often installed with ``pip install -e`` and named in
    ``ADAPTERKIT_LOAD_PLUGINS`` too: the same module, loaded once, without a warning (it was a
    pluggy error dumping every plugin module)."""
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", "adapterkit_plugins.sft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        pm = get_plugin_manager()
    assert pm.trainers.entries["sft"].plugin == "sft"


def test_a_second_plugin_of_a_name_loaded_by_path_is_one_short_warning(tmp_path, monkeypatch):
    """A development copy loaded through ADAPTERKIT_LOAD_PLUGINS beside a plugin of the same
    name: pluggy's error listed the repr of every loaded module on one line, and did not say
    which copy is used."""
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "twice.py").write_text(PLUGIN_SOURCE.format(name=f"m_{folder}"))
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS",
                       f"{tmp_path / 'one' / 'twice.py'},{tmp_path / 'two' / 'twice.py'}")
    with pytest.warns(PluginWarning) as caught:
        pm = get_plugin_manager()
    [said] = [str(w.message) for w in caught if "twice" in str(w.message)]
    assert re.search(r"plugin 'twice' from ADAPTERKIT_LOAD_PLUGINS: \S+two/twice\.py was not "
                     r"loaded: a plugin of that name is loaded already \(from "
                     r"ADAPTERKIT_LOAD_PLUGINS: \S+one/twice\.py\), and that one is used", said)
    assert "<module" not in said and len(said) < 400
    assert "m_one" in pm.methods.names() and "m_two" not in pm.methods.names()

"""Every hook is documented (with its exact signature) and has a test_hook_<name> here;
plugin scaffolds install and pass their own tests; broken plugins can be uninstalled."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from adapterkit import hookimpl
from adapterkit.plugin_api import hookspecs
from adapterkit.plugin_api.manager import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "adapterkit_spec"))


def test_every_hook_is_in_the_guide_with_its_signature():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"### {name}\n" in guide, name
        assert f"`{name}({params})`" in guide, f"{name}({params}) not documented"
    documented = set(re.findall(r"^### (\w+)$", guide, flags=re.M))
    assert documented == set(HOOKS), documented ^ set(HOOKS)


def test_every_hook_has_a_test():
    tests = {n for n in globals() if n.startswith("test_hook_")}
    assert tests == {f"test_hook_{n}" for n in HOOKS}


def test_every_hookspec_has_a_docstring_with_params_and_version():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and "versionadded" in doc, name


def pm_with(plugin):
    return get_plugin_manager(entry_points=False, env=False, plugins={"p": plugin})


def test_hook_register_methods():
    from adapterkit import AdapterMethod

    class P:
        @hookimpl
        def register_methods(self, register):
            m = AdapterMethod()
            m.name = "m"
            register(m)

    assert pm_with(P()).method("m").name == "m"


def test_hook_register_trainers():
    from adapterkit import Trainer

    class P:
        @hookimpl
        def register_trainers(self, register):
            t = Trainer()
            t.name = "t"
            register(t)

    assert pm_with(P()).trainer("t").name == "t"


def test_hook_register_merge_strategies():
    from adapterkit import MergeStrategy

    class P:
        @hookimpl
        def register_merge_strategies(self, register):
            m = MergeStrategy()
            m.name = "avg"
            register(m)

    assert pm_with(P()).merge_strategies.names() == ["avg"]


def test_hook_register_data_formats(tmp_path):
    from adapterkit import DataFormat, load_data

    class QA(DataFormat):
        name = "qa"
        columns = ("q", "a")
        shape = "prompt_completion"

        def convert(self, row):
            return {"prompt": row["q"], "completion": row["a"]}

    class P:
        @hookimpl
        def register_data_formats(self, register):
            register(QA())

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    data = load_data(str(path), formats=pm_with(P()).data_formats)
    assert data.rows == [{"prompt": "1+1?", "completion": "2"}] and data.format == "qa"


def test_hook_register_scorers():
    from adapterkit import Scorer

    class Always(Scorer):
        name = "always"

        def score(self, prediction, reference):
            return 1.0

    class P:
        @hookimpl
        def register_scorers(self, register):
            register(Always())

    assert pm_with(P()).scorers.get("always").score("x", "y") == 1.0


def test_hook_register_commands(home):
    from click.testing import CliRunner

    from adapterkit.cli import build_cli

    class P:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            def hello():
                click.echo("hi from a plugin")

    out = CliRunner().invoke(build_cli(pm_with(P())), ["hello"])
    assert out.exit_code == 0 and out.output == "hi from a plugin\n"


def _save(library, name):
    from adapterkit import PocketBookMeta

    with library.stage() as staged:
        (staged / "adapter_config.json").write_text("{}")
        (staged / "adapter_model.safetensors").write_bytes(b"x")
        return library.commit(staged, PocketBookMeta(name=name, version=1))


def test_hook_pocket_book_saved(library):
    seen = []

    class P:
        @hookimpl
        def pocket_book_saved(self, pocket_book):
            seen.append((pocket_book.ref, pocket_book.path.is_dir()))

    library.plugins = pm_with(P())
    _save(library, "x")
    assert seen == [("x@1", True)]


def test_hook_pocket_book_removed(library):
    seen = []

    class P:
        @hookimpl
        def pocket_book_removed(self, name, version):
            seen.append((name, version))

    library.plugins = pm_with(P())
    _save(library, "x")
    library.remove("x", all_versions=True)
    assert seen == [("x", 1)]


# -- scaffold, install, uninstall ---------------------------------------------------------------

def adapterkit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "adapterkit", *map(str, args)],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("kind", ["method", "trainer", "merge", "data", "scorer", "command"])
def test_scaffold_tests_pass(kind, tmp_path):
    from adapterkit.plugin_api.scaffold import scaffold

    root = scaffold(f"demo-{kind}", kind, tmp_path)
    assert (root / "pyproject.toml").read_text().count("[project.entry-points.adapterkit]") == 1
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(root / "tests")], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-2000:]


def test_scaffold_refuses_bad_names_and_existing_folders(tmp_path):
    from adapterkit import InvalidName, NameTaken
    from adapterkit.plugin_api.scaffold import scaffold

    with pytest.raises(InvalidName):
        scaffold("Bad Name", "scorer", tmp_path)
    with pytest.raises(InvalidName, match="unknown plugin kind"):
        scaffold("ok", "nope", tmp_path)
    scaffold("ok", "scorer", tmp_path)
    with pytest.raises(NameTaken):
        scaffold("ok", "scorer", tmp_path)


@pytest.mark.slow
def test_new_install_list_use_and_uninstall_even_when_broken(tmp_path):
    """The user path: scaffold, install, see it listed, use it, break it, uninstall it."""
    out = adapterkit("plugin", "new", "akdemo", "--kind", "command", "--dir", tmp_path)
    assert out.returncode == 0, out.stderr
    root = tmp_path / "adapterkit-akdemo"
    try:
        assert adapterkit("install", "-e", root).returncode == 0
        listed = json.loads(adapterkit("plugins", "--json").stdout)
        assert any(p["name"] == "akdemo" and p["version"] == "0.1.0" for p in listed)
        assert adapterkit("akdemo", "you").stdout == "Hello, you!\n"
        # now break it: every command still works, with one warning naming it
        (root / "adapterkit_akdemo.py").write_text("raise RuntimeError('broken on purpose')\n")
        out = adapterkit("list")
        assert out.returncode == 0 and "plugin 'akdemo' failed to import" in out.stderr
    finally:
        out = adapterkit("uninstall", "adapterkit-akdemo")
    assert out.returncode == 0, out.stderr
    assert "failed to import" not in out.stderr  # uninstall never loaded it
    assert not any(p["name"] == "akdemo" for p in json.loads(adapterkit("plugins", "--json").stdout))


def test_worked_example_is_installed():
    listed = {p["name"]: p for p in json.loads(adapterkit("plugins", "--json").stdout)}
    assert listed["breadcrumbs"]["source"] == "entry point adapterkit_breadcrumbs"

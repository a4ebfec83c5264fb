"""Plugin loading, registration and fault isolation."""

import json
import textwrap
from importlib.metadata import EntryPoint

import pytest

import adapterkit
from adapterkit import AdapterMethod, Trainer, hookimpl
from adapterkit.plugin_api.manager import PluginWarning, get_plugin_manager


class Method(AdapterMethod):
    def __init__(self, name):
        self.name = name

    def peft_config(self, **_):
        raise AssertionError("not built in these tests")


class Toy(Trainer):
    data_shapes = ("text",)

    def __init__(self, name):
        self.name = name

    def train(self, *, job, **_):
        raise AssertionError("not trained in these tests")


def test_builtin_plugins_load_through_entry_points():
    pm = get_plugin_manager(env=False)
    assert {"lora", "qlora"} <= set(pm.methods.names())
    assert pm.info["lora"].source.startswith("entry point adapterkit_plugins.lora")
    assert pm.info["lora"].version == adapterkit.__version__
    assert pm.method("qlora").quantization == "4bit"


def test_inline_plugin_registers_each_kind():
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Method("dora-ish"))

        @hookimpl
        def register_trainers(self, register):
            register(Toy("toy"))

    pm = get_plugin_manager(entry_points=False, env=False, plugins={"mine": Plugin()})
    assert pm.methods.names() == ["dora-ish"]
    assert pm.trainer("toy").name == "toy"
    assert pm.info["mine"].registers == {"method": ["dora-ish"], "trainer": ["toy"]}


def test_unknown_name_lists_the_known_ones():
    pm = get_plugin_manager(env=False)
    with pytest.raises(adapterkit.PluginError, match="unknown method 'nope'; known: lora, qlora"):
        pm.method("nope")


def test_raising_hook_warns_and_others_keep_working():
    class Broken:
        @hookimpl
        def register_methods(self, register):
            raise RuntimeError("boom")

    class Good:
        @hookimpl
        def register_methods(self, register):
            register(Method("good"))

    with pytest.warns(PluginWarning, match="plugin 'broken' failed in hook register_methods: "
                                           "RuntimeError: boom"):
        pm = get_plugin_manager(entry_points=False, env=False,
                                plugins={"broken": Broken(), "good": Good()})
    assert pm.methods.names() == ["good"]


def test_duplicate_name_says_who_owns_it():
    class A:
        @hookimpl
        def register_methods(self, register):
            register(Method("same"))

    class B(A):
        pass

    with pytest.warns(PluginWarning, match="plugin 'b' defines its method name as `same` but "
                                           "that name is already used by 'a'"):
        pm = get_plugin_manager(entry_points=False, env=False, plugins={"a": A(), "b": B()})
    assert pm.methods.entries["same"].plugin == "a"


def test_wrong_type_is_refused_with_a_warning():
    class Wrong:
        @hookimpl
        def register_methods(self, register):
            register("lora")

    with pytest.warns(PluginWarning, match="is not an adapterkit.AdapterMethod"):
        pm = get_plugin_manager(entry_points=False, env=False, plugins={"wrong": Wrong()})
    assert pm.methods.names() == []


def test_unknown_hook_skips_the_plugin():
    class Typo:
        @hookimpl
        def register_method(self, register):  # missing "s"
            pass

    with pytest.warns(PluginWarning, match="unknown hook.*register_method"):
        pm = get_plugin_manager(entry_points=False, env=False, plugins={"typo": Typo()})
    assert "typo" not in pm.info


def test_incompatible_hook_version_is_skipped():
    class Future:
        ADAPTERKIT_HOOK_VERSION = 99

        @hookimpl
        def register_methods(self, register):
            register(Method("future"))

    with pytest.warns(PluginWarning, match="hook version 99"):
        pm = get_plugin_manager(entry_points=False, env=False, plugins={"future": Future()})
    assert pm.methods.names() == []


def test_plugin_that_fails_to_import_warns(monkeypatch):
    import adapterkit.plugin_api.manager as plugins_mod

    eps = [EntryPoint("explodes", "no_such_module_xyz", "adapterkit")]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: eps)
    with pytest.warns(PluginWarning, match="plugin 'explodes' failed to import.*"
                                           "ADAPTERKIT_DISABLE_PLUGINS=explodes"):
        pm = plugins_mod.get_plugin_manager(env=False)
    assert pm.info == {}


PLUGIN_SOURCE = textwrap.dedent('''
    from adapterkit import AdapterMethod, hookimpl

    class M(AdapterMethod):
        name = "{name}"

    @hookimpl
    def register_methods(register):
        register(M())
''')


def test_env_loads_files_and_folders_and_disable_blocks(tmp_path, monkeypatch):
    (tmp_path / "one.py").write_text(PLUGIN_SOURCE.format(name="from-file"))
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "two.py").write_text(PLUGIN_SOURCE.format(name="from-folder"))
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", f"{tmp_path / 'one.py'},{folder}")
    pm = get_plugin_manager()
    assert {"from-file", "from-folder", "lora"} <= set(pm.methods.names())
    assert pm.info["one"].source.startswith("ADAPTERKIT_LOAD_PLUGINS")

    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGINS", "lora,two")
    pm = get_plugin_manager()
    assert "lora" not in pm.methods and "from-folder" not in pm.methods
    assert "from-file" in pm.methods and "qlora" in pm.methods


def test_env_plugin_with_syntax_error_warns(tmp_path, monkeypatch):
    (tmp_path / "bad.py").write_text("def broken(:\n")
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", str(tmp_path / "bad.py"))
    with pytest.warns(PluginWarning, match="failed to load.*SyntaxError"):
        pm = get_plugin_manager()
    assert "lora" in pm.methods


def test_broken_plugin_never_stops_the_cli(tmp_path, monkeypatch):
    (tmp_path / "bad.py").write_text("raise ImportError('I am broken')")
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", str(tmp_path / "bad.py"))
    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "adapterkit", "plugins", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert "adapterkit: warning: plugin" in out.stderr and "I am broken" in out.stderr
    assert {p["name"] for p in json.loads(out.stdout)} >= {"lora", "qlora"}


def test_lifecycle_hook_failure_does_not_undo_a_save(library, tmp_path):
    from adapterkit import PocketBookMeta

    seen = []

    class Watcher:
        @hookimpl
        def pocket_book_saved(self, pocket_book):
            seen.append(pocket_book.ref)

    class Crasher:
        @hookimpl
        def pocket_book_saved(self, pocket_book):
            raise ValueError("nope")

    pm = get_plugin_manager(entry_points=False, env=False,
                            plugins={"watcher": Watcher(), "crasher": Crasher()})
    library.plugins = pm
    with library.draft() as staged:
        (staged / "adapter_config.json").write_text("{}")
        (staged / "adapter_model.safetensors").write_bytes(b"x")
        with pytest.warns(PluginWarning, match="'crasher' failed in hook pocket_book_saved"):
            library.commit(staged, PocketBookMeta(name="x", version=1))
    assert seen == ["x@1"] and library.exists("x@1")

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


def pm_with_builtins(plugin):
    """The built-in plugins plus ``plugin``: a registered item used alongside the others."""
    return get_plugin_manager(entry_points=True, env=False, plugins={"p": plugin})


def _rows_file(tmp_path, shape):
    from adapterkit.pytest_plugin import TINY_ROWS

    path = tmp_path / f"{shape}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS[shape]))
    return path


def test_hook_register_methods(tiny_base, home, tmp_path):
    """A registered method builds the pocket book train() saves, and prepares the base."""
    from adapterkit import AdapterMethod, Library, TrainOptions, train

    prepared = []

    class RsLoRA(AdapterMethod):
        name = "rs-q"

        def peft_config(self, *, target_modules, r=16, alpha=32, dropout=0.05, **options):
            from peft import LoraConfig

            # its own choices, visible in what is saved: rsLoRA, on q_proj only
            return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                              target_modules=["q_proj"], use_rslora=True, task_type="CAUSAL_LM")

        def prepare_base(self, model, *, gradient_checkpointing=False):
            prepared.append(type(model).__name__)
            return model

    class P:
        @hookimpl
        def register_methods(self, register):
            register(RsLoRA())

    result = train("sft", base=str(tiny_base), data=str(_rows_file(tmp_path, "text")),
                   name="rs", home=home, plugins=pm_with_builtins(P()),
                   options=TrainOptions(method="rs-q", max_steps=1, batch_size=4, r=4, alpha=8))
    assert prepared == ["LlamaForCausalLM"]
    book = Library(home).get("rs")
    assert book.meta.method == "rs-q"
    config = json.loads((book.path / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["target_modules"] == ["q_proj"]
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    from safetensors import safe_open

    with safe_open(str(book.path / "adapter_model.safetensors"), "pt") as fh:
        modules = {k.split(".")[-3] for k in fh.keys()}
    assert modules == {"q_proj"}
    assert result.pocket_book.ref == "rs@1"


def test_hook_register_trainers(tiny_base, home, tmp_path):
    """train() runs a registered trainer on the job it builds, and saves what it trained."""
    import types

    import torch

    from adapterkit import Library, Trainer, TrainOptions, train

    seen = {}

    class Nudge(Trainer):
        name = "nudge"
        data_shapes = ("text",)

        def train(self, *, job, **_):
            seen["rows"] = len(job.data.rows)
            model = job.model
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            seen["trainable"] = bool(trainable) and all("lora_" in n for n in trainable)
            with torch.no_grad():  # "training": every B set to a value we can look for
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.fill_(0.25)
            return types.SimpleNamespace(global_step=1, log_history=[{"loss": 2.0, "step": 1}])

    class P:
        @hookimpl
        def register_trainers(self, register):
            register(Nudge())

    pm = pm_with_builtins(P())
    result = train("nudge", base=str(tiny_base), data=str(_rows_file(tmp_path, "text")),
                   name="nudged", home=home, plugins=pm,
                   options=TrainOptions(r=4, alpha=8, target_modules="q_proj,v_proj"))
    assert seen == {"rows": 16, "trainable": True}
    book = Library(home).get("nudged")
    assert book.meta.trainer == "nudge" and result.metrics["steps"] == 1
    from safetensors.torch import load_file

    saved = load_file(str(book.path / "adapter_model.safetensors"))
    b_keys = [k for k in saved if "lora_B" in k]
    assert len(b_keys) == 4 and all(torch.all(saved[k] == 0.25) for k in b_keys)
    # its data_shapes are honoured: other data is refused before it runs
    from adapterkit import DataFormatError

    with pytest.raises(DataFormatError):
        train("nudge", base=str(tiny_base), data=str(_rows_file(tmp_path, "preference")),
              name="refused", home=home, plugins=pm, options=TrainOptions(r=4))
    assert "rows" in seen and not Library(home).exists("refused")


def test_hook_register_merge_strategies(library, tiny_base, peft_adapter, tmp_path):
    """merge() hands the members to a registered strategy and saves what it returns."""
    import torch
    from safetensors.torch import load_file

    from adapterkit import MergeOutput, MergeStrategy
    from adapterkit.lora.combine import merge
    from adapterkit.plugin_api.testing import make_peft_adapter

    calls = []

    class ScaleFirst(MergeStrategy):
        name = "scale-first"
        allows_negative = False

        def merge(self, *, adapters, weights, **_):
            calls.append(([a.ref for a in adapters], list(weights)))
            tensors = {k: v * weights[0] if "lora_B" in k else v
                       for k, v in adapters[0].tensors().items()}
            return MergeOutput(dict(adapters[0].config), tensors)

    class P:
        @hookimpl
        def register_merge_strategies(self, register):
            register(ScaleFirst())

    other = make_peft_adapter(tiny_base, tmp_path / "other", seed=7)
    library.import_peft(peft_adapter, "one", base=str(tiny_base))
    library.import_peft(other, "two", base=str(tiny_base))
    pm = pm_with(P())
    book = merge(library, ["one", "two"], [0.5, 1.0], method="scale-first", name="m", plugins=pm)
    assert calls == [(["one@1", "two@1"], [0.5, 1.0])]
    assert book.meta.source == {"kind": "merge", "method": "scale-first"}
    assert book.meta.parents == ["one@1", "two@1"]
    raw = load_file(str(peft_adapter / "adapter_model.safetensors"))
    saved = load_file(str(book.path / "adapter_model.safetensors"))
    assert saved.keys() == raw.keys() and any("lora_B" in k for k in raw)
    for key in raw:
        assert torch.equal(saved[key], raw[key] * 0.5 if "lora_B" in key else raw[key]), key
    # the core enforces what the strategy declares
    from adapterkit import ConfigError

    with pytest.raises(ConfigError, match="does not accept negative weights"):
        merge(library, ["one", "two"], [0.5, -1.0], method="scale-first", name="neg", plugins=pm)
    with pytest.raises(ConfigError, match="method scale-first does not use --density"):
        merge(library, ["one", "two"], None, method="scale-first", name="d", density=0.5,
              plugins=pm)
    with pytest.raises(ConfigError, match="method scale-first does not use --rank"):
        merge(library, ["one", "two"], None, method="scale-first", name="r", rank=4, plugins=pm)
    assert len(calls) == 1


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


def test_hook_register_scorers(home, library, tiny_base, peft_adapter, tmp_path):
    """`eval --scorer NAME` scores every generated answer with the registered scorer."""
    from click.testing import CliRunner

    from adapterkit import Scorer
    from adapterkit.cli import build_cli

    calls = []

    class ShortAnswers(Scorer):
        name = "short"

        def score(self, prediction, reference):
            calls.append((prediction, reference))
            return float(len(prediction) <= len(reference))

    class P:
        @hookimpl
        def register_scorers(self, register):
            register(ShortAnswers())

    library.import_peft(peft_adapter, "book", base=str(tiny_base))
    rows = [{"prompt": f"Colour of item {i}?", "completion": c}
            for i, c in enumerate(["red", "a rather long blue answer", "green"])]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(build_cli(pm_with_builtins(P())),
                             ["eval", "book", "--data", str(data), "--scorer", "short",
                              "--max-new-tokens", "4", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{"):])
    # called once per row for the pocket book and once per row for the plain base
    assert [ref for _, ref in calls] == [r["completion"] for r in rows] * 2
    by_hand = [float(len(p) <= len(r)) for p, r in calls]
    assert report["short"] == {"pocket_book": sum(by_hand[:3]) / 3, "base": sum(by_hand[3:]) / 3}


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

    with library.draft() as staged:
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
        assert any(p["name"] == "akdemo" and p["version"] == "0.1.0"
                   and p["registers"] == {"command": ["akdemo"]} for p in listed), listed
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

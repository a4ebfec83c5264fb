"""What a plugin hands back is checked before anything is saved: a broken trainer or merge
strategy is named, and the library never holds an untrained or misfitting pocket book."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from adapterkit import MergeOutput, MergeStrategy, PluginError, Trainer, TrainOptions, hookimpl
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.plugin_api.testing import make_peft_adapter

ROOT = Path(__file__).resolve().parents[1]


def manager(*items, kind):
    class Plugin:
        pass

    def register(self, register):
        for item in items:
            register(item)

    setattr(Plugin, f"register_{kind}", hookimpl(register))
    return get_plugin_manager(entry_points=True, env=False, plugins={"broken": Plugin()})


def assert_nothing_saved(library, name):
    assert not [s for s in library.list() if s.name == name]


class Returns(Trainer):
    data_shapes = ("text",)

    def __init__(self, name, state):
        self.name = name
        self.state = state

    def train(self, *, job, **_):
        assert job.model is not None  # builds the PEFT model, as a trainer does first
        return self.state


@pytest.mark.parametrize("state,says", [
    # (it may have trained steps it does not report: "nothing was trained" was not known)
    (None, "returned None: nothing shows what was trained"),
    (types.SimpleNamespace(global_step=0, log_history=[]),
     "returned a state of 0 optimizer steps: no step was trained, and nothing was saved"),
    ({"loss": 1.0}, "returned a dict without global_step: nothing shows what was trained"),
])
def test_a_trainer_that_trained_nothing_saves_nothing(tiny_base, adapterkit_data, home, library,
                                                      state, says):
    from adapterkit import train

    pm = manager(Returns("lazy", state), kind="trainers")
    with pytest.raises(PluginError, match=re.escape(says)) as caught:
        train("lazy", base=str(tiny_base), data=str(adapterkit_data["text"]), name="x",
              plugins=pm, home=home, options=TrainOptions(max_steps=1, general="off"))
    assert "trainer 'lazy' (plugin 'broken')" in str(caught.value)
    assert_nothing_saved(library, "x")


class Hands(MergeStrategy):
    allows_negative = False

    def __init__(self, name, make):
        self.name = name
        self.make = make

    def merge(self, *, adapters, weights, **_):
        return self.make(adapters)


def _wrong_names(adapters):
    import torch

    return MergeOutput(dict(adapters[0].config), {"foo.bar": torch.zeros(2, 2)})


def _wrong_shape(adapters):
    tensors = adapters[0].tensors()
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :-1]  # one input column short of its layer
    return MergeOutput(dict(adapters[0].config), tensors)


def _wrong_rank(adapters):
    """The config says another rank than the factors have: PEFT refuses such a file, and it
    used to be saved (a pocket book nobody could load)."""
    return MergeOutput({**adapters[0].config, "r": int(adapters[0].config["r"]) + 5},
                       adapters[0].tensors())


@pytest.mark.parametrize("make,says", [
    (lambda adapters: None, "returned NoneType, not an adapterkit.MergeOutput"),
    (_wrong_rank, "returned an adapter whose config disagrees with its factors"),
    (lambda adapters: MergeOutput(dict(adapters[0].config), {}), "returned no tensors"),
    (_wrong_names, "returned an adapter that does not fit the base"),
    (_wrong_shape, "returned an adapter that does not fit the base"),
    (lambda adapters: MergeOutput(dict(adapters[0].config),
                                  {k: v.numpy() for k, v in adapters[0].tensors().items()}),
     "returned a ndarray for"),
    (lambda adapters: MergeOutput(dict(adapters[0].config),
                                  {k: v * float("inf") for k, v in adapters[0].tensors().items()}),
     "returned values that are not finite numbers"),
])
def test_a_merge_strategys_broken_result_is_refused_naming_it(library, tiny_base, tmp_path,
                                                               make, says):
    from adapterkit import merge

    for name, seed in (("a", 1), ("b", 2)):
        library.import_peft(make_peft_adapter(tiny_base, tmp_path / name, seed=seed), name,
                            base=str(tiny_base))
    pm = manager(Hands("bent", make), kind="merge_strategies")
    with pytest.raises(PluginError, match=re.escape(says)) as caught:
        merge(library, ["a", "b"], None, method="bent", name="m", plugins=pm)
    assert "merge strategy 'bent' (plugin 'broken')" in str(caught.value)
    assert "nothing was saved" in str(caught.value)
    assert_nothing_saved(library, "m")


# -- the guide's examples run as written ---------------------------------------------------

def _guide_example(marker: str) -> str:
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


def test_the_guides_kto_trainer_trains_with_and_without_an_eval_split(tiny_base, home,
                                                                      adapterkit_data, library,
                                                                      monkeypatch):
    """docs/plugins.md's trainer example, as printed: it once read prompt/completion rows that
    carry no label, which TRL's KTOTrainer needs, and failed in TRL on any data."""
    from adapterkit import train

    module = types.ModuleType("kto_example")
    monkeypatch.setitem(sys.modules, "kto_example", module)  # (dataclasses look it up)
    exec(compile(_guide_example("class KTO(Trainer)"), "docs/plugins.md", "exec"),
         module.__dict__)
    pm = get_plugin_manager(entry_points=True, env=False, plugins={"kto_example": module})
    for name, split in (("k", 0.0), ("ke", 0.25)):
        result = train("kto", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                       name=name, plugins=pm, home=home,
                       options=TrainOptions(max_steps=2, batch_size=4, general="off",
                                            eval_split=split, trainer_options={"beta": 0.2}))
        assert result.metrics["steps"] == 2
        assert library.get(name).meta.hyperparameters


# -- a plugin's own failure: one line naming it --------------------------------------------

BROKEN = '''
from adapterkit import MergeStrategy, Scorer, Trainer, hookimpl


class Boom(MergeStrategy):
    name = "boom"

    def merge(self, *, adapters, weights, **_):
        raise RuntimeError("boom in merge")


class ViaCore(MergeStrategy):
    name = "via-core"

    def merge(self, *, adapters, weights, **_):
        from adapterkit import concatenate

        return concatenate(adapters, weights)  # (the test makes adapterkit fail in there)


class Hungry(MergeStrategy):
    name = "hungry"

    def merge(self, *, adapters, weights, **_):
        raise MemoryError()


class Quitter(MergeStrategy):
    name = "quitter"

    def merge(self, *, adapters, weights, **_):
        import sys

        sys.exit(2)


class OldSignature(MergeStrategy):
    name = "old-signature"

    def merge(self, adapters, weights):
        return None


class Unfinished(Trainer):
    name = "unfinished"
    data_shapes = ("text",)


@hookimpl
def register_merge_strategies(register):
    register(Boom())
    register(ViaCore())
    register(Hungry())
    register(OldSignature())
    register(Quitter())


@hookimpl
def register_trainers(register):
    register(Unfinished())


@hookimpl
def register_commands(cli):
    import click

    @cli.command("polite-exit")
    @click.argument("status", type=int)
    def polite_exit(status):
        import sys

        click.echo("said my piece")
        sys.exit(status)
'''


@pytest.fixture
def broken_cli(tmp_path, monkeypatch, home, library, tiny_base):
    from click.testing import CliRunner

    from adapterkit.cli import build_cli

    for name, seed in (("a", 1), ("b", 2)):
        library.import_peft(make_peft_adapter(tiny_base, tmp_path / name, seed=seed), name,
                            base=str(tiny_base))
    (tmp_path / "brokenplugin.py").write_text(BROKEN, encoding="utf-8")
    monkeypatch.setenv("ADAPTERKIT_LOAD_PLUGINS", str(tmp_path / "brokenplugin.py"))
    monkeypatch.delenv("ADAPTERKIT_TRACEBACK", raising=False)
    with pytest.warns(Warning) as said:
        cli = build_cli(get_plugin_manager())

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    run.warnings = [str(w.message) for w in said]
    return run


def test_an_exception_in_a_plugins_code_is_one_line_naming_the_plugin(broken_cli, monkeypatch):
    out = broken_cli("merge", "a", "b", "--method", "boom", "--name", "m")
    assert out.exit_code == 1 and out.output.count("\n") == 1, out.output
    assert out.output.startswith("Error: plugin 'brokenplugin' failed (brokenplugin.py:")
    assert "RuntimeError: boom in merge — raised in that plugin's code" in out.output
    assert "ADAPTERKIT_DISABLE_PLUGINS=brokenplugin" in out.output
    monkeypatch.setenv("ADAPTERKIT_TRACEBACK", "1")  # its author sees where
    out = broken_cli("merge", "a", "b", "--method", "boom", "--name", "m")
    assert isinstance(out.exception, RuntimeError)


def test_sys_exit_in_a_plugins_code_is_one_line_naming_the_plugin_not_a_silent_exit(
        broken_cli):
    """A strategy (or trainer...) calling ``sys.exit(2)`` ended the command with status 2 and
    no word at all."""
    out = broken_cli("merge", "a", "b", "--method", "quitter", "--name", "m")
    assert out.exit_code == 1 and out.output.count("\n") == 1, out.output
    assert out.output.startswith("Error: plugin 'brokenplugin' failed (brokenplugin.py:")
    assert "SystemExit" in out.output


@pytest.mark.parametrize("status", [0, 3])
def test_a_plugins_own_command_exits_with_the_status_it_chooses(broken_cli, status):
    """Its exit status is the command's own: neither 0 nor a status after its own message is
    turned into a failure blamed on the plugin."""
    out = broken_cli("polite-exit", status)
    assert out.exit_code == status and out.output == "said my piece\n", out.output


def test_an_exception_raised_deeper_in_adapterkit_is_not_blamed_on_the_plugin(broken_cli,
                                                                             monkeypatch):
    """A plugin calling adapterkit (or a trainer whose loop runs adapterkit's callbacks) stays
    on the traceback of what adapterkit raises; only what its own code raised is its bug."""
    from adapterkit.lora import combine

    def our_bug(*args, **kwargs):
        raise RuntimeError("a bug of adapterkit's")

    monkeypatch.setattr(combine, "concat", our_bug)
    out = broken_cli("merge", "a", "b", "--method", "via-core", "--name", "m")
    assert isinstance(out.exception, RuntimeError) and "brokenplugin" not in out.output


def test_running_out_of_memory_is_one_line_saying_what_to_lower(broken_cli):
    out = broken_cli("merge", "a", "b", "--method", "hungry", "--name", "m")
    assert out.exit_code == 1 and out.output.startswith("Error: out of memory (MemoryError): "
                                                        "lower --batch-size or --max-length")


def test_a_plugin_is_blamed_through_the_guards_wrappers():
    """A trainer built with job.guarded(...) fails in the library under the guard's loss
    wrapper: the wrapper only hands the work on, so the plugin stays named."""
    import types

    from adapterkit.plugin_api.manager import get_plugin_manager

    plugin = types.ModuleType("guardedplugin")
    pm = get_plugin_manager(entry_points=False, env=False, plugins={"guardedplugin": plugin})
    space: dict = {}
    exec("def library_step():\n    raise ValueError('a setting the plugin passed')\n",
         {"__name__": "trl.trainer"}, space)
    exec("def compute_loss():\n    library_step()\n",
         {"__name__": "adapterkit.training.guard", "library_step": space["library_step"]}, space)
    exec("def train():\n    compute_loss()\n",
         {"__name__": "guardedplugin", "compute_loss": space["compute_loss"]}, space)
    with pytest.raises(ValueError) as caught:
        space["train"]()
    assert pm.plugin_at_fault(caught.value.__traceback__)[0] == "guardedplugin"


def test_concatenate_refuses_weights_that_are_not_one_number_per_pocket_book(library,
                                                                            tiny_base, tmp_path):
    from adapterkit import ConfigError, concatenate
    from adapterkit.lora.combine import inputs_of

    library.import_peft(make_peft_adapter(tiny_base, tmp_path / "c", seed=4), "c",
                        base=str(tiny_base))
    members = inputs_of(library, [library.get("c")])
    for weights in (None, [1.0, 2.0], [float("nan")]):
        with pytest.raises(ConfigError, match="concatenate needs one finite weight per pocket "
                                              "book"):
            concatenate(members, weights)


def test_a_method_that_cannot_take_adapterkits_arguments_is_refused_at_registration(
        broken_cli):
    assert any("cannot register merge strategy 'old-signature': its merge() cannot be called "
               "as adapterkit calls it" in w and "**_" in w for w in broken_cli.warnings), \
        broken_cli.warnings
    out = broken_cli("merge", "a", "b", "--method", "old-signature", "--name", "m")
    assert "unknown merge strategy 'old-signature'" in out.output


def test_a_method_a_plugin_left_out_is_named_when_called(broken_cli, adapterkit_data,
                                                         tiny_base):
    out = broken_cli("train", "unfinished", "--base", tiny_base, "--data",
                     adapterkit_data["text"], "--name", "u", "--max-steps", 1, "--general", "off")
    assert out.exit_code == 1, out.output
    assert out.output.splitlines()[-1].startswith(
        "Error: trainer 'unfinished' (class Unfinished) does not implement train()")
    assert "Traceback" not in out.output

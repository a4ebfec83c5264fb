"""``adapterkit plugin new``: a ready-to-install plugin package with a passing test."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from adapterkit.errors import InvalidName, NameTaken
from adapterkit.plugin_api.manager import installed_plugins

KINDS = ("method", "trainer", "merge", "data", "scorer", "command")

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "adapterkit-{name}"
version = "0.1.0"
description = "An adapterkit {kind} plugin: {name}"
requires-python = ">=3.10"
dependencies = ["adapterkit"]

[project.entry-points.adapterkit]
{name} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

_README = """\
# adapterkit-{name}

An [adapterkit](https://pypi.org/project/adapterkit/) {kind} plugin.

```bash
adapterkit install -e .      # or: pip install -e .
adapterkit plugins           # {name} is listed
python -m pytest             # runs its test with adapterkit's fixtures
```

{usage}
"""

_MODULES = {
    "method": ('''\
"""{name}: an adapterkit adapter method."""

from adapterkit import AdapterMethod, hookimpl

ADAPTERKIT_HOOK_VERSION = 1


class {cls}(AdapterMethod):
    name = "{name}"
    description = "LoRA with rank-stabilised scaling (rsLoRA)"

    def peft_config(self, *, target_modules="all-linear", r=16, alpha=32, dropout=0.05,
                    **options):
        from peft import LoraConfig  # heavy: imported only when a pocket book is built

        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                          target_modules=target_modules, use_rslora=True,
                          task_type="CAUSAL_LM")


@hookimpl
def register_methods(register):
    register({cls}())
''', '''\
import {module}


def test_registers_and_builds_a_config(adapterkit_plugin_manager):
    pm = adapterkit_plugin_manager({module})
    config = pm.method("{name}").peft_config(target_modules=["q_proj"], r=4)
    assert config.use_rslora and config.r == 4


def test_trains_a_pocket_book(adapterkit_plugin_manager, adapterkit_tiny_base, adapterkit_data,
                              adapterkit_home):
    from adapterkit import TrainOptions, train

    pm = adapterkit_plugin_manager({module})
    result = train("sft", base=str(adapterkit_tiny_base),
                   data=str(adapterkit_data["prompt_completion"]), name="t", plugins=pm,
                   home=adapterkit_home,
                   options=TrainOptions(method="{name}", max_steps=2, batch_size=4))
    assert result.pocket_book.meta.method == "{name}"
''', "adapterkit train sft --method {name} --base BASE --data FILE --name NAME"),
    "trainer": ('''\
"""{name}: an adapterkit trainer (plain causal-LM loss through transformers' Trainer)."""

from adapterkit import Trainer, hookimpl

ADAPTERKIT_HOOK_VERSION = 1


class {cls}(Trainer):
    name = "{name}"
    description = "Causal-LM loss on text rows with transformers' Trainer"
    data_shapes = ("text",)

    def train(self, *, job, **_):
        from transformers import DataCollatorForLanguageModeling, Trainer as HFTrainer
        from transformers import TrainingArguments

        # The mapped function closes over the tokenizer and a number, not over `job`: datasets
        # fingerprints it (dill) by everything it reaches, and `job` reaches the whole model.
        tok, max_length = job.tokenizer, job.options.max_length

        def tokens(dataset):  # None without --eval-split
            return None if dataset is None else dataset.map(
                lambda row: tok(row["text"], truncation=True, max_length=max_length),
                remove_columns=["text"])

        trainer = HFTrainer(model=job.model, args=TrainingArguments(**job.training_arguments()),
                            train_dataset=tokens(job.train_dataset()),
                            eval_dataset=tokens(job.eval_dataset()), callbacks=job.callbacks,
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        job.configure(trainer)
        trainer.train(resume_from_checkpoint=job.resume_from)
        return trainer.state


@hookimpl
def register_trainers(register):
    register({cls}())
''', '''\
import {module}


def test_trains_and_the_loss_falls(adapterkit_plugin_manager, adapterkit_tiny_base,
                                   adapterkit_data, adapterkit_home):
    from adapterkit import TrainOptions, train

    pm = adapterkit_plugin_manager({module})
    result = train("{name}", base=str(adapterkit_tiny_base), data=str(adapterkit_data["text"]),
                   name="t", plugins=pm, home=adapterkit_home,
                   options=TrainOptions(max_steps=20, batch_size=4, learning_rate=3e-2,
                                        logging_steps=2, eval_split=0.25))
    m = result.metrics
    assert m["train_loss_final"] < m["train_loss_first"]
    assert m["eval"]["loss"] > 0  # the held-out rows, scored
''', "adapterkit train {name} --base BASE --data notes.txt --name NAME"),
    "merge": ('''\
"""{name}: an adapterkit merge strategy (weighted average of the deltas, exact rank)."""

from adapterkit import MergeStrategy, hookimpl

ADAPTERKIT_HOOK_VERSION = 1


class {cls}(MergeStrategy):
    name = "{name}"
    description = "weighted average: ranks concatenated, weights divided by their sum"
    allows_negative = False

    def merge(self, *, adapters, weights, **_):
        from adapterkit import concatenate

        total = sum(weights)
        return concatenate(adapters, [w / total for w in weights], path="merge --method {name}")


@hookimpl
def register_merge_strategies(register):
    register({cls}())
''', '''\
import {module}


def test_merges_two_pocket_books(adapterkit_plugin_manager, adapterkit_library,
                                 adapterkit_tiny_base, tmp_path):
    from adapterkit import merge
    from adapterkit.plugin_api.testing import make_peft_adapter

    for name, seed in (("a", 1), ("b", 2)):
        path = make_peft_adapter(adapterkit_tiny_base, tmp_path / name, seed=seed)
        adapterkit_library.import_peft(path, name, base=str(adapterkit_tiny_base))
    pm = adapterkit_plugin_manager({module})
    book = merge(adapterkit_library, ["a", "b"], [1, 3], method="{name}", name="ab",
                 plugins=pm)
    assert book.meta.parents == ["a@1", "b@1"]
''', "adapterkit merge A B --method {name} --name C"),
    "data": ('''\
"""{name}: an adapterkit data format (question/answer rows)."""

from adapterkit import DataFormat, hookimpl

ADAPTERKIT_HOOK_VERSION = 1


class {cls}(DataFormat):
    name = "{name}"
    description = "question/answer rows, trained as prompt/completion"
    columns = ("question", "answer")
    shape = "prompt_completion"

    def convert(self, row):
        return {{"prompt": row["question"], "completion": row["answer"]}}


@hookimpl
def register_data_formats(register):
    register({cls}())
''', '''\
import json

import {module}


def test_reads_question_answer_files(adapterkit_plugin_manager, tmp_path):
    from adapterkit import load_data

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({{"question": "2+2?", "answer": "4"}}) + "\\n")
    pm = adapterkit_plugin_manager({module})
    data = load_data(str(path), formats=pm.data_formats)
    assert data.format == "{name}" and data.rows == [{{"prompt": "2+2?", "completion": "4"}}]
''', "adapterkit train sft --data qa.jsonl ...  # rows with question/answer columns"),
    "scorer": ('''\
"""{name}: an adapterkit scorer for generated answers."""

from adapterkit import Scorer, hookimpl

ADAPTERKIT_HOOK_VERSION = 1


class {cls}(Scorer):
    name = "{name}"
    description = "1 if the answer starts with the reference"

    def score(self, prediction, reference):
        return float(prediction.strip().startswith(reference.strip()))


@hookimpl
def register_scorers(register):
    register({cls}())
''', '''\
import {module}


def test_scores(adapterkit_plugin_manager):
    scorer = adapterkit_plugin_manager({module}).scorers.get("{name}")
    assert scorer.score("Paris, France", "Paris") == 1.0
    assert scorer.score("Lyon", "Paris") == 0.0


def test_is_listed(adapterkit_cli):
    import json

    result = adapterkit_cli("plugins", "--json", plugins=({module},))
    assert result.exit_code == 0
    assert any(p["registers"].get("scorer") == ["{name}"] for p in json.loads(result.output))
''', "adapterkit eval NAME --data FILE --scorer {name}"),
    "command": ('''\
"""{name}: an extra adapterkit command."""

import click

from adapterkit import hookimpl

ADAPTERKIT_HOOK_VERSION = 1


@hookimpl
def register_commands(cli):
    @cli.command(name="{name}")
    @click.argument("who", default="world")
    def command(who):
        """Say hello (an example plugin command)."""
        click.echo(f"Hello, {{who}}!")
''', '''\
import {module}


def test_command_runs(adapterkit_cli):
    result = adapterkit_cli("{name}", "adapterkit", plugins=({module},))
    assert result.exit_code == 0 and result.output == "Hello, adapterkit!\\n"
''', "adapterkit {name} WHO"),
}


def plugin_name(name: str) -> str:
    """The plugin's own name: ``NAME`` whether given as ``NAME`` or ``adapterkit-NAME``, so the
    distribution (``adapterkit-NAME``) never has the prefix twice."""
    return re.sub(r"^adapterkit[-_]", "", name)


def _refuse_installed_name(name: str) -> None:
    """A plugin is known by its name: one an installed plugin (a built-in such as ``sft`` or
    ``lora`` included) already has would make the new one skipped at every load. Names that
    differ only in '-' / '_' share a module name, so they clash too."""

    def key(n: str) -> str:
        return n.replace("-", "_").lower()

    for taken, dist in installed_plugins().items():
        if key(taken) == key(name):
            owner = "adapterkit itself (a built-in plugin)" if dist.lower() == "adapterkit" \
                else f"the installed package {dist}"
            raise NameTaken(f"plugin name {name!r} is already used by {owner}; choose another "
                            "name")


#: The plugin manager's registry of each kind the scaffold registers an item of, by its name.
_REGISTRIES = {"method": "methods", "trainer": "trainers", "merge": "merge_strategies",
               "data": "data_formats", "scorer": "scorers"}


def _refuse_taken_item(name: str, kind: str) -> None:
    """The scaffold registers a ``kind`` named ``name``: one a loaded plugin registers already
    (the built-in scorer ``exact_match``, trainer ``reward``...) would be refused at every
    load, and the scaffold's own test would fail."""
    import warnings

    from adapterkit.plugin_api.manager import get_plugin_manager

    registry = _REGISTRIES.get(kind)
    if registry is None:
        return
    with warnings.catch_warnings():  # (another plugin's trouble is not this command's)
        warnings.simplefilter("ignore")
        entries = getattr(get_plugin_manager(env=False), registry).entries
    if name in entries:
        raise NameTaken(f"the {kind} name {name!r} is already registered by the plugin "
                        f"{entries[name].plugin!r}; a plugin registering it again would be "
                        "refused at every load: choose another name")


def scaffold(name: str, kind: str, where: str | Path = ".") -> Path:
    """Write ``adapterkit-NAME/`` (pyproject, module, README, test) under ``where``.

    ``name`` may carry the ``adapterkit-`` prefix or not: ``shout`` and ``adapterkit-shout``
    both make the plugin ``shout`` in the distribution ``adapterkit-shout``. A name an installed
    plugin already has (``sft``, ``lora``...), or the name of an item of ``kind`` a loaded
    plugin registers (the scorer ``exact_match``...), is refused with :class:`NameTaken`.
    """
    if kind not in KINDS:
        raise InvalidName(f"unknown plugin kind {kind!r}; use one of {', '.join(KINDS)}")
    given, name = name, plugin_name(name)
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,40}", name):
        raise InvalidName(f"invalid plugin name {given!r}: lowercase letters, digits, '-' and "
                          "'_', starting with a letter (at most 41 characters)")
    _refuse_installed_name(name)
    _refuse_taken_item(name, kind)
    module = "adapterkit_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name)) or "Plugin"
    root = Path(where) / f"adapterkit-{name}"
    if root.exists():
        raise NameTaken(f"{root} already exists; choose another name or folder")
    source, test, usage = _MODULES[kind]
    fields = {"name": name, "module": module, "cls": cls, "kind": kind}
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(_PYPROJECT.format(**fields), encoding="utf-8")
    (root / f"{module}.py").write_text(source.format(**fields), encoding="utf-8")
    (root / "tests" / f"test_{module}.py").write_text(test.format(**fields), encoding="utf-8")
    (root / "README.md").write_text(
        _README.format(usage=textwrap.dedent(f"Use it:\n\n    {usage.format(**fields)}"),
                       **fields), encoding="utf-8")
    return root

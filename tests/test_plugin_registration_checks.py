"""What a plugin registers is checked when it registers: data shapes no file can have and
trainer options no value can be typed by are refused at start-up (a warning naming the plugin,
the item and what to do), not at the first run; a trainer built outside the registry meets the
same checks before any work."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from adapterkit import (
    ConfigError,
    DataFormat,
    PluginError,
    Trainer,
    TrainOptions,
    build_trainer_options,
    hookimpl,
)
from adapterkit.plugin_api.manager import PluginWarning, get_plugin_manager

KNOWN_SHAPES = "text, prompt_completion, messages, preference, prompt"


def _trainer(name: str, *, shapes: Any = ("preference",), options: Any = None) -> Trainer:
    trainer = Trainer()
    trainer.name, trainer.data_shapes, trainer.options = name, shapes, options
    return trainer


def _register(*items: Any) -> tuple[Any, list[str]]:
    """A fresh plugin manager where plugin ``mine`` registers ``items``, and its warnings."""
    class Plugin:
        @hookimpl
        def register_trainers(self, register):
            for item in items:
                if isinstance(item, Trainer):
                    register(item)

        @hookimpl
        def register_data_formats(self, register):
            for item in items:
                if isinstance(item, DataFormat):
                    register(item)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_plugin_manager(entry_points=False, env=False, plugins={"mine": Plugin()})
    return pm, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


@pytest.mark.parametrize("shapes", [("kto",), (), ("text", "kto"), "text"])
def test_a_trainer_reading_no_standard_shape_is_refused_and_the_others_register(shapes):
    pm, warned = _register(_trainer("odd", shapes=shapes), _trainer("fine"))
    (message,) = warned
    assert message.startswith(f"plugin 'mine' cannot register trainer 'odd': data_shapes = "
                              f"{shapes!r} ")
    assert KNOWN_SHAPES in message
    assert pm.trainers.names() == ["fine"]
    assert pm.info["mine"].registers == {"trainer": ["fine"]}


def test_a_data_format_converting_to_no_standard_shape_is_refused():
    class QA(DataFormat):
        name, columns, shape = "qa", ("q", "a"), "question_answer"

    pm, warned = _register(QA())
    assert warned == ["plugin 'mine' cannot register data format 'qa': shape = "
                      f"'question_answer' is not a standard shape: convert rows to one of "
                      f"{KNOWN_SHAPES} and name it"]
    assert pm.data_formats.names() == []


def test_the_standard_shapes_are_the_ones_data_files_are_read_as():
    """Registration checks against its own list: it must be the data reader's."""
    from adapterkit.plugin_api.registry import STANDARD_SHAPES
    from adapterkit.training.data import SHAPES

    assert sorted(STANDARD_SHAPES) == sorted(SHAPES)
    assert ", ".join(STANDARD_SHAPES) == KNOWN_SHAPES


@dataclass
class Fine:
    beta: float = 0.1


class NotADataclass:
    beta: float = 0.1


@pytest.mark.parametrize("options, expected", [
    (NotADataclass, "is not a dataclass: declare one with @dataclass and name the class"),
    (Fine(), "options = an instance of Fine: name the class itself (options = Fine)"),
])
def test_options_that_are_not_a_dataclass_class_are_refused_at_registration(options, expected):
    pm, warned = _register(_trainer("odd", options=options))
    (message,) = warned
    assert message.startswith("plugin 'mine' cannot register trainer 'odd': options = ")
    assert expected in message
    assert pm.trainers.names() == []


@dataclass
class Untypable:
    where: Path = Path(".")
    pair: tuple[int, int] = (1, 2)
    ok: int = 1


def test_unsupported_annotations_are_refused_naming_the_field_and_the_types_to_use():
    pm, warned = _register(_trainer("odd", options=Untypable))
    assert warned == ["plugin 'mine' cannot register trainer 'odd': Untypable.where (Path), "
                      "Untypable.pair (tuple[int, int]): trainer options take only bool, int, "
                      "float, str, dict, Literal[...], list[X] of these, any of them | None "
                      "(take a str and convert it in __post_init__)"]
    assert pm.trainers.names() == []
    # a trainer never registered (a plugin's own test) is refused before any work, not typed
    # as the string it was given
    with pytest.raises(PluginError, match=r"trainer 'odd': Untypable.where \(Path\)"):
        build_trainer_options(_trainer("odd", options=Untypable),
                              TrainOptions(trainer_options={"where": "/tmp", "pair": "3,4"}))


@dataclass
class BadDefaults:
    beta: float = "high"  # type: ignore[assignment]
    mode: Literal["a", "b"] = "c"  # type: ignore[assignment]
    steps: int = "3"  # type: ignore[assignment]
    tags: list[int] = field(default_factory=lambda: ["x"])  # type: ignore[list-item]
    scale: float = 1  # an int is a float's value: fine
    label: str | None = None


def test_defaults_not_of_their_type_are_the_plugins_bug_refused_by_field():
    pm, warned = _register(_trainer("odd", options=BadDefaults))
    (message,) = warned
    assert message.startswith("plugin 'mine' cannot register trainer 'odd': ")
    for problem in ("BadDefaults.beta defaults to 'high', which is not a number",
                    "BadDefaults.mode defaults to 'c', which is not one of a, b",
                    "BadDefaults.steps defaults to '3', which is not an integer",
                    "BadDefaults.tags defaults to ['x'], which is not a list"):
        assert problem in message, message
    assert "scale" not in message and "label" not in message
    assert pm.trainers.names() == []
    with pytest.raises(PluginError, match="trainer 'odd': BadDefaults.beta defaults to 'high'"):
        build_trainer_options(_trainer("odd", options=BadDefaults))


@dataclass
class Checked:
    level: int = 0

    def check(self, options: TrainOptions) -> Any:
        return {0: [], 1: f"level {self.level} is too high", 2: True, 3: None}[self.level]


def test_check_returning_a_string_is_one_problem_and_anything_else_the_plugins_bug():
    trainer = _trainer("checked", options=Checked)
    assert _register(trainer)[1] == []

    def build(level: int) -> Any:
        return build_trainer_options(trainer, TrainOptions(trainer_options={"level": level}))

    with pytest.raises(ConfigError) as err:
        build(1)
    assert str(err.value) == "invalid checked options: level 1 is too high"
    with pytest.raises(PluginError, match=r"trainer 'checked': Checked.check returned True; "
                                          r"make it return a list of one-line problems"):
        build(2)
    assert build(0) == Checked(0) and build(3) == Checked(3)


@dataclass
class Nullable:
    steps: int | None = None
    tags: list[str] = field(default_factory=list)


def test_a_null_or_none_says_how_to_give_none_and_what_to_give_instead():
    trainer = _trainer("opt", options=Nullable)

    def problems(**sets: str) -> str:
        given = {k: yaml.safe_load(v) for k, v in sets.items()}  # as --set KEY=VALUE reads
        with pytest.raises(ConfigError) as err:
            build_trainer_options(trainer, TrainOptions(trainer_options=given))
        return str(err.value)

    assert problems(steps="None") == ("invalid opt options: steps must be an integer, or null "
                                      "(also ~ or empty) for none, got 'None'")
    assert problems(tags="") == ("invalid opt options: tags must be a list (YAML [a, b] or a,b; "
                                 "[] for none), got null: give one, or leave tags out for its "
                                 "default")
    # what the messages promise is accepted
    for none in ("null", "~", ""):
        assert build_trainer_options(trainer, TrainOptions(trainer_options={
            "steps": yaml.safe_load(none)})).steps is None
    assert build_trainer_options(trainer, TrainOptions(trainer_options={
        "tags": yaml.safe_load("[]")})).tags == []


def test_builtin_plugins_register_without_a_warning_and_without_torch():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_plugin_manager(env=False)
    assert [str(w.message) for w in caught if issubclass(w.category, PluginWarning)] == []
    assert {"sft", "dpo", "reward", "rlhf"} <= set(pm.trainers.names())
    assert "alpaca" in pm.data_formats.names()
    code = ("import sys; from adapterkit.plugin_api.manager import get_plugin_manager; "
            "get_plugin_manager(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_an_infinite_float_default_no_limit_is_a_default_of_its_type():
    """``float("inf")`` as "no limit" is a common default; only a given value must be finite."""
    from dataclasses import dataclass

    from adapterkit.plugin_api.option_types import options_class_problems

    @dataclass
    class Limits:
        most: float = float("inf")
        least: float | None = float("-inf")

    assert options_class_problems(Limits) == []


@pytest.mark.parametrize("options", [None, "with"])
def test_a_reuse_option_that_is_not_one_of_its_options_is_refused(options):
    """``Trainer.reuse_option`` names the option the core then advises (``--set NAME=...``,
    a recipe's ``set:``): one the trainer does not take would be refused at that advice."""
    @dataclass
    class Opts:
        judge: str | None = None

    fine = _trainer("fine", options=Opts)
    fine.reuse_option = "judge"
    odd = _trainer("odd", options=Opts if options else None)
    odd.reuse_option = "reward"
    pm, said = _register(fine, odd)
    assert said == ["plugin 'mine' cannot register trainer 'odd': reuse_option = 'reward' is "
                    "not a field of its options that takes a pocket book's name (a str): name "
                    "the option that takes the pocket book also_saves() names, or leave it "
                    "None"], said
    assert "fine" in pm.trainers and "odd" not in pm.trainers


@pytest.mark.parametrize(("reuse", "drops", "expected"), [
    (["judge"], (), "reuse_option = ['judge'] is not a field"),  # (unhashable: no crash)
    ("beta", (), "reuse_option = 'beta' is not a field of its options that takes a pocket "
                 "book's name (a str)"),  # (a float: --set beta=NAME would be refused)
    ("judges", (), "reuse_option = 'judges' is not a field of its options that takes a "
                   "pocket book's name (a str)"),  # (a list of names: not one)
    ("judge", ("judge_steps", "eval split"), "reuse_drops = ('judge_steps', 'eval split') "
                                              "is not a tuple of option names"),
    ("judge", "eval_split", "reuse_drops = 'eval_split' is not a tuple"),
])
def test_reuse_settings_that_could_never_be_followed_are_refused(reuse, drops, expected):
    @dataclass
    class Opts:
        judge: str | None = None
        beta: float = 0.1
        judge_steps: int | None = None
        judges: list[str] = field(default_factory=list)

    fine = _trainer("fine", options=Opts)
    fine.reuse_option, fine.reuse_drops = "judge", ("judge_steps", "eval_split")
    odd = _trainer("odd", options=Opts)
    odd.reuse_option, odd.reuse_drops = reuse, drops
    pm, said = _register(fine, odd)
    assert len(said) == 1 and said[0].startswith(
        f"plugin 'mine' cannot register trainer 'odd': {expected}"), said
    assert pm.trainers.names() == ["fine"]

"""Trainer options are typed by the dataclass each trainer declares (``Trainer.options``) and
checked before any work: every problem in one error, the base never loaded for a bad one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from adapterkit import (
    ConfigError,
    Library,
    Trainer,
    TrainOptions,
    build_trainer_options,
    hookimpl,
    train,
)
from adapterkit.plugin_api.manager import get_plugin_manager


@pytest.fixture
def never_loads(monkeypatch):
    """Fails the test if a run loads its base; the list records any attempt."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the base was loaded for a run with bad trainer options")

    monkeypatch.setattr("adapterkit.training.run.load_for_method", refuse)
    return calls


def test_cli_reports_every_dpo_option_problem_in_one_line_before_loading(
        tiny_base, home, adapterkit_data, adapterkit_cli, never_loads):
    out = adapterkit_cli("train", "dpo", "--base", tiny_base, "--data",
                         adapterkit_data["preference"], "--name", "polite",
                         "--set", "beta=-1", "--set", "nonsense=2")
    assert out.exit_code == 1, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1, out.output
    assert "unknown dpo option(s) nonsense (known: beta, loss_type, precompute_ref_log_probs)" \
        in lines[0]
    assert "beta must be above 0, got -1.0" in lines[0]
    assert never_loads == []
    assert Library(home).list() == [] and not (home / "runs").exists()


def test_recipe_trainer_options_are_checked_with_the_other_options(
        tiny_base, home, tmp_path, adapterkit_data, adapterkit_cli, never_loads):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("lr: 1e-3\nlearning_rate: fast\n"
                      "trainer_options:\n  beta: 0\n  precompute_ref_log_probs: maybe\n")
    out = adapterkit_cli("train", "dpo", "--base", tiny_base, "--data",
                         adapterkit_data["preference"], "--name", "polite",
                         "--config", recipe)
    assert out.exit_code == 1, out.output
    (line,) = out.output.strip().splitlines()
    for problem in ("unknown option(s) lr", "learning_rate: expected float, got 'fast'",
                    "beta must be above 0, got 0.0",
                    "precompute_ref_log_probs must be one of auto, true, false, got 'maybe'"):
        assert problem in line, line
    assert never_loads == []


def test_api_refuses_bad_rlhf_options_together_before_reserving_the_name(
        tiny_base, home, adapterkit_data, never_loads):
    options = TrainOptions(max_steps=1, batch_size=6, trainer_options={
        "num_generations": 4, "max_new_tokens": 0, "temperature": "hot", "reward_step": 2})
    with pytest.raises(ConfigError) as err:
        train("rlhf", base=str(tiny_base), data=str(adapterkit_data["preference"]),
              name="kind", home=home, plugins=get_plugin_manager(env=False), options=options)
    message = str(err.value)
    assert "\n" not in message
    for problem in ("unknown rlhf option(s) reward_step", "max_new_tokens is 0",
                    "temperature must be a number, got 'hot'",
                    "--batch-size 6 must be a multiple of num_generations 4"):
        assert problem in message, message
    assert never_loads == []
    assert Library(home).list() == [] and not (home / "runs").exists()


def test_builtin_dpo_options_arrive_typed():
    from adapterkit_plugins.dpo import DPOOptions

    dpo = get_plugin_manager(env=False).trainer("dpo")
    assert dpo.options is DPOOptions
    typed = build_trainer_options(dpo, TrainOptions(trainer_options={
        "beta": "0.25", "loss_type": "sigmoid, sft", "precompute_ref_log_probs": False}))
    assert typed == DPOOptions(beta=0.25, loss_type=["sigmoid", "sft"],
                               precompute_ref_log_probs="false")
    assert build_trainer_options(dpo, TrainOptions(trainer_options={
        "loss_type": ["ipo"], "precompute_ref_log_probs": True})).loss_type == ["ipo"]
    assert build_trainer_options(dpo) == DPOOptions()  # nothing given: the defaults
    # a loss TRL does not compute: refused with the others' names before any work (it was a
    # traceback from TRL's first step, after the base and data had loaded)
    with pytest.raises(ConfigError, match="loss_type foo is not a TRL DPO loss; known: "
                                          "sigmoid, hinge, ipo"):
        build_trainer_options(dpo, TrainOptions(trainer_options={"loss_type": "sigmoid,foo"}))


@dataclass
class GroupOptions:
    """A plugin trainer's own options."""

    #: Completions compared per prompt (required).
    group: int
    #: Sampling style.
    style: Literal["greedy", "sample"] = "greedy"
    #: Per-loss weights.
    weights: list[float] = field(default_factory=lambda: [1.0])
    #: Optional name of something.
    label: str | None = None
    #: A switch.
    fast: bool = False

    def __post_init__(self):
        if len(self.weights) > 3:
            raise ValueError(f"at most 3 weights, got {len(self.weights)}")

    def check(self, options: TrainOptions) -> list[str]:
        if options.batch_size % self.group:
            return [f"batch_size {options.batch_size} is not a multiple of group {self.group}"]
        return []


class _Stop(Exception):
    """Raised by the toy trainers: the test has what it came for."""


def _toy(name: str, options: type | None, seen: list):
    class Toy(Trainer):
        data_shapes = ("preference",)

        def train(self, *, job, **_):
            seen.append((job.trainer_options, dict(job.options.trainer_options)))
            raise _Stop

    Toy.name, Toy.options = name, options

    class Plugin:
        @hookimpl
        def register_trainers(self, register):
            register(Toy())

    return Plugin()


def test_plugin_trainer_gets_its_own_dataclass_typed(tiny_base, home, adapterkit_data,
                                                     adapterkit_plugin_manager):
    seen: list = []
    pm = adapterkit_plugin_manager(_toy("grouped", GroupOptions, seen))
    given = {"group": "4", "style": "SAMPLE", "weights": "0.5,2", "fast": "yes"}
    with pytest.raises(_Stop):
        train("grouped", base=str(tiny_base), data=str(adapterkit_data["preference"]),
              name="g", home=home, plugins=pm,
              options=TrainOptions(max_steps=1, batch_size=8, trainer_options=given))
    ((typed, as_given),) = seen
    assert typed == GroupOptions(group=4, style="sample", weights=[0.5, 2.0], fast=True)
    assert isinstance(typed.group, int) and isinstance(typed.weights[1], float)
    assert as_given == given  # what was given stays as given (it is what metadata records)


def test_problems_from_types_required_fields_and_the_dataclass_come_together(
        adapterkit_plugin_manager):
    pm = adapterkit_plugin_manager(_toy("grouped", GroupOptions, []))
    grouped = pm.trainer("grouped")

    def problems(given, **options):
        with pytest.raises(ConfigError) as err:
            build_trainer_options(grouped, TrainOptions(trainer_options=given, **options))
        return str(err.value)

    text = problems({"style": "wild", "fast": "maybe", "colour": 1, "shade": 2})
    assert text.startswith("invalid grouped options: ")
    for problem in ("unknown grouped option(s) colour, shade (known: group, style, weights, "
                    "label, fast)", "style must be one of greedy, sample, got 'wild'",
                    "fast must be true or false, got 'maybe'", "group is required"):
        assert problem in text, text
    # with every type right, what the dataclass finds itself, in the same error
    text = problems({"group": 3, "label": 5}, batch_size=8)
    assert text == "invalid grouped options: batch_size 8 is not a multiple of group 3"
    text = problems({"group": 2, "weights": [1, 2, 3, 4], "style": "wild"})
    assert "style must be one of greedy, sample" in text and "at most 3 weights, got 4" in text
    ok = build_trainer_options(grouped, TrainOptions(trainer_options={"group": 2, "label": 5}))
    assert ok.label == "5"


def test_trainer_without_options_refuses_any_before_loading(tiny_base, home, adapterkit_data,
                                                            adapterkit_plugin_manager,
                                                            never_loads):
    seen: list = []
    pm = adapterkit_plugin_manager(_toy("plain", None, seen))
    with pytest.raises(ConfigError, match=r"the plain trainer takes no trainer options .*"
                                          r"got beta, gamma"):
        train("plain", base=str(tiny_base), data=str(adapterkit_data["preference"]),
              name="p", home=home, plugins=pm,
              options=TrainOptions(max_steps=1, trainer_options={"beta": 1, "gamma": 2}))
    assert seen == [] and never_loads == []
    # the built-in sft takes none either: refused, not silently ignored
    with pytest.raises(ConfigError, match="the sft trainer takes no trainer options"):
        train("sft", base=str(tiny_base), data=str(adapterkit_data["text"]), name="s",
              home=home, plugins=get_plugin_manager(env=False),
              options=TrainOptions(max_steps=1, trainer_options={"beta": 0.1}))
    assert never_loads == [] and Library(home).list() == []


def test_trainer_without_options_gets_none(tiny_base, home, adapterkit_data,
                                           adapterkit_plugin_manager):
    seen: list = []
    pm = adapterkit_plugin_manager(_toy("plain", None, seen))
    with pytest.raises(_Stop):
        train("plain", base=str(tiny_base), data=str(adapterkit_data["preference"]),
              name="p", home=home, plugins=pm, options=TrainOptions(max_steps=1))
    assert seen == [(None, {})]

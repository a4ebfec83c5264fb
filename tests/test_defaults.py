"""Measured defaults (#18): a trainer's defaults apply where a run sets nothing, anything the run
sets wins, and the forgetting guard that ``sft`` turns on by default can be turned off."""

from __future__ import annotations

import json

import pytest

from adapterkit import ConfigError, PluginError, Trainer, TrainOptions
from adapterkit.training.options import DEFAULT_LEARNING_RATE, build_options, with_defaults


@pytest.fixture
def trainer(pm):
    return pm.trainer


def test_sft_uses_its_measured_defaults_where_nothing_is_set(trainer):
    got = with_defaults(trainer("sft"), TrainOptions())
    # the values docs/defaults.md chose, written out: not read back from the plugin
    assert (got.learning_rate, got.forgetting_budget, got.guard_weight, got.general) == (
        1e-3, 1.0, 3.0, "general")
    assert (got.r, got.epochs, got.early_stopping) == (16, 1.0, None)  # the rest as before


def test_what_a_run_sets_wins_over_the_trainers_defaults(trainer):
    got = with_defaults(trainer("sft"), TrainOptions(learning_rate=5e-5,
                                                      forgetting_budget=2.0, guard_weight=0.1,
                                                      general="mine.txt"))
    assert (got.learning_rate, got.forgetting_budget, got.guard_weight, got.general) == (
        5e-5, 2.0, 0.1, "mine.txt")


@pytest.mark.parametrize("off", [0, 0.0])
def test_a_budget_of_0_turns_the_default_guard_off_weight_included(off, trainer):
    got = with_defaults(trainer("sft"), TrainOptions(forgetting_budget=off))
    assert got.forgetting_budget is None and got.guard_weight is None
    assert got.learning_rate == 1e-3  # the other defaults still apply


def test_the_default_guard_yields_to_early_stopping_and_to_a_kl_weight_of_0(trainer):
    sft = trainer("sft")
    stopping = with_defaults(sft, TrainOptions(eval_split=0.2, early_stopping=2))
    assert stopping.forgetting_budget is None and stopping.guard_weight is None
    no_kl = with_defaults(sft, TrainOptions(guard_weight=0.0))
    assert no_kl.forgetting_budget is None and no_kl.guard_weight == 0.0
    # a weight of its own keeps the default budget (the guard stays on, at that weight)
    weighted = with_defaults(sft, TrainOptions(guard_weight=0.5))
    assert weighted.forgetting_budget == 1.0 and weighted.guard_weight == 0.5


@pytest.mark.parametrize("name", ["dpo", "reward", "rlhf"])
def test_trainers_without_defaults_train_as_before(name, trainer):
    got = with_defaults(trainer(name), TrainOptions())
    assert got.learning_rate == DEFAULT_LEARNING_RATE == 2e-4
    assert got.forgetting_budget is None and got.guard_weight is None and got.general is None


def test_a_third_party_trainers_defaults_apply_the_same_way():
    class Mine(Trainer):
        name = "mine"
        defaults = {"learning_rate": 3e-4, "general": "general"}

    got = with_defaults(Mine(), TrainOptions(general="mine.txt"))
    assert got.learning_rate == 3e-4 and got.general == "mine.txt"  # general was set: it wins


def test_defaults_for_an_option_a_run_cannot_leave_unset_are_a_plugin_error():
    """``r`` is 16 unless set, so a default for it could never apply: refused, by name."""
    class Wrong(Trainer):
        name = "wrong"
        defaults = {"r": 8, "lr": 1e-3}

    with pytest.raises(PluginError, match=r"wrong.*defaults for lr, r"):
        with_defaults(Wrong(), TrainOptions())


@pytest.mark.parametrize("name", ["reward", "rlhf"])
def test_off_is_no_guard_so_trainers_without_one_accept_it(name, pm):
    from adapterkit.training.build import applies_guard, refuse_unapplied_guard

    trainer = pm.trainer(name)
    refuse_unapplied_guard(name, trainer, TrainOptions(forgetting_budget=0))  # no error
    with pytest.raises(ConfigError, match="does not apply the forgetting guard"):
        refuse_unapplied_guard(name, trainer, TrainOptions(forgetting_budget=1.0))
    assert not applies_guard(trainer)


@pytest.mark.parametrize("budget, weight, expected", [
    (1.0, None, 0.3), (1.0, 0.5, 0.5), (0.0, None, 0.0), (0, 0.2, 0.2)])
def test_the_quickstart_keeps_its_own_weight_and_0_turns_its_guard_off(budget, weight, expected,
                                                                       trainer):
    from adapterkit.quickstart import part_one_weight

    got = with_defaults(trainer("sft"), TrainOptions(
        forgetting_budget=budget, guard_weight=part_one_weight(budget, weight)))
    assert got.guard_weight == expected
    assert (got.forgetting_budget is None) == (budget == 0)


@pytest.mark.parametrize("value", ["off", "OFF", "0", "0%", False])
def test_off_reads_as_no_guard_from_a_flag_or_a_recipe(value, tmp_path):
    assert build_options(overrides={"forgetting_budget": value}).forgetting_budget == 0.0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"forgetting_budget: {str(value).lower()}\n")  # YAML: `off` is false
    assert build_options(recipe).forgetting_budget == 0.0


def test_a_negative_budget_is_still_refused():
    from adapterkit import ConfigError

    with pytest.raises(ConfigError, match="forgetting_budget"):
        build_options(overrides={"forgetting_budget": "-1"})


@pytest.mark.slow
def test_train_sft_with_no_flags_records_the_defaults_it_used_and_off_turns_the_guard_off(
        adapterkit_cli, tiny_base, adapterkit_data, home):
    common = ["--base", tiny_base, "--data", adapterkit_data["prompt_completion"],
              "--max-steps", "2", "--json"]
    out = adapterkit_cli("train", "sft", "--name", "plain-defaults", *common)
    assert out.exit_code == 0, out.output
    meta = json.loads(adapterkit_cli("show", "plain-defaults", "--json").output)
    options = meta["hyperparameters"]
    assert options["learning_rate"] == 1e-3 and options["forgetting_budget"] == 1.0
    assert options["guard_weight"] == 3.0 and meta["metrics"]["guard"]["weight"] == 3.0
    assert meta["metrics"]["guard"]["kl_batches"] >= 1  # the KL term acted
    assert "general_loss_change_pct" in meta["metrics"]["forgetting"]

    out = adapterkit_cli("train", "sft", "--name", "no-guard", "--forgetting-budget", "off",
                         *common)
    assert out.exit_code == 0, out.output
    meta = json.loads(adapterkit_cli("show", "no-guard", "--json").output)
    options = meta["hyperparameters"]
    assert options["forgetting_budget"] is None and "guard" not in meta["metrics"]
    assert options["learning_rate"] == 1e-3

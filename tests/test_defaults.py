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
    assert got.min_steps == 30 and got.epochs is None  # epochs follow the data's size
    assert (got.r, got.early_stopping) == (16, None)  # the rest as before


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


def test_the_default_guard_yields_to_a_kl_weight_of_0_and_acts_with_early_stopping(trainer):
    sft = trainer("sft")
    stopping = with_defaults(sft, TrainOptions(eval_split=0.2, early_stopping=2))
    assert stopping.forgetting_budget == 1.0 and stopping.early_stopping == 2
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


def test_a_default_of_the_wrong_type_is_the_plugins_error_not_the_users():
    """It read "invalid training options: learning_rate: expected a number, got 'fast'" to a
    user who gave no --lr."""
    class Odd(Trainer):
        name = "odd"
        defaults = {"learning_rate": "fast", "min_steps": -3}

    with pytest.raises(PluginError, match=r"^trainer 'odd' declares defaults the training "
                                          r"options refuse \(.*learning_rate.*'fast'.*\): fix "
                                          r"its Trainer.defaults$"):
        with_defaults(Odd(), TrainOptions(learning_rate=1e-3))  # even where the run sets it


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


@pytest.mark.parametrize("value", ["off", "Off", False])
def test_general_off_turns_the_default_forgetting_check_off(value, trainer, tmp_path):
    got = with_defaults(trainer("sft"), build_options(overrides={"general": value}))
    assert got.general is None and got.forgetting_budget == 1.0  # the guard stays on
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"general: {str(value).lower()}\n")  # YAML: `off` is false
    assert with_defaults(trainer("sft"), build_options(recipe)).general is None
    # in Python too, and for a trainer that measures nothing by default
    assert with_defaults(trainer("sft"), TrainOptions(general="off")).general is None
    assert with_defaults(trainer("dpo"), TrainOptions(general="off")).general is None


@pytest.mark.parametrize("rows,batch,processes,expected", [
    (152, 8, 1, 2.0),  # the sweep's routing task: 19 steps an epoch → 2 epochs, 38 steps
    (120, 8, 1, 2.0),  # gazetteer: 15 → 2, exactly 30
    (240, 8, 1, 1.0),  # the quickstart's triage data: 30 steps in one epoch
    (16, 8, 1, 3.0),   # 2 steps an epoch would need 15: at most 3
    (152, 4, 2, 2.0),  # global batch 8 on 2 processes, as one process of 8
    (1000, 8, 1, 1.0),
])
def test_sft_trains_small_data_for_at_least_30_steps(rows, batch, processes, expected, trainer):
    from adapterkit.training.options import with_data_defaults

    got = with_data_defaults(with_defaults(trainer("sft"), TrainOptions(batch_size=batch)),
                             rows, processes)
    assert got.epochs == expected and got.min_steps == 30


def test_epochs_or_max_steps_given_and_other_trainers_keep_one_epoch(trainer):
    from adapterkit.training.options import with_data_defaults

    sft = trainer("sft")
    assert with_data_defaults(with_defaults(sft, TrainOptions(epochs=1)), 16).epochs == 1
    # beside max_steps no epochs is set: it would do nothing, and a stage run with these
    # options (rlhf's reward) would be refused for giving both
    assert with_data_defaults(with_defaults(sft, TrainOptions(max_steps=4)), 16).epochs is None
    assert with_data_defaults(with_defaults(sft, TrainOptions(min_steps=0)), 16).epochs == 1
    assert with_data_defaults(with_defaults(sft, TrainOptions(min_steps=4)), 16).epochs == 2
    assert with_data_defaults(with_defaults(trainer("dpo"), TrainOptions()), 16).epochs == 1
    with pytest.raises(ConfigError, match="min_steps: must be ≥ 0"):
        build_options(overrides={"min_steps": -1})
    # where the run's length is set, sft's default min_steps is not applied (nor recorded)...
    for given in (dict(epochs=1), dict(max_steps=4), dict(packing=True)):
        assert with_defaults(sft, TrainOptions(**given)).min_steps is None, given


@pytest.mark.parametrize("given,names", [
    ({"epochs": 2}, "epochs"), ({"max_steps": 9}, "max_steps"), ({"packing": True}, "packing"),
    ({"epochs": 2, "packing": True}, "epochs, packing")])
def test_min_steps_with_a_length_set_is_refused_not_ignored(given, names):
    with pytest.raises(ConfigError, match=f"min_steps: 30 acts only when the run's length is "
                                          f"left to it; {names} sets it: leave one out"):
        build_options(overrides={"min_steps": 30, **given})
    assert build_options(overrides={"min_steps": 0, **given}).min_steps == 0  # none: no clash


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
    assert "general_loss_change_pct" in meta["metrics"]["forgetting"]  # still measured

    out = adapterkit_cli("train", "sft", "--name", "unmeasured", "--forgetting-budget", "off",
                         "--general", "off", *common)
    assert out.exit_code == 0, out.output
    meta = json.loads(adapterkit_cli("show", "unmeasured", "--json").output)
    assert "guard" not in meta["metrics"]
    assert "forgetting" not in meta["metrics"]


@pytest.mark.slow
def test_train_sft_on_16_rows_takes_3_epochs_unless_told_otherwise(adapterkit_cli, tiny_base,
                                                                    adapterkit_data, home):
    common = ["--base", tiny_base, "--data", adapterkit_data["prompt_completion"],
              "--batch-size", "8", "--forgetting-budget", "off", "--general", "off"]
    for name, flags, epochs, steps in [("auto", [], 3, 6), ("one", ["--epochs", "1"], 1, 2),
                                       ("fewer", ["--min-steps", "4"], 2, 4),
                                       # counted on the rows left after the eval split: 8
                                       ("split", ["--min-steps", "4", "--eval-split", "0.5"],
                                        3, 3)]:
        out = adapterkit_cli("train", "sft", "--name", name, *common, *flags)
        assert out.exit_code == 0, out.output
        meta = json.loads(adapterkit_cli("show", name, "--json").output)
        assert meta["hyperparameters"]["epochs"] == epochs, name
        assert meta["metrics"]["steps"] == steps, name

"""`adapterkit pipeline RECIPE.yaml`: stages in order, each on the one before; the whole recipe
checked first (every problem at once); resume after a failure; the lineage on the card."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from adapterkit import ConfigError, Library, TrainOptions, train
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.pipeline import load_recipe, run_pipeline

FAST = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "r": 4, "alpha": 8,
        "dropout": 0.0, "logging_steps": 1}


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def data(adapterkit_data, tmp_path) -> dict[str, Path]:
    """The shapes' files, plus a short general-text file for the forgetting figure."""
    general = tmp_path / "general.txt"
    general.write_text("The weather was mild and the market was busy.\n\n"
                       "She read the letter twice before answering it.\n", encoding="utf-8")
    return {**adapterkit_data, "general": general}


def two_stages(tiny_base: Path, **stage2: object) -> dict:
    """sft on prompt/completion pairs, then dpo on preference pairs on top of it."""
    return {"base": str(tiny_base), **FAST, "general": "general.txt",
            "stages": [{"name": "instruct", "trainer": "sft", "data": "prompt_completion.jsonl"},
                       {"name": "polite", "trainer": "dpo", "data": "preference.jsonl",
                        "set": {"beta": 0.1}, **stage2}]}


# -- the recipe file ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("base: [unclosed\n", "is not valid YAML"),
    ("- just\n- a list\n", "must be a mapping with base: and stages: (it is a list)"),
    ("", "(it is empty)"),
])
def test_a_recipe_that_is_not_a_yaml_mapping_is_one_line(adapterkit_cli, tmp_path, text,
                                                         expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    result = adapterkit_cli("pipeline", path)
    assert result.exit_code == 1
    assert expected in result.output and len(result.output.strip().splitlines()) == 1


def test_on_is_a_key_not_a_boolean(tmp_path, data, tiny_base, home):
    """YAML 1.1 reads `on:` as True; the recipe reader keeps it the stage key it is."""
    recipe = two_stages(tiny_base)
    recipe["stages"].append({"name": "third", "trainer": "sft", "data": "text.jsonl",
                             "on": "instruct", "packing": "off"})
    plan = load_recipe(write_recipe(tmp_path, recipe), home=home,
                       plugins=get_plugin_manager(env=False))
    assert [(s.name, s.on) for s in plan.stages] == [
        ("instruct", None), ("polite", "instruct"), ("third", "instruct")]
    assert plan.stages[2].options.packing is False


def test_general_off_is_read_as_no_forgetting_check_not_as_a_file(tmp_path, data, tiny_base,
                                                                   home, pm):
    """`general: off` (YAML's false) turns sft's default check off in a stage, as on the CLI."""
    from adapterkit.training.options import with_defaults

    recipe = two_stages(tiny_base)
    recipe["general"] = "off"
    recipe["stages"][1]["general"] = "general.txt"  # a stage may still measure its own
    plan = load_recipe(write_recipe(tmp_path, recipe), home=home, plugins=pm)
    first, second = plan.stages
    assert with_defaults(pm.trainer("sft"), first.options).general is None
    assert second.options.general.endswith("general.txt")
    recipe["general"] = "general.txt"
    other = load_recipe(write_recipe(tmp_path, recipe, "other.yaml"), home=home, plugins=pm)
    assert other.stages[0].fingerprint != first.fingerprint  # off is part of what it trains


# -- every problem at once, nothing written ------------------------------------------------------

def test_every_problem_of_every_stage_is_reported_at_once(adapterkit_cli, data, tiny_base, home,
                                                         peft_adapter):
    library = Library(home)
    library.import_peft(peft_adapter, "taken", base=str(tiny_base))
    folder = data["general"].parent
    recipe = {
        "base": str(tiny_base), **FAST, "colour": "blue",               # unknown recipe key
        "stages": [
            {"name": "alpha", "trainer": "sft", "data": "prompt_completion.jsonl",
             "on": "beta"},                                               # alpha → beta → alpha
            {"name": "beta", "trainer": "sft", "data": "prompt_completion.jsonl", "on": "alpha"},
            {"name": "gamma", "trainer": "sft", "data": "missing.jsonl",  # stage 3: no such file
             "on": "beta"},
            {"name": "delta", "trainer": "telepathy", "data": "text.jsonl",  # unknown trainer
             "on": "zeta"},                                               # produced later
            {"name": "epsilon", "trainer": "sft", "data": "text.jsonl",
             "on": "ghost",                                               # never produced
             "learning_rate": -1, "r": "many",                            # bad values
             "flavour": "mint"},                                          # unknown stage key
            {"name": "zeta", "trainer": "dpo", "data": "preference.jsonl",
             "set": {"beta": 0, "gamma": 1}},                             # bad trainer options
            {"name": "alpha", "trainer": "sft", "data": "text.jsonl"},   # duplicate name
            {"name": "taken", "trainer": "sft", "data": "text.jsonl"},   # taken in the library
        ]}
    result = adapterkit_cli("pipeline", write_recipe(folder, recipe))
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "nothing was trained" in message
    expected = [
        "unknown recipe key(s) colour",
        "stages alpha → beta → alpha form a cycle",
        "stage 3 (gamma): data: data file",
        "missing.jsonl does not exist",
        "stage 4 (delta): unknown trainer 'telepathy'",
        "stage 4 (delta): on: zeta, which this recipe produces later (stage 6 (zeta))",
        "stage 5 (epsilon): unknown key(s) flavour",
        "stage 5 (epsilon): on: ghost is not a stage of this recipe, and not in the library",
        "learning_rate: must be positive, got -1.0",
        "r: expected int, got 'many'",
        "stage 6 (zeta): invalid training options: unknown dpo option(s) gamma",
        "beta must be above 0, got 0.0",
        "stage 7 (alpha): the name alpha is also stage 1 (alpha)'s",
        "stage 8 (taken): a pocket book named 'taken' already exists",
        "save as a new version with name: taken@2",  # a recipe's key, not train's --name
    ]
    assert [e for e in expected if e not in message] == [], message
    # nothing written: the library holds what it held, no run folder was started
    assert [s.name for s in library.list(all_versions=True)] == ["taken"]
    assert not (home / "runs").exists()


def test_what_needs_the_base_is_checked_for_every_stage_before_the_first_step(data, tiny_base,
                                                                            home):
    """LoRA targets and prompt lengths need the base's structure and tokenizer: checked for
    every stage once it is loaded, still before stage 1 trains."""
    recipe = two_stages(tiny_base)
    recipe["stages"][0]["max_length"] = 3  # shorter than the prompts
    recipe["stages"][1]["target_modules"] = "no_such_proj"
    with pytest.raises(ConfigError) as refused:
        run_pipeline(write_recipe(data["general"].parent, recipe), home=home,
                     plugins=get_plugin_manager(env=False))
    message = str(refused.value)
    assert "has 2 problems" in message and "nothing was trained" in message
    assert "stage 1 (instruct): max_length 3 is not longer than prompt 1" in message
    assert "stage 2 (polite): target module(s) no_such_proj match no linear layer" in message
    assert Library(home).list() == [] and not (home / "runs").exists()


def test_processes_is_checked_before_anything_runs(adapterkit_cli, data, tiny_base):
    path = write_recipe(data["general"].parent, two_stages(tiny_base))
    zero = adapterkit_cli("pipeline", path, "--processes", "0")
    assert zero.exit_code == 1 and "--processes must be at least 1" in zero.output
    from adapterkit.training.launch import places

    if places()[0] < 2:
        pytest.skip("this machine places fewer than 2 processes")
    # a bad recipe is refused by the launching process, before any rank starts
    broken = two_stages(tiny_base)
    broken["stages"][1]["trainer"] = "telepathy"
    refused = adapterkit_cli("pipeline", write_recipe(data["general"].parent, broken, "b.yaml"),
                             "--processes", "2")
    assert refused.exit_code == 1 and "unknown trainer 'telepathy'" in refused.output
    assert Library().list() == []


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_then_dpo_runs_end_to_end_with_the_lineage_on_the_card(adapterkit_cli, data,
                                                                   tiny_base, home):
    path = write_recipe(data["general"].parent, two_stages(tiny_base))
    result = adapterkit_cli("pipeline", path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Stage 1/2: instruct (sft)" in out and "Stage 2/2: polite (dpo)" in out

    library = Library(home)
    first, final = library.get("instruct"), library.get("polite")
    # stage 2 trained on top of stage 1 (frozen, active underneath)
    assert final.meta.stacked_on == ["instruct@1"] and final.meta.parents == ["instruct@1"]
    assert (first.meta.trainer, final.meta.trainer) == ("sft", "dpo")
    # one line per stage at the end: ref, steps, final loss, forgetting figure (as recorded)
    for index, book in ((1, first), (2, final)):
        m = book.meta.metrics
        assert m["steps"] == 2
        assert (f"{index}/2 {book.ref} ({book.meta.trainer}): 2 steps, final loss "
                f"{m['train_loss_final']:.4f}, forgetting "
                f"{m['forgetting']['general_loss_change_pct']:+.2f}%") in out

    # the final pocket book's metadata and card carry the whole lineage
    pipeline = final.meta.pipeline
    assert (pipeline["stage"], pipeline["stages"], pipeline["recipe"]) == (2, 2, "recipe.yaml")
    lineage = pipeline["lineage"]
    assert [(s["ref"], s["trainer"], s["on"]) for s in lineage] == [
        ("instruct@1", "sft", None), ("polite@1", "dpo", "instruct@1")]
    for entry, book in zip(lineage, (first, final)):
        assert entry["metrics"]["train_loss_final"] == book.meta.metrics["train_loss_final"]
        assert entry["forgetting"] == book.meta.metrics["forgetting"]
    card = (final.path / "README.md").read_text(encoding="utf-8")
    assert "Lineage" in card and "`instruct@1`" in card and "`polite@1`" in card
    for book in (first, final):
        assert f"{book.meta.metrics['forgetting']['general_loss_change_pct']:+.2f}%" in card
    # the card is still ours (the standard sections stay)
    assert "An adapterkit pocket book:" in card and "## Results" in card
    # run again: its names are taken, and it says how to continue instead
    again = adapterkit_cli("pipeline", path)
    assert again.exit_code == 1 and "pass --resume" in again.output


@pytest.mark.slow
def test_a_stage_book_is_committed_with_its_pipeline_record(data, tiny_base, home, monkeypatch):
    """The record --resume recognises a stage by is in the stage's own commit, not a second
    write after it: a kill between the two could leave a finished stage unrecognised."""
    committed: list[dict] = []
    commit = Library.commit

    def spy(self, staged, meta, **kwargs):
        committed.append(dict(meta.pipeline))
        return commit(self, staged, meta, **kwargs)

    def no_second_write(self, *args, **kwargs):
        raise AssertionError("a stage's metadata is written after its commit")

    monkeypatch.setattr(Library, "commit", spy)
    monkeypatch.setattr(Library, "update_meta", no_second_write)
    recipe = two_stages(tiny_base)
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["name"] = "instruct@2"  # a stage may name its version
    path = write_recipe(data["general"].parent, recipe)
    run_pipeline(path, home=home, plugins=get_plugin_manager(env=False))
    assert [(c["stage"], c["stage_name"], [s["ref"] for s in c["lineage"]]) for c in committed] \
        == [(1, "instruct@2", ["instruct@2"])]
    book = Library(home).get("instruct")
    assert book.ref == "instruct@2"
    assert book.meta.pipeline == committed[0]
    assert "Lineage" in (book.path / "README.md").read_text(encoding="utf-8")


# -- resume --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_a_failure_in_stage_two_skips_stage_one(data, tiny_base, home):
    from transformers import TrainerCallback

    class CrashAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash in stage 2")

    class Steps(TrainerCallback):
        def __init__(self):
            self.seen: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    pm = get_plugin_manager(env=False)
    path = write_recipe(data["general"].parent, two_stages(tiny_base, save_steps=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(path, home=home, plugins=pm,
                     callbacks=lambda s: [CrashAfterCheckpoint()] if s.index == 2 else [])
    library = Library(home)
    assert [s.name for s in library.list()] == ["instruct"]  # stage 2 saved nothing
    first = library.get("instruct")
    assert first.meta.pipeline["stage"] == 1 and (home / "runs" / "polite").is_dir()

    # without --resume: both the finished stage and the interrupted one say how to go on
    with pytest.raises(ConfigError) as refused:
        load_recipe(path, home=home, plugins=pm)
    assert "instruct@1 was made by this stage in an earlier run" in str(refused.value)
    assert "an interrupted run of polite exists (checkpoint-1)" in str(refused.value)

    trained: dict[int, Steps] = {}
    said: list[str] = []

    def callbacks(stage):
        trained[stage.index] = Steps()
        return [trained[stage.index]]

    result = run_pipeline(path, home=home, plugins=pm, resume=True, callbacks=callbacks,
                          progress=said.append)
    assert list(trained) == [2]  # stage 1 was not trained again
    assert trained[2].seen == [2]  # stage 2 went on from its checkpoint (step 1)
    assert any("instruct@1 was finished by an earlier run; skipped" in m for m in said)
    assert any("resuming from checkpoint-1" in m for m in said)
    assert [(r.pocket_book.ref, r.skipped) for r in result.stages] == [
        ("instruct@1", True), ("polite@1", False)]
    assert [s.version for s in library.list(all_versions=True) if s.name == "instruct"] == [1]
    assert library.get("instruct").meta.files == first.meta.files  # untouched
    final = library.get("polite")
    assert final.meta.stacked_on == ["instruct@1"] and final.meta.metrics["steps"] == 2
    assert [s["ref"] for s in final.meta.pipeline["lineage"]] == ["instruct@1", "polite@1"]
    assert final.meta.pipeline["lineage"][0]["metrics"] == {
        k: v for k, v in first.meta.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert not (home / "runs" / "polite").exists()

    # another recipe (stage 1 changed) is not mistaken for this one: its names are taken
    changed = two_stages(tiny_base, save_steps=1)
    changed["stages"][0]["learning_rate"] = 5e-3
    other = write_recipe(data["general"].parent, changed, "changed.yaml")
    with pytest.raises(ConfigError, match="not made by this stage of this recipe"):
        load_recipe(other, home=home, plugins=pm, resume=True)
    done = load_recipe(path, home=home, plugins=pm, resume=True)
    assert [s.done.ref if s.done else None for s in done.stages] == ["instruct@1", "polite@1"]
    assert json.loads(json.dumps(final.meta.pipeline))  # plain JSON in the metadata


@pytest.mark.slow
def test_processes_applies_to_every_stage(adapterkit_cli, data, tiny_base, home):
    from adapterkit.training.launch import places

    if places()[0] < 2:
        pytest.skip("this machine places fewer than 2 processes")
    recipe = two_stages(tiny_base)
    recipe["stages"][1] = {"name": "more", "trainer": "sft", "data": "messages.jsonl"}
    result = adapterkit_cli("pipeline", write_recipe(data["general"].parent, recipe),
                            "--processes", "2")
    assert result.exit_code == 0, result.output
    final = Library(home).get("more")
    assert final.meta.stacked_on == ["instruct@1"]
    # each stage trained on both processes (recorded by train() itself) and once (one entry)
    assert [(s["ref"], s["metrics"].get("processes")) for s in final.meta.pipeline["lineage"]] \
        == [("instruct@1", 2), ("more@1", 2)]
    assert [s.name for s in Library(home).list(all_versions=True)] == ["instruct", "more"]


@pytest.mark.slow
def test_stages_may_train_in_different_precisions_on_the_one_resident_base(data, tiny_base,
                                                                           home):
    """bf16 then fp32 on the same resident base: each stage trains and measures as it says
    (the fp32 stage on the exact weights, read back after the bf16 one)."""
    recipe = two_stages(tiny_base, precision="fp32")
    recipe["stages"][0]["precision"] = "bf16"
    run_pipeline(write_recipe(data["general"].parent, recipe), home=home,
                 plugins=get_plugin_manager(env=False))
    first, second = (Library(home).get(n).meta.metrics for n in ("instruct", "polite"))
    assert (first["precision"], first["measured_in"]) == ("bf16", "fp32")
    assert second["precision"] == "fp32" and "measured_in" not in second


def test_a_library_book_of_another_base_is_refused_before_stage_one_trains(data, tiny_base,
                                                                           home, tmp_path):
    """on: a library pocket book made on another base is refused with the checks that need
    the base, before the first stage trains (train --on refuses it the same way)."""
    from adapterkit.plugin_api.testing import make_peft_adapter, make_tiny_base

    other = make_tiny_base(tmp_path / "other-base", seed=7)
    library = Library(home)
    library.import_peft(make_peft_adapter(other, tmp_path / "elsewhere"), "elsewhere",
                        base=str(other))
    recipe = two_stages(tiny_base, on="elsewhere")
    with pytest.raises(ConfigError) as refused:
        run_pipeline(write_recipe(data["general"].parent, recipe), home=home,
                     plugins=get_plugin_manager(env=False))
    message = str(refused.value)
    assert "nothing was trained" in message and "stage 2 (polite): on:" in message
    assert [b.name for b in library.list()] == ["elsewhere"]


def test_a_damaged_library_book_named_by_a_stage_is_refused_with_the_recipe(data, tiny_base,
                                                                             home, tmp_path):
    from adapterkit.plugin_api.testing import make_peft_adapter

    library = Library(home)
    book = library.import_peft(make_peft_adapter(tiny_base, tmp_path / "p"), "damaged",
                               base=str(tiny_base))
    weights = book.path / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte: its recorded hash no longer matches
    weights.write_bytes(bytes(raw))
    recipe = two_stages(tiny_base, on="damaged")
    with pytest.raises(ConfigError) as refused:
        load_recipe(write_recipe(data["general"].parent, recipe), home=home,
                    plugins=get_plugin_manager(env=False))
    assert "stage 2 (polite): on:" in str(refused.value) and "damaged" in str(refused.value)


def crashed_in_stage_two(folder: Path, tiny_base: Path, home: Path, pm) -> Path:
    """The two-stage recipe, run until stage 2 crashes after its first checkpoint."""
    from transformers import TrainerCallback

    class CrashAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash in stage 2")

    path = write_recipe(folder, two_stages(tiny_base, save_steps=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(path, home=home, plugins=pm,
                     callbacks=lambda s: [CrashAfterCheckpoint()] if s.index == 2 else [])
    return path


def test_resume_refuses_to_continue_a_stage_whose_definition_changed(data, tiny_base, home):
    """A stage interrupted after a checkpoint, then edited: --resume would continue the old
    run and record the new definition on its pocket book; it is refused instead."""
    pm = get_plugin_manager(env=False)
    folder = data["general"].parent
    crashed_in_stage_two(folder, tiny_base, home, pm)
    edited = write_recipe(folder, two_stages(tiny_base, save_steps=1, learning_rate=5e-3))
    with pytest.raises(ConfigError) as refused:
        load_recipe(edited, home=home, plugins=pm, resume=True)
    assert "the interrupted run of polite (checkpoint-1) was started by another definition" \
        in str(refused.value)
    result = run_pipeline(write_recipe(folder, two_stages(tiny_base, save_steps=1)), home=home,
                          plugins=pm, resume=True)  # as it was: it goes on
    assert result.stages[-1].pocket_book.ref == "polite@1"
    assert not list((home / "runs").glob(".*.stage.json"))  # gone with the finished stages


@pytest.mark.slow
def test_restart_trains_an_interrupted_stage_anew(data, tiny_base, home, adapterkit_cli):
    """The refusals said "pass --resume" only, or to remove a folder by hand: the pipeline had
    no --restart, which the train refusals inside it named."""
    pm = get_plugin_manager(env=False)
    folder = data["general"].parent
    path = crashed_in_stage_two(folder, tiny_base, home, pm)
    with pytest.raises(ConfigError, match="an interrupted run of polite exists \\(checkpoint-1\\): "
                                          "pass --resume to continue it, or --restart to train "
                                          "the stage anew"):
        load_recipe(path, home=home, plugins=pm, restart=False)
    edited = write_recipe(folder, two_stages(tiny_base, save_steps=1, learning_rate=5e-3))
    with pytest.raises(ConfigError, match="put the stage back as it was, or pass --restart too "
                                          "to train it anew"):
        load_recipe(edited, home=home, plugins=pm, resume=True)
    result = adapterkit_cli("pipeline", str(edited), "--resume", "--restart", "--json")
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [(s["ref"], s["skipped"]) for s in stages] == [("instruct@1", True),
                                                         ("polite@1", False)]
    assert "resumed_at_step" not in stages[1]["metrics"]  # from step 0, not checkpoint-1
    polite = Library(home).get("polite")
    assert polite.meta.hyperparameters["learning_rate"] == 5e-3
    assert not (home / "runs" / "polite").exists()


# -- what the pipeline accepts does something, and what it prints is what happened -------------

def test_a_from_stage_refuses_lora_shape_keys_it_would_ignore(tmp_path, data, tiny_base, home,
                                                             adapterkit_cli):
    """A `from:` stage's own r/alpha/dropout/target_modules were overwritten by the copy's
    shape without a word (`train --from` refuses the flags); so were a --config recipe's."""
    recipe = two_stages(tiny_base)  # its recipe-wide r and alpha serve the other stages
    recipe["stages"].append({"name": "copy", "trainer": "sft", "data": "prompt_completion.jsonl",
                             "from": "instruct", "r": 8, "target-modules": "q_proj"})
    with pytest.raises(ConfigError, match="from: instruct continues a copy of that pocket book, "
                                          "with its rank, alpha, dropout and target modules: "
                                          "drop r, target_modules from this stage"):
        load_recipe(write_recipe(tmp_path, recipe), home=home,
                    plugins=get_plugin_manager(env=False))
    config = write_recipe(tmp_path, {"r": 8, "max_steps": 2}, name="train.yaml")
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data",
                            data["prompt_completion"], "--name", "c", "--from", "someone",
                            "--config", config)
    assert result.exit_code == 1 and f"drop r (in {config})" in result.output, result.output


def test_a_stage_on_a_library_book_is_fingerprinted_by_its_weights(tmp_path, data, tiny_base,
                                                                  home):
    """`rm law` then `import ... --name law` gives law@1 again, other weights: a --resume must
    not take the stage trained on the old law@1 as finished."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    library = Library(home)
    library.import_peft(make_peft_adapter(tiny_base, tmp_path / "a", seed=1), "law",
                        base=str(tiny_base))
    recipe = write_recipe(tmp_path, {"base": str(tiny_base), **FAST, "stages": [
        {"name": "on-law", "trainer": "sft", "data": "prompt_completion.jsonl", "on": "law"}]})
    pm = get_plugin_manager(env=False)
    first = load_recipe(recipe, home=home, plugins=pm).stages[0].fingerprint
    assert load_recipe(recipe, home=home, plugins=pm).stages[0].fingerprint == first
    library.remove("law")
    library.import_peft(make_peft_adapter(tiny_base, tmp_path / "b", seed=2), "law@1",
                        base=str(tiny_base))  # by number: a plain name would take law@2
    assert library.get("law").version == 1
    assert load_recipe(recipe, home=home, plugins=pm).stages[0].fingerprint != first


def test_stage_lines_say_why_no_forgetting_figure_and_a_rerun_that_trains_nothing_says_so(
        tmp_path, data, tiny_base, home, adapterkit_cli):
    from types import SimpleNamespace

    from adapterkit.training.pipeline import stage_line

    def line(trainer, general):
        stage = SimpleNamespace(index=1, trainer=trainer, options=SimpleNamespace(general=general))
        return stage_line(SimpleNamespace(stage=stage, pocket_book=SimpleNamespace(ref="x@1"),
                                          metrics={"steps": 2}, skipped=False), 1)

    assert line("reward", None).endswith("forgetting not measured (a reward head scores text)")
    assert line("sft", "off").endswith("forgetting not measured (general: off)")
    assert line("dpo", None).endswith("forgetting not measured (no general:)")
    recipe = write_recipe(tmp_path, {"base": str(tiny_base), **FAST, "stages": [
        {"name": "once", "trainer": "sft", "data": "prompt_completion.jsonl",
         "general": "off"}]})
    first = adapterkit_cli("pipeline", recipe)
    assert first.exit_code == 0 and "Saved once@1" in first.output, first.output
    again = adapterkit_cli("pipeline", recipe, "--resume")
    assert again.exit_code == 0, again.output
    assert "Nothing trained: every stage was finished by an earlier run" in again.output
    assert "Saved once@1" not in again.output


def test_chat_false_with_message_rows_is_refused_in_the_recipes_words(adapterkit_cli, data,
                                                                     tiny_base):
    """A recipe says ``chat: false``, not ``--no-chat``: the refusal names what the user wrote."""
    recipe = {"base": str(tiny_base), **FAST,
              "stages": [{"name": "talk", "trainer": "sft", "data": "messages.jsonl",
                          "chat": False}]}
    result = adapterkit_cli("pipeline", write_recipe(data["general"].parent, recipe))
    assert result.exit_code == 1
    assert "stage 1 (talk): chat: false: " in result.output
    assert "drop chat: false or give string rows" in result.output
    assert "--no-chat" not in result.output


def test_a_recipes_dropout_meets_stages_that_train_without_dropout(tmp_path):
    """The recipe's ``dropout: 0.1`` reaches a dpo stage, which trains without dropout: refused
    with advice that works there (``dropout: 0``); a ``from:`` stage keeps its copy's LoRA
    shape, so the recipe's shape is not its own (it had no way out: ``dropout: 0`` is refused
    in a from: stage)."""
    from adapterkit.training.recipe import _stage_options

    pm = get_plugin_manager(env=False)
    shared = {"dropout": 0.1, "max_steps": 2}

    def problems_of(item: dict) -> list[str]:
        problems: list[str] = []
        _stage_options("stage 2 (x)", item, shared, tmp_path, pm, problems)
        return problems

    [said] = problems_of({"name": "x", "trainer": "dpo", "data": "p.jsonl"})
    assert "trains with dropout off (TRL's disable_dropout)" in said
    assert "in a recipe: dropout: 0 for this stage" in said
    assert problems_of({"name": "x", "trainer": "dpo", "data": "p.jsonl", "dropout": 0}) == []
    assert problems_of({"name": "x", "trainer": "dpo", "data": "p.jsonl", "from": "a"}) == []
    assert problems_of({"name": "x", "trainer": "sft", "data": "p.jsonl"}) == []
    # the default's value, written in the stage (or as the recipe's default), is refused too:
    # it was recorded as 0 without a word
    for stage, shared_value in (({"dropout": 0.05}, 0.1), ({}, 0.05)):
        shared["dropout"] = shared_value
        [said] = problems_of({"name": "x", "trainer": "dpo", "data": "p.jsonl", **stage})
        assert "a dropout of 0.05 would do nothing" in said, said
    # a dpo copy's own dropout is to be dropped (it keeps its copy's), not set to 0
    [said] = problems_of({"name": "x", "trainer": "dpo", "data": "p.jsonl", "from": "a",
                          "dropout": 0.05})
    assert "with its rank, alpha, dropout and target modules: drop dropout" in said, said
    assert problems_of({"name": "x", "trainer": "sft", "data": "p.jsonl"}) == []


def _importer(library: Library, tiny_base: Path, tmp_path: Path, name: str,
              said: list[str]) -> type:
    """A callback class that, at a stage's first step, imports a PEFT adapter as ``name``,
    appending to ``said`` "saved" or the refusal."""
    from transformers import TrainerCallback

    from adapterkit.errors import NameTaken
    from adapterkit.plugin_api.testing import make_peft_adapter

    adapter = make_peft_adapter(tiny_base, tmp_path / "other")

    class ImportDuringStage(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                try:
                    library.import_peft(adapter, name, base=str(tiny_base))
                    said.append("saved")
                except NameTaken as exc:
                    said.append(str(exc))

    return ImportDuringStage


def test_no_other_save_takes_a_later_stages_name_while_an_earlier_one_trains(
        data, tiny_base, home, tmp_path):
    """An import under stage 2's name while stage 1 trained was saved, and the pipeline then
    stopped at stage 2 with its name taken, stage 1's training for nothing: every stage still
    to train holds its name from the pipeline's start, as a run holds its own."""
    library = Library(home)
    said: list[str] = []
    importer = _importer(library, tiny_base, tmp_path, "polite", said)
    pm = get_plugin_manager(env=False)
    path = write_recipe(data["general"].parent, two_stages(tiny_base))
    result = run_pipeline(path, home=home, plugins=pm,
                          callbacks=lambda s: [importer()] if s.index == 1 else [])
    assert len(said) == 1 and said[0].startswith("a run training polite in "), said
    assert [(r.pocket_book.ref, r.skipped) for r in result.stages] == [
        ("instruct@1", False), ("polite@1", False)]
    assert library.get("polite").meta.stacked_on == ["instruct@1"]  # the stage's, not the import
    assert not (home / "locks").exists()  # every lock let go, the home as the run found it
    adapter = tmp_path / "other"  # (the importer's)
    assert str(library.import_peft(adapter, "polite@2", base=str(tiny_base)).ref) == "polite@2"


def test_each_stage_name_is_handed_to_its_run_never_let_go_in_between(data, tiny_base, home,
                                                                       monkeypatch):
    """The pipeline let go of a stage's name just before the stage's train() took it again: an
    import in that moment took the name. Now the held lock is handed to the run as it is."""
    import adapterkit.training.pipeline as pipeline
    from adapterkit.library.run_locks import training_now

    seen: list[tuple[str, str | None]] = []
    real_train = pipeline.train

    def train(trainer, **kwargs):  # the moment between the pipeline and the run's own lock
        seen.append((kwargs["name"], training_now(home, kwargs["name"])))
        return real_train(trainer, **kwargs)

    monkeypatch.setattr(pipeline, "train", train)
    path = write_recipe(data["general"].parent, two_stages(tiny_base))
    run_pipeline(path, home=home, plugins=get_plugin_manager(env=False))
    assert seen == [("instruct", f"pid {os.getpid()}"), ("polite", f"pid {os.getpid()}")]
    assert not (home / "locks").exists()  # every lock let go, the home as the run found it


def test_a_stage_that_stops_before_its_run_takes_its_name_lets_it_go(data, tiny_base, home,
                                                                     monkeypatch):
    """A handed lock no run took (train() refused before it) is released by the pipeline."""
    import adapterkit.training.pipeline as pipeline
    from adapterkit.library.run_locks import training_now

    def train(trainer, **kwargs):
        raise ConfigError("refused before the run took its lock")

    monkeypatch.setattr(pipeline, "train", train)
    path = write_recipe(data["general"].parent, two_stages(tiny_base))
    with pytest.raises(ConfigError):
        run_pipeline(path, home=home, plugins=get_plugin_manager(env=False))
    assert training_now(home, "instruct") is None and training_now(home, "polite") is None
    assert not (home / "locks").exists()


def test_a_stage_named_as_the_reward_book_an_rlhf_stage_trains_is_refused(data, tiny_base,
                                                                          home):
    """rlhf ``pol`` without a reward first trains ``pol-reward``; a later stage under that name
    was found taken only after stage 1 had trained (or, holding it, stopped stage 1's own
    reward run as "another run"). The recipe refuses it, before anything trains
    (``Trainer.also_saves``); with its own reward pocket book, rlhf saves nothing else."""
    stages = [{"name": "pol", "trainer": "rlhf", "data": "preference.jsonl"},
              {"name": "pol-reward", "trainer": "sft", "data": "prompt_completion.jsonl"}]
    recipe = {"base": str(tiny_base), **FAST, "stages": stages}
    pm = get_plugin_manager(env=False)
    with pytest.raises(ConfigError) as refused:
        load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert str(refused.value).endswith(
        "stage 2 (pol-reward): stage 1 (pol, rlhf) also saves a pocket book under the name "
        "pol-reward: give one of the two stages another name")  # (an sft book: no reward)
    assert not (home / "runs").exists()

    stages[1].update(trainer="reward", data="preference.jsonl")  # one that could be: said how
    with pytest.raises(ConfigError) as refused:
        load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert "stage 2 (pol-reward): stage 1 (pol, rlhf) also saves a pocket book under the name " \
        "pol-reward: give one of the two stages another name, or, if stage 2 (pol-reward) is " \
        "meant to be that pocket book, move it before pol, give stage 1 (pol, rlhf) set: " \
        "{reward: pol-reward}, so that its run uses pol-reward instead of training it, and say " \
        "what pol trains on (on: null for the base)" in str(refused.value)
    assert not (home / "runs").exists()

    stages[0]["set"] = {"reward": "judge"}  # its own reward book: pol saves only pol (judge
    # is looked up when the stage starts: a stage may name what an earlier one makes)
    plan = load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert [s.name for s in plan.stages] == ["pol", "pol-reward"]


def _sft_then_rlhf(tiny_base: Path) -> dict:
    return {"base": str(tiny_base), **FAST, "stages": [
        {"name": "first", "trainer": "sft", "data": "prompt_completion.jsonl"},
        {"name": "pol", "trainer": "rlhf", "data": "preference.jsonl",
         "set": {"num_generations": 2, "max_new_tokens": 4, "reward_steps": 2}}]}


def test_the_pocket_book_an_rlhf_stage_saves_besides_is_held_from_the_start(data, tiny_base,
                                                                            home, tmp_path):
    """An import of ``pol-reward`` while stage 1 trained was saved, and stage 2 (rlhf ``pol``,
    which trains ``pol-reward`` first) then stopped, stage 1 trained for nothing: the pipeline
    holds the names a stage's run saves besides its own, and hands them to that run."""
    library = Library(home)
    said: list[str] = []
    importer = _importer(library, tiny_base, tmp_path, "pol-reward", said)
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    result = run_pipeline(path, home=home, plugins=get_plugin_manager(env=False),
                          callbacks=lambda s: [importer()] if s.index == 1 else [])
    assert len(said) == 1 and said[0].startswith("a run training pol-reward in "), said
    assert [r.pocket_book.ref for r in result.stages] == ["first@1", "pol@1"]
    assert library.get("pol-reward").meta.trainer == "reward"  # the stage's, not the import
    assert not (home / "locks").exists()


def test_a_recipe_whose_rlhf_stage_would_save_a_taken_name_is_refused_first(data, tiny_base,
                                                                           home, tmp_path):
    """``pol-reward`` already in the library: rlhf's own check refused it only when stage 2
    started, after stage 1 had trained. The recipe refuses it before anything trains; with
    two versions, what frees the name is every version's removal. A name the library refuses
    for another reason (a name differing only in case) is that stage's problem, said."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    adapter = make_peft_adapter(tiny_base, tmp_path / "other")
    Library(home).import_peft(adapter, "pol-reward", base=str(tiny_base))
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    with pytest.raises(ConfigError) as refused:
        load_recipe(path, home=home, plugins=get_plugin_manager(env=False))
    assert str(refused.value).endswith(
        "stage 2 (pol): its rlhf run also saves a pocket book under the name pol-reward, "
        "which the library holds already: remove it (adapterkit rm pol-reward), or give the "
        "stage another name")
    Library(home).import_peft(adapter, "pol-reward@2", base=str(tiny_base))
    with pytest.raises(ConfigError) as refused:
        load_recipe(path, home=home, plugins=get_plugin_manager(env=False))
    assert "which the library holds already: remove every version of it (adapterkit rm " \
        "pol-reward --all-versions), or give the stage another name" in str(refused.value)
    Library(home).remove("pol-reward", all_versions=True)
    Library(home).import_peft(adapter, "Pol-reward", base=str(tiny_base))
    with pytest.raises(ConfigError) as refused:
        load_recipe(path, home=home, plugins=get_plugin_manager(env=False))
    assert "stage 2 (pol): its rlhf run also saves a pocket book under the name pol-reward, " \
        "which the library refuses ('pol-reward' differs from the pocket book 'Pol-reward' " \
        "only in case" in str(refused.value), str(refused.value)
    assert str(refused.value).endswith(": give the stage another name")


class _SavesBeside:
    """A plugin whose trainer ``sft-beside`` trains as sft and saves, itself, a PEFT folder
    under ``NAME-beside`` (or, with ``fixed``, under ``beside``), which it declares."""

    def __init__(self, tiny_base: Path, tmp_path: Path, fixed: bool | str = False,
                 fails: Exception | None = None) -> None:
        from adapterkit.plugin_api.testing import make_peft_adapter

        self.adapter = make_peft_adapter(tiny_base, tmp_path / "beside-adapter")
        self.tiny_base, self.fixed, self.fails = tiny_base, fixed, fails

    @property
    def trainer(self):
        outer = self

        class SftBeside(type(get_plugin_manager(env=False).trainer("sft"))):
            name = "sft-beside"
            description = "sft, and a pocket book saved beside"

            def also_saves(self, *, name, trainer_options):
                if outer.fails is not None:
                    raise outer.fails
                if isinstance(outer.fixed, str):
                    return [outer.fixed]
                return ["beside" if outer.fixed else name.split("@")[0] + "-beside"]

            def train(self, *, job, **kwargs):
                extra = self.also_saves(name=job.name, trainer_options=None)[0]
                Library(job.home).import_peft(outer.adapter, extra, base=str(outer.tiny_base))
                return super().train(job=job, **kwargs)

        return SftBeside()

    def manager(self):
        from adapterkit import hookimpl

        trainer = self.trainer

        class Plugin:
            @hookimpl
            def register_trainers(self, register):
                register(trainer)

        return get_plugin_manager(env=False, plugins={"beside": Plugin()})


def test_a_plugin_saving_what_it_declares_itself_is_not_refused_in_a_pipeline(
        data, tiny_base, home, tmp_path):
    """The pipeline holds the names a stage's run declares it saves besides (also_saves); a
    plugin that saves one itself, through the library on its run's thread, was refused as if
    another run trained it (the pipeline's own hold, pid of this very process)."""
    pm = _SavesBeside(tiny_base, tmp_path).manager()
    recipe = {"base": str(tiny_base), **FAST, "general": "general.txt", "stages": [
        {"name": "one", "trainer": "sft-beside", "data": "prompt_completion.jsonl"}]}
    result = run_pipeline(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert [r.pocket_book.ref for r in result.stages] == ["one@1"]
    assert Library(home).get("one-beside").ref == "one-beside@1"
    assert not (home / "locks").exists()


def test_two_stages_whose_runs_would_save_the_same_name_are_refused(data, tiny_base, home,
                                                                   tmp_path):
    pm = _SavesBeside(tiny_base, tmp_path, fixed=True).manager()
    recipe = {"base": str(tiny_base), **FAST, "general": "general.txt", "stages": [
        {"name": "one", "trainer": "sft-beside", "data": "prompt_completion.jsonl"},
        {"name": "two", "trainer": "sft-beside", "data": "prompt_completion.jsonl"}]}
    with pytest.raises(ConfigError) as refused:
        load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert "stage 2 (two, sft-beside): stage 1 (one) also saves a pocket book under the name " \
        "beside, as this stage's run would: give one of the two stages another name" \
        in str(refused.value)


def test_a_name_a_stage_saves_besides_is_checked_at_the_version_declared(data, tiny_base,
                                                                          home, tmp_path):
    """A trainer that declares ``beside@2``: the recipe dropped the version and refused it
    because ``beside@1`` was in the library; ``beside@2`` itself taken is refused."""
    pm = _SavesBeside(tiny_base, tmp_path, fixed="beside@2").manager()
    recipe = {"base": str(tiny_base), **FAST, "general": "general.txt", "stages": [
        {"name": "one", "trainer": "sft-beside", "data": "prompt_completion.jsonl"}]}
    path = write_recipe(data["general"].parent, recipe)
    library = Library(home)
    library.import_peft(_SavesBeside(tiny_base, tmp_path / "b1").adapter, "beside@1",
                        base=str(tiny_base))
    plan = load_recipe(path, home=home, plugins=pm)
    assert plan.stages[0].also_saves == ["beside@2"]
    library.import_peft(_SavesBeside(tiny_base, tmp_path / "b2").adapter, "beside@2",
                        base=str(tiny_base))
    with pytest.raises(ConfigError, match="also saves a pocket book under the name beside@2, "
                                          "which the library holds already"):
        load_recipe(path, home=home, plugins=pm)


@pytest.mark.parametrize("fails", [ConfigError("beside needs a --set key"), KeyError("k")])
def test_a_plugin_s_also_saves_that_fails_is_a_problem_of_its_stage(data, tiny_base, home,
                                                                    tmp_path, fails):
    """Its own adapterkit error is said as it is; anything else is its bug, named so."""
    pm = _SavesBeside(tiny_base, tmp_path, fails=fails).manager()
    recipe = {"base": str(tiny_base), **FAST, "general": "general.txt", "stages": [
        {"name": "one", "trainer": "sft-beside", "data": "prompt_completion.jsonl"}]}
    with pytest.raises(ConfigError) as refused:
        load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    said = str(refused.value)
    if isinstance(fails, ConfigError):
        assert "stage 1 (one): beside needs a --set key" in said, said
    else:
        assert "stage 1 (one): trainer sft-beside's also_saves() failed (KeyError: 'k'); " \
            "report it to its plugin's authors" in said, said
    assert not (home / "runs").exists()


def _keep_as_said(said: str, recipe: dict, data, home: Path, pm) -> None:
    """The first way on, followed word for word: stage 2 given the key and mapping said, with
    --resume --restart; the recipe is taken (stage 1 done, stage 2 to train)."""
    import re

    import yaml

    key, mapping = re.search(r"to keep it, give (?:the stage|stage 2 \(pol\)) (\w+): (\{.*?\})"
                             r" \(in place of its \1:\), so that its run uses", said).groups()
    assert yaml.safe_load(mapping)["reward"] == "pol-reward@1", mapping
    recipe["stages"][1][key] = yaml.safe_load(mapping)
    plan = load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm,
                       resume=True, restart=True)
    assert [s.done is not None for s in plan.stages] == [True, False]


@pytest.mark.parametrize("key", ["set", "trainer_options"])
def test_a_resume_past_an_rlhf_stage_s_saved_reward_book_says_how_to_go_on(data, tiny_base,
                                                                           home, key):
    """An rlhf stage interrupted after its reward pocket book was saved: --resume loaded the
    base and then met rlhf's refusal, whose advice (--reward, --name) a pipeline cannot take.
    The recipe says so before anything loads, with two ways on that work: keep the reward
    pocket book (set: {reward: ...}) or train it again, each with --resume --restart (stage 1
    is finished: --restart alone is refused there). A stage that gives its trainer options as
    ``trainer_options:`` is told that key (``set:`` beside it is refused)."""
    pm = get_plugin_manager(env=False)
    recipe = _sft_then_rlhf(tiny_base)
    recipe["stages"][1][key] = recipe["stages"][1].pop("set")
    path = write_recipe(data["general"].parent, recipe)
    run_pipeline(path, home=home, plugins=pm)
    library = Library(home)
    library.remove("pol")  # as if the policy's run had stopped after its reward stage:
    (home / "runs" / "pol").mkdir(parents=True)  # what that run records as it starts it,
    (home / "runs" / "pol" / "stages.json").write_text('["pol-reward"]')  # and as it saves
    (home / "runs" / "pol" / "stages-saved.json").write_text('["pol-reward@1"]')
    for restart in (False, True):
        with pytest.raises(ConfigError) as refused:
            load_recipe(path, home=home, plugins=pm, resume=True, restart=restart)
        assert str(refused.value).endswith(
            "stage 2 (pol): its interrupted run saved pol-reward@1 before it stopped: to keep "
            f"it, give the stage {key}: {{num_generations: 2, max_new_tokens: 4, reward: "
            f"pol-reward@1}} (in place of its {key}:), so that its run uses pol-reward@1 "
            "instead of training it, and pass --resume "
            "--restart; or remove it (adapterkit rm pol-reward@1) and pass --resume --restart "
            "to train the stage anew"), str(refused.value)

    from adapterkit.plugin_api.testing import make_peft_adapter

    other = make_peft_adapter(tiny_base, data["general"].parent / "other")
    library.import_peft(other, "pol-reward@2", base=str(tiny_base))  # (pol-reward is free only
    with pytest.raises(ConfigError) as taken:  # when no version is left)
        load_recipe(path, home=home, plugins=pm, resume=True)
    assert "or remove every version of it (adapterkit rm pol-reward --all-versions) and pass " \
        "--resume --restart to train the stage anew" in str(taken.value), str(taken.value)
    library.remove("pol-reward@2")
    _keep_as_said(str(refused.value), recipe, data, home, pm)  # the first way
    library.remove("pol-reward")  # the second way, followed
    plan = load_recipe(path, home=home, plugins=pm, resume=True, restart=True)
    assert [s.done is not None for s in plan.stages] == [True, False]


@pytest.mark.parametrize(("held", "said_first"), [
    ("pol-reward", "stage 2 (pol, rlhf) saves pol-reward besides its own pocket book, and "
                   "another run of pol-reward is training in "),
    ("pol", "stage 2 (pol): another run of pol is training in ")])
def test_a_pipeline_refused_a_name_another_run_holds_says_which_stage(data, tiny_base, home,
                                                                      held, said_first):
    """A stage's own name, or one its run saves besides: the stage and its name: are said
    (run_locks.hold_run's ``instead``), not train's --name."""
    from adapterkit.errors import RunStateError
    from adapterkit.library.run_locks import hold_run

    other = hold_run(home, held)  # what another run of that name holds
    try:
        path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
        with pytest.raises(RunStateError) as refused:
            run_pipeline(path, home=home, plugins=get_plugin_manager(env=False))
    finally:
        other.release()
    said = str(refused.value)
    assert said.startswith(said_first) and \
        said.endswith(": wait for it to finish, or give the stage another name (name:)"), said
    assert Library(home).list() == []


def test_an_rlhf_stage_that_fails_after_saving_its_reward_book_says_the_pipeline_s_way_on(
        data, tiny_base, home, monkeypatch):
    """The stage's run saved pol-reward, then its policy part failed. The run used to advise
    the command line's ``--reward NAME`` and the pipeline ``--resume``, which a pipeline does
    not take or refuses past that book; the stage now says the two ways that work there
    (the same ones a later ``--resume`` is told)."""
    import trl

    def fails(self, *args, **kwargs):
        raise RuntimeError("the policy's step failed")

    monkeypatch.setattr(trl.GRPOTrainer, "train", fails)
    said: list[str] = []
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    pm = get_plugin_manager(env=False)
    with pytest.raises(RuntimeError, match="the policy's step failed"):
        run_pipeline(path, home=home, plugins=pm, progress=said.append)
    assert sorted(b.name for b in Library(home).list()) == ["first", "pol-reward"]
    text = "\n".join(said)
    assert "--reward" not in text and "--resume to continue" not in text, text
    assert "pol-reward@1 (a stage of its run) was saved; pol was not." in said
    way = ("Stage 2/2: pol (rlhf) stopped; first@1 (an earlier stage) is saved. Its run saved "
           "pol-reward@1 before it stopped: to keep it, give stage 2 (pol) set: "
           "{num_generations: 2, max_new_tokens: 4, reward: pol-reward@1} (in place of its "
           "set:), so that its run uses pol-reward@1 "
           "instead of training it, and pass --resume --restart; or remove it (adapterkit rm "
           "pol-reward@1) and pass --resume --restart to train stage 2 (pol) anew.")
    assert way in said, text
    with pytest.raises(ConfigError) as refused:  # what --resume is told: the same two ways
        load_recipe(path, home=home, plugins=pm, resume=True)
    assert "to keep it, give the stage set: {num_generations: 2, max_new_tokens: 4, reward: " \
        "pol-reward@1} (in place of its set:)" in str(refused.value)
    _keep_as_said(way, _sft_then_rlhf(tiny_base), data, home, pm)  # followed as said


@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_a_taken_name_the_run_did_not_save_is_not_said_to_be_its_own(data, tiny_base, home,
                                                                     tmp_path, kind):
    """The reward stage recorded as started (stages.json) but stopped before it saved; then
    something else took pol-reward. --resume said "its interrupted run saved pol-reward" (of
    a reward pocket book): only what the run recorded saving is its own. Reusing one is
    offered where it could be the one (a reward head)."""
    from adapterkit.plugin_api.testing import make_peft_adapter

    pm = get_plugin_manager(env=False)
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    (home / "runs" / "pol").mkdir(parents=True)
    (home / "runs" / "pol" / "stages.json").write_text('["pol-reward"]')
    if kind == "policy":
        Library(home).import_peft(make_peft_adapter(tiny_base, tmp_path / "a"), "pol-reward",
                                  base=str(tiny_base))
    else:
        train("reward", base=str(tiny_base), data=str(data["preference"]), name="pol-reward",
              home=home, plugins=pm, options=TrainOptions(**{**FAST, "max_steps": 1}))
    with pytest.raises(ConfigError) as refused:
        load_recipe(path, home=home, plugins=pm, resume=True)
    said = str(refused.value)
    assert "stage 2 (pol): its rlhf run also saves a pocket book under the name pol-reward, " \
        "which the library holds already: remove it (adapterkit rm pol-reward), or give the " \
        "stage another name" in said
    assert "interrupted run saved" not in said, said
    assert ("if it is the pocket book that run would train, give the stage set: "
            "{num_generations: 2, max_new_tokens: 4, reward: pol-reward} (in place of its set:)"
            in said) == (kind == "reward"), said


def test_a_lock_file_that_cannot_be_removed_never_hides_why_a_stage_stopped(
        data, tiny_base, home, monkeypatch, unremovable_locks):
    """A stage's run failed, and the run's, then the pipeline's, release of the names' locks
    failed to remove their files: that error replaced the run's own. Now the run's exception
    goes on and the lock files are warned of (their locks let go all the same)."""
    import trl

    def fails(self, *args, **kwargs):
        raise RuntimeError("the stage's step failed")

    monkeypatch.setattr(trl.SFTTrainer, "train", fails)
    unremovable_locks()
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    with pytest.warns(RuntimeWarning, match="could not be removed") as warned, \
            pytest.raises(RuntimeError, match="the stage's step failed"):
        run_pipeline(path, home=home, plugins=get_plugin_manager(env=False))
    monkeypatch.undo()
    locks = sorted(re.search(r"(run-[^/ ]+\.lock) could not be removed", str(w.message))[1]
                   for w in warned if "could not be removed" in str(w.message))
    assert locks == ["run-first.lock", "run-pol-reward.lock", "run-pol.lock"], locks
    from adapterkit.library.run_locks import training_now

    assert [training_now(home, n) for n in ("first", "pol", "pol-reward")] == [None] * 3


def test_a_stage_following_a_reward_stage_is_refused_before_anything_trains(data, tiny_base,
                                                                             home):
    """[reward judge, rlhf pol set: {reward: judge}]: pol follows judge by default, and a
    reward head generates nothing to train on — refused only when pol started, after judge
    had trained (as a library book named in on: is refused before anything trains)."""
    stages = [{"name": "judge", "trainer": "reward", "data": "preference.jsonl"},
              {"name": "pol", "trainer": "rlhf", "data": "preference.jsonl",
               "set": {"reward": "judge"}}]
    recipe = {"base": str(tiny_base), **FAST, "stages": stages}
    pm = get_plugin_manager(env=False)
    said = _refusal(data, recipe, home, pm)
    assert said.endswith(
        "stage 2 (pol): on: judge is a reward pocket book (it scores text, it does not "
        "generate); name a policy pocket book (a stage without on: or from: trains on the "
        "stage before it; on: null trains on the base)"), said
    stages.append({"name": "judge2", "trainer": "reward", "data": "preference.jsonl",
                   "from": "judge"})  # continuing a reward stage is what a reward head can do
    stages[1]["on"] = None  # the remedy said: on the base
    plan = load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert [s.name for s in plan.stages] == ["judge", "pol", "judge2"]
    stages[2]["on"] = "pol"  # a reward head on top of a policy stage: fine too
    del stages[2]["from"]
    plan = load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    assert plan.stages[2].parent == 2
    stages[2].update({"from": "pol"})  # but no reward head to continue in a policy
    del stages[2]["on"]
    assert "stage 3 (judge2): from: pol is a policy pocket book" in \
        _refusal(data, recipe, home, pm)


def _refusal(data, recipe: dict, home: Path, pm) -> str:
    """Why ``load_recipe`` refuses ``recipe`` (written beside the test data)."""
    with pytest.raises(ConfigError) as refused:
        load_recipe(write_recipe(data["general"].parent, recipe), home=home, plugins=pm)
    return str(refused.value)


def test_an_rlhf_stage_that_fails_as_it_is_measured_still_says_the_way_on(data, tiny_base,
                                                                          home, monkeypatch):
    """The reward pocket book saved and the policy trained, then measuring it failed: only a
    failure inside the trainer carried what the run had saved, so the stage said --resume,
    which is refused past that book."""
    from adapterkit.training import run as run_module

    real = run_module._measure

    def measure(run, state, elapsed):
        if run.ref.name == "pol":
            raise RuntimeError("measuring failed")
        return real(run, state, elapsed)

    monkeypatch.setattr(run_module, "_measure", measure)
    said: list[str] = []
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    with pytest.raises(RuntimeError, match="measuring failed"):
        run_pipeline(path, home=home, plugins=get_plugin_manager(env=False),
                     progress=said.append)
    assert "pol-reward@1 (a stage of its run) was saved; pol was not." in said
    assert any(line.startswith("Stage 2/2: pol (rlhf) stopped; first@1 (an earlier stage) is "
                               "saved. Its run saved pol-reward@1 before it stopped: to keep it")
               for line in said), said


def test_ctrl_c_in_an_rlhf_stage_past_its_reward_book_says_one_way_on(data, tiny_base, home,
                                                                      adapterkit_cli,
                                                                      monkeypatch):
    """`adapterkit pipeline` added "Run ... --resume to continue from there" below the stage's
    own advice, a way that is refused past the reward pocket book the stage's run saved."""
    import trl

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trl.GRPOTrainer, "train", interrupted)
    path = write_recipe(data["general"].parent, _sft_then_rlhf(tiny_base))
    out = adapterkit_cli("pipeline", str(path))
    assert out.exit_code == 130, out.output
    assert "Its run saved pol-reward@1 before it stopped: to keep it" in out.output
    assert "Interrupted in stage 2: go on as said above." in out.output, out.output
    assert "--resume` to continue" not in out.output


@pytest.mark.parametrize("stage", ["instruct", "polite"])
def test_a_failure_after_a_stage_saved_its_own_pocket_book_says_it_was_saved(data, tiny_base,
                                                                             home, stage):
    """A plugin's ``pocket_book_saved`` hook failed after a stage's commit went through, its
    warning an error (``-W error``): the run said "instruct was not [saved]" and, past a
    checkpoint, that --resume continues from it (refused: the name is taken). Now its book is
    said saved, on the exception too (``saved_own``), and the way on is --resume, which skips
    the stage, as followed here."""
    import warnings

    from adapterkit.plugin_api.hookspecs import hookimpl
    from adapterkit.plugin_api.manager import PluginWarning

    class Fails:
        @hookimpl
        def pocket_book_saved(self, pocket_book):
            if pocket_book.name == stage:
                raise RuntimeError("the watcher failed")

    path = write_recipe(data["general"].parent, two_stages(tiny_base, save_steps=1))
    said: list[str] = []
    with pytest.raises(PluginWarning, match="the watcher failed") as failed, \
            warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        run_pipeline(path, home=home, progress=said.append,
                     plugins=get_plugin_manager(env=False, plugins={"fails": Fails()}))
    assert failed.value.saved_own == f"{stage}@1" and failed.value.stages_saved == []
    assert f"{stage}@1 was saved before the run stopped: what stopped it came after." in said
    text = "\n".join(said)
    assert "was not" not in text and "checkpoint" not in text, text
    assert said[-1] == {
        "instruct": "Stage 1/2: instruct (sft) stopped after its pocket book was saved. Run "
                    "the pipeline again with --resume to go on past stage 1.",
        "polite": "Stage 2/2: polite (dpo) stopped after its pocket book was saved; "
                  "instruct@1 (an earlier stage) is saved. Its pocket book is the pipeline's "
                  "last: nothing is left to train."}[stage]
    assert not (home / "runs" / stage).exists()  # (its checkpoints: the run is over)
    assert list((home / "runs").glob(f".{stage}.stage.json")) == []  # (nor its marker)
    result = run_pipeline(path, home=home, plugins=get_plugin_manager(env=False), resume=True)
    assert [(r.pocket_book.ref, r.skipped) for r in result.stages] == [
        ("instruct@1", True), ("polite@1", stage == "polite")]


@pytest.mark.parametrize("key", ["trainer_options", "trainer-options"])
def test_a_stage_with_set_and_trainer_options_is_refused_however_it_is_spelled(
        data, tiny_base, home, key):
    """Two spellings of one mapping: neither may silently win (the advice past a saved reward
    pocket book names the key a stage uses)."""
    recipe = two_stages(tiny_base)
    recipe["stages"][1][key] = {"beta": 0.2}
    with pytest.raises(ConfigError, match="give trainer options in set: or trainer_options:, "
                                          "not both"):
        load_recipe(write_recipe(data["general"].parent, recipe), home=home,
                    plugins=get_plugin_manager(env=False))

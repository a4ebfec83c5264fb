"""How the advice past a pocket book a run saved besides its own is spelled, from the
trainer's ``reuse_option`` and ``reuse_drops`` alone: no trainer's name in the core."""

from __future__ import annotations

from dataclasses import dataclass

from adapterkit import Trainer, TrainOptions
from adapterkit.training import reuse


@dataclass
class JudgeOptions:
    judge: str | None = None
    judge_steps: int | None = None
    warmth: float = 1.0


def _trainer(option: str | None = "judge") -> Trainer:
    trainer = Trainer()
    trainer.name, trainer.options = "judged", JudgeOptions
    trainer.reuse_option, trainer.reuse_drops = option, ("judge_steps", "eval_split")
    return trainer


def test_a_command_line_reuses_through_the_trainer_s_option_and_drops_what_it_refuses():
    from adapterkit.cli.train import _reuse_flags

    given = TrainOptions(eval_split=0.2, trainer_options={"judge_steps": 3})
    flags = {"eval_split": 0.2, "trainer_options": {"judge_steps": 3}}
    assert _reuse_flags(_trainer(), "j@2", given, flags, None) == \
        "--set judge=j@2 and leave out --set judge_steps, --eval-split"
    assert _reuse_flags(_trainer(), "j@2", given, {}, "run.yaml") == \
        "--set judge=j@2, and remove judge_steps, eval_split from run.yaml"  # (its --config)
    assert _reuse_flags(_trainer(), "j@2", TrainOptions(), {}, None) == "--set judge=j@2"
    assert _reuse_flags(_trainer("reward"), "r@1", TrainOptions(), {}, None) == "--reward r@1"
    assert _reuse_flags(_trainer(None), "j@2", given, flags, None) is None


def test_past_a_removal_the_command_line_says_restart_never_resume():
    """A resume after removing what the run saved would train it again and go on from steps
    taken against the one removed: a mixed run."""
    from adapterkit.cli.train import _how_on, _past_saved

    stopped = KeyboardInterrupt()
    stopped.checkpoint, stopped.finished, stopped.save_steps = "checkpoint-4", False, 2
    past, removes = _past_saved(["j@2"], _trainer(None), TrainOptions())
    assert (past, removes) == (" (remove j@2 first: adapterkit rm j@2)", True)
    assert _how_on(stopped, past, removes) == (
        False, "checkpoint-4 was trained against what a run again trains anew: run the same "
               "command with --restart (remove j@2 first: adapterkit rm j@2)")
    past, removes = _past_saved(["j@2"], _trainer(), TrainOptions())
    assert _how_on(stopped, past, removes) == (
        True, "run the same command with --resume to continue from checkpoint-4 (reuse j@2: "
              "add --set judge=j@2)")


def test_the_built_in_trainers_drop_only_options_there_are():
    """Registration cannot ask (it sits below the training package): a name neither of the
    trainer's options nor a training option would never be advised."""
    import dataclasses

    from adapterkit.plugin_api.manager import get_plugin_manager

    training = {f.name for f in dataclasses.fields(TrainOptions)}
    for trainer in get_plugin_manager(env=False).trainers:
        own = {f.name for f in dataclasses.fields(trainer.options)} if trainer.options else set()
        assert set(trainer.reuse_drops) <= own | training, trainer.name
    assert get_plugin_manager(env=False).trainer("rlhf").reuse_drops  # (something checked)


def test_a_recipe_stage_is_told_its_set_entry_and_the_keys_to_drop():
    """The whole mapping the stage then gives, under the key it gives it with: ``set:``
    beside a ``trainer_options:`` is refused, and a stage's ``set:`` replaces the recipe's
    ``trainer_options:`` (what it keeps of those is said in it)."""
    given = TrainOptions(eval_split=0.2, trainer_options={"judge_steps": 3, "warmth": 0.5})
    for key in ("set", "trainer_options"):
        assert reuse.in_stage(_trainer(), "j@2", given, "stage 2 (p)", key) == (
            f"give stage 2 (p) {key}: {{warmth: 0.5, judge: j@2}} (in place of its {key}:), "
            "set its eval_split: 0.0, so that its run uses j@2 instead of training it")
    assert reuse.in_stage(_trainer(), "j@2", given, "stage 2 (p)") == (
        "give stage 2 (p) set: {warmth: 0.5, judge: j@2} (in place of the recipe's "
        "trainer_options:, which a stage's set: replaces), set its eval_split: 0.0, so that "
        "its run uses j@2 instead of training it")
    assert reuse.in_stage(_trainer(), "j@2", TrainOptions(), "stage 2 (p)") == (
        "give stage 2 (p) set: {judge: j@2}, so that its run uses j@2 instead of training it")
    assert reuse.in_stage(_trainer(), "j@2", TrainOptions(early_stopping=3), "s") == (
        "give s set: {judge: j@2}, so that its run uses j@2 instead of training it")  # not
    # among its reuse_drops
    said = reuse.after_stop(_trainer(None), ["j@2", "k@1"], given, "stage 2 (p)")
    assert said == ("j@2, k@1 before it stopped: remove them (adapterkit rm j@2, adapterkit rm "
                    "k@1) and pass --resume --restart to train stage 2 (p) anew")


def test_a_name_saved_besides_is_the_run_s_own_only_at_the_version_it_declares(
        library, peft_adapter, tiny_base):
    """A recorded ``beside@1`` was taken as the run's own wherever the trainer declared
    ``beside``, at any version: a declared ``beside@2``, which is free, was refused as "its
    interrupted run saved beside@1". A record that does not read as a name names nothing.
    What frees a plain name is every version's removal."""
    library.import_peft(peft_adapter, "beside", base=str(tiny_base))
    one = "remove it (adapterkit rm beside@1)"
    assert reuse.taken_besides(library, ["beside@2"], ["beside@1"]) == []
    assert reuse.taken_besides(library, ["beside"], ["beside@1", "not a name!"]) == [
        reuse.Taken("beside@1", own=True, reusable=True, rm=one)]
    assert reuse.taken_besides(library, ["beside@1"], ["beside@1"]) == [
        reuse.Taken("beside@1", own=True, reusable=True, rm=one)]
    assert reuse.taken_besides(library, ["beside"], []) == [  # (a policy: not to reuse)
        reuse.Taken("beside", own=False, reusable=False, rm="remove it (adapterkit rm beside)")]
    assert reuse.taken_besides(library, ["beside@1"], ["beside@2"]) == [
        reuse.Taken("beside@1", own=False, reusable=False, rm=one)]  # (@2 recorded, not held)
    assert reuse.taken_besides(library, ["elsewhere"], ["beside@1"]) == []
    library.import_peft(peft_adapter, "beside@2", base=str(tiny_base))
    every = "remove every version of it (adapterkit rm beside --all-versions)"
    assert reuse.taken_besides(library, ["beside"], []) == [
        reuse.Taken("beside", own=False, reusable=False, rm=every)]
    assert reuse.taken_besides(library, ["beside"], ["beside@1"]) == [
        reuse.Taken("beside@1", own=True, reusable=True, rm=every)]
    assert reuse.taken_besides(library, ["beside@2"], []) == [
        reuse.Taken("beside@2", own=False, reusable=False, rm="remove it (adapterkit rm beside@2)")]


def test_a_name_refused_for_another_reason_says_that_reason(library, peft_adapter, tiny_base):
    """A name differing from a held one only in case is no pocket book to remove or reuse:
    its own refusal is said, not "the library holds it already: remove it"."""
    library.import_peft(peft_adapter, "Beside", base=str(tiny_base))
    [taken] = reuse.taken_besides(library, ["beside"], [])
    assert (taken.held, taken.reusable, taken.rm) == ("beside", False, "")
    assert taken.why == ("'beside' differs from the pocket book 'Beside' only in case, which "
                         "some file systems do not tell apart")  # (its reason, not its advice)

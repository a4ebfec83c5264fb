"""`train --resume` continues only the run its checkpoints are of: the same definition (data,
trainer, LoRA shape, training options), not a run that had finished its steps; and the line
after Ctrl-C says what a next run can do."""

from __future__ import annotations

import contextlib
import os

import pytest
from transformers import TrainerCallback

from adapterkit import Library, TrainOptions
from adapterkit.errors import RunStateError
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.run import train

#: Small and fast; checkpoints every 2 steps; the forgetting guard on (sft's default budget).
OPTS = dict(max_steps=10, batch_size=2, save_steps=2, logging_steps=1, r=4, alpha=8,
            dropout=0.0, precision="fp32", max_length=128, learning_rate=1e-3)


class Interrupt(TrainerCallback):
    """Ctrl-C at the end of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@pytest.fixture
def pm():
    return get_plugin_manager(env=False)


@pytest.fixture
def rows(adapterkit_data):
    return str(adapterkit_data["prompt_completion"])


def interrupted(tiny_base, rows, home, pm, *, at: int = 5, **kw) -> None:
    with pytest.raises(KeyboardInterrupt):
        train("sft", base=str(tiny_base), data=rows, name="cut", home=home, plugins=pm,
              options=TrainOptions(**{**OPTS, **kw}), callbacks=[Interrupt(at)])
    assert (home / "runs" / "cut" / "checkpoint-4").is_dir()


@contextlib.contextmanager
def base_never_loads(monkeypatch):
    """Within it, loading the base fails the test: a refusal must come before."""
    def loads(*args, **kwargs):
        raise AssertionError("the base was loaded")

    with monkeypatch.context() as m:
        m.setattr("adapterkit.training.run.load_for_method", loads)
        yield


def test_a_resume_with_another_lora_shape_is_refused_in_one_line_before_the_base_loads(
        tiny_base, rows, home, pm, adapterkit_cli, monkeypatch):
    """It was transformers' 'size mismatch for ...lora_A...' traceback, after the base
    loaded; now one line naming the difference and what to do."""
    interrupted(tiny_base, rows, home, pm)

    with base_never_loads(monkeypatch):
        with pytest.raises(RunStateError, match=r"r 4 → 8.*resume with the same settings, or "
                                                 r"pass --restart to start over"):
            train("sft", base=str(tiny_base), data=rows, name="cut", home=home, plugins=pm,
                  options=TrainOptions(**{**OPTS, "r": 8}), resume=True)
    flags = ["--lr", 1e-3, "--max-steps", 10, "--batch-size", 2, "--save-steps", 2,
             "--logging-steps", 1, "--alpha", 8, "--dropout", 0.0, "--precision", "fp32",
             "--max-length", 128]
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", rows, "--name",
                            "cut", "-r", 8, *flags, "--resume")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the interrupted run of cut was "
                                                   "started with other settings: r 4 → 8;")
    # with the checkpoint's own settings it goes on
    again = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", rows, "--name", "cut",
                           "-r", 4, *flags, "--resume")
    assert again.exit_code == 0, again.output
    assert Library(home).get("cut").meta.metrics["steps"] == 10


def test_a_resume_with_other_data_or_options_is_refused_listing_each_difference(
        tiny_base, rows, home, pm, tmp_path):
    interrupted(tiny_base, rows, home, pm)
    other = tmp_path / "other.jsonl"
    lines = open(rows, encoding="utf-8").read().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")  # same rows, new order
    changed = TrainOptions(**{**OPTS, "learning_rate": 5e-3, "max_steps": 12, "max_length": 64,
                              "forgetting_budget": 2.0})
    with pytest.raises(RunStateError) as refused:
        train("sft", base=str(tiny_base), data=str(other), name="cut", home=home, plugins=pm,
              options=changed, resume=True)
    said = str(refused.value)
    assert "\n" not in said
    for difference in ("data sha256:", "forgetting_budget 1.0 → 2.0", "learning_rate 0.001 → "
                       "0.005", "max_length 128 → 64", "max_steps 10 → 12"):
        assert difference in said, said
    assert said.endswith("resume with the same settings, or pass --restart to start over")
    # what changes nothing the steps compute may change: checkpoints, logging, trackers
    result = train("sft", base=str(tiny_base), data=rows, name="cut", home=home, plugins=pm,
                   options=TrainOptions(**{**OPTS, "save_steps": 3, "logging_steps": 2}),
                   resume=True)
    assert (result.metrics["steps"], result.metrics["resumed_at_step"]) == (10, 4)
    hyper = result.pocket_book.meta.hyperparameters
    assert (hyper["learning_rate"], hyper["max_length"], hyper["r"]) == (1e-3, 128, 4)


def test_a_run_folder_without_the_record_resumes_as_before(tiny_base, rows, home, pm):
    """A run interrupted under an earlier version has no record of its definition: only the
    checks it had (the checkpoint, the precision) apply."""
    interrupted(tiny_base, rows, home, pm)
    (home / "runs" / "cut" / "definition.json").unlink()
    result = train("sft", base=str(tiny_base), data=rows, name="cut", home=home, plugins=pm,
                   options=TrainOptions(**{**OPTS, "learning_rate": 2e-3}), resume=True)
    assert (result.metrics["steps"], result.metrics["resumed_at_step"]) == (10, 4)


def test_a_run_folder_without_the_record_still_refuses_another_lora_shape(
        tiny_base, rows, home, pm, monkeypatch):
    """Its checkpoints hold their LoRA config: another rank was transformers' "size mismatch"
    traceback after the base loaded, another alpha a silently different scaling."""
    interrupted(tiny_base, rows, home, pm)
    (home / "runs" / "cut" / "definition.json").unlink()
    with base_never_loads(monkeypatch):
        for change, said in (({"r": 8}, "r 4 → 8"), ({"alpha": 16}, "alpha 8 → 16")):
            with pytest.raises(RunStateError, match=rf"started with other settings: {said};"):
                train("sft", base=str(tiny_base), data=rows, name="cut", home=home,
                      plugins=pm, options=TrainOptions(**{**OPTS, **change}), resume=True)


def test_a_run_stopped_after_its_last_step_is_refused_not_resumed_with_an_empty_step(
        tiny_base, rows, home, pm, monkeypatch):
    """Interrupted in the forgetting check after step 10 of 10 (checkpoint-10): transformers
    resumed it with an 11th step at learning rate 0 and the run reported 11 steps, their
    tokens and a guard that acted on none of them."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("adapterkit.training.run._measure", stopped)
        with pytest.raises(KeyboardInterrupt) as caught:
            train("sft", base=str(tiny_base), data=rows, name="late", home=home, plugins=pm,
                  options=TrainOptions(**OPTS))
    assert (home / "runs" / "late" / "checkpoint-10").is_dir()
    assert caught.value.finished and caught.value.checkpoint == "checkpoint-10"

    with base_never_loads(monkeypatch):
        with pytest.raises(RunStateError, match=r"had trained all its 10 steps \(checkpoint-10\)"
                                                 r".*pass --restart to train it again"):
            train("sft", base=str(tiny_base), data=rows, name="late", home=home, plugins=pm,
                  options=TrainOptions(**OPTS), resume=True)
    assert Library(home).list() == []
    again = train("sft", base=str(tiny_base), data=rows, name="late", home=home, plugins=pm,
                  options=TrainOptions(**OPTS), restart=True).metrics
    assert again["steps"] == 10 and "resumed_at_step" not in again
    assert again["guard"]["kl_batches"] > 0 and again["guard"]["weight"] > 0


@pytest.fixture
def ctrl_c(monkeypatch):
    """The CLI's sft run gets Ctrl-C at the end of the step ``ctrl_c.at``."""
    from adapterkit_plugins.sft import SFT

    train_sft = SFT.train

    class At:
        at = 1

    def interrupted_train(self, *, job, **kw):
        job.callbacks.append(Interrupt(At.at))
        return train_sft(self, job=job, **kw)

    monkeypatch.setattr(SFT, "train", interrupted_train)
    return At


def test_ctrl_c_says_resume_only_where_a_checkpoint_was_written(tiny_base, rows, home,
                                                                 adapterkit_cli, ctrl_c):
    """Before the first checkpoint (sft's default run of 30 steps never reaches the default
    --save-steps 50) the line said to --resume, which then found no interrupted run."""
    args = ["train", "sft", "--base", tiny_base, "--data", rows, "--name", "c", "-r", 4,
            "--max-steps", 6, "--batch-size", 2, "--precision", "fp32"]
    ctrl_c.at = 1
    first = adapterkit_cli(*args)
    assert first.exit_code == 130
    said = first.stderr.strip().splitlines()[-1]
    assert said == ("Interrupted: nothing was saved to the library; no checkpoint was written "
                    "yet (one every --save-steps 50 steps): run the command again.")
    assert not list((home / "runs" / "c").glob("checkpoint-*"))
    ctrl_c.at = 3
    second = adapterkit_cli(*args, "--save-steps", 2)
    assert second.exit_code == 130
    assert second.stderr.strip().splitlines()[-1] == (
        "Interrupted: nothing was saved to the library. Run the same command with --resume to "
        "continue from checkpoint-2.")
    ctrl_c.at = 0  # never
    resumed = adapterkit_cli(*args, "--save-steps", 2, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert Library(home).get("c").meta.metrics["steps"] == 6


def test_an_rlhf_policy_resumes_against_the_reward_pocket_book_its_run_trained(
        tiny_base, adapterkit_data, home, pm):
    """Interrupted after its reward stage was saved, an rlhf run is resumed with --reward
    NAME-reward (as the refusal of a plain rerun says) instead of the stage's own options; an
    option of the policy is still compared, given on both sides or on one."""
    data = str(adapterkit_data["preference"])
    opts = dict(max_steps=4, batch_size=8, learning_rate=1e-2, r=4, alpha=8, dropout=0.0,
                logging_steps=1, save_steps=2, seed=1)

    def rlhf(trainer_options, split=0.0, **kw):
        return train("rlhf", base=str(tiny_base), data=data, name="p", home=home, plugins=pm,
                     options=TrainOptions(**opts, trainer_options=trainer_options,
                                          eval_split=split), **kw)

    # (the held-out split serves the reward stage alone, and rlhf refuses it beside --reward:
    # the resume cannot give it again)
    with pytest.raises(KeyboardInterrupt):  # (the stage's 2 steps never reach step 3)
        rlhf({"reward_steps": 2, "max_new_tokens": 4, "beta": 0.2}, split=0.25,
             callbacks=[Interrupt(3)])
    assert (home / "runs" / "p" / "checkpoint-2").is_dir()
    with pytest.raises(RunStateError, match=r"other settings: trainer_options.max_new_tokens 4 "
                                            r"→ 8; resume with"):
        rlhf({"reward": "p-reward@1", "max_new_tokens": 8, "beta": 0.2}, resume=True)
    # an option of the policy left out on the resume was not compared (only the reuse option
    # and what it drops may change, Trainer.reuse_option/reuse_drops): its steps went on
    # with the default beta, the pocket book recording it as if from the start
    with pytest.raises(RunStateError, match=r"other settings: trainer_options.beta 0.2 → "
                                            r"0.05; resume with"):
        rlhf({"reward": "p-reward@1", "max_new_tokens": 4}, resume=True)
    result = rlhf({"reward": "p-reward@1", "max_new_tokens": 4, "beta": 0.2}, resume=True)
    assert (result.metrics["steps"], result.metrics["resumed_at_step"]) == (4, 2)
    assert result.metrics["reward_book"] == "p-reward@1"


def test_a_checkpoint_killed_while_written_is_passed_over_for_the_one_before(tiny_base, rows,
                                                                             home, pm):
    """Ctrl-C while checkpoint-6 was written: the interruption named it, and --resume then
    refused it ("remove that folder"). The whole one before is taken instead."""
    interrupted(tiny_base, rows, home, pm)
    partial = home / "runs" / "cut" / "checkpoint-6"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"")  # no trainer_state.json yet
    result = train("sft", base=str(tiny_base), data=rows, name="cut", home=home, plugins=pm,
                   options=TrainOptions(**OPTS), resume=True)
    assert (result.metrics["steps"], result.metrics["resumed_at_step"]) == (10, 4)


def test_a_trainer_option_given_at_its_default_is_no_change_on_resume(tiny_base, home, pm,
                                                                     adapterkit_data):
    """Before: ``--resume --set beta=0.1`` (dpo's default) was refused as "trainer_options
    {} → {"beta": 0.1}", while ``--lr`` at its default was no change; another beta still is."""
    pairs = str(adapterkit_data["preference"])
    options = {**OPTS, "forgetting_budget": 0.0}
    with pytest.raises(KeyboardInterrupt):
        train("dpo", base=str(tiny_base), data=pairs, name="cut", home=home, plugins=pm,
              options=TrainOptions(**options), callbacks=[Interrupt(5)])
    with pytest.raises(RunStateError, match=r"other settings: trainer_options.beta 0.1 → 0.5; "):
        train("dpo", base=str(tiny_base), data=pairs, name="cut", home=home, plugins=pm,
              options=TrainOptions(**options, trainer_options={"beta": 0.5}), resume=True)
    result = train("dpo", base=str(tiny_base), data=pairs, name="cut", home=home, plugins=pm,
                   options=TrainOptions(**options, trainer_options={"beta": 0.1}), resume=True)
    assert (result.metrics["steps"], result.metrics["resumed_at_step"]) == (10, 4)


def test_a_second_run_under_a_name_in_training_is_refused_before_it_clears_anything(
        tiny_base, rows, home, pm):
    """Found by a user: two `train --name es2` at once shared runs/es2 (the second cleared the
    first one's folder as it started), and the one that saved second trained to the end, found
    the name taken and lost its run. The second is refused before it touches the folder."""
    from adapterkit.library.run_locks import hold_run, release_all

    interrupted(tiny_base, rows, home, pm)  # a run folder with checkpoints, as a running one
    held = [hold_run(home, "cut")]  # what a run of "cut" training in another process holds
    try:
        # a running run's checkpoints are no interrupted run to resume or restart
        for again in ({}, {"restart": True}, {"resume": True}):
            with pytest.raises(RunStateError, match=rf"^another run of cut is training in "
                                                    rf"{home} \(pid \d+\): wait for it to "
                                                    r"finish, or train under another --name$"):
                train("sft", base=str(tiny_base), data=rows, name="cut", home=home,
                      plugins=pm, options=TrainOptions(**OPTS), **again)
        assert (home / "runs" / "cut" / "checkpoint-4").is_dir()  # nothing of it cleared
    finally:
        release_all(held)
    result = train("sft", base=str(tiny_base), data=rows, name="cut", home=home, plugins=pm,
                   options=TrainOptions(**OPTS), resume=True)  # free again: the lock went
    assert result.metrics["steps"] == 10


def test_a_home_whose_filesystem_has_no_locks_trains_unlocked(tiny_base, rows, home, pm,
                                                               monkeypatch):
    """flock fails otherwise than "taken" on some network mounts: that is no other run, so
    the run goes on (as before there were locks) and leaves no lock file behind."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    result = train("sft", base=str(tiny_base), data=rows, name="free", home=home, plugins=pm,
                   options=TrainOptions(**{**OPTS, "max_steps": 2}))
    assert result.metrics["steps"] == 2
    assert not (home / "locks").exists()


class ImportAt(TrainerCallback):
    """At the end of step ``at``, save other weights under ``names`` as another command would
    (recording what each save raised)."""

    def __init__(self, at: int, save) -> None:
        self.at, self.save, self.raised = at, save, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.raised.append(self.save())


def test_no_other_save_takes_the_name_a_run_is_training(tiny_base, rows, home, pm,
                                                        peft_adapter):
    """Found by a user: `import --name z` while `train --name z` ran was saved; the run trained
    to the end, found its name taken and lost its weights (--resume failed on the name again,
    --restart discarded them). Any save of the name is refused while its run holds the lock —
    plain, an explicit version, a stack — and the run saves its own."""
    import re

    from adapterkit.errors import NameTaken
    from adapterkit.lora.combine import stack

    library = Library(home)
    library.import_peft(peft_adapter, "other", base=str(tiny_base))

    def others() -> list[str]:
        said = []
        for save in (lambda: library.import_peft(peft_adapter, "busy", base=str(tiny_base)),
                     lambda: library.import_peft(peft_adapter, "busy@3", base=str(tiny_base)),
                     lambda: stack(library, ["other"], None, name="busy")):
            try:
                save()
                said.append("saved")
            except NameTaken as exc:
                said.append(str(exc))
        return said

    during = ImportAt(3, others)
    result = train("sft", base=str(tiny_base), data=rows, name="busy", home=home, plugins=pm,
                   options=TrainOptions(**{**OPTS, "max_steps": 4}), callbacks=[during])
    assert str(result.pocket_book.ref) == "busy@1"
    refused = rf"^a run training busy in {home} \(pid \d+\) will save under that name when it " \
              r"ends, so busy(@3)? was not saved: wait for the run to finish, or save this one " \
              r"under another name$"
    assert [bool(re.match(refused, said)) for said in during.raised[0]] == [True] * 3
    assert [(s.name, s.version) for s in library.list() if s.name == "busy"] == [("busy", 1)]
    assert str(library.import_peft(peft_adapter, "busy@2", base=str(tiny_base)).ref) == "busy@2"


def test_a_save_is_refused_while_another_process_trains_the_name(tiny_base, home,
                                                                 peft_adapter):
    """The CLI's import while a run of the name trains in another process: one line naming the
    run's pid and what to do, exit 1, nothing saved; once the run has ended it saves."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from adapterkit.cli import build_cli
    from adapterkit.library.run_locks import run_lock_path

    path = run_lock_path(home, "z")
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # what a run of z holds (run_locks.hold_run), in a process
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"f = open({str(path)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.write(f'pid {os.getpid()}'); f.flush(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cli = build_cli(get_plugin_manager(env=False))
    args = ["import", str(peft_adapter), "--name", "z", "--base", str(tiny_base)]
    try:
        assert holder.stdout.readline().strip() == "held"
        done = CliRunner().invoke(cli, args)
        assert done.exit_code == 1, done.output
        assert f"a run training z in {home} (pid {holder.pid}) will save under that name" \
            in done.output
        assert done.exception is None or isinstance(done.exception, SystemExit)
        assert not Library(home).exists("z")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert Library(home).exists("z@1")


def test_a_run_starting_while_a_save_asks_about_its_name_is_not_refused(home):
    """An import asking whether a run holds the name holds the lock shared for a moment: a
    run starting in that moment was refused as "another run of z is training"."""
    import fcntl
    import threading

    from adapterkit.library.run_locks import hold_run, release_all, run_lock_path

    path = run_lock_path(home, "z")
    path.parent.mkdir(parents=True)
    path.touch()
    asking = open(path, encoding="utf-8")  # what training_now holds while it asks
    fcntl.flock(asking, fcntl.LOCK_SH)
    done = threading.Timer(0.05, asking.close)
    done.start()
    held = [hold_run(home, "z")]
    done.join()
    release_all(held)


def test_a_handed_run_lock_is_taken_as_it_is_and_released_once(tmp_path):
    """``RunLock.hand_over``: the next ``hold_run`` of the name in this process takes the very
    lock, held throughout; whoever releases first lets it go, a second release does nothing,
    and the folders taking it created go once empty."""
    from adapterkit.library.run_locks import hold_run, training_now

    home = tmp_path / "home"
    lock = hold_run(home, "x")
    assert lock is not None and training_now(home, "x") == f"pid {os.getpid()}"
    lock.hand_over()
    assert training_now(home, "x") == f"pid {os.getpid()}"
    again = hold_run(home, "x")
    assert again is lock
    other = hold_run(home, "y")  # a second lock in the same home: the folders stay for it
    lock.release()
    assert training_now(home, "x") is None and (home / "locks").is_dir()
    lock.release()  # the first holder's release, after the taker's: nothing
    fresh = hold_run(home, "x")
    assert fresh is not None and fresh is not lock  # taken afresh, not handed again
    assert other is not None
    other.release()
    assert home.is_dir()  # x's lock is in it still
    fresh.release()
    assert not home.exists()  # the folders taking the locks created: gone once empty


def test_a_handed_run_lock_goes_only_to_a_run_on_the_handing_thread(tmp_path):
    """A lock handed on in one thread (a pipeline to its stage) was taken by the next
    ``hold_run`` of the name on any thread: another thread's unrelated run of that name trained
    alongside the stage, whose own run was then refused. Another thread is refused, as before."""
    import threading

    from adapterkit.library.run_locks import hold_run

    home = tmp_path / "home"
    lock = hold_run(home, "x")
    assert lock is not None
    lock.hand_over()
    seen: list[object] = []

    def other_thread() -> None:
        try:
            seen.append(hold_run(home, "x"))
        except RunStateError as exc:
            seen.append(str(exc))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(seen) == 1 and "another run of x is training" in str(seen[0]), seen
    assert hold_run(home, "x") is lock  # the handing thread's run takes it
    lock.release()
    assert not home.exists()


def test_a_run_lock_whose_file_cannot_be_removed_is_let_go_all_the_same(tmp_path, monkeypatch,
                                                                       unremovable_locks):
    """``release()`` marked the lock released, then failed removing its file before closing
    it: the name stayed locked for the rest of the process, and no second release closed it."""

    from adapterkit.library.run_locks import hold_run, release_all, training_now

    home = tmp_path / "home"
    lock = hold_run(home, "a")
    assert lock is not None
    unremovable_locks("a")
    with pytest.warns(RuntimeWarning, match="run-a.lock could not be removed"):
        release_all([lock])  # (never raised: a failed run's exception, or a saved run, stands)
    monkeypatch.undo()
    assert training_now(home, "a") is None  # let go, though its file is still there
    again = hold_run(home, "a")
    assert again is not None
    again.release()


def test_lock_files_that_cannot_be_removed_raise_nothing_where_warnings_are_errors(
        tmp_path, monkeypatch, unremovable_locks, capsys):
    """Warned of inside its loop, a first lock file under ``-W error`` left the next locks
    held and replaced the exception a failed run was on its way out with."""
    import warnings

    from adapterkit.library.run_locks import hold_run, release_all, training_now

    home = tmp_path / "home"
    locks = [hold_run(home, n) for n in ("a", "b")]
    unremovable_locks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        release_all(locks)
    monkeypatch.undo()
    assert locks == [] and [training_now(home, n) for n in ("a", "b")] == [None, None]
    said = capsys.readouterr().err  # (said all the same, not raised)
    assert said.count("could not be removed") == 2, said


def test_a_run_whose_lock_file_cannot_be_removed_still_returns_what_it_saved(
        tiny_base, rows, home, pm, monkeypatch, unremovable_locks):
    """The book was committed, then removing the lock file failed: train() raised that error,
    past its save, and a caller's resident base was not handed over. It is warned of now."""
    from adapterkit.library.run_locks import training_now

    unremovable_locks("kept")
    with pytest.warns(RuntimeWarning, match="run-kept.lock could not be removed"):
        result = train("sft", base=str(tiny_base), data=rows, name="kept", home=home,
                       plugins=pm, options=TrainOptions(**{**OPTS, "max_steps": 2}))
    monkeypatch.undo()
    assert result.pocket_book.ref == "kept@1" and training_now(home, "kept") is None


def test_a_run_lock_taken_with_a_relative_home_is_released_after_a_chdir(tmp_path,
                                                                        monkeypatch):
    """The lock kept the relative path it was given: released after a ``chdir`` it removed
    neither its file nor the folders it made (the home was not left as found)."""
    from pathlib import Path

    from adapterkit.library.run_locks import hold_run

    monkeypatch.chdir(tmp_path)
    lock = hold_run(Path("rel-home"), "a")
    assert lock is not None and (tmp_path / "rel-home" / "locks" / "run-a.lock").is_file()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    lock.release()
    assert not (tmp_path / "rel-home").exists()

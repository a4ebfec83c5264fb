"""Early stopping on the held-out split: training stops when the eval loss stops improving, and
the saved pocket book is the best evaluation's — checked against weights a separate callback
copies at every evaluation, never against early stopping's own copy."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from adapterkit import ConfigError, TrainOptions, train
from adapterkit.library.metadata import CARD_FILE, WEIGHTS_FILE
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.early_stop import BEST_RECORD, BEST_WEIGHTS, callback, eval_every


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(env=False)


@pytest.fixture
def noisy(tmp_path):
    """Held-out rows that training pulls away from: the rows ``eval_split`` holds out (it
    shuffles with the run's seed, 0, as here) answer "blue", the rest "red"."""
    held = list(range(40))
    random.Random(0).shuffle(held)
    held = set(held[:10])  # eval_split 0.25 of 40 rows
    rows = [{"prompt": f"Code of item {i}?", "completion": ("blue " if i in held else "red ") * 4}
            for i in range(40)]
    path = tmp_path / "noisy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(**kw):
    # forgetting_budget=0: without sft's default guard (the tests of both together say so)
    base = dict(max_steps=40, learning_rate=5e-2, batch_size=4, logging_steps=2, save_steps=10,
                r=8, alpha=16, dropout=0.0, eval_split=0.25, precision="fp32",
                forgetting_budget=0)
    base.update(kw)
    return TrainOptions(**base)


class Snapshots(TrainerCallback):
    """At every evaluation: the eval loss and a copy of the trainable weights."""

    def __init__(self):
        self.seen: list[tuple[int, float, dict]] = []

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        self.seen.append((state.global_step, metrics["eval_loss"],
                          {n.replace(".default", ""): p.detach().clone()
                           for n, p in model.named_parameters() if p.requires_grad}))


def test_training_stops_and_the_saved_book_is_the_best_evaluations(tiny_base, home, noisy, pm):
    snaps = Snapshots()
    result = train("sft", base=str(tiny_base), data=str(noisy), name="early",
                   options=options(early_stopping=2), home=home, plugins=pm, callbacks=[snaps])
    record = result.metrics["early_stopping"]
    steps, losses = [s for s, _, _ in snaps.seen], [loss for _, loss, _ in snaps.seen]
    assert steps == [4 * (i + 1) for i in range(len(steps))]  # every ceil(40 / 10) steps
    best = min(range(len(losses)), key=losses.__getitem__)
    # stopped 2 evaluations after the best, well before the 40 steps it was set for
    assert record["stopped_at_step"] == steps[-1] == result.metrics["steps"] < 40
    # the final loss covers the steps up to the stop (they were in no log when the stop fell
    # between two logging intervals)
    assert result.metrics["loss_history"][-1][0] == record["stopped_at_step"]
    assert len(steps) - 1 - best == 2 and record["evaluations"] == len(steps)
    assert record["best_step"] == steps[best] and record["best_eval_loss"] == losses[best]
    assert record["restored_best"] is True
    saved = load_file(str(result.pocket_book.path / WEIGHTS_FILE))
    expected = snaps.seen[best][2]
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert not torch.equal(saved[next(iter(saved))], snaps.seen[-1][2][next(iter(saved))])
    card = (result.pocket_book.path / CARD_FILE).read_text()
    precision = result.metrics["precision"]
    assert f"best eval loss {losses[best]:.4f} (the trainer's evaluation, in {precision}) at " \
        f"step {steps[best]}; stopped at step {steps[-1]}; the pocket book saved is the best " \
        "step's" in card


def test_on_by_default_with_an_eval_split_and_off_without(tiny_base, home, noisy, pm):
    with_split = train("sft", base=str(tiny_base), data=str(noisy), name="default-on",
                       options=options(max_steps=6), home=home, plugins=pm)
    assert with_split.metrics["early_stopping"]["patience"] == 3
    assert with_split.metrics["early_stopping"]["evaluations"] >= 1
    without = train("sft", base=str(tiny_base), data=str(noisy), name="default-off",
                    options=options(max_steps=6, eval_split=0.0), home=home, plugins=pm)
    assert "early_stopping" not in without.metrics
    off = train("sft", base=str(tiny_base), data=str(noisy), name="asked-off",
                options=options(max_steps=6, early_stopping=0), home=home, plugins=pm)
    assert "early_stopping" not in off.metrics


def test_early_stopping_without_a_held_out_split_is_refused(tiny_base, home, noisy, pm):
    with pytest.raises(ConfigError, match="add --eval-split"):
        train("sft", base=str(tiny_base), data=str(noisy), name="refused",
              options=options(eval_split=0.0, early_stopping=2), home=home, plugins=pm)


def test_with_the_forgetting_guard_the_budget_is_checked_on_the_best_evaluations_weights(
        tiny_base, home, noisy, pm):
    """Both act: early stopping restores the best evaluation's weights, and the guard checks
    its budget on those (and keeps them, within it here)."""
    snaps = Snapshots()
    result = train("sft", base=str(tiny_base), data=str(noisy), name="both",
                   options=options(early_stopping=2, forgetting_budget=50.0, guard_every=2,
                                   general="general"),
                   home=home, plugins=pm, callbacks=[snaps])
    record, guard = result.metrics["early_stopping"], result.metrics["guard"]
    steps, losses = [s for s, _, _ in snaps.seen], [loss for _, loss, _ in snaps.seen]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert record["restored_best"] is True and record["best_step"] == steps[best] < steps[-1]
    assert guard["kept_step"] == steps[best] and guard["restored"] is False
    # the saved weights are the best evaluation's, not the last step's: said so
    assert result.metrics["weights_step"] == steps[best] < result.metrics["steps"]
    assert guard["within_budget"] is True and [c["step"] for c in guard["checks"]] == [
        steps[best]]
    assert any(s > steps[best] for s in guard["snapshots"])  # later ones existed, unused
    saved = load_file(str(result.pocket_book.path / WEIGHTS_FILE))
    assert all(torch.equal(saved[k], snaps.seen[best][2][k]) for k in saved)


def test_over_the_budget_the_guard_falls_back_only_to_snapshots_before_the_kept_step(
        tiny_base, monkeypatch):
    """Given the best evaluation's step (8), the guard never takes a later snapshot (10,
    within the budget) over it: it measures 8, then 6 (over), then 4 (within) and keeps 4's
    weights. Losses by hand, keyed by each snapshot's weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.training import guard as guard_module

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    guard = guard_module.ForgettingGuard(AutoTokenizer.from_pretrained(tiny_base),
                                         anchor_texts=["x"], general_texts=["y"],
                                         budget_pct=1.0, weight=0.0)
    losses = {2: 1.0, 4: 1.005, 6: 1.02, 8: 1.05, 10: 1.0}  # base loss 1.0; budget 1%
    for step in (2, 4, 6, 10):
        with torch.no_grad():
            lora_b.fill_(step)
        guard.snapshot(model, step)
    with torch.no_grad():
        lora_b.fill_(8)  # the weights early stopping restored: step 8's
    monkeypatch.setattr(guard_module, "text_loss",
                        lambda m, tok, texts: losses[int(lora_b[0, 0].item())])
    report = guard.finish(model, 8, base_loss=1.0)
    assert [c["step"] for c in report.checks] == [8, 6, 4]
    assert report.kept_step == 4 and report.restored and report.within_budget
    assert lora_b[0, 0].item() == 4


def test_sft_stops_early_by_default_with_an_eval_split_under_its_default_guard(
        tiny_base, home, noisy, pm):
    default = train("sft", base=str(tiny_base), data=str(noisy), name="default-guard",
                    options=options(max_steps=4, forgetting_budget=None), home=home,
                    plugins=pm)
    assert default.metrics["early_stopping"]["patience"] == 3
    assert default.metrics["guard"]["budget_pct"] == 1


def test_under_fsdp_asking_for_it_is_refused_before_the_base_loads(home, noisy, pm,
                                                                    monkeypatch):
    """FSDP shards the weights early stopping keeps: asked for under FSDP it is refused, and
    before the base is loaded (this base does not exist: loading it would fail otherwise)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP shards"):
        train("sft", base="no/such-base", data=str(noisy), name="fsdp-early",
              options=options(early_stopping=2), home=home, plugins=pm)


def test_the_last_steps_are_evaluated_too(tiny_base, home, noisy, pm):
    """43 steps, an evaluation every 5: the 3 after the last scheduled one are judged too."""
    snaps = Snapshots()
    train("sft", base=str(tiny_base), data=str(noisy), name="tail",
          options=options(max_steps=43, learning_rate=1e-3, early_stopping=50), home=home,
          plugins=pm, callbacks=[snaps])
    assert [s for s, _, _ in snaps.seen][-2:] == [40, 43]


def test_a_packed_run_is_evaluated_about_ten_times_by_its_own_step_count(tiny_base, home,
                                                                         noisy, pm):
    """Packing makes fewer, longer rows than the options foresee: 30 training rows, batch 4,
    10 epochs would be 80 steps (an evaluation every 8); packed, the trainer runs far fewer, and
    the cadence follows its count, not the foreseen one."""
    from adapterkit.training.job import planned_steps

    snaps = Snapshots()
    opts = options(max_steps=-1, epochs=10, packing=True, max_length=512, early_stopping=50,
                   learning_rate=1e-3)
    result = train("sft", base=str(tiny_base), data=str(noisy), name="packed-cadence",
                   options=opts, home=home, plugins=pm, callbacks=[snaps])
    ran = result.metrics["steps"]
    assert planned_steps(opts, 30) == 80 and ran < 40  # packing took most of the steps away
    every = math.ceil(ran / 10)
    steps = [s for s, _, _ in snaps.seen]
    assert steps == sorted({*range(every, ran + 1, every), ran})
    assert result.metrics["early_stopping"]["eval_every"] == every
    card = (result.pocket_book.path / CARD_FILE).read_text()
    assert f"{len(steps)} evaluations every {every} steps" in card if every != 1 else \
        f"{len(steps)} evaluations every step" in card


def test_eval_cadence():
    assert eval_every(40, 50) == 4
    assert eval_every(1000, 50) == 50  # never rarer than checkpoints
    assert eval_every(3, 50) == 1
    assert eval_every(95, 50) == math.ceil(95 / 10)


def test_a_resumed_run_keeps_the_best_so_far(tmp_path):
    """The best evaluation's weights and counter travel with each checkpoint (safetensors and
    JSON written beside it) and come back on --resume."""
    from types import SimpleNamespace

    weights = {"lora_A": torch.arange(6.0).reshape(2, 3)}
    stopper = callback(3)
    stopper.best = {k: v.clone() for k, v in weights.items()}
    stopper.record.update(evaluations=4, best_step=20, best_eval_loss=1.5)
    stopper.early_stopping_patience_counter = 2
    (tmp_path / "checkpoint-30").mkdir()
    stopper.on_save(SimpleNamespace(output_dir=str(tmp_path)),
                    SimpleNamespace(global_step=30, is_world_process_zero=True), None)
    assert (tmp_path / "checkpoint-30" / BEST_WEIGHTS).is_file()
    assert (tmp_path / "checkpoint-30" / BEST_RECORD).is_file()
    again = callback(3, resume_from=str(tmp_path / "checkpoint-30"))
    again._read(tmp_path / "checkpoint-30")
    assert torch.equal(again.best["lora_A"], weights["lora_A"])
    assert again.early_stopping_patience_counter == 2
    assert (again.record["best_step"], again.record["evaluations"]) == (20, 4)


def test_where_earlier_weights_are_kept_the_step_and_its_logged_loss_are_recorded():
    """The guard's fallback or early stopping's best: the card and the run's line gave the
    last step's loss and steps alone, as if they were the saved weights'. ``kept_weights``
    names the kept step and the training loss logged last at or before it; nothing where
    the last step's weights are saved."""
    from types import SimpleNamespace

    from adapterkit.training.pipeline import stage_line
    from adapterkit.training.save import kept_weights

    state = SimpleNamespace(log_history=[
        {"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0}, {"step": 10, "eval_loss": 2.5},
        {"step": 15, "loss": 1.0}, {"step": 20, "loss": 0.5}])
    metrics = {"steps": 20, "train_loss_final": 0.5}
    assert kept_weights(state, {**metrics, "guard": {"kept_step": 12, "restored": True}},
                        None) == {"weights_step": 12, "train_loss_kept": 2.0,
                                  "train_loss_kept_step": 10,
                                  "weights_kept_by": "the forgetting guard's fallback"}
    stopped = {"best_step": 15, "restored_best": True}
    assert kept_weights(state, metrics, stopped)["train_loss_kept"] == 1.0
    # the guard's fallback wins over early stopping's best; a kept last step says nothing
    assert kept_weights(state, {**metrics, "guard": {"kept_step": 5, "restored": True}},
                        stopped)["weights_step"] == 5
    assert kept_weights(state, {**metrics, "guard": {"kept_step": 20, "restored": False}},
                        None) == {}
    assert kept_weights(state, metrics, {"best_step": 15, "restored_best": False}) == {}
    early = kept_weights(state, {**metrics, "guard": {"kept_step": 2, "restored": True}}, None)
    assert early["train_loss_kept"] is None and early["train_loss_kept_step"] is None

    result = SimpleNamespace(stage=SimpleNamespace(index=1, trainer="sft", options=None),
                             skipped=False,
                             pocket_book=SimpleNamespace(ref="a@1"),
                             metrics={**metrics, **kept_weights(state, metrics, stopped)})
    assert stage_line(result, 1) == (
        "1/1 a@1 (sft): 20 steps, final loss 0.5000 (weights kept: step 15's, early stopping's "
        "best; train loss logged at step 15: 1), forgetting not measured (no general:)")


def test_the_early_stopping_line_says_when_the_guard_then_kept_earlier_weights():
    """Both acted: early stopping restored its best step, then the guard fell back further.
    The line said "the pocket book saved is the best step's" beside the guard's own line
    naming another step."""
    from adapterkit.library.card import early_stopping_line

    record = {"patience": 2, "evaluations": 5, "eval_every": 4, "best_eval_loss": 1.5,
              "best_step": 12, "stopped_at_step": 20, "restored_best": True}
    assert early_stopping_line(record).endswith("; the pocket book saved is the best step's")
    assert early_stopping_line(record, kept_step=12).endswith(
        "; the pocket book saved is the best step's")
    line = early_stopping_line(record, kept_step=8)  # the guard's fallback, before step 12
    assert line.endswith("; the best step's weights were restored, then the forgetting guard "
                         "kept earlier ones"), line


def test_the_lineage_says_which_steps_weights_a_stage_kept():
    """A pipeline card's lineage table gave such a stage's first → last loss as its train
    loss, and its weights_step, train_loss_kept... raw under "other metrics" (the string
    saying what kept them was dropped). The cell now says it as the card's Results do."""
    from types import SimpleNamespace

    from adapterkit.library.card import _pipeline_lines
    from adapterkit.training.pipeline import lineage_entry

    metrics = {"steps": 20, "train_loss_first": 3.0, "train_loss_final": 0.5, "weights_step": 12,
               "train_loss_kept": 2.0, "train_loss_kept_step": 10, "tokens": 900,
               "weights_kept_by": "the forgetting guard's fallback", "dropped": "words"}
    meta = SimpleNamespace(parents=[], method="lora", data={"description": "d.jsonl"})
    stage = SimpleNamespace(index=1, name="a", trainer="sft", on=None, start_from=None)
    entry = lineage_entry(stage, "a@1", meta, metrics)
    assert "dropped" not in entry["metrics"]  # other strings stay out, as before
    row = [line for line in _pipeline_lines({"stage": 1, "stages": 1, "lineage": [entry]})
           if line.startswith("| 1 a |")]
    cells = [c.strip() for c in row[0].strip("|").split(" | ")]
    assert cells[6] == ("3 → 0.5, at step 20; weights kept: step 12's, the forgetting guard's "
                        "fallback; train loss logged at step 10: 2")
    assert cells[9] == "–"  # nothing raw under "other metrics"; tokens has its own key list

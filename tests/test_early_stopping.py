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
    # forgetting_budget=0: without sft's default guard, which would choose the kept weights
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
    assert len(steps) - 1 - best == 2 and record["evaluations"] == len(steps)
    assert record["best_step"] == steps[best] and record["best_eval_loss"] == losses[best]
    assert record["restored_best"] is True
    saved = load_file(str(result.pocket_book.path / WEIGHTS_FILE))
    expected = snaps.seen[best][2]
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert not torch.equal(saved[next(iter(saved))], snaps.seen[-1][2][next(iter(saved))])
    card = (result.pocket_book.path / CARD_FILE).read_text()
    assert f"best eval loss {losses[best]:.4f} at step {steps[best]}; stopped at step " \
        f"{steps[-1]}; the pocket book saved is the best step's" in card


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


def test_with_the_forgetting_guard_it_is_off_by_default_and_refused_when_asked(
        tiny_base, home, noisy, pm):
    """Both would choose which weights are kept: the guard does, early stopping stays out."""
    with pytest.raises(ConfigError, match="use one or the other"):
        train("sft", base=str(tiny_base), data=str(noisy), name="both",
              options=options(early_stopping=2, forgetting_budget=5.0), home=home, plugins=pm)
    guarded = train("sft", base=str(tiny_base), data=str(noisy), name="guarded",
                    options=options(max_steps=4, forgetting_budget=50.0, general="general"),
                    home=home, plugins=pm)
    assert "early_stopping" not in guarded.metrics and "guard" in guarded.metrics
    # sft's default guard (no budget given) wins over the default early stopping too...
    default = train("sft", base=str(tiny_base), data=str(noisy), name="default-guard",
                    options=options(max_steps=4, forgetting_budget=None), home=home,
                    plugins=pm)
    assert "early_stopping" not in default.metrics and default.metrics["guard"]["budget_pct"] == 1
    # ...and yields to early stopping asked for by name
    stopping = train("sft", base=str(tiny_base), data=str(noisy), name="asked-stopping",
                     options=options(max_steps=4, forgetting_budget=None, early_stopping=2),
                     home=home, plugins=pm)
    assert "guard" not in stopping.metrics and stopping.metrics["early_stopping"]["patience"] == 2


def test_the_last_steps_are_evaluated_too(tiny_base, home, noisy, pm):
    """43 steps, an evaluation every 5: the 3 after the last scheduled one are judged too."""
    snaps = Snapshots()
    train("sft", base=str(tiny_base), data=str(noisy), name="tail",
          options=options(max_steps=43, learning_rate=1e-3, early_stopping=50), home=home,
          plugins=pm, callbacks=[snaps])
    assert [s for s, _, _ in snaps.seen][-2:] == [40, 43]


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

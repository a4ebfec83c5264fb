"""Nothing claims more than happened: options that do not act are refused, and every figure a
card, a quickstart or a benchmark prints is one measured in that run."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest

from adapterkit import ConfigError, Library, Trainer, TrainOptions, hookimpl, train
from adapterkit.plugin_api.manager import get_plugin_manager
from tests.scripts import load_script

TINY = dict(max_steps=3, batch_size=8, learning_rate=1e-2, r=4, alpha=8, dropout=0.0,
            logging_steps=1, seed=0)


# -- the forgetting guard acts where it is accepted ----------------------------------------------

@pytest.mark.parametrize("trainer", ["reward", "rlhf"])
@pytest.mark.parametrize("flag", [("--forgetting-budget", "5%"), ("--guard-weight", "0.1")])
def test_trainers_without_the_guard_refuse_its_options_in_one_line(
        trainer, flag, tiny_base, adapterkit_data, adapterkit_cli, home):
    out = adapterkit_cli("train", trainer, "--base", tiny_base, "--data",
                         adapterkit_data["preference"], "--name", "guarded", "--max-steps", "1",
                         *flag)
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    # (a reward head generates nothing: --general, which it refuses too, is not offered)
    measures = " (--general still measures forgetting)" if trainer == "rlhf" else ""
    assert errors == [f"Error: the {trainer} trainer does not apply the forgetting guard "
                      "(nothing adds its KL term to its loss): train with dpo, sft, or drop "
                      f"--forgetting-budget/--guard-weight{measures}"]
    assert "Loading base" not in out.output  # refused before any work
    assert Library(home).list(all_versions=True) == []  # rlhf's reward stage included
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def _plugin(trainer: Trainer):
    class Plugin:
        @hookimpl
        def register_trainers(self, register):
            register(trainer)

    return Plugin()


def test_a_plugin_trainer_must_declare_the_guard_to_get_it(tiny_base, adapterkit_data, home,
                                                           adapterkit_plugin_manager):
    calls = []

    class Quiet(Trainer):  # does not declare uses_guard: the default is False
        name = "quiet"
        data_shapes = ("text",)

        def train(self, *, job, **_):
            calls.append(job)
            raise AssertionError("training must not start")

    pm = adapterkit_plugin_manager(_plugin(Quiet()))
    for options in (TrainOptions(forgetting_budget=5.0), TrainOptions(guard_weight=0.3)):
        with pytest.raises(ConfigError, match="the quiet trainer does not apply the forgetting "
                                              "guard.*train with dpo, sft"):
            train("quiet", base=str(tiny_base), data=str(adapterkit_data["text"]), name="q",
                  options=options, home=home, plugins=pm)
    assert calls == []


def test_a_declared_guard_that_never_acted_is_not_recorded(tiny_base, adapterkit_data, home,
                                                           adapterkit_plugin_manager):
    sft = get_plugin_manager(env=False).trainer("sft")

    class Forgetful(Trainer):
        """Declares the guard, then trains with sft without showing it the guard."""

        name = "forgetful"
        data_shapes = ("text",)
        uses_guard = True

        def train(self, *, job, **_):
            job.guard = None  # sft adds the KL term only when the job carries a guard
            return sft.train(job=job)

    pm = adapterkit_plugin_manager(_plugin(Forgetful()))
    result = train("forgetful", base=str(tiny_base), data=str(adapterkit_data["text"]),
                   name="forgetful", home=home, plugins=pm,
                   options=TrainOptions(**TINY, guard_weight=0.5))
    guard = result.metrics["guard"]
    assert (guard["kl_batches"], guard["weight"]) == (0, 0.0)
    saved = Library(home).get("forgetful")
    assert saved.meta.metrics["guard"]["weight"] == 0.0
    assert "guard" not in (saved.path / "README.md").read_text().lower()


def test_the_guard_that_acted_is_recorded_with_its_batches(tiny_base, adapterkit_data, home):
    result = train("sft", base=str(tiny_base), data=str(adapterkit_data["text"]), name="kept",
                   home=home, plugins=get_plugin_manager(env=False),
                   options=TrainOptions(**TINY, guard_weight=0.5))
    # 3 steps of one batch each (grad_accum 1): the KL term was added on step 0 only (it comes
    # on one step in 3)
    assert result.metrics["steps"] == 3
    guard = result.metrics["guard"]
    assert (guard["kl_batches"], guard["weight"], guard["kl_every"]) == (1, 0.5, 3)
    card = (result.pocket_book.path / "README.md").read_text()
    assert "- forgetting guard: KL term at weight 0.5, added to the loss of 1 training " \
           "batch (one step in 3, 3× as heavy)" in card
    # the divergence it logged (one interval held the term: first and last are that one), on
    # the card beside it; the first step's pocket book is the base's own, so it is about 0
    kl = result.metrics["guard_kl_final"]
    assert result.metrics["guard_kl_first"] == kl and 0 <= kl < 1e-3
    assert f"; KL to the base on the anchor text {kl:.4g} → {kl:.4g} (first and last " \
           "logged)" in card


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory, tiny_base):
    """An sft run with the guard explicitly off (``guard_weight=0``)."""
    from adapterkit.pytest_plugin import TINY_ROWS

    home = tmp_path_factory.mktemp("honesty-home")
    data = home / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["text"]))
    return train("sft", base=str(tiny_base), data=str(data), name="plain", home=home / "lib",
                 plugins=get_plugin_manager(env=False),
                 options=TrainOptions(**TINY, guard_weight=0.0))


def test_card_of_an_sft_run_without_a_guard_says_nothing_about_a_guard(unguarded):
    assert not [key for key in unguarded.metrics if key.startswith("guard")]
    card = (unguarded.pocket_book.path / "README.md").read_text()
    assert "guard" not in card.lower(), card


def test_card_has_no_accuracy_lines_that_nothing_measured(unguarded):
    from adapterkit.library.card import render_card

    meta = unguarded.pocket_book.meta
    # nothing in a training run measures accuracy; a trainer plugin's own metrics with these
    # names must not turn into "held-out accuracy" claims either
    card = render_card(dataclasses.replace(meta, metrics={
        **meta.metrics, "accuracy_before": 0.25, "accuracy_after": 0.75}))
    results = card.split("## Results", 1)[1].split("## Use it", 1)[0]
    assert "accuracy" not in results.lower(), results
    assert "25.0%" not in card and "75.0%" not in card
    # what the run did measure is still there
    assert f"- steps: {unguarded.metrics['steps']}" in results


# -- quickstart part two prints measured preference figures only --------------------------------

def test_bedside_quickstart_prints_only_measured_preference_figures(tiny_base, home):
    from adapterkit import load_base
    from adapterkit.plugin_api.testing import make_peft_adapter
    from adapterkit.pytest_plugin import TINY_ROWS
    from adapterkit.training.metrics import preference_accuracy

    bedside = load_script("examples", "quickstart_bedside")
    from peft import PeftModel

    base = load_base(str(tiny_base), home=home)
    adapter = make_peft_adapter(tiny_base, home / "adapter", seed=3)
    model = PeftModel.from_pretrained(base.model, str(adapter)).eval()
    rows = TINY_ROWS["preference"][:4]
    acc = preference_accuracy(model, base.tokenizer, rows)

    lines = bedside.preference_lines(acc, "triage@1")
    printed = re.findall(r"\d+\.\d%", "\n".join(lines))
    assert printed == [f"{acc['implicit']:.1%}", f"{acc['likelihood_before']:.1%}",
                       f"{acc['likelihood_after']:.1%}"]
    assert "before" not in lines[0]  # the implicit margin has no measured "before"
    figures = bedside.preference_figures(acc)
    assert figures == {"preference_accuracy_after": acc["implicit"],
                       "likelihood_before": acc["likelihood_before"],
                       "likelihood_after": acc["likelihood_after"], "pairs": 4}


def test_implicit_margin_of_a_fresh_pocket_book_is_zero_by_construction(tiny_base, home):
    """Why the quickstart prints no "before" for it: with B = 0 (PEFT's initialisation) the
    policy equals the reference, so no pair has a margin above 0 whatever the data."""
    from peft import LoraConfig, get_peft_model

    from adapterkit import load_base
    from adapterkit.pytest_plugin import TINY_ROWS
    from adapterkit.training.metrics import preference_accuracy

    base = load_base(str(tiny_base), home=home)
    model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert preference_accuracy(model.eval(), base.tokenizer,
                               TINY_ROWS["preference"][:4])["implicit"] == 0.0


# -- benchmarks ----------------------------------------------------------------------------------

def test_bench_swap_counts_recompilations_with_torch_counters():
    """The recompilation figure comes from torch's own counter, so it can be above 0."""
    import torch

    bench = load_script("benchmarks", "bench_swap")
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="eager", dynamic=False)
    counts = []
    for rows in (2, 2, 3):  # the same shape twice, then a new one: dynamic=False recompiles
        before = bench.compiled_graphs()
        compiled(torch.randn(rows, 4))
        counts.append(bench.compiled_graphs() - before)
    assert counts == [1, 0, 1]


@pytest.mark.slow
def test_bench_swap_runs_with_mixed_ranks_on_a_tiny_base(monkeypatch, capsys):
    bench = load_script("benchmarks", "bench_swap")
    monkeypatch.setattr(sys, "argv", ["bench_swap.py", "--base", "tiny", "--attached", "10",
                                      "--ranks", "2,4,8", "--no-compile"])
    bench.main()
    out = capsys.readouterr().out
    assert "swap latency: 2 attached" in out and "10 attached" in out
    assert "MB at r=2" in out and "MB at r=8" in out
    padding = next(line for line in out.splitlines() if line.startswith("padding:"))
    assert "r=2 pocket book padded to r=8 vs in a session of r=2" in padding
    # zero padding is the same product: the logits agree to float32 round-off, relative to
    # their size (the summation order of a rank-8 and a rank-2 product differs with the CPU's
    # kernels: 1.3e-5 of 6.7 on an AMD EPYC); a wrong padding moves them by a LoRA delta
    diff, scale = (float(v) for v in re.findall(r"logits difference\| (\S+) \(of max \|logits\| "
                                               r"(\S+)\)", padding)[0])
    assert 0 < scale and diff < 1e-5 * max(scale, 1.0), padding


def test_bench_dpo_reruns_compare_like_with_like():
    bench = load_script("benchmarks", "bench_dpo")
    common = dict(max_steps=2, batch_size=8, learning_rate=1e-3, r=4, alpha=8, seed=0)
    first, rerun = bench.dpo_options(common, 0.1), bench.dpo_options(common, 0.2)
    assert first.general == "general"  # both run the forgetting check
    assert first.trainer_options.pop("beta") == 0.1 and rerun.trainer_options.pop("beta") == 0.2
    assert first == rerun  # and nothing else differs


def test_a_resumed_runs_tokens_per_second_are_of_its_own_steps(tiny_base, adapterkit_data,
                                                                home):
    """A run resumed at step 5 of 12 trained 7 steps in its loop: its tokens/s divides those
    steps' tokens (an uninterrupted 12-step run's less a 5-step run's, same data order), not
    all 12 steps' tokens, by its loop's seconds."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    pm = get_plugin_manager(env=False)
    data = str(adapterkit_data["prompt_completion"])
    opts = dict(batch_size=2, learning_rate=1e-3, r=4, alpha=8, dropout=0.0, save_steps=5,
                precision="fp32", forgetting_budget=0, general="off", eval_split=0.0)
    whole = train("sft", base=str(tiny_base), data=data, name="whole", home=home, plugins=pm,
                  options=TrainOptions(max_steps=12, **opts)).metrics
    first = train("sft", base=str(tiny_base), data=data, name="first", home=home, plugins=pm,
                  options=TrainOptions(max_steps=5, **opts)).metrics
    with pytest.raises(KeyboardInterrupt):
        train("sft", base=str(tiny_base), data=data, name="cut", home=home, plugins=pm,
              options=TrainOptions(max_steps=12, **opts), callbacks=[Interrupt()])
    resumed = train("sft", base=str(tiny_base), data=data, name="cut", home=home, plugins=pm,
                    options=TrainOptions(max_steps=12, **opts), resume=True).metrics
    assert (resumed["steps"], resumed["resumed_at_step"]) == (12, 5)
    assert resumed["tokens"] == whole["tokens"] > first["tokens"] > 0
    own = whole["tokens"] - first["tokens"]
    # the figures are rounded (seconds to 0.01, tokens/s to 0.1): the loop's true seconds lie
    # within 0.005 of loop_seconds, so own tokens over them bound tokens/s (a short loop of a
    # tiny base can take 0.1 s, where a fixed 5% did not hold for the rounding alone)
    seconds = resumed["loop_seconds"]
    assert own / (seconds + 0.005) - 0.05 <= resumed["tokens_per_second"] \
        <= own / max(seconds - 0.005, 1e-9) + 0.05
    assert "resumed_at_step" not in whole


def test_a_runs_general_off_holds_for_a_stage_it_trains_with_its_options(
        tiny_base, adapterkit_data, home, adapterkit_plugin_manager):
    """``general: off`` on a run whose trainer trains an ``sft`` stage first (``train_stage``
    with default options): the stage measures no forgetting either. The run's "off" had been
    resolved to None by then, which the stage read as "its own default": sft's check."""
    sft = get_plugin_manager(env=False).trainer("sft")

    class Staged(Trainer):
        name = "staged"
        data_shapes = ("prompt_completion",)

        def train(self, *, job, **_):
            job.train_stage("sft", name="staged-first")
            return sft.train(job=job)

    pm = adapterkit_plugin_manager(_plugin(Staged()))
    data = str(adapterkit_data["prompt_completion"])
    first = dict(name="staged", home=home, plugins=pm, base=str(tiny_base), data=data)
    result = train("staged", **first, options=TrainOptions(**TINY, general="off"))
    stage = Library(home).get("staged-first")
    assert "forgetting" not in stage.meta.metrics and "forgetting" not in result.metrics
    # and the control: sft alone, with the same options less general, measures it
    alone = train("sft", base=str(tiny_base), data=data, name="alone", home=home, plugins=pm,
                  options=TrainOptions(**TINY))
    assert "forgetting" in alone.metrics


def test_a_stage_with_the_runs_own_options_takes_what_its_trainer_acts_on(
        tiny_base, adapterkit_data, home, adapterkit_plugin_manager):
    """A trainer that trains a reward pocket book first (``job.train_stage`` with default
    options) on a run that measures forgetting, with a guard's anchor and min_steps: the
    reward stage, which can use none of them, trains with the rest of the run's options
    instead of being refused after the base loaded."""
    sft = get_plugin_manager(env=False).trainer("sft")

    class Judged(Trainer):
        name = "judged"
        data_shapes = ("preference",)
        uses_guard = True

        def train(self, *, job, **_):
            stage = job.train_stage("reward", name="judged-judge")
            job.options.trainer_options["judge"] = stage.pocket_book.ref
            job.data = type(job.data)(
                [{"prompt": r["prompt"], "completion": r["chosen"]} for r in job.data.rows],
                "prompt_completion", job.data.source, job.data.sha256, job.data.format)
            return sft.train(job=job)

    anchor = home / "anchor.txt"
    home.mkdir(parents=True, exist_ok=True)
    anchor.write_text("Some prose to stay near.\n\nAnd a second paragraph of it.\n")
    pm = adapterkit_plugin_manager(_plugin(Judged()))
    result = train("judged", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                   name="judged", home=home, plugins=pm,
                   options=TrainOptions(**{**TINY, "max_steps": -1}, min_steps=2,
                                        forgetting_budget=50.0, anchor=str(anchor),
                                        general="general"))
    judge = Library(home).get("judged-judge")
    assert judge.meta.trainer == "reward" and "forgetting" not in judge.meta.metrics
    assert judge.meta.hyperparameters["min_steps"] is None
    assert "forgetting" in result.metrics  # the run's own check acted


def test_a_stage_given_the_runs_options_with_max_steps_is_not_refused_for_its_epochs(
        tiny_base, adapterkit_data, home, adapterkit_plugin_manager):
    """A plugin staging with ``replace(job.options, max_steps=2)`` on a run by epochs carried
    the run's resolved epochs beside max_steps, which the stage refused ("give one of
    max_steps and epochs") with a reason its user could not act on."""
    from dataclasses import replace

    sft = get_plugin_manager(env=False).trainer("sft")

    class Staged(Trainer):
        name = "staged2"
        data_shapes = ("prompt_completion",)

        def train(self, *, job, **_):
            job.train_stage("sft", name="staged2-first", options=replace(
                job.options, max_steps=2, general="off", forgetting_budget=None,
                guard_weight=None, min_steps=None))
            return sft.train(job=job)

    pm = adapterkit_plugin_manager(_plugin(Staged()))
    result = train("staged2", name="staged2", home=home, plugins=pm, base=str(tiny_base),
                   data=str(adapterkit_data["prompt_completion"]),
                   options=TrainOptions(**{**TINY, "max_steps": -1}, epochs=1.0,
                                        general="off"))
    stage = Library(home).get("staged2-first")
    assert stage.meta.metrics["steps"] == 2 and result.pocket_book.ref == "staged2@1"

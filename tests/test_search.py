"""``train --search``: trials on a held-out split, the best within the forgetting budget kept
under the asked name, the others discarded, the table recorded; resume after an interruption;
bad input refused before any work."""

from __future__ import annotations

import json
import random

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from adapterkit import ConfigError, TrainOptions, train
from adapterkit.errors import RunStateError
from adapterkit.library.metadata import CARD_FILE, WEIGHTS_FILE
from adapterkit.library.store import Library
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.search import SearchFailed, _ranks_that_fit, search


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(env=False)


@pytest.fixture
def pairs(tmp_path):
    rows = [{"prompt": f"Colour of item {i}?", "completion": f"It is {c}."}
            for i, c in enumerate(["red", "blue", "green", "red", "amber"] * 6)]
    path = tmp_path / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(**kw):
    base = dict(max_steps=6, batch_size=4, logging_steps=2, save_steps=50, r=4, alpha=8,
                dropout=0.0, precision="fp32", early_stopping=0)
    base.update(kw)
    return TrainOptions(**base)


def test_the_best_trial_is_kept_under_the_name_and_the_others_discarded(
        tiny_base, home, pairs, pm):
    # (the ranks drawn are those the tiny base's smallest targeted layers hold: a draw of
    # rank 64 stopped the whole search once its base had loaded)
    said = []
    result = search("sft", base=str(tiny_base), data=str(pairs), name="colours",
                    space=["lr", "r"], trials=3, options=options(seed=0), home=home, plugins=pm,
                    progress=said.append)
    library = Library(home)
    # the tiny base's k/v projections give out 2 heads × 16 = 32 features (a hand value)
    assert _ranks_that_fit(str(tiny_base), library, options()) == (4, 8, 16, 32)
    assert max(row["r"] for row in result.trials) <= 32
    assert any("ranks 4, 8, 16, 32 (those this base's smallest targeted layer can hold)" in line
               for line in said)
    assert [s.name for s in library.list(all_versions=True)] == ["colours"]
    table = result.trials
    assert [row["trial"] for row in table] == [0, 1, 2]
    assert len({(row["lr"], row["r"]) for row in table}) == 3  # three different settings
    best = min(table, key=lambda row: row["eval_loss"])
    book = result.kept.pocket_book
    meta = library.get("colours").meta
    assert meta.metrics["search"]["kept"] == best["trial"]
    # the kept files are the best trial's training: its settings, its own held-out loss
    assert meta.hyperparameters["learning_rate"] == best["lr"]
    assert meta.hyperparameters["r"] == best["r"] and meta.metrics["eval"]["loss"] == \
        best["eval_loss"]
    assert meta.metrics["search"]["eval_split"] == 0.2
    card = (book.path / CARD_FILE).read_text()
    assert f"Kept trial {best['trial']} of a search over lr, r" in card
    assert card.count("| 0 |") + card.count("| 1 |") + card.count("| 2 |") >= 3
    # the weights load in plain PEFT with the kept rank
    weights = load_file(str(book.path / WEIGHTS_FILE))
    assert next(w for k, w in weights.items() if "lora_A" in k).shape[0] == best["r"]
    assert not (home / "runs" / ".search-colours").exists()


def test_a_budget_no_trial_meets_keeps_nothing_and_reports_the_table(
        tiny_base, home, tmp_path, pm):
    """Answers of nonsense letters at a high learning rate: general text gets worse."""
    rows = [{"prompt": f"Item {i}?", "completion": "qqqq zzzz qqqq zzzz qqqq"} for i in range(30)]
    data = tmp_path / "nonsense.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SearchFailed, match=r"no trial stayed within the forgetting budget of "
                                           r"0\.001%; nothing was kept\.\ntrial") as caught:
        # the trials without sft's default guard: under it, a tiny random base's general-text
        # loss can even fall while it learns nonsense
        search("sft", base=str(tiny_base), data=str(data), name="strict", space=["steps"],
               trials=2, budget=1e-3, options=options(learning_rate=5e-2, forgetting_budget=0),
               home=home, plugins=pm)
    assert str(caught.value).count("over budget") == 2
    assert Library(home).list(all_versions=True) == []


class InterruptSecondTrial(TrainerCallback):
    """Ctrl-C in the first step of the second training it sees."""

    def __init__(self):
        self.trainings = 0
        self.lrs = []

    def on_train_begin(self, args, state, control, **kw):
        self.trainings += 1
        self.lrs.append(args.learning_rate)

    def on_step_end(self, args, state, control, **kw):
        if self.trainings == 2:
            raise KeyboardInterrupt


def test_an_interrupted_search_resumes_without_running_finished_trials_again(
        tiny_base, home, pairs, pm):
    interrupt = InterruptSecondTrial()
    kwargs = dict(base=str(tiny_base), data=str(pairs), name="again", space=["lr"], trials=3,
                  options=options(), home=home, plugins=pm)
    with pytest.raises(KeyboardInterrupt):
        search("sft", callbacks=[interrupt], **kwargs)
    with pytest.raises(ConfigError, match="pass --resume to continue it or --restart"):
        search("sft", **kwargs)
    counted = InterruptSecondTrial()  # counts trainings; interrupts none (never a second one
    counted.trainings = -10           # reaching 2)
    result = search("sft", resume=True, callbacks=[counted], **kwargs)
    assert counted.trainings == -10 + 2  # the interrupted trial again, then the third
    assert len(result.trials) == 3 and [s.name for s in Library(home).list()] == ["again"]
    # the finished trial as it was; the interrupted one again, with its settings; a new one
    assert [(row["trial"], row.get("again_of")) for row in result.trials] == \
        [(0, None), (2, 1), (3, None)]
    assert counted.lrs[0] == interrupt.lrs[1] == result.trials[1]["lr"]
    assert result.trials[0]["lr"] == interrupt.lrs[0]
    assert len({row["lr"] for row in result.trials}) == 3
    assert not (home / "runs" / "again-trial-1").exists()


def test_a_resume_with_other_settings_is_refused_and_leaves_the_search_as_it_was(
        tiny_base, home, pairs, pm):
    kwargs = dict(base=str(tiny_base), data=str(pairs), name="same", space=["lr"], trials=2,
                  home=home, plugins=pm)
    with pytest.raises(KeyboardInterrupt):
        search("sft", callbacks=[InterruptSecondTrial()], options=options(), **kwargs)
    with pytest.raises(RunStateError, match=r"ran with other settings \(batch_size 4 → 2; "
                                            r"max_steps 6 → 5\): give the same ones"):
        search("sft", resume=True, options=options(batch_size=2, max_steps=5), **kwargs)
    with pytest.raises(RunStateError, match=r"other settings \(budget_pct None → 2.0; general None → .general.\)"):
        search("sft", resume=True, options=options(), budget=2.0, **kwargs)
    pairs.write_text(pairs.read_text().replace("red", "crimson"))
    with pytest.raises(RunStateError, match=r"other settings \(the data's content\)"):
        search("sft", resume=True, options=options(), **kwargs)
    assert (home / "runs" / ".search-same" / "study.db").exists()  # still resumable


@pytest.mark.parametrize("kwargs,message", [
    (dict(space=["lr"], trials=0), "--trials must be at least 1"),
    (dict(space=["lr"], trials=2, budget=-1.0), "--budget must be a positive percentage"),
    (dict(space=["lr"], trials=2, options=options(eval_split=0.05)),
     "held-out split of at least 5 rows; --eval-split 0.05 of 30 rows holds out 1: give at "
     "least 100 rows, or a larger --eval-split"),  # (100 × 0.05 holds out 5: it said 101)
    (dict(space=["lr"], trials=2, resume=True, restart=True), "give one"),
    (dict(space=["steps"], trials=2, options=options(max_steps=-1, min_steps=5)),
     "--search steps sets each trial's --max-steps, with which --min-steps cannot act"),
    (dict(space=["lr"], trials=2, budget=1.0, trainer="reward"),
     "reward pocket books (a reward head, which scores text) have none: leave --budget out"),
    (dict(space=["lr"], trials=2, budget=1.0, options=options(general="off")),
     "--budget keeps trials by their forgetting figure, which --general off turns off"),
    (dict(space=["lr"], trials=2, resume=True), "no interrupted search of bad to resume"),
    (dict(space=["steps"], trials=2, options=options(max_steps=-1, epochs=2)),
     "beside which the trainer ignores --epochs: leave --epochs out"),
    (dict(space=["lr"], trials=2, options=options(epochs=2)),
     "--max-steps sets each trial's length, and the trainer ignores --epochs beside it"),
    # what a trial's own run refuses before its base loads, refused before the study exists
    (dict(space=["lr"], trials=2, options=options(anchor="anchor.txt", forgetting_budget=0)),
     "--anchor is the forgetting guard's anchor text"),
    (dict(space=["lr"], trials=2, options=options(chat=None, guard_weight=0.5),
          trainer="reward"),
     "the reward trainer does not apply the forgetting guard"),
])
def test_bad_searches_are_refused_before_any_work(tiny_base, home, pairs, pm, kwargs, message,
                                                  tmp_path):
    kwargs.setdefault("options", options())
    trainer = kwargs.pop("trainer", "sft")
    data = pairs
    if trainer == "reward":  # the same rows as pairs, with a rejected answer each
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        data = tmp_path / "preferences.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                            "rejected": "No idea."}) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search(trainer, base=str(tiny_base), data=str(data), name="bad", home=home,
               plugins=pm, **kwargs)
    assert Library(home).list(all_versions=True) == []
    assert not (home / "runs" / ".search-bad").exists()


@pytest.mark.parametrize("args,message", [
    (["--search", "lr,dropout"], "dropout is not searchable (searchable: lr, r, steps"),
    (["--search", "lr", "--trials", "0"], "--trials must be at least 1"),
    (["--trials", "3"], "--trials goes only with --search"),
    (["--search", "lr", "--lr", "1e-3"], "--lr sets what --search lr varies"),
    (["--search", "lr", "--budget", "lots"], "--budget: expected a percentage"),
    (["--search", "lr", "--num-machines", "2", "--machine-rank", "0"],
     "--search trains its trials on this one machine (--processes N acts); leave out "
     "--num-machines, --machine-rank"),
    (["--search", "lr", "--processes", "0"], "--processes must be at least 1, got 0"),
    (["--search", "lr", "--resume", "--restart"], "give one"),
    (["--search", "lr", "--eval-split", "0.2", "--early-stopping", "2"],
     "leave --early-stopping out"),
])
def test_cli_refuses_bad_search_flags_in_one_line(adapterkit_cli, tiny_base, pairs, library,
                                                  args, message):
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", pairs, "--name", "x",
                            *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert library.list(all_versions=True) == []


def test_cli_search_saves_the_best_and_says_so(adapterkit_cli, tiny_base, pairs, library):
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", pairs, "--name", "cli",
                            "--search", "lr,steps", "--trials", "2",
                            "--batch-size", "4", "--rank", "4", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "Trial 0 (1/2):" in result.output and "Trials:" in result.output
    assert "Saved cli@1: trial " in result.output
    assert [s.name for s in library.list(all_versions=True)] == ["cli"]


def test_pocket_books_named_like_its_trials_are_never_touched(tiny_base, home, pairs, pm):
    """Trials are removed by name: a search refuses to start beside a book it did not make."""
    train("sft", base=str(tiny_base), data=str(pairs), name="mine-trial-0", options=options(),
          home=home, plugins=pm)
    with pytest.raises(ConfigError, match="mine-trial-0 already exists .not made by this "
                                          "search.: remove it or choose another NAME"):
        search("sft", base=str(tiny_base), data=str(pairs), name="mine", space=["lr"],
               trials=2, options=options(), home=home, plugins=pm)
    assert Library(home).exists("mine-trial-0")
    assert not (home / "runs" / ".search-mine").exists()  # a refused start leaves no study


class Fails(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        raise RuntimeError("out of memory (made up)")


def test_a_failing_trial_is_recorded_failed_and_not_run_again(tiny_base, home, pairs, pm):
    kwargs = dict(base=str(tiny_base), data=str(pairs), name="fails", space=["lr"], trials=2,
                  options=options(), home=home, plugins=pm)
    with pytest.raises(RuntimeError, match="made up"):
        search("sft", callbacks=[Fails()], **kwargs)
    counted = InterruptSecondTrial()
    counted.trainings = -10
    result = search("sft", resume=True, callbacks=[counted], **kwargs)
    assert counted.trainings == -10 + 2  # two new trials; the failed one is not run again
    assert [row["trial"] for row in result.trials] == [1, 2]
    assert [s.name for s in Library(home).list(all_versions=True)] == ["fails"]


def test_restart_after_an_interruption_discards_what_the_trials_left(tiny_base, home, pairs, pm):
    interrupt = InterruptSecondTrial()
    kwargs = dict(base=str(tiny_base), data=str(pairs), name="over", space=["lr"], trials=2,
                  options=options(), home=home, plugins=pm)
    with pytest.raises(KeyboardInterrupt):
        search("sft", callbacks=[interrupt], **kwargs)
    assert (home / "runs" / "over-trial-1").exists()  # the interrupted trial's run folder
    result = search("sft", restart=True, **kwargs)
    assert [row["trial"] for row in result.trials] == [0, 1]
    assert [s.name for s in Library(home).list(all_versions=True)] == ["over"]
    assert not list((home / "runs").glob("over-trial-*"))


def test_a_trials_recipe_rebuilds_its_options_exactly(tmp_path, pm):
    """A launched trial's ranks read its options from a recipe file: every option survives,
    and the ones left to the trainer's defaults stay unset."""
    import yaml

    from adapterkit.training.options import build_options
    from adapterkit.training.search import trial_recipe

    trial = TrainOptions(learning_rate=3.7e-4, r=32, alpha=64, max_steps=7, eval_split=0.2,
                         early_stopping=0, forgetting_budget=0.0, general="general",
                         report_to=["tensorboard"], trainer_options={"beta": 0.2},
                         precision="fp32", packing=True)
    recipe = tmp_path / "trial.yaml"
    recipe.write_text(yaml.safe_dump(trial_recipe(trial)))
    assert build_options(recipe) == trial
    recipe.write_text(yaml.safe_dump(trial_recipe(TrainOptions(r=8))))
    rebuilt = build_options(recipe)
    assert rebuilt == TrainOptions(r=8) and rebuilt.learning_rate is None
    assert rebuilt.forgetting_budget is None and rebuilt.guard_weight is None
    # an option at its default is left out: written, it reads as given (a dpo trial's
    # dropout: 0.05, which dpo refuses, stopped every launched dpo trial)
    assert "dropout" not in trial_recipe(TrainOptions(r=8))
    recipe.write_text(yaml.safe_dump(trial_recipe(TrainOptions(learning_rate=1e-3))))
    assert build_options(recipe, trainer=pm.trainer("dpo")) == \
        TrainOptions(learning_rate=1e-3)


@pytest.mark.parametrize("config", [False, True])
def test_a_search_across_machines_is_refused_before_any_work(tiny_base, home, pairs, pm,
                                                             tmp_path, config):
    launch = dict(processes=1, num_machines=2, main_address="127.0.0.1:29511")
    if config:  # the machines asked for by an accelerate config file
        path = tmp_path / "two.yaml"
        path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
                        "num_machines: 2\nnum_processes: 2\nmachine_rank: 0\n"
                        "main_process_ip: 127.0.0.1\nmain_process_port: 29511\n")
        launch = dict(config_file=str(path))
    with pytest.raises(ConfigError, match="trains its trials on this one machine; the launch "
                                          "asks for 2 machines"):
        search("sft", base=str(tiny_base), data=str(pairs), name="far", space=["lr"],
               trials=2, options=options(), home=home, plugins=pm, launch=launch)
    assert Library(home).list(all_versions=True) == []
    assert not (home / "runs" / ".search-far").exists()


def test_a_diverged_trial_ranks_last_and_is_never_kept():
    from types import SimpleNamespace

    from adapterkit.training.search import _best, _score

    def result(loss):
        return SimpleNamespace(metrics={"eval": {"loss": loss}, "steps": 3,
                                        "forgetting": {"general_loss_change_pct": 0.1}},
                               pocket_book=SimpleNamespace(ref="t@1"))

    assert _score(result(float("nan")), 1.0)["eval_loss"] == float("inf")
    table = [{"trial": 0, "eval_loss": float("inf"), "within_budget": True},
             {"trial": 1, "eval_loss": 2.5, "within_budget": True}]
    assert _best(table)["trial"] == 1 and _best(table[:1]) is None
    with pytest.raises(ConfigError, match="scored no held-out row: none fits --max-length"):
        _score(result(None), 1.0)


def test_a_resume_names_each_setting_that_changed():
    from adapterkit.training.search import _setup_changes

    was = {"trainer": "sft", "base": "b", "data": "/d.jsonl", "data_sha256": "1", "space": ["lr"],
           "budget_pct": None, "on": None, "from": None, "processes": 1,
           "options": {"r": 16, "seed": 0}}
    now = {**was, "trainer": "dpo", "space": ["lr", "r"], "on": "triage", "data_sha256": "2",
           "processes": 2, "options": {"r": 16, "seed": 1}}
    assert _setup_changes(was, now) == [
        "the data's content", "on None → 'triage'", "seed 0 → 1", "processes 1 → 2",
        "space ['lr'] → ['lr', 'r']", "trainer 'sft' → 'dpo'"]
    assert _setup_changes(was, dict(was)) == []


@pytest.mark.slow
def test_search_with_processes_trains_each_trial_on_two_ranks_as_one_process_would(
        adapterkit_cli, tiny_base, pairs, home, capfd):
    """``--search ... --processes 2``: each trial is a real two-rank run (gloo), whose pocket
    book equals a one-process training of the kept trial's settings with the same global
    batch (2 ranks x 2 rows against 1 x 4), to float round-off."""
    from tests.test_distributed import ROUND_OFF, lora_gap

    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", pairs, "--name",
                            "wide", "--search", "lr", "--trials", "2", "--processes", "2",
                            "--batch-size", "2", "--max-steps", "4", "--rank", "4",
                            "--alpha", "8", "--dropout", "0", "--precision", "fp32",
                            "--max-length", "64", "--forgetting-budget", "off")
    out, err = capfd.readouterr()
    assert result.exit_code == 0, result.output + out + err
    assert "Trial 1 (2/2):" in result.output and "Saved wide@1: trial " in result.output
    assert "Saved wide-trial" not in out  # the ranks leave the report to the search
    library = Library(home)
    assert [s.name for s in library.list(all_versions=True)] == ["wide"]
    book = library.get("wide")
    meta = book.meta
    assert meta.metrics["processes"] == 2 and len(meta.metrics["search"]["trials"]) == 2
    kept = meta.metrics["search"]["trials"][meta.metrics["search"]["kept"]]
    assert meta.hyperparameters["learning_rate"] == kept["lr"]
    one = train("sft", base=str(tiny_base), data=str(pairs), name="one", home=home / "one",
                options=TrainOptions(learning_rate=kept["lr"], batch_size=4, max_steps=4, r=4,
                                     alpha=8, dropout=0.0, precision="fp32", max_length=64,
                                     eval_split=0.2, early_stopping=0, forgetting_budget=0))
    gap = lora_gap(one.pocket_book.path, book.path)
    print(f"search trial on 2 processes vs 1: max |ΔLoRA| = {gap:.2e}")
    assert gap < ROUND_OFF
    assert not (home / "runs" / ".search-wide").exists()


@pytest.mark.slow
@pytest.mark.parametrize("chat", [True, False])
def test_a_reward_search_ranks_trials_by_the_reward_loss_on_held_out_pairs(
        tiny_base, home, tmp_path, pm, chat):
    """Every trainer searches: a reward head's held-out loss is TRL's reward loss on the held
    out pairs, here checked against plain PEFT + transformers scoring the saved pocket book
    on ids built by hand."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"prompt": f"Greet person {i}.", "chosen": " Hello, nice to meet you!",
             "rejected": " Go away."} for i in range(30)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = search("reward", base=str(tiny_base), data=str(prefs), name="judge", space=["lr"],
                    trials=2, options=options(batch_size=8, chat=chat), home=home, plugins=pm)
    assert [s.name for s in Library(home).list(all_versions=True)] == ["judge"]
    book = Library(home).get("judge")
    evaluated = book.meta.metrics["eval"]
    assert evaluated["pairs"] == 6
    assert min(row["eval_loss"] for row in result.trials) == evaluated["loss"]

    # the same held-out pairs, each answer scored alone (no padding) by plain PEFT
    tok = AutoTokenizer.from_pretrained(tiny_base)
    random.Random(0).shuffle(rows)  # the split as documented: seeded shuffle, first 20%
    held_out = rows[:6]

    def ids(prompt, answer):  # what TRL's reward trainer tokenizes
        if chat:
            return tok.apply_chat_template([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": answer}],
                                           tokenize=True, return_dict=True)["input_ids"]
        return tok(prompt + answer + tok.eos_token)["input_ids"]

    seq = AutoModelForSequenceClassification.from_pretrained(
        tiny_base, num_labels=1, pad_token_id=tok.pad_token_id)
    plain = PeftModel.from_pretrained(seq, book.path).eval()

    def reward(prompt, answer):
        with torch.no_grad():
            return plain(input_ids=torch.tensor([ids(prompt, answer)])).logits[0, 0]

    gaps = torch.stack([reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"])
                        for r in held_out])
    expected = float(-torch.nn.functional.logsigmoid(gaps).mean())
    assert evaluated["loss"] == pytest.approx(expected, abs=1e-4)
    assert evaluated["pair_accuracy"] == pytest.approx(float((gaps > 0).float().mean()))
    assert "chosen ranked first in" in (book.path / CARD_FILE).read_text()


@pytest.mark.parametrize("how", ["on", "start_from"])
def test_a_search_on_top_of_or_from_a_pocket_book_keeps_its_lineage(tiny_base, home, pairs, pm,
                                                                     how):
    """`--search ... --on BOOK` trains every trial on top of BOOK (the kept one stacks on it);
    `--from BOOK` continues a copy of it (its rank kept); BOOK itself is left as it was."""
    first = train("sft", base=str(tiny_base), data=str(pairs), name="under", options=options(),
                  home=home, plugins=pm).pocket_book
    before = (first.path / WEIGHTS_FILE).read_bytes()
    result = search("sft", base=str(tiny_base), data=str(pairs), name="over", space=["lr"],
                    trials=2, options=options(), home=home, plugins=pm, **{how: "under"})
    library = Library(home)
    assert sorted(s.name for s in library.list(all_versions=True)) == ["over", "under"]
    meta = library.get("over").meta
    if how == "on":
        assert meta.stacked_on == ["under@1"]
    else:
        assert meta.stacked_on == [] and meta.parents == ["under@1"]
        assert meta.hyperparameters["r"] == 4
    assert len(result.trials) == 2
    assert (library.get("under").path / WEIGHTS_FILE).read_bytes() == before


def test_a_trainer_that_evaluates_nothing_is_refused_before_any_trial(tiny_base, home, pairs,
                                                                       pm):
    """rlhf (GRPO) records no held-out figure of its policy: --search is refused before it
    writes a study or trains a trial, where it used to train a whole trial first, resumed or
    not."""
    for again in (False, True):
        with pytest.raises(ConfigError, match="the rlhf trainer records no held-out figure"):
            search("rlhf", base=str(tiny_base), data=str(pairs), name="bad", home=home,
                   plugins=pm, space=["lr"], trials=2, options=options(), resume=again)
    assert Library(home).list() == [] and not (home / "runs").exists()


def test_a_search_saves_the_new_version_the_refusal_of_a_taken_name_suggests(
        adapterkit_cli, tiny_base, pairs, library):
    """With x@1 in the library, `--name x --search` suggests --name x@2, and --name x@2
    saves the kept trial as x@2 (it used to be refused: its trials were named after x@2)."""
    args = ("--search", "lr", "--trials", "2", "--max-steps", "4", "--batch-size", "4",
            "--rank", "4", "--alpha", "8", "--precision", "fp32")
    first = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", pairs, "--name", "x",
                           "--max-steps", "4", "--batch-size", "4", "--rank", "4",
                           "--precision", "fp32")
    assert first.exit_code == 0, first.output
    before = (library.get("x@1").path / WEIGHTS_FILE).read_bytes()
    taken = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", pairs, "--name", "x",
                           *args)
    assert taken.exit_code != 0 and "--name x@2" in taken.output, taken.output
    result = adapterkit_cli("train", "sft", "--base", tiny_base, "--data", pairs, "--name",
                            "x@2", *args)
    assert result.exit_code == 0, result.output
    assert "Saved x@2: trial " in result.output
    assert [(s.name, s.version) for s in library.list(all_versions=True)] == [("x", 1), ("x", 2)]
    kept = library.get("x@2")
    assert (kept.meta.name, kept.meta.version) == ("x", 2)
    assert len(kept.meta.metrics["search"]["trials"]) == 2
    assert (kept.path / CARD_FILE).read_text().count("x@2") == 0  # the card names x, not x@2
    assert (library.get("x@1").path / WEIGHTS_FILE).read_bytes() == before  # x@1 untouched
    runs = library.home / "runs"
    assert not list(runs.glob("x-trial-*")) and not list(runs.glob(".search-*"))


@pytest.mark.parametrize("length,trials", [(93, 2), (92, 11)])
def test_a_name_too_long_for_its_trials_is_refused_before_the_study_exists(
        tiny_base, home, pairs, pm, length, trials):
    """NAME-trial-K must be a pocket-book name (at most 100 characters) for every trial K:
    a longer one used to fail in the first trial, leaving a study that blocked the next
    search as an interrupted one."""
    from adapterkit.errors import InvalidName

    name = "n" * length
    last = f"{name}-trial-{trials - 1}"
    assert len(last) == 101
    with pytest.raises(InvalidName, match=rf"trial {trials - 1} would be {last} \(101 "
                                          rf"characters; a name has at most 100\): give a "
                                          rf"NAME of at most {length - 1} characters"):
        search("sft", base=str(tiny_base), data=str(pairs), name=name, space=["lr"],
               trials=trials, options=options(), home=home, plugins=pm)
    assert Library(home).list(all_versions=True) == []
    assert not (home / "runs").exists() or not list((home / "runs").iterdir())


def test_the_kept_trial_has_one_number_everywhere_even_after_a_failed_trial(
        adapterkit_cli, tiny_base, pairs, library, monkeypatch):
    """The progress line, the Saved line, the card and the metadata name the kept trial by
    one number (Optuna's, as in NAME-trial-K); a failed trial makes the numbers run past
    --trials, and the Saved line never reads "trial 2 of 2" for the second of two."""
    import re

    from adapterkit.training import search as search_module

    real = search_module._train_trial
    calls = []

    def first_fails(*args, **kwargs):
        calls.append(kwargs["name"])
        if len(calls) == 1:
            raise RuntimeError("out of memory (made up)")
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "_train_trial", first_fails)
    args = ("train", "sft", "--base", tiny_base, "--data", pairs, "--name", "num",
            "--search", "lr", "--trials", "2", "--max-steps", "4", "--batch-size", "4",
            "--rank", "4", "--alpha", "8", "--precision", "fp32")
    failed = adapterkit_cli(*args)
    assert failed.exit_code != 0
    result = adapterkit_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert calls == ["num-trial-0", "num-trial-1", "num-trial-2"]
    assert "Trial 1 (1/2):" in result.output and "Trial 2 (2/2):" in result.output
    saved = re.search(r"Saved num@1: trial (\d+), the best of 2 finished trials, held-out "
                      r"loss ([0-9.]+)", result.output)
    assert saved, result.output
    kept = int(saved.group(1))
    meta = library.get("num").meta
    assert meta.metrics["search"]["kept"] == kept
    assert [t["trial"] for t in meta.metrics["search"]["trials"]] == [1, 2]
    row = next(t for t in meta.metrics["search"]["trials"] if t["trial"] == kept)
    assert f"{row['eval_loss']:.4f}" == saved.group(2)
    assert f"Kept trial {kept} of a search" in (library.get("num").path / CARD_FILE).read_text()
    # the progress line that ran the kept trial carries its number and its loss
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"Trial {kept} ("))
    said = next(line for line in lines[at + 1:] if "held-out loss" in line)
    assert f"held-out loss {row['eval_loss']:.4f}" in said


def test_a_dpo_trial_the_guard_rolled_back_is_scored_on_the_weights_it_kept(
        tiny_base, home, tmp_path, pm, monkeypatch):
    """dpo's held-out figure is its trainer's own evaluation at the kept step: a trial whose
    forgetting guard falls back to a snapshot is evaluated at that snapshot's step (it used
    to be evaluated only every --save-steps, and the search stopped with "dpo records no
    held-out loss"). The guard's measurement is rigged here so that it falls back: over the
    budget at the last step, within it before."""
    from adapterkit.training.guard import ForgettingGuard

    real = ForgettingGuard._check

    def rigged(self, model, step):
        entry = real(self, model, step)
        entry["general_loss_change_pct"] = 50.0 if step >= self.planned_steps else 0.0
        return entry

    monkeypatch.setattr(ForgettingGuard, "_check", rigged)
    rows = [{"prompt": f"Greet person {i}.", "chosen": " Hello, nice to meet you!",
             "rejected": " Go away."} for i in range(30)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said: list[str] = []
    result = search("dpo", base=str(tiny_base), data=str(prefs), name="pref", space=["lr"],
                    trials=2, home=home, plugins=pm, progress=said.append,
                    options=options(forgetting_budget=1.0, guard_weight=0.0, guard_every=2,
                                    save_steps=50))
    assert "each trial evaluates (and checkpoints) every 2 steps, where its forgetting guard " \
        "keeps snapshots, not every 50" in said[0]
    meta = Library(home).get("pref").meta
    guard, evaluated = meta.metrics["guard"], meta.metrics["eval"]
    assert guard["restored"] is True and guard["kept_step"] == 4  # the newest snapshot
    assert evaluated["step"] == 4 and evaluated["measured_by"] == "trainer"
    kept = next(row for row in result.trials if row["trial"] == meta.metrics["search"]["kept"])
    assert kept["eval_loss"] == evaluated["loss"]
    assert [s.name for s in Library(home).list(all_versions=True)] == ["pref"]


def test_a_trial_whose_kept_step_was_not_evaluated_is_refused_for_that_reason():
    """(A trainer evaluating on a cadence of its own): the reason given is the true one, not
    that the trainer records no held-out loss."""
    from types import SimpleNamespace

    from adapterkit.training.search import _score

    result = SimpleNamespace(metrics={"guard": {"restored": True, "kept_step": 4}, "steps": 6},
                             pocket_book=SimpleNamespace(ref="t-trial-0@1",
                                                         meta=SimpleNamespace(trainer="dpo")))
    with pytest.raises(ConfigError, match=r"trial t-trial-0@1: the forgetting guard kept step "
                                          r"4's weights, which the dpo trainer did not evaluate"):
        _score(result, None)


def test_a_resume_checks_its_trials_names_up_to_the_highest_number_it_can_reach():
    """A resume numbers trials past --trials (an interrupted one runs again under a new
    number): NAME-trial-K is checked up to the highest K it can reach, found here by running
    a resume's steps on an Optuna study (the interrupted trial queued again, then asked until
    enough have finished)."""
    import optuna

    from adapterkit.errors import InvalidName
    from adapterkit.training.search import _check_trial_length, _last_trial

    state = optuna.trial.TrialState
    study = optuna.create_study()
    for _ in range(3):
        trial = study.ask()
        trial.suggest_float("lr", 1e-5, 1e-3)
        study.tell(trial, 1.0)
    stale = study.ask()
    stale.suggest_float("lr", 1e-5, 1e-3)  # interrupted: still running
    last = _last_trial(study, 8, optuna)
    study.tell(stale.number, state=state.FAIL)  # what search does with it
    study.enqueue_trial(stale.params, skip_if_exists=False)
    numbers = []
    while sum(t.state == state.COMPLETE for t in study.trials) < 8:
        trial = study.ask()
        trial.suggest_float("lr", 1e-5, 1e-3)
        numbers.append(trial.number)
        study.tell(trial, 1.0)
    assert numbers == [4, 5, 6, 7, 8] and last == max(numbers)
    _check_trial_length("n" * 91, last, resume=True)  # n...-trial-8: 99 characters
    with pytest.raises(InvalidName, match=r"give a NAME of at most 92 characters, or --restart"):
        _check_trial_length("n" * 93, last, resume=True)


def test_the_sampler_draws_at_random_for_half_the_trials_then_by_tpe(tmp_path):
    """TPE draws at random until n_startup_trials have finished (Optuna's default: 10, so
    every draw of a default 8-trial search was random): the search's first half of the trials
    (at most 10) are the random sampler's draws with its seed, the rest are TPE's own."""
    import optuna

    from adapterkit.training.search import _study

    def draws(sampler_study, n):
        lrs = []
        for i in range(n):
            trial = sampler_study.ask()
            lrs.append(trial.suggest_float("lr", 1e-5, 3e-3, log=True))
            sampler_study.tell(trial, (lrs[-1] - 2e-4) ** 2 + i * 1e-12)  # best near 2e-4
        return lrs

    library = Library(tmp_path / "home")
    study = _study(optuna, tmp_path / "study", "s", 7, resume=False, restart=False,
                   library=library, trials=8)
    searched = draws(study, 8)
    plain = draws(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)), 8)
    assert searched[:4] == plain[:4]
    assert all(a != b for a, b in zip(searched[4:], plain[4:]))


def test_a_study_drawn_from_other_ranks_is_refused_on_resume_in_one_line(home, tmp_path):
    """A search recorded before ranks were fitted to the base drew from all five; going on
    from its study with fewer choices made Optuna raise ("CategoricalDistribution does not
    support dynamic value space") on every --resume, a traceback that left the trial RUNNING."""
    import optuna

    from adapterkit.errors import RunStateError
    from adapterkit.training.search import _study

    library = Library(home)
    folder = tmp_path / ".search-x"
    old_setup = {"trainer": "sft", "space": ["r"]}
    _study(optuna, folder, "x", 0, resume=False, restart=False, library=library, trials=2,
           setup=old_setup)
    with pytest.raises(RunStateError, match="ran with other settings .*ranks.* --restart"):
        _study(optuna, folder, "x", 0, resume=True, restart=False, library=library, trials=2,
               setup={**old_setup, "ranks": [4, 8, 16, 32]})


def test_no_other_save_takes_the_name_a_search_will_keep(tiny_base, home, pairs, pm,
                                                         peft_adapter):
    """Found in review: an import under NAME during `train --search --name NAME` was saved,
    and the search then failed at its end with its name taken. The search holds NAME's run
    lock as a run does: the import is refused, the search keeps its best trial; and a run of
    NAME starting meanwhile is refused."""
    from adapterkit.errors import NameTaken

    said: list[str] = []

    class ImportDuringTrial(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not said:
                for attempt in (
                        lambda: Library(home).import_peft(peft_adapter, "held",
                                                          base=str(tiny_base)),
                        lambda: train("sft", base=str(tiny_base), data=str(pairs), name="held",
                                      home=home, plugins=pm, options=options())):
                    try:
                        attempt()
                        said.append("saved")
                    except (NameTaken, RunStateError) as exc:
                        said.append(str(exc))

    result = search("sft", base=str(tiny_base), data=str(pairs), name="held", space=["lr"],
                    trials=2, options=options(), home=home, plugins=pm,
                    callbacks=[ImportDuringTrial()])
    assert said[0].startswith("a run training held in ")
    assert said[1].startswith("another run of held is training in ")
    assert str(result.kept.pocket_book.ref) == "held@1"
    assert [s.name for s in Library(home).list()] == ["held"]


def test_every_trial_s_pocket_book_besides_its_own_is_checked_before_the_study_exists(
        tiny_base, home, pairs):
    """A trainer whose run saves a pocket book besides its own (``also_saves``): the name of
    trial 0's, taken, was found only as that trial started (the search checked its last
    trial's); it is refused before anything is written."""
    from adapterkit_plugins.sft import SFT

    from adapterkit import hookimpl
    from adapterkit.errors import BesidesTaken
    from adapterkit.plugin_api.testing import make_peft_adapter

    class Sided(SFT):
        name, reuse_option = "sided", None

        def also_saves(self, *, name, trainer_options):
            return [f"side-of-{name}"]

    class Plugin:
        @hookimpl
        def register_trainers(self, register):
            register(Sided())

    Library(home).import_peft(make_peft_adapter(tiny_base, home.parent / "a"),
                              "side-of-s-trial-0", base=str(tiny_base))
    with pytest.raises(BesidesTaken) as refused:
        search("sided", base=str(tiny_base), data=str(pairs), name="s", space=["lr"],
               trials=2, options=options(), home=home,
               plugins=get_plugin_manager(env=False, plugins={"sided": Plugin()}))
    assert str(refused.value) == (
        "the sided run of s-trial-0 saves a pocket book under the name side-of-s-trial-0 "
        "besides its own, and the library holds side-of-s-trial-0 already: remove it "
        "(adapterkit rm side-of-s-trial-0); or pick another name")
    assert not (home / "runs").exists() or not list((home / "runs").iterdir())

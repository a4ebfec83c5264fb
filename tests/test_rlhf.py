"""The reward and rlhf trainers on a tiny random base: one resident base for all roles."""

import json
import sys

import pytest
import torch
from safetensors import safe_open

from adapterkit import (
    BaseMismatch,
    ConfigError,
    InvalidAdapter,
    Library,
    TrainOptions,
    load_base,
    train,
)
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.reward import RewardScorer, reward_of_generations

HELD_OUT = [f"Greet person {i}." for i in range(100, 108)]
#: What the command line says after an error, below it: an exception's note (Python 3.11+;
#: 3.10 has none, and says it before the error, as it did).
NOTES = pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11+")

RL = dict(max_steps=24, batch_size=8, learning_rate=1e-2, r=8, alpha=16, dropout=0.0,
          logging_steps=1, seed=1)


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory, tiny_base):
    """SFT on both kinds of answer ("mix"), then rlhf on top of it in one command.

    A random tiny model never says anything a reward model likes; after the SFT it says both
    the courteous and the curt answer, so RL has something to choose between.
    """
    from adapterkit.pytest_plugin import TINY_ROWS

    home = tmp_path_factory.mktemp("rlhf-home")
    folder = tmp_path_factory.mktemp("rlhf-data")
    data, mix = folder / "prefs.jsonl", folder / "mix.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))
    mix.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k]}) + "\n"
                           for r in TINY_ROWS["preference"] for k in ("chosen", "rejected")))
    pm = get_plugin_manager(env=False)
    base = load_base(str(tiny_base), home=home)
    sft = train("sft", base=base, data=str(mix), name="mix", home=home, plugins=pm,
                options=TrainOptions(**{**RL, "learning_rate": 3e-2}))
    sft.model.unload()
    result = train("rlhf", base=base, data=str(data), name="kind", home=home, plugins=pm,
                   on="mix", options=TrainOptions(**RL, trainer_options={
                       "reward_steps": 20, "max_new_tokens": 24}))
    return home, data, pm, base, result


@pytest.mark.slow
def test_one_command_trains_reward_then_policy(rlhf_run):
    home, _, _, base, result = rlhf_run
    refs = sorted(f"{b.name}@{b.version}" for b in Library(home).list())
    assert refs == ["kind-reward@1", "kind@1", "mix@1"]
    meta = result.pocket_book.meta
    assert meta.trainer == "rlhf" and meta.stacked_on == ["mix@1"]
    assert meta.hyperparameters["trainer_options"]["reward"] == "kind-reward@1"
    assert result.metrics["reward_first_log"] is not None
    assert "ref" not in result.model.peft_config  # GRPO's reference copy is not saved
    assert not (result.pocket_book.path / "ref").exists()

    # held-out prompts: sampled answers score higher with the policy than without it
    scorer = RewardScorer(base, Library(home).get("kind-reward"), policy=result.model)
    try:
        reward = reward_of_generations(result.model, scorer, HELD_OUT, max_new_tokens=24,
                                       samples=8)
    finally:
        scorer.close()
    assert reward["after"] > reward["before"], reward


@pytest.mark.slow
def test_reward_book_scores_the_same_resident_and_in_plain_peft(rlhf_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    home, _, _, base, result = rlhf_run
    book = Library(home).get("kind-reward")
    config = json.loads((book.path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    scorer = RewardScorer(base, book, policy=result.model)
    try:
        from adapterkit.training.reward import render

        ids = render(scorer.tokenizer, [{"role": "user", "content": "Greet person 3."}],
                     [{"role": "assistant", "content": "Hello, nice to meet you!"}])
        resident = scorer.score_ids([ids])[0]
        chosen, rejected = scorer.score(["Greet person 1."] * 2,
                                        ["Hello, nice to meet you!", "Go away."])
    finally:
        scorer.close()
    assert chosen > rejected  # the reward pocket book learned the preference
    seq = AutoModelForSequenceClassification.from_pretrained(
        tiny_base, num_labels=1, pad_token_id=scorer.tokenizer.pad_token_id)
    plain = PeftModel.from_pretrained(seq, book.path).eval()
    with torch.no_grad():
        expected = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert resident == pytest.approx(expected, abs=1e-4)
    # scoring left the policy's logits untouched (the reward LoRA is switched off again)
    probe = torch.tensor([[3, 50, 60, 70]])
    with torch.no_grad():
        before = result.model(input_ids=probe).logits
    scorer = RewardScorer(base, book, policy=result.model)
    scorer.score(["x"], ["y"])
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=probe).logits, before)
    scorer.close()


@pytest.mark.slow
def test_policy_reloads_in_plain_peft(rlhf_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home, _, _, _, result = rlhf_run
    ids = torch.tensor([[3, 50, 60, 70, 80]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      Library(home).get("mix").path, adapter_name="mix")
    plain.load_adapter(str(result.pocket_book.path), adapter_name="kind")
    plain.base_model.set_adapter(["mix", "kind"], inference_mode=True)
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, result.model(input_ids=ids).logits,
                              atol=1e-5)


@pytest.mark.slow
def test_reward_reuse_trains_no_second_reward_book(rlhf_run, tiny_base):
    home, data, pm, _, _ = rlhf_run
    options = TrainOptions(**{**RL, "max_steps": 2},
                           trainer_options={"reward": "kind-reward", "max_new_tokens": 4})
    again = train("rlhf", base=str(tiny_base), data=str(data), name="kind2", home=home,
                  plugins=pm, options=options)
    assert again.metrics["reward_book"] == "kind-reward@1"
    assert again.pocket_book.meta.hyperparameters["trainer_options"]["reward"] == "kind-reward@1"
    assert options.trainer_options["reward"] == "kind-reward"  # the caller's object untouched
    assert not any(b.name == "kind2-reward" for b in Library(home).list())

    # the same prompts alone (GRPO's own format) train the same policy, seed for seed
    prompts = data.with_name("prompts.jsonl")
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n"
                               for line in data.read_text().splitlines()))
    alone = train("rlhf", base=str(tiny_base), data=str(prompts), name="kind-prompts",
                  home=home, plugins=pm, options=options)
    assert alone.metrics["reward_book"] == "kind-reward@1"
    with safe_open(again.pocket_book.path / "adapter_model.safetensors", "pt") as a, \
            safe_open(alone.pocket_book.path / "adapter_model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    without = TrainOptions(**{**RL, "max_steps": 2}, trainer_options={"max_new_tokens": 4})
    with pytest.raises(ConfigError, match="first trains a reward pocket book from preference "
                                          "pairs: give a prompt/chosen/rejected file, or "
                                          "--reward NAME"):
        train("rlhf", base=str(tiny_base), data=str(prompts), name="kind-prompts-alone",
              home=home, plugins=pm, options=without)


def test_bad_reward_and_rl_settings_write_nothing(rlhf_run, tiny_base, other_base, tmp_path):
    home, data, pm, _, _ = rlhf_run
    elsewhere = train("reward", base=str(other_base), data=str(data), name="other-reward",
                      home=home, plugins=pm, options=TrainOptions(**{**RL, "max_steps": 1}))
    before = sorted((b.name, b.version) for b in Library(home).list())

    def rlhf(**sets):
        return train("rlhf", base=str(tiny_base), data=str(data), name="bad", home=home,
                     plugins=pm, options=TrainOptions(**{**RL, "max_steps": 1},
                                                      trainer_options=sets))

    with pytest.raises(InvalidAdapter, match="--reward kind@1 is a policy pocket book"):
        rlhf(reward="kind")
    with pytest.raises(BaseMismatch, match="reward pocket book other-reward@1 was made on"):
        rlhf(reward="other-reward")
    with pytest.raises(ConfigError, match="max_new_tokens is 0"):
        rlhf(reward="kind-reward", max_new_tokens=0)
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        rlhf(reward="kind-reward", num_generations=1)
    with pytest.raises(ConfigError, match="with --reward there is none, and the policy is not "
                                          "evaluated: drop --eval-split"):
        train("rlhf", base=str(tiny_base), data=str(data), name="bad", home=home, plugins=pm,
              options=TrainOptions(**{**RL, "max_steps": 1, "eval_split": 0.25},
                                   trainer_options={"reward": "kind-reward"}))
    with pytest.raises(ConfigError, match="the library holds kind-reward already: to use it "
                                          "instead of training one, set the trainer option "
                                          "reward to kind-reward; or remove it"):
        train("rlhf", base=str(tiny_base), data=str(data), name="kind@2", home=home,
              plugins=pm, options=TrainOptions(**{**RL, "max_steps": 1}))
    with pytest.raises(ConfigError, match="reward pocket book"):
        train("dpo", base=str(tiny_base), data=str(data), name="bad", home=home, plugins=pm,
              on="kind-reward")
    # pairs longer than max_length: TRL's RewardTrainer left them out without a word (and with
    # none left failed on an empty sampler, a traceback)
    # (36: room for every prompt, 34 tokens, not for its answers)
    with pytest.raises(ConfigError, match=r"(\d+) of \1 training preference pairs are longer "
                                          r"than --max-length 36 tokens"):
        train("reward", base=str(tiny_base), data=str(data), name="long", home=home,
              plugins=pm, options=TrainOptions(**{**RL, "max_steps": 1, "max_length": 36}))
    assert sorted((b.name, b.version) for b in Library(home).list()) == before
    assert elsewhere.pocket_book.meta.trainer == "reward"


def test_reward_book_cannot_generate(rlhf_run, tiny_base):
    from adapterkit import open_session
    from adapterkit.runtime.peft_model import peft_model as attach

    home, _, _, _, _ = rlhf_run
    library = Library(home)
    with pytest.raises(InvalidAdapter, match="reward pocket book: it scores text"):
        attach(load_base(str(tiny_base), home=home), library.get("kind-reward"), library=library)
    with pytest.raises(InvalidAdapter, match="reward pocket book"):
        open_session(str(tiny_base), home=home).swap("kind-reward")


def test_cli_reward_flag_errors_are_one_line(rlhf_run, tiny_base, adapterkit_cli, monkeypatch):
    home, data, *_ = rlhf_run
    monkeypatch.setenv("ADAPTERKIT_HOME", str(home))
    out = adapterkit_cli("train", "rlhf", "--base", str(tiny_base), "--data", str(data),
                         "--name", "cli-bad", "--reward", "kind", "--max-steps", "1")
    assert out.exit_code != 0
    assert "Traceback" not in out.output
    assert out.output.strip().splitlines()[-1].startswith(
        "Error: --reward kind@1 is a policy pocket book")
    out = adapterkit_cli("generate", "hello", "--adapter", "kind-reward")
    assert out.exit_code != 0 and "reward pocket book" in out.output


@pytest.mark.slow
def test_rlhf_with_qlora(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    from adapterkit.pytest_plugin import TINY_ROWS

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))
    home = tmp_path / "home"
    result = train("rlhf", base=str(tiny_base), data=str(data), name="q", home=home,
                   plugins=get_plugin_manager(env=False),
                   options=TrainOptions(**{**RL, "method": "qlora", "max_steps": 2},
                                        trainer_options={"reward_steps": 2, "max_new_tokens": 4}))
    library = Library(home)
    assert library.get("q-reward").meta.method == "qlora"
    assert result.pocket_book.meta.method == "qlora" and result.metrics["steps"] == 2


def test_interrupt_after_the_reward_stage_says_what_was_saved(tiny_base, tmp_path,
                                                               adapterkit_cli, monkeypatch):
    import trl

    from adapterkit.pytest_plugin import TINY_ROWS

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trl.GRPOTrainer, "train", interrupted)
    out = adapterkit_cli("train", "rlhf", "--base", str(tiny_base), "--data", str(data),
                         "--name", "halted", "--max-steps", "1", "-r", "4")
    assert out.exit_code == 130
    assert "halted-reward@1 (a stage of its run) was saved; halted was not.\nInterrupted: " \
        "no checkpoint was written yet (one every --save-steps 50 steps): run the " \
        "command again (reuse halted-reward@1: add --reward halted-reward@1).\n" in out.output
    assert out.output.count("halted-reward@1 (a stage") == 1  # (said once, by the run)
    listed = adapterkit_cli("list", "--json")
    assert [b["name"] for b in json.loads(listed.output)] == ["halted-reward"]
    # what --reward skips is named, so that the resume is the first try (it took three)
    out = adapterkit_cli("train", "rlhf", "--base", str(tiny_base), "--data", str(data),
                         "--name", "halted2", "--max-steps", "1", "-r", "4", "--eval-split",
                         "0.25", "--set", "reward_steps=1")
    assert "add --reward halted2-reward@1 and leave out --set reward_steps, --eval-split)" \
        in out.output, out.output


@NOTES
@pytest.mark.parametrize("error", [ValueError, ConfigError])
def test_a_failure_after_the_reward_stage_says_how_to_reuse_it(tiny_base, tmp_path,
                                                                adapterkit_cli, monkeypatch,
                                                                error):
    """A policy step that fails (not Ctrl-C) after the reward stage was saved: the option
    that reuses it, from the trainer's ``reuse_option`` (it said "for rlhf: --reward NAME"),
    said after the error (it came before it): below the error's line, or a traceback's."""
    import trl

    from adapterkit.pytest_plugin import TINY_ROWS

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))

    def fails(self, *args, **kwargs):
        raise error("the policy's step failed")

    monkeypatch.setattr(trl.GRPOTrainer, "train", fails)
    out = adapterkit_cli("train", "rlhf", "--base", str(tiny_base), "--data", str(data),
                         "--name", "broke", "--max-steps", "1", "-r", "4")
    assert out.exit_code != 0
    assert "broke-reward@1 (a stage of its run) was saved; broke was not." in out.output
    then = ("Once the cause is fixed: no checkpoint was written yet (one every --save-steps "
            "50 steps): run the command again (reuse broke-reward@1: add --reward "
            "broke-reward@1).")
    if error is ConfigError:  # one line, and the way on below it
        assert out.output.endswith(f"Error: the policy's step failed\n{then}\n"), out.output
    else:  # a traceback (not a user's mistake), and the way on as its note, printed after it
        assert then not in out.output and out.exception.__notes__ == [then]


@pytest.mark.slow
def test_grpos_reference_is_the_policy_switched_off_not_a_copy(rlhf_run, tiny_base,
                                                              monkeypatch):
    """GRPO's KL reference for a policy that starts at zero: the adapter switched off (TRL's
    frozen copy of it, ``"ref"``, dropped by ``job.configure``), and nothing left after."""
    from trl.trainer import grpo_trainer

    home, data, pm, _, _ = rlhf_run
    used = []
    real = grpo_trainer.use_adapter

    def recording(model, adapter_name):
        used.append(adapter_name)
        return real(model, adapter_name)

    monkeypatch.setattr(grpo_trainer, "use_adapter", recording)
    options = TrainOptions(**{**RL, "max_steps": 2},
                           trainer_options={"reward": "kind-reward", "max_new_tokens": 4})
    result = train("rlhf", base=str(tiny_base), data=str(data), name="kind3", home=home,
                   plugins=pm, options=options)
    assert used and set(used) == {None}  # beta 0.05: a reference was taken, never the copy
    assert list(result.model.peft_config) == ["default"]
    assert [p.name for p in result.pocket_book.path.iterdir() if p.is_dir()] == []


def test_min_steps_acts_on_the_policy_and_the_reward_stage_takes_its_epochs(tiny_base, home,
                                                                          adapterkit_data):
    """--min-steps on rlhf without --reward: the reward stage it trains first took the
    policy's resolved epochs with min_steps still set, and was refused after the base loaded
    for a combination nobody gave."""
    pm = get_plugin_manager(env=False)
    result = train("rlhf", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                   name="least", home=home, plugins=pm,
                   options=TrainOptions(min_steps=3, batch_size=8, r=4, alpha=8, dropout=0.0,
                                        trainer_options={"max_new_tokens": 2}))
    # min_steps counts 16 rows, 8 a step: 2 steps an epoch, so 2 epochs for at least 3
    # (GRPO's batch of 8 holds 2 prompts × 4 completions: 16 steps)
    assert result.metrics["steps"] >= 3
    reward = Library(home).get("least-reward")
    assert reward.meta.hyperparameters["epochs"] == 2.0 and reward.meta.metrics["steps"] == 4


@pytest.mark.slow
def test_an_rlhf_run_interrupted_in_its_reward_stage_resumes_or_restarts(rlhf_run, tiny_base,
                                                                       monkeypatch):
    """Killed while training its reward pocket book (before the policy's first checkpoint),
    `--resume` said there was nothing to resume and `--restart` tripped over the stage's own
    checkpoint: only deleting runs/NAME-reward by hand went on. Now the run's --resume
    continues the stage from its checkpoint, --restart discards it, and a plain rerun says so
    before the base loads."""
    from types import SimpleNamespace

    from transformers import TrainerCallback

    from adapterkit.training.recipe import interrupted

    home, data, pm, _, _ = rlhf_run

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash in the reward stage")

    class Steps(TrainerCallback):
        def __init__(self):
            self.seen: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    options = TrainOptions(**{**RL, "max_steps": 2, "save_steps": 1},
                           trainer_options={"reward_steps": 2, "max_new_tokens": 4})

    def rlhf(name, **kw):
        return train("rlhf", base=str(tiny_base), data=str(data), name=name, home=home,
                     plugins=pm, options=options, **kw)

    for name, flag in (("resumed", "resume"), ("restarted", "restart")):
        with pytest.raises(RuntimeError, match="simulated crash"):
            rlhf(name, callbacks=[Crash()])
        assert (home / "runs" / f"{name}-reward" / "checkpoint-1").is_dir()
        # a pipeline's --resume sees it too (it resumes the stage that holds this run)
        assert interrupted(Library(home), SimpleNamespace(name=name)) == \
            f"its stage {name}-reward"
        with pytest.raises(ConfigError, match=f"an interrupted run of {name}-reward \\(a stage "
                                              f"of {name}\\) exists; pass --resume"):
            rlhf(name)
        # killed again while the base loads: the record of the stage to resume is kept
        with monkeypatch.context() as m:
            def killed(*args, **kwargs):
                raise KeyboardInterrupt

            m.setattr("adapterkit.training.run.load_for_method", killed)
            with pytest.raises(KeyboardInterrupt):
                rlhf(name, **{flag: True})
        # a restart removed the stage's run first; a resume kept it (and its record)
        assert (home / "runs" / f"{name}-reward").exists() == (flag == "resume")
        steps = Steps()
        result = rlhf(name, callbacks=[steps], **{flag: True})
        assert result.metrics["reward_book"] == f"{name}-reward@1"
        # the stage's steps, then the policy's: the stage went on from step 1, or started over
        stage_steps = steps.seen[:steps.seen.index(2) + 1]
        assert stage_steps == ([2] if flag == "resume" else [1, 2]), steps.seen
        assert {b.name for b in Library(home).list()} >= {name, f"{name}-reward"}


def test_reward_flag_on_another_trainer_names_itself(adapterkit_cli, tiny_base, adapterkit_data):
    """``--reward`` became ``--set reward=...``: on dpo the refusal spoke of an unknown dpo
    option, on sft of --set the user never typed."""
    for trainer in ("dpo", "sft"):
        out = adapterkit_cli("train", trainer, "--base", str(tiny_base), "--data",
                             adapterkit_data["preference"], "--name", "x", "--reward", "r")
        assert out.exit_code == 1
        assert out.output.strip().splitlines()[-1] == (
            f"Error: --reward names the reward pocket book rlhf optimises against; the "
            f"{trainer} trainer takes none: drop --reward")


# --- the reward model rlhf scores with is the one that was trained -------------------------

QUICK = dict(max_steps=2, batch_size=4, learning_rate=3e-2, r=4, alpha=8, dropout=0.0,
             logging_steps=1, seed=3, precision="fp32")


@pytest.fixture(scope="module")
def stacked_rewards(tmp_path_factory, tiny_base):
    """A policy pocket book ``under``, and two reward pocket books trained ``--on under``:
    ``plain-rm`` without the chat template (``--no-chat``), ``chat-rm`` with it."""
    from adapterkit.pytest_plugin import TINY_ROWS

    home = tmp_path_factory.mktemp("stacked-home")
    folder = tmp_path_factory.mktemp("stacked-data")
    prefs, pc = folder / "prefs.jsonl", folder / "pc.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))
    pc.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["prompt_completion"]))
    pm = get_plugin_manager(env=False)
    base = load_base(str(tiny_base), home=home)
    train("sft", base=base, data=str(pc), name="under", home=home, plugins=pm,
          options=TrainOptions(**QUICK)).model.unload()
    for name, chat in (("plain-rm", False), ("chat-rm", None)):
        result = train("reward", base=base, data=str(prefs), name=name, home=home, plugins=pm,
                       on="under", options=TrainOptions(**QUICK, chat=chat))
        result.model.unload()
        assert result.pocket_book.meta.stacked_on == ["under@1"]
    return home, prefs, pm, base


def _plain_reward_model(tiny_base, library, book, folder):
    """The reward model as plain transformers + PEFT users build it: the base with the pocket
    book it was trained on top of merged in, then its SEQ_CLS adapter."""
    from peft import PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    causal = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(causal, library.get("under").path).merge_and_unload()
    merged.save_pretrained(folder)
    seq = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32)
    return tokenizer, PeftModel.from_pretrained(seq, book.path).eval()


def _reward_trainer_ids(tokenizer, pair):
    """The token ids TRL's RewardTrainer trains a reward model on for ``pair``'s chosen side."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import RewardTrainer

    args = SimpleNamespace(dataset_num_proc=None, max_length=None)
    prepared = RewardTrainer._prepare_dataset(SimpleNamespace(), Dataset.from_list([pair]),
                                              tokenizer, args, "train")
    return prepared[0]["chosen_ids"]


def _plain_text(part, role):
    """A string, or the one message of ``role`` it was turned into (by hand, not adapterkit)."""
    if isinstance(part, str):
        return part
    assert [m["role"] for m in part] == [role]
    return part[0]["content"]


@pytest.mark.parametrize(("reward", "policy_chat"), [
    ("plain-rm", False),  # no template on either side: plain prompt + completion, as TRL's GRPO
    ("plain-rm", True),   # the policy chats; the reward pocket book reads the plain text it saw
    ("chat-rm", False),   # the policy writes plain text; the reward book reads chat turns
])
def test_rlhf_rewards_are_the_trained_reward_models_on_the_text_it_was_trained_on(
        stacked_rewards, tiny_base, tmp_path, monkeypatch, reward, policy_chat):
    """`rlhf --reward BOOK` scored with BOOK alone (not the pocket book it was trained on top
    of), and always through the chat template (a `--no-chat` reward book too). Each reward
    GRPO used now equals a plain transformers + PEFT reward model
    (base + underlay merged + the reward book's adapter) on the text rendered as the book was
    trained: token ids TRL's own RewardTrainer gives the pair (plain text: with its
    end-of-sequence token), or the chat template's."""
    from trl import GRPOTrainer

    home, prefs, pm, _ = stacked_rewards
    library = Library(home)
    seen = []
    real = GRPOTrainer._calculate_rewards

    def recording(self, inputs, prompts, completions, completion_ids_list):
        out = real(self, inputs, prompts, completions, completion_ids_list)
        seen.append((prompts, completions, out[:, 0].tolist()))
        return out

    monkeypatch.setattr(GRPOTrainer, "_calculate_rewards", recording)
    train("rlhf", base=str(tiny_base), data=str(prefs), name=f"pol-{reward}-{policy_chat}",
          home=home, plugins=pm,
          options=TrainOptions(max_steps=1, batch_size=4, r=4, alpha=8, dropout=0.0, seed=2,
                               chat=policy_chat, precision="fp32", trainer_options={
                                   "reward": reward, "num_generations": 2,
                                   "max_new_tokens": 6}))
    assert seen
    tokenizer, plain = _plain_reward_model(tiny_base, library, library.get(reward), tmp_path)
    for prompts, completions, got in seen:
        assert isinstance(prompts[0], list) == policy_chat  # the policy rendered as asked
        for prompt, completion, value in zip(prompts, completions, got):
            p, c = _plain_text(prompt, "user"), _plain_text(completion, "assistant")
            if reward == "plain-rm":
                pair = {"prompt": p, "chosen": c, "rejected": c}
            else:
                pair = {"prompt": [{"role": "user", "content": p}],
                        "chosen": [{"role": "assistant", "content": c}],
                        "rejected": [{"role": "assistant", "content": c}]}
            ids = _reward_trainer_ids(tokenizer, pair)
            with torch.no_grad():
                expected = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert value == pytest.approx(expected, abs=1e-4), (prompt, completion)


def test_a_reward_book_trained_on_top_needs_its_library(stacked_rewards):
    home, _, _, base = stacked_rewards
    with pytest.raises(ConfigError, match=r"plain-rm@1 was trained on top of under@1: pass "
                                          r"library= so that they score underneath it"):
        RewardScorer(base, Library(home).get("plain-rm"))


def test_rlhf_refuses_completions_the_reward_book_could_not_read_whole(stacked_rewards,
                                                                       tiny_base):
    """--max-length cut the scored text from the start: the end of every long completion went
    unscored, without a word. Prompt + max_new_tokens past it is refused before any work, with
    --reward and before the reward stage alike."""
    home, prefs, pm, _ = stacked_rewards
    before = sorted((b.name, b.version) for b in Library(home).list())
    tokenizer = load_base(str(tiny_base), home=home).tokenizer
    longest = max(  # as TRL's RewardTrainer reads a prompt with an empty answer
        len(_reward_trainer_ids(tokenizer, {"prompt": p, "chosen": "", "rejected": ""}))
        for p in (json.loads(line)["prompt"] for line in prefs.read_text().splitlines()))
    for sets in ({"reward": "plain-rm"}, {}):
        options = TrainOptions(max_steps=1, batch_size=4, r=4, alpha=8, chat=False,
                               max_length=longest + 8, trainer_options={
                                   **sets, "num_generations": 2, "max_new_tokens": 32})
        with pytest.raises(ConfigError, match=rf"16 of 16 prompts with completions of "
                                              rf"max_new_tokens 32 can be longer than "
                                              rf"--max-length {longest + 8} tokens .* raise "
                                              rf"--max-length to at least {longest + 32}"):
            train("rlhf", base=str(tiny_base), data=str(prefs), name="too-long", home=home,
                  plugins=pm, options=options)
    assert sorted((b.name, b.version) for b in Library(home).list()) == before  # no stage


def test_a_plain_text_reward_book_refuses_conversations(stacked_rewards, tiny_base, tmp_path):
    """A `--no-chat` reward pocket book never read a conversation: prompts of several turns
    have no plain-text form it was trained on, and are refused before any work."""
    home, _, pm, _ = stacked_rewards
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"prompt": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": f"Greet person {i}."}]}) + "\n" for i in range(4)))
    with pytest.raises(ConfigError, match=r"trained on plain text \(--no-chat\), and this "
                                          r"prompt is a chat conversation \(system, user turns\)"):
        train("rlhf", base=str(tiny_base), data=str(data), name="convo", home=home, plugins=pm,
              options=TrainOptions(max_steps=1, batch_size=4, r=4, alpha=8, trainer_options={
                  "reward": "plain-rm", "num_generations": 2, "max_new_tokens": 4}))


def test_reward_flag_and_set_reward_together_are_refused(adapterkit_cli, tiny_base,
                                                         adapterkit_data):
    """`--reward r1 --set reward=r2` trained against r1 without a word about r2."""
    out = adapterkit_cli("train", "rlhf", "--base", str(tiny_base), "--data",
                         adapterkit_data["preference"], "--name", "x", "--reward", "r1",
                         "--set", "reward=r2")
    assert out.exit_code == 1
    assert out.output.strip().splitlines()[-1] == (
        "Error: --reward r1 and --set reward=r2 both name the reward pocket book: give it once "
        "(--reward)")


def test_rlhf_says_how_many_distinct_prompts_the_policy_samples_for(rlhf_run, tiny_base):
    """Pairs repeat their prompts (one prompt, several pairs): the run's "(N rows)" is the
    file's count, and the policy samples for each distinct prompt once — said, not hidden."""
    home, data, pm, _, _ = rlhf_run
    rows = data.read_text().splitlines()
    twice = data.with_name("prefs-twice.jsonl")
    twice.write_text("\n".join(rows + rows) + "\n")
    distinct = len({json.dumps(json.loads(r)["prompt"]) for r in rows})
    said: list[str] = []
    options = TrainOptions(**{**RL, "max_steps": 1},
                           trainer_options={"reward": "kind-reward", "max_new_tokens": 4})
    train("rlhf", base=str(tiny_base), data=str(twice), name="kind-twice", home=home,
          plugins=pm, options=options, progress=said.append)
    assert (f"The policy samples answers for the {distinct} distinct prompts of the "
            f"{2 * len(rows)} rows.") in said


def _prefs(tmp_path):
    from adapterkit.pytest_plugin import TINY_ROWS

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS["preference"]))
    return data


def _fast_rlhf(**trainer_options) -> TrainOptions:
    return TrainOptions(**{**RL, "max_steps": 1, "r": 4, "alpha": 8},
                        trainer_options={"reward_steps": 1, "max_new_tokens": 4,
                                         "num_generations": 2, **trainer_options})


def test_a_ctrl_c_as_the_reward_stage_gives_the_base_back_keeps_what_it_saved(
        tiny_base, tmp_path, monkeypatch):
    """The reward pocket book was committed, then Ctrl-C came while its stage gave the shared
    base back, before the run noted it: the run said nothing was saved besides. It is
    recorded as its commit begins (and kept, as it reached the library)."""
    from adapterkit.training import run as run_module

    real = run_module._hand_over

    def hand_over(run, result):
        real(run, result)
        if result is not None and result.pocket_book.name.endswith("-reward"):
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_hand_over", hand_over)
    home = tmp_path / "home"
    with pytest.raises(KeyboardInterrupt) as stopped:
        train("rlhf", base=str(tiny_base), data=str(_prefs(tmp_path)), name="q", home=home,
              plugins=get_plugin_manager(env=False), options=_fast_rlhf())
    assert stopped.value.stages_saved == ["q-reward@1"]
    assert Library(home).get("q-reward").ref == "q-reward@1"


def test_a_reward_stage_whose_commit_failed_is_not_said_saved(tiny_base, tmp_path,
                                                               monkeypatch):
    """Recorded as its commit began, a stage whose commit then failed is not claimed."""
    real_commit = Library.commit

    def commit(self, staged, meta, **kwargs):
        if str(kwargs.get("name", meta.name)).endswith("-reward"):
            raise OSError(28, "No space left on device")
        return real_commit(self, staged, meta, **kwargs)

    monkeypatch.setattr(Library, "commit", commit)
    said: list[str] = []
    with pytest.raises(OSError) as failed:
        train("rlhf", base=str(tiny_base), data=str(_prefs(tmp_path)), name="q",
              home=tmp_path / "home", plugins=get_plugin_manager(env=False),
              options=_fast_rlhf(), progress=said.append)
    assert failed.value.stages_saved == []
    assert not [line for line in said if "was saved" in line], said


def test_an_exception_that_takes_no_attributes_is_not_replaced(tiny_base, tmp_path,
                                                                monkeypatch):
    """The run sets what a next run can do on the exception; a frozen one raised
    FrozenInstanceError there, which replaced the trainer's own error."""
    from dataclasses import dataclass

    import trl

    @dataclass(frozen=True)
    class Frozen(Exception):
        code: int = 7

    def fails(self, *args, **kwargs):
        raise Frozen()

    monkeypatch.setattr(trl.GRPOTrainer, "train", fails)
    with pytest.raises(Frozen):
        train("rlhf", base=str(tiny_base), data=str(_prefs(tmp_path)), name="q",
              home=tmp_path / "home", plugins=get_plugin_manager(env=False),
              options=_fast_rlhf())


@NOTES
def test_options_a_config_file_gave_are_to_be_removed_from_it_not_left_out(
        tiny_base, tmp_path, adapterkit_cli, monkeypatch):
    """"Leave out --eval-split" cannot be followed where --config gave it (and early_stopping
    beside it would then be refused): the file is named, and what to remove from it."""
    import trl
    import yaml

    def fails(self, *args, **kwargs):
        raise ValueError("the policy's step failed")

    monkeypatch.setattr(trl.GRPOTrainer, "train", fails)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"eval_split": 0.25, "early_stopping": 2}))
    out = adapterkit_cli("train", "rlhf", "--base", str(tiny_base), "--data",
                         str(_prefs(tmp_path)), "--name", "cfg", "--max-steps", "1", "-r", "4",
                         "--config", str(config), "--set", "reward_steps=1")
    assert out.exit_code != 0
    assert f"(reuse cfg-reward@1: add --reward cfg-reward@1 and leave out --set reward_steps, " \
        f"and remove eval_split, early_stopping from {config})" in out.exception.__notes__[0]


@NOTES
@pytest.mark.parametrize("checkpoint", [None, 1, 2])
def test_a_rerun_past_the_reward_book_its_run_saved_is_told_how_to_go_on(
        tiny_base, tmp_path, adapterkit_cli, adapterkit_home, checkpoint):
    """The run of pol was interrupted after its reward stage saved pol-reward@1 (its record,
    stages-saved.json), and is run again as it was: refused before the base loads, saying
    what the run saved, every flag to leave out, and whether to --resume (a policy checkpoint
    past it, which a rerun without --resume is refused beside) or not (none: --resume is
    refused; one of its last step: --restart, a resume would train nothing); followed as
    said, every check passes (the missing base is refused next)."""
    data = _prefs(tmp_path)
    assert adapterkit_cli("train", "reward", "--base", str(tiny_base), "--data", str(data),
                          "--name", "pol-reward", "--max-steps", "1", "-r", "4").exit_code == 0
    run = adapterkit_home / "runs" / "pol"  # as the interrupted run left it
    run.mkdir(parents=True)
    (run / "stages.json").write_text('["pol-reward"]')
    (run / "stages-saved.json").write_text('["pol-reward@1"]')
    if checkpoint:  # of step 1 or 2, of a run of 2 steps
        (run / f"checkpoint-{checkpoint}").mkdir()
        (run / f"checkpoint-{checkpoint}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": checkpoint, "max_steps": 2}))
    args = ["train", "rlhf", "--base", str(tmp_path / "no-base"), "--data", str(data),
            "--name", "pol"]
    out = adapterkit_cli(*args, "--set", "reward_steps=2", "--resume")
    how, flag = {
        None: (", and start it without --resume (it wrote no checkpoint past it)",
               ", and run it without --resume"),
        1: (", and pass --resume (to continue from checkpoint-1)", ", and pass --resume"),
        2: (", and pass --restart, not --resume (its checkpoint-2 is of its last step: a "
            "resume would train nothing)", ", and pass --restart in place of --resume")
    }[checkpoint]
    assert out.exit_code == 1 and out.stderr.strip().splitlines()[-2:] == [
        "Error: the rlhf run of pol saves a pocket book under the name pol-reward besides its "
        "own, and its interrupted run saved pol-reward@1: to use it instead of training one, "
        f"set the trainer option reward to pol-reward@1, leave out reward_steps{how}; or "
        "remove it (adapterkit rm pol-reward@1) and pass --restart (not --resume) to train it "
        "anew; or pick another name",
        f"On the command line: add --reward pol-reward@1 and leave out --set reward_steps"
        f"{flag}."], out.stderr
    if checkpoint == 2:  # (without --resume there is none to replace)
        plain = adapterkit_cli(*args, "--set", "reward_steps=2")
        assert plain.stderr.strip().splitlines()[-1] == (
            "On the command line: add --reward pol-reward@1 and leave out --set reward_steps, "
            "and pass --restart."), plain.stderr
    follow = {None: [], 1: ["--resume"], 2: ["--restart"]}[checkpoint]
    if checkpoint != 1:  # (followed with --resume, the resume reads it: not a real one)
        followed = adapterkit_cli(*args, "--reward", "pol-reward@1", *follow)
        assert "Error: unknown base" in followed.stderr, followed.stderr
    else:  # what the advice spares: without --resume, refused beside the checkpoint
        assert "pass --resume" in adapterkit_cli(*args, "--reward", "pol-reward@1").stderr

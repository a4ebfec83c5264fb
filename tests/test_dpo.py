"""The dpo trainer on a tiny random base: preferences are learned, the result reloads in PEFT."""

import json

import pytest
import torch

from adapterkit import ConfigError, DataFormatError, TrainOptions, train
from adapterkit.plugin_api.manager import get_plugin_manager
from adapterkit.training.metrics import completion_logprob


@pytest.mark.slow
def test_dpo_learns_preferences_and_reloads(tiny_base, home, adapterkit_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = get_plugin_manager(env=False)
    result = train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                   name="polite", home=home, plugins=pm,
                   options=TrainOptions(max_steps=20, batch_size=4, learning_rate=3e-2, r=8,
                                        alpha=16, dropout=0.0, logging_steps=2,
                                        trainer_options={"beta": 0.1}))
    assert result.metrics["train_loss_final"] < result.metrics["train_loss_first"]
    from adapterkit import load_base

    model = result.model
    tok = load_base(str(tiny_base), home=home).tokenizer
    rows = [json.loads(line) for line in adapterkit_data["preference"].read_text().splitlines()]
    margins = []
    for row in rows[:4]:
        reward = {}
        for key in ("chosen", "rejected"):
            on = completion_logprob(model, tok, row["prompt"], row[key])
            with model.disable_adapter():
                off = completion_logprob(model, tok, row["prompt"], row[key])
            reward[key] = 0.1 * (on - off)
        margins.append(reward["chosen"] - reward["rejected"])
    assert all(m > 0 for m in margins), margins  # implicit reward margin grew from 0
    from adapterkit.training.metrics import preference_accuracy

    acc = preference_accuracy(model, tok, rows[:4])
    assert acc["implicit"] == 1.0 and acc["pairs"] == 4
    assert acc["likelihood_after"] >= acc["likelihood_before"]

    ids = torch.tensor([[3, 50, 60, 70, 80]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                         result.pocket_book.path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert result.pocket_book.meta.trainer == "dpo"


def test_dpo_refuses_bad_pairs_and_options(tiny_base, home, tmp_path, adapterkit_data):
    pm = get_plugin_manager(env=False)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(DataFormatError, match="chosen and rejected are identical in row"):
        train("dpo", base=str(tiny_base), data=str(same), name="x", home=home, plugins=pm)
    with pytest.raises(DataFormatError, match=r"this trainer reads preference rows \(prompt/chosen/rejected\)"):
        train("dpo", base=str(tiny_base), data=str(adapterkit_data["text"]), name="x",
              home=home, plugins=pm)
    with pytest.raises(ConfigError, match="unknown dpo option.*gamma"):
        train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]), name="x",
              home=home, plugins=pm,
              options=TrainOptions(max_steps=1, trainer_options={"gamma": 1}))


def reference_logps(model, tokenizer, rows):
    """Summed log-probs of each row's chosen and rejected answer, computed here with plain
    transformers: the answer is what the chat template adds after the generation prompt."""
    out = {"chosen": [], "rejected": []}
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for key, values in out.items():
            text = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": row[key]}], tokenize=False)
            assert text.startswith(prompt)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            per_token = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1),
                                                      torch.tensor(ids[1:])]
            values.append(per_token[n_prompt - 1:].sum().item())
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.slow
def test_reference_logps_are_cached_on_disk_per_reference(tiny_base, home, adapterkit_data,
                                                          monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    pm = get_plugin_manager(env=False)
    data = str(adapterkit_data["preference"])
    rows = [json.loads(line) for line in adapterkit_data["preference"].read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    cache = home / "cache" / "dpo-ref"

    # every batch of reference log-probs TRL computes ahead of training goes through here
    ref_batches = []
    real_ref = DPOTrainer.compute_ref_log_probs

    def counting_ref(self, model, inputs):
        ref_batches.append(len(inputs["input_ids"]))
        return real_ref(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counting_ref)

    def run(name, steps=4, **kwargs):  # 4 steps of 4 cover the 16 pairs
        ref_batches.clear()
        # float32, as the plain reference below computes (the other DPO tests run in the
        # default precision, bf16 on a CPU with bf16 instructions)
        options = TrainOptions(max_steps=steps, batch_size=4, learning_rate=1e-2, r=4, alpha=8,
                               dropout=0.0, trainer_options=kwargs.pop("sets", {}),
                               precision="fp32")
        return train("dpo", base=str(tiny_base), data=data, name=name, home=home, plugins=pm,
                     options=options, **kwargs)

    def weights(result):
        return load_file(str(result.pocket_book.path / "adapter_model.safetensors"))

    first = run("a")
    assert first.metrics["reference_cache"] == {"train": "computed"}
    assert sum(ref_batches) == 2 * len(rows)  # chosen and rejected of every pair, once
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1
    # what is cached is the plain base's log-probs of each answer, row by row
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    expected = reference_logps(plain, tokenizer, rows)
    entry = load_file(str(files[0]))
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(entry[key].double(), expected[key], rtol=1e-6, atol=1e-4)
    assert not torch.allclose(expected["chosen"], expected["rejected"])  # rows tell apart

    # a rerun and a beta sweep read it back: no reference forward at all, and the rerun
    # trains exactly as the run that computed it
    again = run("b")
    assert again.metrics["reference_cache"] == {"train": "hit"} and ref_batches == []
    swept = run("c", sets={"beta": 0.5})
    assert swept.metrics["reference_cache"] == {"train": "hit"} and ref_batches == []
    w_first, w_again = weights(first), weights(again)
    assert w_first.keys() == w_again.keys() and len(w_first) > 0
    assert [k for k in w_first if not torch.equal(w_first[k], w_again[k])] == []
    # a run that computes its reference alongside each step instead trains to the same weights
    uncached = run("d", sets={"precompute_ref_log_probs": False})
    assert "reference_cache" not in uncached.metrics and ref_batches == []
    w_uncached = weights(uncached)
    assert [k for k in w_first
            if not torch.allclose(w_first[k], w_uncached[k], rtol=0, atol=1e-5)] == []

    # another reference (a pocket book underneath) is another cache entry; a short run over
    # part of the data computes it alongside each step instead (auto), unless told to cache
    short = run("e", steps=1, on="a")
    assert short.metrics["reference_cache"] == {"train": "alongside"} and ref_batches == []
    assert len(sorted(cache.glob("*.safetensors"))) == 1
    on = run("f", steps=1, on="a", sets={"precompute_ref_log_probs": True})
    assert on.metrics["reference_cache"] == {"train": "computed"}
    assert sum(ref_batches) == 2 * len(rows)
    (new_file,) = set(cache.glob("*.safetensors")) - set(files)
    # its values: base + a, as plain PEFT computes them
    with_a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                       str(first.pocket_book.path)).eval()
    expected_on = reference_logps(with_a, tokenizer, rows)
    entry_on = load_file(str(new_file))
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(entry_on[key].double(), expected_on[key], rtol=1e-6, atol=1e-4)
        assert not torch.allclose(expected_on[key], expected[key], atol=1e-3)
    again_short = run("g", steps=1, on="a")
    assert again_short.metrics["reference_cache"] == {"train": "hit"} and ref_batches == []


def test_dpo_refuses_bad_beta(tiny_base, home, adapterkit_data):
    pm = get_plugin_manager(env=False)
    for beta, match in ((0, "beta must be above 0"), ("x", "beta must be a number")):
        with pytest.raises(ConfigError, match=match):
            train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                  name="x", home=home, plugins=pm,
                  options=TrainOptions(max_steps=1, trainer_options={"beta": beta}))
    assert not (home / "runs" / "x@1").exists() or not any((home / "runs" / "x@1").iterdir())


def test_batched_completion_logprobs_equal_one_answer_at_a_time(tiny_base):
    """The batched log-probabilities (right padding, answers of different lengths) against the
    sum written here with plain transformers, one unpadded answer per forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.training.metrics import completion_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    pairs = [("Is it sunny?", "Yes."), ("Where is the station?", "Two streets down, then left."),
             ("Hi", "Hello there, how can I help you today with your question?")] * 3
    expected = []
    for prompt, answer in pairs:
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                       tokenize=False)
        start = len(tok(head, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        expected.append(sum(logps[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])))
    got = completion_logprobs(model, tok, pairs, batch_size=4)
    assert got == pytest.approx(expected, abs=1e-3)
    assert len(set(round(v, 3) for v in got)) == 3  # three different answers, three sums


@pytest.mark.slow
def test_the_forgetting_guard_acts_in_dpo(tiny_base, home, adapterkit_data):
    """dpo builds its trainer through job.guarded: the KL term is added (counted, recorded),
    pulls general-text loss back toward the base, and the budget is decided as for sft."""
    pm = get_plugin_manager(env=False)

    def run(name, **guard):
        return train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                     name=name, home=home, plugins=pm,
                     options=TrainOptions(max_steps=20, batch_size=4, learning_rate=3e-2, r=8,
                                          alpha=16, dropout=0.0, logging_steps=5,
                                          general="general", seed=0, **guard))

    plain = run("plain").metrics
    guarded = run("guarded", guard_weight=3.0, forgetting_budget=1000).metrics
    assert "guard" not in plain
    g = guarded["guard"]
    # steps 0, 3, ..., 18
    assert (g["kl_batches"], g["weight"], g["within_budget"]) == (7, 3.0, True)
    change = guarded["forgetting"]["general_loss_change_pct"]
    assert abs(change) < 0.5 * abs(plain["forgetting"]["general_loss_change_pct"]), (plain, change)
    assert g["checks"][0]["general_loss"] == guarded["forgetting"]["general_loss"]


def _ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _answer_logp(model, prompt_ids, full_ids):
    n = 0  # where the answer starts: the common prefix, as TRL cuts it
    while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
        n += 1
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return float(logps[torch.arange(n - 1, len(full_ids) - 1), ids[0, n:]].sum())


def test_an_eval_split_gives_dpos_held_out_loss_of_the_saved_pocket_book(tiny_base, home,
                                                                          adapterkit_data):
    """With --eval-split, dpo records the held-out DPO loss (it used to fail after training,
    reading a completion that preference rows do not have): checked by hand on the saved
    pocket book, loaded by PEFT, against the base — −log σ(β·margin) over the held-out pairs."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.library.card import _fmt
    from adapterkit.training.build import split_eval
    from adapterkit.training.data import load_data

    pm = get_plugin_manager(env=False)
    result = train("dpo", base=str(tiny_base), data=str(adapterkit_data["preference"]),
                   name="held-out", home=home, plugins=pm,
                   options=TrainOptions(max_steps=4, batch_size=4, learning_rate=5e-4, r=8,
                                        alpha=16, dropout=0.0, eval_split=0.25,
                                        precision="fp32", trainer_options={"beta": 0.1}))
    figures = result.metrics["eval"]
    _, held = split_eval(load_data(str(adapterkit_data["preference"])), 0.25, 0)
    assert figures["pairs"] == len(held.rows) == 4 and figures["measured_by"] == "trainer"
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      result.pocket_book.path).eval()
    losses, wins = [], 0
    for row in held.rows:
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = _ids(tok, user, add_generation_prompt=True)
        margin = 0.0
        for key, sign in (("chosen", 1), ("rejected", -1)):
            full = _ids(tok, user + [{"role": "assistant", "content": row[key]}])
            on = _answer_logp(model, prompt, full)
            with model.disable_adapter():
                off = _answer_logp(model, prompt, full)
            margin += sign * 0.1 * (on - off)
        losses.append(float(-F.logsigmoid(torch.tensor(margin))))
        wins += margin > 0
    assert 0.05 < figures["loss"] < 0.69  # moved from log 2, and not to nothing
    assert figures["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert figures["reward_accuracy"] == wins / len(losses)
    card = (result.pocket_book.path / "README.md").read_text()
    assert f"on 4 held-out pairs, step {figures['step']}): {_fmt(figures['loss'])}" in card


def test_the_held_out_figure_is_of_the_step_whose_weights_are_kept():
    """The trainer's evaluation at the kept step: the last, early stopping's best, or the
    forgetting guard's fallback; none where the trainer did not evaluate that step."""
    from types import SimpleNamespace

    from adapterkit.training.run import trainer_eval

    log = [{"loss": 0.7, "step": 2}, {"eval_loss": 0.6, "eval_rewards/accuracies": 0.5,
                                      "step": 2},
           {"eval_loss": 0.4, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.3,
            "step": 4}]
    state = SimpleNamespace(global_step=4, log_history=log)
    assert trainer_eval(state, None, 4) == {"loss": 0.4, "step": 4, "pairs": 4,
                                            "measured_by": "trainer", "reward_accuracy": 1.0,
                                            "reward_margin": 0.3}
    best = {"best_step": 2, "restored_best": True}
    assert trainer_eval(state, best, 4)["loss"] == 0.6
    assert trainer_eval(state, None, 4, kept=2)["step"] == 2  # the guard's fallback
    assert trainer_eval(state, None, 4, kept=3) is None  # not evaluated there


# -- preference shapes: every pair reaches TRL with its prompt once -----------------------

PAIRS = [(f"Greet person {i}.", "Hello, nice to meet you!", "Go away.") for i in range(4)]
SYSTEM = {"role": "system", "content": "You are polite."}


def _turn(role, content):
    return {"role": role, "content": content}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tokenized(path):
    """The pairs as TRL's DPOTrainer tokenizes what adapterkit hands it (``TrainJob`` rows on
    a chat base, through TRL's own dataset preparation)."""
    from pathlib import Path
    from types import SimpleNamespace

    from trl import DPOTrainer

    from adapterkit.plugin_api.testing import tiny_tokenizer
    from adapterkit.training.data import load_data
    from adapterkit.training.job import TrainJob

    tok = tiny_tokenizer()
    job = TrainJob(build=lambda: None, tokenizer=tok, data=load_data(path), eval_data=None,
                   options=TrainOptions(), chat=True, output_dir=Path("x"), resume_from=None)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), job.train_dataset(),
                                           tok, args, "train")
    return prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()


def test_ultrafeedback_and_implicit_prompt_pairs_tokenize_as_the_plain_pairs(tmp_path):
    """UltraFeedback rows (a prompt string, and answers that are whole conversations starting
    with it) were trained on the prompt twice (4170 tokens against 3052 for the same pairs);
    implicit-prompt rows (chosen/rejected alone, Anthropic HH) were refused for a missing
    prompt column. Both now reach TRL token for token as the plain pairs, and the implicit
    prompt is the one TRL's extract_prompt takes."""
    from trl.data_utils import extract_prompt

    from adapterkit.training.data import load_data

    def conversation(prompt, answer, system=()):
        return [*system, _turn("user", prompt), _turn("assistant", answer)]

    plain = _tokenized(_write(tmp_path / "plain.jsonl", [
        {"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]))
    uf = [{"prompt": p, "chosen": conversation(p, c), "rejected": conversation(p, r)}
          for p, c, r in PAIRS]
    implicit = [{"chosen": conversation(p, c), "rejected": conversation(p, r)}
                for p, c, r in PAIRS]
    assert _tokenized(_write(tmp_path / "uf.jsonl", uf)) == plain
    assert _tokenized(_write(tmp_path / "implicit.jsonl", implicit)) == plain
    read = load_data(str(tmp_path / "implicit.jsonl"))
    assert read.rows == [extract_prompt(row) for row in implicit]
    # a conversational prompt (a system turn first) repeated at the start of the answers
    explicit = _tokenized(_write(tmp_path / "explicit.jsonl", [
        {"prompt": [SYSTEM, _turn("user", p)], "chosen": [_turn("assistant", c)],
         "rejected": [_turn("assistant", r)]} for p, c, r in PAIRS]))
    assert explicit != plain  # (the system turn is rendered)
    repeated = [{"prompt": [SYSTEM, _turn("user", p)], "chosen": conversation(p, c, [SYSTEM]),
                 "rejected": conversation(p, r, [SYSTEM])} for p, c, r in PAIRS]
    assert _tokenized(_write(tmp_path / "repeated.jsonl", repeated)) == explicit
    implicit = [{"chosen": row["chosen"], "rejected": row["rejected"]} for row in repeated]
    assert _tokenized(_write(tmp_path / "implicit_system.jsonl", implicit)) == explicit


def test_pairs_whose_answers_do_not_start_with_their_prompt_are_refused_naming_the_row(
        tmp_path):
    from adapterkit.training.data import load_data

    p, c, r = PAIRS[0]
    good = {"prompt": p, "chosen": [_turn("user", p), _turn("assistant", c)],
            "rejected": [_turn("user", p), _turn("assistant", r)]}
    other = {**good, "chosen": [_turn("user", "Something else."), _turn("assistant", c)]}
    path = _write(tmp_path / "uf.jsonl", [good, other, good])
    with pytest.raises(DataFormatError, match=r"uf\.jsonl: row\(s\) 2: chosen begins with a "
                                              r"user turn that is not the prompt: give the "
                                              r"answer alone, or begin it with the prompt's "
                                              r"turns \(or pass --skip-bad-rows"):
        load_data(path)
    assert load_data(path, skip_bad_rows=True).skipped == [2]
    unshared = {"chosen": [_turn("user", p), _turn("assistant", c)],
                "rejected": [_turn("user", "Another question?"), _turn("assistant", r)]}
    implicit = {"chosen": good["chosen"], "rejected": good["rejected"]}
    path = _write(tmp_path / "implicit.jsonl", [implicit, unshared])
    with pytest.raises(DataFormatError, match=r"implicit\.jsonl: row\(s\) 2: chosen and rejected "
                                              r"share no beginning to take as the prompt .*add "
                                              r"a prompt column"):
        load_data(path)
    text = {"chosen": "Hi there ", "rejected": "Go away."}  # (TRL: the prompt "Hi there")
    with pytest.raises(DataFormatError, match=r"row\(s\) 1: chosen and rejected share no"):
        load_data(_write(tmp_path / "text.jsonl", [text]))


def test_implicit_prompts_yield_to_plugin_formats_and_to_a_prompt_column(tmp_path):
    """The implicit-prompt rule took chosen/rejected columns before the data-format plugins
    (whose columns they may be), and split a pair whose prompt cell was left empty in a file
    that has a prompt column, which is a malformed row."""
    from adapterkit import DataFormat
    from adapterkit.plugin_api.registry import Registry
    from adapterkit.training.data import load_data

    class HH(DataFormat):
        name, columns, shape = "hh", ("chosen", "rejected"), "preference"

        def convert(self, row):
            return {"prompt": "Q", "chosen": row["chosen"], "rejected": row["rejected"]}

    formats = Registry("data format", DataFormat)
    formats.add(HH(), plugin="mine")
    path = _write(tmp_path / "hh.jsonl", [{"chosen": "Hi there.", "rejected": "Hi you."}])
    assert load_data(path, formats=formats).rows == [
        {"prompt": "Q", "chosen": "Hi there.", "rejected": "Hi you."}]
    p, c, r = PAIRS[0]
    holed = _write(tmp_path / "holed.jsonl", [{"prompt": p, "chosen": c, "rejected": r},
                                              {"prompt": None, "chosen": "Same start A",
                                               "rejected": "Same start B"}])
    with pytest.raises(DataFormatError, match=r"row\(s\) 2"):
        load_data(holed)
    assert load_data(holed, skip_bad_rows=True).skipped == [2]


def test_message_rows_refuse_no_chat_and_a_base_without_a_chat_template(tiny_base, home,
                                                                       tmp_path,
                                                                       adapterkit_data):
    """Message rows are rendered with the chat template whatever --no-chat says: a dpo or sft
    run with --no-chat trained on the template and recorded chat=False; on a base without a
    template it ended in a transformers traceback."""
    from tests.test_bad_options import without_chat_template

    pm = get_plugin_manager(env=False)
    p, c, r = PAIRS[0]
    conversational = _write(tmp_path / "conv.jsonl", [
        {"prompt": [_turn("user", p)], "chosen": [_turn("assistant", c)],
         "rejected": [_turn("assistant", r)]}])
    for trainer, data in (("dpo", conversational), ("sft", str(adapterkit_data["messages"]))):
        with pytest.raises(ConfigError, match=r"^--no-chat: .* holds message rows, and message "
                                              r"rows are always rendered with the chat "
                                              r"template; drop --no-chat or give string rows$"):
            train(trainer, base=str(tiny_base), data=data, name="x", home=home, plugins=pm,
                  options=TrainOptions(max_steps=1, chat=False))
    plain = without_chat_template(tiny_base, tmp_path / "plain-base")
    with pytest.raises(ConfigError, match=r"holds message rows, which are rendered with the "
                                          r"chat template, and this base's tokenizer has none"):
        train("dpo", base=str(plain), data=conversational, name="x", home=home, plugins=pm,
              options=TrainOptions(max_steps=1))
    from adapterkit.training.data import check_rendering, load_data

    check_rendering(load_data(str(adapterkit_data["preference"])), False)  # strings: no template


def test_dpo_and_reward_train_without_dropout_and_say_so(tiny_base, home, adapterkit_data):
    """TRL's DPO and reward trainers switch every dropout off (``disable_dropout``, their
    default): ``--dropout 0.9`` trained the very weights ``--dropout 0`` did, while the card
    and ``adapter_config.json`` said 0.9. Such runs record 0 now, and refuse another value
    before any work instead of ignoring it."""
    from safetensors.torch import load_file

    pm = get_plugin_manager(env=False)
    data = str(adapterkit_data["preference"])
    for trainer in ("dpo", "reward"):
        with pytest.raises(ConfigError, match=rf"^the {trainer} trainer trains with dropout off "
                                              r"\(TRL's disable_dropout\): a dropout of 0\.3 "
                                              r"would do nothing; leave --dropout out"):
            train(trainer, base=str(tiny_base), data=data, name=f"{trainer}-drop", home=home,
                  plugins=pm, options=TrainOptions(max_steps=1, dropout=0.3))
    assert not (home / "library").exists() or not any((home / "library").iterdir())

    runs = {}
    for name, dropout in (("plain", 0.0), ("default", 0.05)):
        result = train("dpo", base=str(tiny_base), data=data, name=name, home=home, plugins=pm,
                       options=TrainOptions(max_steps=3, batch_size=4, learning_rate=3e-2,
                                            dropout=dropout, seed=5))
        config = json.loads((result.pocket_book.path / "adapter_config.json").read_text())
        assert config["lora_dropout"] == 0.0
        assert result.pocket_book.meta.hyperparameters["dropout"] == 0.0
        runs[name] = load_file(result.pocket_book.path / "adapter_model.safetensors")
        result.model.unload()
    # the default trained what dropout 0 trains: the record says what acted
    assert runs["plain"].keys() == runs["default"].keys()
    for key in runs["plain"]:
        assert torch.equal(runs["plain"][key], runs["default"][key]), key


def test_trls_dpo_trainer_switches_lora_dropout_off_and_a_copy_records_it(
        tiny_base, home, adapterkit_data, monkeypatch, library, tmp_path):
    """Independent of adapterkit's record: with the refusal switched off, TRL's DPOTrainer
    trains the same weights at LoRA dropout 0.5 as at 0 — so 0 is what acts. And a dpo copy
    (``--from``) of a book made with dropout 0.05 records and configures 0 too."""
    from safetensors.torch import load_file

    from adapterkit.plugin_api.testing import make_peft_adapter

    pm = get_plugin_manager(env=False)
    monkeypatch.setattr(type(pm.trainer("dpo")), "drops_out", True)  # as before the fix
    data = str(adapterkit_data["preference"])
    weights = []
    for name, dropout in (("d0", 0.0), ("d5", 0.5)):
        result = train("dpo", base=str(tiny_base), data=data, name=name, home=home, plugins=pm,
                       options=TrainOptions(max_steps=3, batch_size=4, learning_rate=3e-2,
                                            dropout=dropout, seed=5))
        weights.append(load_file(result.pocket_book.path / "adapter_model.safetensors"))
        result.model.unload()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    monkeypatch.undo()

    library.import_peft(make_peft_adapter(tiny_base, tmp_path / "start", seed=2,
                                          lora_dropout=0.05), "start", base=str(tiny_base))
    copy = train("dpo", base=str(tiny_base), data=data, name="copy", home=home, plugins=pm,
                 start_from="start", options=TrainOptions(max_steps=1, batch_size=4))
    config = json.loads((copy.pocket_book.path / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0
    assert copy.pocket_book.meta.hyperparameters["dropout"] == 0.0
    copy.model.unload()

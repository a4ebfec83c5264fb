"""The forgetting guard, `eval` and `generate` on a tiny random base."""

import json

import pytest
import torch
from click.testing import CliRunner

from adapterkit import TrainOptions, train
from adapterkit.plugin_api.manager import get_plugin_manager

#: The rows of conftest's ``data`` file (conftest.COLOUR_ROWS).
ROWS = [{"prompt": f"Colour of item {i}?", "completion": f"Answer: {c}"}
        for i, c in enumerate(["red", "blue", "green", "red"] * 4)]


def opts(**kw):
    base = dict(max_steps=30, learning_rate=3e-2, batch_size=4, logging_steps=5, save_steps=100,
                r=8, alpha=16, dropout=0.0, general="general", guard_every=10)
    base.update(kw)
    return TrainOptions(**base)


def chat_ids(tokenizer, prompt, completion=None):
    """Token ids of a row rendered with the chat template, built here with plain transformers:
    (prompt ids ending in the generation prompt, ids of prompt + answer)."""
    user = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if completion is None:
        return prompt_ids, None
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": completion}], tokenize=False)
    assert full.startswith(text)
    return prompt_ids, tokenizer(full, add_special_tokens=False)["input_ids"]


def greedy_exact_match(model, tokenizer, rows, max_new_tokens):
    """Share of rows whose greedy answer (one prompt at a time, no padding) is the completion."""
    hits = 0
    for row in rows:
        ids, _ = chat_ids(tokenizer, row["prompt"])
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        hits += answer.strip() == row["completion"].strip()
    return hits / len(rows)


def completion_loss(model, tokenizer, rows):
    """Token-weighted mean cross-entropy on the answers, one row per forward pass."""
    total, count = 0.0, 0
    for row in rows:
        prompt_ids, ids = chat_ids(tokenizer, row["prompt"], row["completion"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        start = len(prompt_ids)
        targets = torch.tensor(ids[start:])
        total += torch.nn.functional.cross_entropy(logits[start - 1:-1], targets,
                                                   reduction="sum").item()
        count += len(targets)
    return total / count


@pytest.mark.slow
def test_kl_guard_reduces_forgetting(tiny_base, home, data, pm):
    plain = train("sft", base=str(tiny_base), data=str(data), name="plain",
                  options=opts(forgetting_budget=0),  # no guard (sft's default has one)
                  home=home, plugins=pm).metrics["forgetting"]["general_loss_change_pct"]
    guarded = train("sft", base=str(tiny_base), data=str(data), name="guarded",
                    options=opts(guard_weight=3.0), home=home, plugins=pm)
    change = guarded.metrics["forgetting"]["general_loss_change_pct"]
    assert abs(change) < 0.5 * abs(plain), (plain, change)
    assert guarded.metrics["guard"]["weight"] == 3.0


def general_change(model, tokenizer, weights):
    """Relative rise (%) of general-text loss with ``weights`` loaded into ``model``'s pocket
    book, against the book switched off: one text per forward, written here with plain PEFT."""
    from peft import set_peft_model_state_dict

    from adapterkit.training.build import general_texts

    def loss():
        total, count = 0.0, 0
        for text in general_texts("general"):
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:],
                                                       reduction="sum").item()
            count += ids.shape[1] - 1
        return total / count

    set_peft_model_state_dict(model, weights)
    with model.disable_adapter():
        base = loss()
    return 100.0 * (loss() - base) / base


def weights_every_ten_steps():
    """A transformers callback that copies the pocket book's weights every ten steps (into
    its ``weights``: step → state dict)."""
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    class Copy(TrainerCallback):
        def __init__(self):
            self.weights = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % 10 == 0:
                self.weights[state.global_step] = {
                    k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    return Copy()


def losses_logged():
    """A transformers callback that keeps each logged training loss (``losses``: step →
    loss), as the trainer logged it."""
    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    return Losses()


@pytest.mark.slow
def test_budget_restores_the_last_weights_within_it(tiny_base, home, data, pm):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    seen = weights_every_ten_steps()
    probe = train("sft", base=str(tiny_base), data=str(data), name="probe",
                  options=opts(forgetting_budget=1000, guard_weight=0.0), home=home, plugins=pm,
                  callbacks=[seen])
    guard = probe.metrics["guard"]
    # within the budget at the end: only the final weights were measured, once, and that one
    # measurement is the reported forgetting figure
    # (the final step's weights are measured, not kept as a snapshot)
    assert [c["step"] for c in guard["checks"]] == [30] and guard["snapshots"] == [10, 20]
    assert guard["checks"][0]["general_loss"] == probe.metrics["forgetting"]["general_loss"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    changes = {step: general_change(probe.model, tok, w) for step, w in seen.weights.items()}
    assert changes[30] == pytest.approx(guard["checks"][0]["general_loss_change_pct"],
                                        rel=1e-4, abs=1e-4)
    assert max(changes[10], changes[20]) < changes[30], changes  # forgetting grows
    budget = (max(changes[10], changes[20]) + changes[30]) / 2  # the last falls outside it
    kept = max(step for step in (10, 20) if changes[step] <= budget)

    seen.weights.clear()
    said: list[str] = []
    logs = losses_logged()
    result = train("sft", base=str(tiny_base), data=str(data), name="budget",
                   options=opts(forgetting_budget=budget, guard_weight=0.0), home=home,
                   plugins=pm, callbacks=[seen, logs], progress=said.append)
    guard = result.metrics["guard"]
    assert guard["restored"] is True and guard["within_budget"] is True
    # a rollback is said, not only recorded
    assert any(f"kept step {kept}'s" in line for line in said), said
    assert guard["kept_step"] == kept
    # measured newest first, and no further than the first within the budget
    assert [c["step"] for c in guard["checks"]] == [30, 20, 10][:[30, 20, 10].index(kept) + 1]
    assert result.metrics["forgetting"]["general_loss_change_pct"] <= budget + 1e-6
    assert result.metrics["forgetting"]["general_loss_change_pct"] == pytest.approx(
        changes[kept], rel=1e-4, abs=1e-4)
    # the saved pocket book is the one the guard kept: the weights of step `kept`
    saved = get_peft_model_state_dict(result.model)
    assert all(torch.equal(saved[k], v) for k, v in seen.weights[kept].items())
    assert not all(torch.equal(saved[k], v) for k, v in seen.weights[30].items())
    ids = torch.tensor([[3, 50, 60, 70]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                         result.pocket_book.path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    card = (result.pocket_book.path / "README.md").read_text()
    assert "forgetting guard: budget" in card and "**forgetting**" in card
    # the run's last loss is step 30's, whose weights were not kept: the card and metrics say
    # which step's weights are saved and the training loss logged then (it gave step 30's
    # loss and steps alone, as if they were the saved weights')
    m = result.metrics
    assert m["weights_step"] == kept and m["train_loss_kept_step"] == kept  # (logged every 5)
    assert m["train_loss_kept"] == logs.losses[kept] != m["train_loss_final"] == logs.losses[30]
    assert "train loss final (step 30, whose weights were not kept): " in card
    assert (f"weights kept: step {kept}'s, the forgetting guard's fallback; train loss logged "
            f"at step {kept}: ") in card
    assert "weights_step" not in probe.metrics  # the last step's weights: nothing to say


def test_budget_that_cannot_be_met_is_reported(tiny_base, home, data, pm):
    result = train("sft", base=str(tiny_base), data=str(data), name="tight",
                   options=opts(forgetting_budget=1e-9, guard_weight=0.0, max_steps=20,
                                guard_every=15),
                   home=home, plugins=pm)
    guard = result.metrics["guard"]
    assert guard["within_budget"] is False and guard["restored"] is False
    # the final weights, then the one snapshot, were measured; the final ones are kept and the
    # reported forgetting figure is theirs (not the last snapshot's that was measured)
    assert [c["step"] for c in guard["checks"]] == [20, 15] and guard["kept_step"] == 20
    assert result.metrics["forgetting"]["general_loss"] == guard["checks"][0]["general_loss"]
    assert result.metrics["forgetting"]["general_loss"] != guard["checks"][1]["general_loss"]


@pytest.fixture
def cli(home):
    from adapterkit.cli import build_cli

    return build_cli(get_plugin_manager(env=False))


@pytest.mark.slow
def test_train_eval_generate_cli(cli, tiny_base, data, home):
    runner = CliRunner()
    out = runner.invoke(cli, ["train", "sft", "--base", str(tiny_base), "--data", str(data),
                              "--name", "colours", "--max-steps", "30", "--lr", "3e-2",
                              "--batch-size", "4", "--general", "general", "--json",
                              # the final weights: the budget can fall back to step 10's,
                              # which the tiny base has not learned from yet
                              "--forgetting-budget", "off"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{"):])
    assert result["ref"] == "colours@1" and "forgetting" in result["metrics"]
    out = runner.invoke(cli, ["eval", "colours", "--data", str(data), "--general", "general",
                              "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{"):])
    assert report["task"]["loss"] < report["task_base"]["loss"]
    # exact match, recomputed with plain PEFT and transformers' generate, prompt by prompt
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit import Library

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                      Library(home).get("colours").path).eval()
    expected = greedy_exact_match(plain, tokenizer, ROWS, max_new_tokens=32)
    with plain.disable_adapter():
        expected_base = greedy_exact_match(plain, tokenizer, ROWS, max_new_tokens=32)
    assert report["exact_match"] == {"pocket_book": expected, "base": expected_base}
    assert expected > expected_base  # the figure tells a trained book from the base
    assert set(report["forgetting"]) == {"general_loss_base", "general_loss",
                                         "general_loss_change_pct"}
    out = runner.invoke(cli, ["generate", "Colour of item 1?", "--adapter", "colours",
                              "--max-new-tokens", "5"])
    assert out.exit_code == 0 and out.output.strip(), out.output
    out = runner.invoke(cli, ["generate", "hi", "--max-new-tokens", "0", "--base", "x"])
    assert out.exit_code == 1 and "at least 1" in out.output


@pytest.mark.parametrize("args,match", [
    (["train", "sft", "--base", "B", "--data", "d.jsonl", "--name", "n", "--config", "nope.yaml"],
     "recipe file nope.yaml does not exist"),
    (["train", "sft", "--base", "B", "--data", "d.jsonl", "--name", "n", "--set", "oops"],
     "--set expects KEY=VALUE"),
    (["train", "sft", "--base", "B", "--data", "d.jsonl", "--name", "n",
      "--forgetting-budget", "lots"], "forgetting_budget: expected float"),
    (["generate", "hi"], "give --base BASE or --adapter NAME"),
    (["eval", "ghost", "--data", "x.jsonl"], "does not exist"),
])
def test_cli_errors_are_one_line(cli, args, match):
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], out.output


def test_unknown_recipe_keys_are_all_listed(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rank: 8\nlr: 1e-3\n")
    out = CliRunner().invoke(cli, ["train", "sft", "--base", "B", "--data", "d.jsonl",
                                   "--name", "n", "--config", str(recipe)])
    assert out.exit_code == 1 and "unknown option(s) lr, rank" in out.output


@pytest.mark.slow
def test_eval_of_a_qlora_book_uses_the_training_layout(cli, tiny_base, data, home, pm):
    """`eval` holds a 4-bit base exactly as training did (no bitsandbytes CPU repacking), so its
    task loss is the one the training run would measure."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from adapterkit import load_base
    from adapterkit.base.load import keep_4bit_layout

    train("sft", base=str(tiny_base), data=str(data), name="q", home=home, plugins=pm,
          options=opts(method="qlora", max_steps=5))
    out = CliRunner().invoke(cli, ["eval", "q", "--data", str(data), "--json"])
    assert out.exit_code == 0, out.output
    reported = json.loads(out.output[out.output.index("{"):])["task"]["loss"]
    base = load_base(str(tiny_base), home=home, quantization="4bit")
    keep_4bit_layout(base.model)
    from adapterkit import Library

    model = PeftModel.from_pretrained(base.model, Library(home).get("q").path).eval()
    # recomputed here, row by row, on the base held as training holds it
    expected = completion_loss(model, base.tokenizer, ROWS)
    assert reported == pytest.approx(expected, rel=1e-4)
    # and that layout is what the figure depends on: bitsandbytes' repacked CPU layout (where
    # this CPU has one) measures something else
    repacked = PeftModel.from_pretrained(load_base(str(tiny_base), home=home,
                                                   quantization="4bit").model,
                                         Library(home).get("q").path).eval()
    if any(getattr(m, "support_avx512bf16_for_cpu", False) for m in repacked.modules()):
        assert completion_loss(repacked, base.tokenizer, ROWS) != pytest.approx(expected,
                                                                               rel=1e-4)


@pytest.mark.slow
def test_the_guard_acts_at_its_weight_under_gradient_accumulation(tiny_base, home, data, pm):
    """batch 4 vs 2 micro-batches of 2: the same pocket book, guard included (0.1 added the
    KL term once per micro-batch, at grad_accum times the recorded weight)."""
    from safetensors.torch import load_file

    books = {}
    for name, batch, accum in (("one", 4, 1), ("accum", 2, 2)):
        result = train("sft", base=str(tiny_base), data=str(data), name=name,
                       # float32: the bound below is float32 round-off
                       options=opts(guard_weight=30.0, batch_size=batch, grad_accum=accum,
                                    max_steps=4, precision="fp32"),
                       home=home, plugins=pm)
        books[name] = load_file(result.pocket_book.path / "adapter_model.safetensors")
    diff = max((books["one"][k] - books["accum"][k]).abs().max().item() for k in books["one"])
    # measured: 4.5e-4 (round-off of a weight-30 KL term at lr 3e-2); the KL term counted
    # twice, as in 0.1, gives 6.6e-2
    assert diff < 5e-3, diff


def test_eval_general_off_means_no_forgetting_check_as_for_train(cli, tiny_base, data, home,
                                                                 tmp_path):
    """``--general off`` (train's word for no check) once read as a file named ``off``."""
    from adapterkit import Library
    from adapterkit.plugin_api.testing import make_peft_adapter

    Library(home).import_peft(make_peft_adapter(tiny_base, tmp_path / "p", seed=3), "p",
                              base=str(tiny_base))
    out = CliRunner().invoke(cli, ["eval", "p", "--data", str(data), "--general", "off",
                                   "--max-new-tokens", "2", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{"):])
    assert "forgetting" not in report and report["task"]["loss"] > 0

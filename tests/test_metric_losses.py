"""The loss figures (general-text loss, held-out task loss) against transformers' own loss,
computed one unpadded text at a time: the batched, padded, row-by-row path must give the
token-weighted mean of those."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapterkit.training.metrics import task_loss, text_loss


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def _by_hand(model, tokenizer, pairs):
    """transformers' mean loss of each text alone (no padding), weighted by its tokens."""
    total, count = 0.0, 0
    for prefix, completion in pairs:
        start = max(len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix
                    else 0, 1)
        ids = torch.tensor([tokenizer(prefix + completion, add_special_tokens=False)
                            ["input_ids"]])
        labels = ids.clone()
        labels[:, :start] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = ids.shape[1] - start
        total += float(loss) * n
        count += n
    return total / count


TEXTS = ["The weather was mild and the market was busy.", "A short one.",
         "Rivers run to the sea, and the sea is never full; to the place the rivers come "
         "from, there they return again.", "Bread, milk and eggs."] * 3  # > one batch of 8


def test_general_text_loss_is_transformers_loss_text_by_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    got = text_loss(model, tokenizer, TEXTS)
    assert got == pytest.approx(_by_hand(model, tokenizer, [("", t) for t in TEXTS]),
                                rel=1e-5)


def test_task_loss_counts_only_the_completions(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = [{"prompt": f"Colour of item {i}:" + " please" * (i % 4), "completion": f" {c}"}
            for i, c in enumerate(["red", "a deep shade of blue", "green", "pale yellow",
                                   "black", "white", "orange", "grey", "violet"])]
    starts = {len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows}
    assert len(starts) > 1  # answers start at several positions in one chunk
    got = task_loss(model, tokenizer, rows, chat=False)
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    assert got["loss"] == pytest.approx(_by_hand(model, tokenizer, pairs), rel=1e-5)
    assert got["tokens"] == sum(len(tokenizer(p + c, add_special_tokens=False)["input_ids"])
                                - len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                for p, c in pairs)


def test_completion_logprobs_are_transformers_log_softmax_answer_by_answer(
        model_and_tokenizer):
    """Batched, sorted by answer start and with logits kept only over the answers' span, each
    answer's summed log-probability is the one of its own full-logits forward, in input order."""
    from adapterkit.training.metrics import _keeps_logits, completion_logprobs

    model, tokenizer = model_and_tokenizer
    assert _keeps_logits(model)  # the span path is the one under test, for PEFT models too
    from peft import LoraConfig, get_peft_model

    assert _keeps_logits(get_peft_model(LlamaForCausalLM(model.config),
                                        LoraConfig(r=2, target_modules=["q_proj"])))
    pairs = [(f"Question {i}: " + "why " * (i % 5), "Because " + "it is so. " * (1 + i % 3))
             for i in range(11)]  # prompts of several lengths, more than one batch of 8
    got = completion_logprobs(model, tokenizer, pairs)
    for (prompt, answer), value in zip(pairs, got):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            tokenize=False)
        start = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, start - 1:-1].float().log_softmax(-1)
        expected = logp.gather(-1, ids[0, start:, None]).sum().item()
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)

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
    rows = [{"prompt": f"Colour of item {i}:", "completion": f" {c}"}
            for i, c in enumerate(["red", "a deep shade of blue", "green", "pale yellow",
                                   "black", "white", "orange", "grey", "violet"])]
    got = task_loss(model, tokenizer, rows, chat=False)
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    assert got["loss"] == pytest.approx(_by_hand(model, tokenizer, pairs), rel=1e-5)
    assert got["tokens"] == sum(len(tokenizer(p + c, add_special_tokens=False)["input_ids"])
                                - len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                for p, c in pairs)

"""On a CPU, TRL's fused LM head scores only the positions that carry a loss: the same loss and
gradients as transformers' plain cross-entropy over full logits, from fewer projected rows."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from trl.kernels import chunked_logprob
from trl.trainer import utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

from adapterkit.training.labelled_positions import score_only_labelled_positions

VOCAB = 96


@pytest.fixture
def wrapped(monkeypatch):
    """The wrap, undone after the test (the process-wide decision is TRL's again)."""
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)
    assert score_only_labelled_positions()
    return trl_utils._use_triton


def _batch():
    """Two rows of different lengths, right-padded; the first 5 tokens of each are prompt."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules="all-linear",
                                            init_lora_weights=False))
    model.train()
    return model


def _counting(monkeypatch) -> list[int]:
    """The rows each call of TRL's fused head projects, from now on in this test."""
    rows: list[int] = []
    real = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return real.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    return rows


def _loss_and_grads(model, fused: bool):
    ids, mask, labels = _batch()
    model.zero_grad()
    if fused:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss
    else:  # transformers' own loss: full logits, float32 cross-entropy, -100 ignored
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_the_wrap_takes_effect_on_a_cpu_only(wrapped):
    """The decision TRL's fused head reads is 'compact' for a CPU tensor, TRL's own elsewhere;
    its kernels' own choice of Triton is untouched; a second call does not wrap twice."""
    assert wrapped(torch.device("cpu")) is True
    assert wrapped(torch.device("meta")) is False
    cuda = torch.device("cuda")
    assert wrapped(cuda) is chunked_logprob._use_triton(cuda)
    assert chunked_logprob._use_triton(torch.device("cpu")) is False
    assert score_only_labelled_positions() and trl_utils._use_triton is wrapped


def test_a_trl_whose_module_reads_the_decision_elsewhere_is_left_alone(tmp_path, monkeypatch):
    """Wrapped only where ``_use_triton`` is read once, to choose the compact path: a TRL that
    also used it to pick a kernel would be handed a Triton kernel on a CPU."""
    import importlib

    from adapterkit.training.labelled_positions import _decides_compact_only

    assert _decides_compact_only(trl_utils)  # this TRL: the one use
    other = tmp_path / "other_trl_utils.py"
    other.write_text("def _use_triton(device):\n    return False\n\n"
                     "def head(h):\n    compact = _use_triton(h.device)\n"
                     "    kernel = 'triton' if _use_triton(h.device) else 'torch'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not _decides_compact_only(importlib.import_module("other_trl_utils"))


def test_it_is_not_applied_where_the_decision_does_more_than_choose_compact(monkeypatch):
    from adapterkit.training import labelled_positions

    original = chunked_logprob._use_triton
    monkeypatch.setattr(trl_utils, "_use_triton", original)
    monkeypatch.setattr(labelled_positions, "_decides_compact_only", lambda module: False)
    assert score_only_labelled_positions() is False
    assert trl_utils._use_triton is original


def test_loss_and_gradients_are_the_plain_cross_entropys_from_the_labelled_rows_only(
        wrapped, monkeypatch):
    model = _model()
    add_fused_lm_head(model.get_base_model())
    plain_loss, plain_grads = _loss_and_grads(model, fused=False)
    rows = _counting(monkeypatch)
    loss, grads = _loss_and_grads(model, fused=True)
    labelled = int((_batch()[2][:, 1:] != -100).sum())
    assert rows == [labelled] and labelled < 2 * 11  # only those rows went through the head
    assert loss == pytest.approx(float(plain_loss), rel=1e-6)
    assert plain_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_bf16_under_autocast_matches_every_position_scored(wrapped, monkeypatch):
    """The training path (a bfloat16 base under CPU autocast): compact and TRL's own
    every-position scoring give the same loss and gradients."""
    model = _model(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    add_fused_lm_head(model.get_base_model())
    results = {}
    rows = _counting(monkeypatch)
    for compact in (True, False):
        if not compact:
            monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)
        rows.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[compact] = _loss_and_grads(model, fused=True)
        assert rows == ([int((_batch()[2][:, 1:] != -100).sum())] if compact else [2 * 11])
    (loss_c, grads_c), (loss_a, grads_a) = results[True], results[False]
    assert float(loss_c) == pytest.approx(float(loss_a), rel=1e-3)
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_a[name], rtol=2e-2, atol=1e-4,
                                   msg=name)


def test_training_on_a_cpu_turns_it_on(tiny_base, home, data, monkeypatch):
    """The same two steps, with the wrap kept out and then as training sets it: the head
    projects fewer rows per step (the completions'), and the decision stays wrapped."""
    from adapterkit import TrainOptions, train
    from adapterkit.training import labelled_positions

    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)
    rows = _counting(monkeypatch)
    options = TrainOptions(max_steps=2, batch_size=4, r=4, alpha=8, general="off",
                           forgetting_budget=0, seed=3)
    with monkeypatch.context() as kept_out:
        kept_out.setattr(labelled_positions, "score_only_labelled_positions", lambda: False)
        train("sft", base=str(tiny_base), data=str(data), name="every", home=home,
              options=options)
    every = list(rows)
    assert trl_utils._use_triton(torch.device("cpu")) is False
    rows.clear()
    train("sft", base=str(tiny_base), data=str(data), name="labelled", home=home,
          options=options)
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert len(rows) == len(every) == 2 and all(0 < a < b for a, b in zip(rows, every)), \
        (rows, every)

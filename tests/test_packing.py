"""``train --packing``: TRL packs several sequences into one row with position ids restarting at
each (padding-free). Each sequence must then get the logits, and so the loss, it gets alone — no
attention across sequences — also through the float32 attention function that the bfloat16 CPU
path registers with transformers (``adapterkit.training.precision``)."""

import pytest
import torch
import torch.nn.functional as F

from adapterkit.training.precision import FP32_ATTENTION, prepare

#: bfloat16 round-off between a batch of one sequence and a packed row (other matmul shapes;
#: measured 0.047, three bfloat16 steps at these logits);
#: attention across sequences moves the logits of this tiny base by about 9 (the control below).
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.1}


def losses(logits, ids):
    """Per-sequence sum of next-token cross-entropy (plain torch)."""
    return float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_sequences_get_the_logits_and_loss_they_get_alone(tiny_base, dtype):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    rows = [torch.randint(3, 200, (n,)).tolist() for n in (7, 12, 5)]
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=getattr(torch, dtype)).eval()
    if dtype == "bfloat16":  # as a bfloat16 run on a CPU prepares it
        prepare(model)
        assert model.config._attn_implementation == FP32_ATTENTION
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": r} for r in rows])
    assert packed["input_ids"].shape == (1, sum(map(len, rows)))
    assert packed["position_ids"][0].tolist() == [i for r in rows for i in range(len(r))]

    def forward(**kw):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            return model(**kw, use_cache=False).logits[0].float()  # as training calls it

    together = forward(input_ids=packed["input_ids"], position_ids=packed["position_ids"])
    leaking = forward(input_ids=packed["input_ids"])  # no restart: the sequences see each other
    tol, start, leaked = TOLERANCE[dtype], 0, 0.0
    for row in rows:
        alone = forward(input_ids=torch.tensor([row]))
        got = together[start:start + len(row)]
        assert (got - alone).abs().max() < tol
        ids = torch.tensor(row)
        assert losses(got, ids) == pytest.approx(losses(alone, ids), rel=tol, abs=tol)
        leaked = max(leaked, float((leaking[start:start + len(row)] - alone).abs().max()))
        start += len(row)
    assert leaked > 10 * tol  # the control: the check above would see attention across rows

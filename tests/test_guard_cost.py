"""What makes the forgetting guard cheap, each part against an independent value: the top-k KL
term, its schedule, the cache of the base's side, and the snapshots the budget falls back to."""

import math

import pytest
import torch
import torch.nn.functional as F

from adapterkit import TrainOptions, train
from adapterkit.training.guard import MAX_SNAPSHOTS, BaseTarget, ForgettingGuard, top_k_kl


def coarse_kl(base_logits, adapted_logits, k):
    """KL(base ‖ adapted) over the base's k likeliest tokens plus one bucket for the rest,
    written out from the two softmaxes (no adapterkit code)."""
    pb, pa = base_logits.double().softmax(-1), adapted_logits.double().softmax(-1)
    top = pb.topk(k, -1).indices
    cb = torch.cat([pb.gather(-1, top), 1 - pb.gather(-1, top).sum(-1, keepdim=True)], -1)
    ca = torch.cat([pa.gather(-1, top), 1 - pa.gather(-1, top).sum(-1, keepdim=True)], -1)
    return float((cb * (cb.log() - ca.log())).sum(-1).mean())


@pytest.mark.parametrize("k", [1, 8, 40])
def test_top_k_kl_is_the_kl_of_the_coarsened_distributions(k):
    torch.manual_seed(0)
    base = torch.randn(6, 64) * 3
    adapted = base + torch.randn(6, 64)
    value = float(top_k_kl(BaseTarget.of(base, k), adapted))
    full = float(F.kl_div(adapted.log_softmax(-1), base.log_softmax(-1), log_target=True,
                          reduction="none").sum(-1).mean())
    assert value == pytest.approx(coarse_kl(base, adapted, k), rel=1e-5)
    assert value <= full + 1e-6  # coarsening never raises a KL


def test_top_k_kl_is_the_full_kl_when_the_base_puts_its_mass_in_the_top_k():
    torch.manual_seed(1)
    base = torch.full((4, 64), -1e4)
    base[:, :5] = torch.randn(4, 5)
    adapted = torch.randn(4, 64, requires_grad=True)
    value = top_k_kl(BaseTarget.of(base, 5), adapted)
    full = F.kl_div(adapted.log_softmax(-1), base.log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean()
    assert float(value) == pytest.approx(float(full), rel=1e-5)
    (g_top,) = torch.autograd.grad(value, adapted)
    (g_full,) = torch.autograd.grad(full, adapted)
    assert torch.allclose(g_top, g_full, atol=1e-6)


def test_no_rest_bucket_no_nan():
    base = torch.randn(3, 10)
    target = BaseTarget.of(base, 9)  # at most vocabulary - 1 tokens, the rest is one token
    assert target.index.shape == (3, 9)
    assert math.isfinite(float(top_k_kl(target, torch.randn(3, 10))))


@pytest.fixture
def peft_model(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attention_dropout=0.5)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False, lora_dropout=0.5))
    return model, AutoTokenizer.from_pretrained(tiny_base)


def test_penalty_is_the_weighted_top_k_kl_on_its_schedule(peft_model):
    model, tok = peft_model
    model.train()  # as in a training loop: the base's and LoRA's dropout would act
    texts = ["The river runs past the old mill and into the town.", "Bread rises overnight."]
    guard = ForgettingGuard(tok, anchor_texts=texts, general_texts=texts, budget_pct=None,
                            weight=0.3, kl_every=3, top_k=16)
    terms = [float(guard.penalty(model, step=s)) for s in range(7)]
    assert model.training  # given back in training mode
    assert [t != 0 for t in terms] == [True, False, False, True, False, False, True]
    assert terms[0] == terms[6]  # the same chunk: no dropout on either side
    assert guard.penalty_calls == 3 and guard.targets_computed == 2  # chunk 0 came back
    # step 3 uses the second anchor chunk: the hand value, with plain PEFT in eval mode
    model.eval()
    ids = torch.tensor([tok(texts[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits[0]
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0]
    assert terms[3] == pytest.approx(0.3 * 3 * coarse_kl(base, adapted, 16), rel=1e-4)


def test_snapshots_are_bounded_and_keep_the_newest_and_oldest(peft_model):
    model, tok = peft_model
    guard = ForgettingGuard(tok, anchor_texts=["a b c"], general_texts=["a b c"],
                            budget_pct=1.0, weight=0.0)
    for step in range(10, 310, 10):
        guard.snapshot(model, step)
        assert len(guard.snapshots) <= MAX_SNAPSHOTS
        assert guard.snapshots[-1] == step and guard.snapshots[0] == 10
    assert guard.snapshots == sorted(guard.snapshots)


def guard_opts(**kw):
    base = dict(max_steps=9, learning_rate=3e-2, batch_size=4, logging_steps=5, save_steps=100,
                r=8, alpha=16, dropout=0.0, guard_weight=0.5, seed=0)
    base.update(kw)
    return TrainOptions(**base)


@pytest.mark.slow
def test_the_base_side_is_cached_and_trains_the_same_pocket_book(tiny_base, home, data, pm):
    from peft import get_peft_model_state_dict

    first = train("sft", base=str(tiny_base), data=str(data), name="first",
                  options=guard_opts(), home=home, plugins=pm)
    guard = first.metrics["guard"]
    # 9 steps, a KL term on every 2nd (0, 2, 4, 6, 8) at 2 × the weight
    assert (guard["kl_batches"], guard["kl_every"], guard["weight"]) == (5, 2, 0.5)
    assert guard["anchor_targets_cached"] == 0
    cached = list((home / "cache" / "guard-anchor").glob("*.safetensors"))
    assert len(cached) == 1
    second = train("sft", base=str(tiny_base), data=str(data), name="second",
                   options=guard_opts(), home=home, plugins=pm)
    assert second.metrics["guard"]["anchor_targets_cached"] == 5
    # the same targets, read back: the same pocket book, bit for bit
    a, b = get_peft_model_state_dict(first.model), get_peft_model_state_dict(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)

    cached[0].write_bytes(b"not safetensors")  # damaged: computed again, and rewritten
    third = train("sft", base=str(tiny_base), data=str(data), name="third",
                  options=guard_opts(), home=home, plugins=pm)
    assert third.metrics["guard"]["anchor_targets_cached"] == 0
    c = get_peft_model_state_dict(third.model)
    assert all(torch.equal(a[k], c[k]) for k in a)
    from safetensors.torch import load_file

    assert len([n for n in load_file(str(cached[0])) if n.startswith("index.")]) == 5
    # other anchor text: its own entry, nothing read from the first
    anchor = data.with_name("anchor.txt")
    anchor.write_text("A quiet walk along the river at dawn.\nThe market opens at nine.\n")
    other = train("sft", base=str(tiny_base), data=str(data), name="other",
                  options=guard_opts(anchor=str(anchor)), home=home, plugins=pm)
    assert other.metrics["guard"]["anchor_targets_cached"] == 0
    assert len(list((home / "cache" / "guard-anchor").glob("*.safetensors"))) == 2


class _Loop:
    """The part of a transformers Trainer that ``guarded`` reads, with a fixed task loss."""

    def __init__(self, scaled, accepts, accumulation):
        self.loss_is_scaled_for_ga = scaled
        self.model_accepts_loss_kwargs = accepts
        self.compute_loss_func = None
        self.current_gradient_accumulation_steps = accumulation
        self.state = type("State", (), {"global_step": 4})()
        self.accelerator = type("Acc", (), {"unwrap_model": staticmethod(lambda m: m)})()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = torch.tensor(2.0)
        return (loss, {"logits": None}) if return_outputs else loss


class _Guard:
    weight = 0.5

    def penalty(self, model, step=None):
        return torch.tensor(1.0)


@pytest.mark.parametrize("scaled, accepts, items, expected", [
    (True, False, None, 2.0 + 1.0 / 4),  # the trainer normalised its loss per step: so is the term
    (False, True, 10, 2.0 + 1.0),  # transformers divides loss + term by the micro-batches itself
    (None, True, 10, 2.0 + 1.0 / 4),  # its own rule: loss kwargs and items of the whole step
    (None, True, None, 2.0 + 1.0),
    (None, False, 10, 2.0 + 1.0),
])
def test_guarded_adds_the_term_scaled_as_transformers_scales_the_loss(scaled, accepts, items,
                                                                      expected):
    from adapterkit.training.guard import guarded

    Trainer = guarded(_Loop, _Guard())
    assert Trainer.__name__ == "Guarded_Loop"
    loop = Trainer(scaled, accepts, 4)
    model = torch.nn.Linear(1, 1).train()
    assert float(loop.compute_loss(model, {}, num_items_in_batch=items)) == pytest.approx(expected)
    loss, outputs = loop.compute_loss(model, {}, return_outputs=True, num_items_in_batch=items)
    assert float(loss) == pytest.approx(expected) and outputs == {"logits": None}
    assert float(loop.compute_loss(model.eval(), {}, num_items_in_batch=items)) == 2.0  # eval
    assert guarded(_Loop, None) is _Loop  # no guard: the class itself


def test_evaluation_adds_no_kl_term(tiny_base, home, data, pm):
    """Only training batches carry the term: evaluations of the split leave the count alone."""
    from transformers import TrainerCallback

    class Evaluations(TrainerCallback):
        count = 0

        def on_evaluate(self, args, state, control, **kwargs):
            Evaluations.count += 1

    result = train("sft", base=str(tiny_base), data=str(data), name="evaluated",
                   options=guard_opts(max_steps=6, eval_split=0.25, save_steps=2), home=home,
                   plugins=pm, callbacks=[Evaluations()])
    assert Evaluations.count >= 3  # the split was evaluated while training (steps 2, 4, 6)
    assert result.metrics["guard"]["kl_batches"] == 3  # training steps 0, 2, 4 only

"""What makes the forgetting guard cheap, each part against an independent value: the top-k KL
term, its schedule, the cache of the base's side, and the snapshots the budget falls back to."""

import math

import pytest
import torch
import torch.nn.functional as F

from adapterkit import TrainOptions, train
from adapterkit.training.guard import MAX_SNAPSHOTS, BaseTarget, ForgettingGuard, top_k_kl
from adapterkit.training.precision import prepare


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


def coarse_kl_tensor(base_logits, adapted_logits, k):
    """:func:`coarse_kl` as a differentiable tensor (float32), for gradients."""
    pb, pa = base_logits.softmax(-1), adapted_logits.float().softmax(-1)
    top = pb.topk(k, -1).indices
    cb = torch.cat([pb.gather(-1, top), 1 - pb.gather(-1, top).sum(-1, keepdim=True)], -1)
    ca = torch.cat([pa.gather(-1, top), 1 - pa.gather(-1, top).sum(-1, keepdim=True)], -1)
    return (cb * (cb.log() - ca.log())).sum(-1).mean()


@pytest.fixture
def still_model(tiny_base):
    """A PEFT model without dropout: the anchor row's term in the task's forward and in one of
    its own are then the same number."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False, lora_dropout=0.0))
    return model.train(), AutoTokenizer.from_pretrained(tiny_base)


def task_batch(tok, width):
    """Three right-padded rows of ``width`` tokens with labels, as a collator gives them."""
    texts = ["one two three four five six seven eight nine ten eleven twelve thirteen",
             "a b c d e f g", "the cat"]
    enc = tok(texts, padding="max_length", max_length=width, truncation=True,
              return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels}


#: The guard of the tests below: one anchor chunk, weight 0.3, a term on every 2nd step, top 16.
WEIGHT, EVERY, TOP = 0.3, 2, 16


def one_chunk_guard(tok, anchor):
    return ForgettingGuard(tok, anchor_texts=[anchor], general_texts=[anchor], budget_pct=None,
                           weight=WEIGHT, kl_every=EVERY, top_k=TOP)


def by_hand(model, tok, batch, anchor, weight=WEIGHT, kl_every=EVERY, k=TOP):
    """Task loss + the weighted KL term on ``anchor`` alone, with plain PEFT and the helper
    above; their LoRA gradients."""
    model.zero_grad()
    loss = model(**batch).loss
    ids = torch.tensor([tok(anchor, add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits[0]
    total = loss + weight * kl_every * coarse_kl_tensor(base, model(input_ids=ids).logits[0], k)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return float(loss), float(total), grads


def test_the_anchor_row_in_the_task_forward_gives_the_hand_term_and_gradients(still_model):
    model, tok = still_model
    anchor = "The river mill"
    batch = task_batch(tok, 24)
    assert len(tok(anchor, add_special_tokens=False)["input_ids"]) < 24
    guard = one_chunk_guard(tok, anchor)
    seen = []

    def task():
        out = model(**batch)
        seen.append(out.logits.shape[0])  # the trainer sees its own rows
        return out.loss

    loss, term = guard.with_task(model, task, step=0)
    assert guard.folded == 1 and seen == [3]
    (loss + term).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want_loss, want_total, want_grads = by_hand(model, tok, batch, anchor)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(loss + term) == pytest.approx(want_total, rel=1e-5)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        assert torch.allclose(grads[name], want_grads[name], rtol=1e-4, atol=1e-6), name
    # off-schedule: the task alone, no row added
    seen.clear()
    loss, term = guard.with_task(model, task, step=1)
    assert float(term) == 0 and guard.folded == 1 and seen == [3]


def test_a_chunk_longer_than_the_batch_gets_a_forward_of_its_own(still_model):
    model, tok = still_model
    anchor = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    batch = task_batch(tok, 6)
    assert len(tok(anchor, add_special_tokens=False)["input_ids"]) > 6
    guard = one_chunk_guard(tok, anchor)
    loss, term = guard.with_task(model, lambda: model(**batch).loss, step=0)
    assert guard.folded == 0 and guard.penalty_calls == 1
    want_loss, want_total, _ = by_hand(model, tok, batch, anchor)
    assert float(loss + term) == pytest.approx(want_total, rel=1e-5)


def test_a_reference_pass_without_gradients_is_left_alone(still_model):
    """DPO's reference forward (no gradients) comes first: the row joins the policy's."""
    model, tok = still_model
    anchor = "The river mill"
    batch = task_batch(tok, 24)
    guard = one_chunk_guard(tok, anchor)
    rows = []

    def task():
        with torch.no_grad(), model.disable_adapter():
            rows.append(model(**batch).logits.shape[0])
        out = model(**batch)
        rows.append(out.logits.shape[0])
        return out.loss

    loss, term = guard.with_task(model, task, step=0)
    assert rows == [3, 3] and guard.folded == 1
    _, want_total, _ = by_hand(model, tok, batch, anchor)
    assert float(loss + term) == pytest.approx(want_total, rel=1e-5)


@pytest.mark.parametrize("extra", ["position_ids", "inputs_embeds"])
def test_a_forward_the_row_cannot_join_is_left_alone(still_model, extra):
    """Packed rows (position ids) and embeddings: the task runs as given, the term has a
    forward of its own and is still the hand value."""
    model, tok = still_model
    anchor = "The river mill"
    batch = task_batch(tok, 24)
    given = dict(batch)
    if extra == "position_ids":
        given["position_ids"] = torch.arange(24).expand(3, -1)
    else:
        given["inputs_embeds"] = model.get_input_embeddings()(given.pop("input_ids"))
    guard = one_chunk_guard(tok, anchor)
    rows = []

    def task():
        out = model(**given)
        rows.append(out.logits.shape[0])
        return out.loss

    loss, term = guard.with_task(model, task, step=0)
    assert guard.folded == 0 and rows == [3]
    _, want_total, _ = by_hand(model, tok, batch, anchor)
    assert float(loss + term) == pytest.approx(want_total, rel=1e-5)


def test_a_model_whose_logits_are_more_than_its_output_layer_gets_its_own_forward(still_model):
    """The output layer is checked once against the model's own logits: a forward that scales
    them (as Gemma's softcapping or Cohere's scale do) is not bypassed by the folded row."""
    model, tok = still_model
    base = model.get_base_model()
    plain_forward = base.forward

    def scaled(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    base.forward = scaled
    anchor = "The river mill"
    batch = task_batch(tok, 24)
    guard = one_chunk_guard(tok, anchor)
    loss, term = guard.with_task(model, lambda: model(**batch).loss, step=0)
    assert guard.folded == 0
    _, want_total, _ = by_hand(model, tok, batch, anchor)  # the scaled logits
    assert float(loss + term) == pytest.approx(want_total, rel=1e-5)


def test_the_base_side_is_computed_in_fixed_groups_of_chunks(still_model, monkeypatch):
    """Groups of TARGET_BATCH chunks (3 here), each in one forward when the run first needs one
    of its chunks, whatever else is due: each chunk's figures equal its own single-row
    forward's, and a group no step visits is never computed."""
    from adapterkit.training import guard as guard_module

    monkeypatch.setattr(guard_module, "TARGET_BATCH", 3)
    model, tok = still_model
    texts = ["The river runs past the old mill and into the town.", "Bread rises overnight.",
             "Snow fell on the hills", "A long quiet evening by the sea, with gulls", "Unused.",
             "Nor this one.", "Nor this."]
    guard = ForgettingGuard(tok, anchor_texts=texts, general_texts=texts, budget_pct=None,
                            weight=0.3, kl_every=2, top_k=16)
    guard.planned_steps = 7  # steps 0, 2, 4, 6: chunks 0-3, in groups 0-2 and 3-5
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    guard.penalty(model, step=0)
    assert sorted(guard.targets) == [0, 1, 2, 3, 4, 5] and guard.targets_computed == 6
    for chunk in range(6):  # each against its own single-row forward of plain transformers
        ids = torch.tensor([tok(texts[chunk], add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), model.disable_adapter():
            logp = model.eval()(input_ids=ids).logits[0].log_softmax(-1)
        model.train()
        values, index = logp.topk(16, -1)
        target = guard.targets[chunk]
        assert torch.equal(target.index, index)
        assert torch.allclose(target.logp, values, atol=1e-5)
    hook.remove()
    assert len(forwards) == 2 + 1 + 6  # two groups, the term's own forward; the checks above
    for step in (2, 4, 6):
        guard.penalty(model, step=step)
    assert guard.targets_computed == 6  # nothing computed twice, chunk 6 never


def test_the_row_rides_along_under_autocast_on_a_trained_book(still_model, tiny_base):
    """As in a bfloat16 run: a bfloat16 base, float32 LoRA factors that are not zero (a trained
    or underlying book) and the forward wrapped in autocast as accelerate wraps it. The output
    layer's check must compare like with like, or the row would never ride along."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok = still_model
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(
        tiny_base, dtype=torch.bfloat16), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
        lora_dropout=0.0))
    prepare(model)  # trainable factors in float32, attention in float32 (as training does)
    plain_forward = model.forward

    def amp_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain_forward(*args, **kwargs)

    model.forward = amp_forward
    model.train()
    anchor = "The river mill"
    batch = task_batch(tok, 24)
    guard = one_chunk_guard(tok, anchor)
    loss, term = guard.with_task(model, lambda: model(**batch).loss, step=0)
    assert guard.folded == 1
    _, want_total, _ = by_hand(model, tok, batch, anchor)
    assert float(loss + term) == pytest.approx(want_total, rel=2e-2)


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
    # 9 steps, a KL term on every 3rd (0, 3, 6) at 3 × the weight
    assert (guard["kl_batches"], guard["kl_every"], guard["weight"]) == (3, 3, 0.5)
    assert guard["anchor_targets_cached"] == 0
    cached = list((home / "cache" / "guard-anchor").glob("*.safetensors"))
    assert len(cached) == 1
    second = train("sft", base=str(tiny_base), data=str(data), name="second",
                   options=guard_opts(), home=home, plugins=pm)
    # chunks 0-2 visited, computed with the rest of their group (chunks 0-7 of the 12)
    assert second.metrics["guard"]["anchor_targets_cached"] == 8
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

    assert len([n for n in load_file(str(cached[0])) if n.startswith("index.")]) == 8
    # other anchor text: its own entry, nothing read from the first
    anchor = data.with_name("anchor.txt")
    anchor.write_text("A quiet walk along the river at dawn.\nThe market opens at nine.\n")
    other = train("sft", base=str(tiny_base), data=str(data), name="other",
                  options=guard_opts(anchor=str(anchor)), home=home, plugins=pm)
    assert other.metrics["guard"]["anchor_targets_cached"] == 0
    assert len(list((home / "cache" / "guard-anchor").glob("*.safetensors"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_the_anchor_row_rides_on_the_trainers_own_forward(trainer, tiny_base, home, data,
                                                          adapterkit_data, pm, tmp_path):
    """In TRL's own loop (SFT's fused LM head, DPO's concatenated chosen/rejected forward with
    its reference pass): every KL term came from the task's forward, none from one of its own."""
    anchor = tmp_path / "anchor.txt"
    anchor.write_text("A cat.\nThe mill.\n")  # shorter than any batch of either data set
    rows = data if trainer == "sft" else adapterkit_data["preference"]
    result = train(trainer, base=str(tiny_base), data=str(rows), name=f"rides-{trainer}",
                   options=guard_opts(anchor=str(anchor)), home=home, plugins=pm)
    guard = result.metrics["guard"]
    assert (guard["kl_batches"], guard["kl_in_task_forward"]) == (3, 3)  # steps 0, 3, 6


@pytest.mark.slow
def test_riding_along_trains_what_a_forward_of_its_own_trains(tiny_base, home, data, pm,
                                                             tmp_path, monkeypatch):
    """In TRL's loop, float32, no dropout: the same pocket book with the row folded into the
    task's forward and with the row refused (every term a forward of its own), up to the
    round-off of a batch one row larger."""
    from peft import get_peft_model_state_dict

    from adapterkit.training import guard as guard_module

    anchor = tmp_path / "anchor.txt"
    anchor.write_text("A cat.\nThe mill.\n")
    books = {}
    for name in ("folded", "own"):
        if name == "own":
            monkeypatch.setattr(guard_module._Fold, "_foldable", lambda *a: False)
        result = train("sft", base=str(tiny_base), data=str(data), name=name,
                       options=guard_opts(anchor=str(anchor), precision="fp32",
                                          guard_weight=5.0), home=home, plugins=pm)
        assert result.metrics["guard"]["kl_in_task_forward"] == (3 if name == "folded" else 0)
        books[name] = get_peft_model_state_dict(result.model)
    diff = max(float((books["folded"][k] - books["own"][k]).abs().max()) for k in books["own"])
    scale = max(float(v.abs().max()) for v in books["own"].values())
    assert diff < 1e-4 * scale


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
    kl_every = 1
    penalty_calls = 0

    def with_task(self, model, task, step=None):
        self.penalty_calls += 1
        return task(), torch.tensor(1.0)


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
    assert result.metrics["guard"]["kl_batches"] == 2  # training steps 0 and 3 only


@pytest.mark.slow
@pytest.mark.parametrize("trainer, grad_accum", [("sft", 1), ("sft", 2), ("dpo", 2)])
def test_the_logged_loss_is_the_task_loss_and_the_kl_term_is_logged_apart(
        trainer, grad_accum, tiny_base, home, data, adapterkit_data, pm, monkeypatch):
    """The loss curve and ``train_loss_final`` are the trainer's own loss, as without the guard;
    the KL term is logged as ``guard_kl``. The term is made huge here (+1000, a constant: the
    same gradients) so that any of it in the logged loss shows. SFT's loss comes normalised for
    gradient accumulation, DPO's is divided by the micro-batches after: both are covered."""
    from transformers import TrainerCallback

    from adapterkit.training import guard as guard_module

    real = guard_module.ForgettingGuard._term
    monkeypatch.setattr(guard_module.ForgettingGuard, "_term",
                        lambda self, target, logits: real(self, target, logits) + 1000.0)

    def run(name, **kw):
        logs = []

        class Record(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    logs_of.append(dict(logs))

        logs_of = logs
        rows = data if trainer == "sft" else adapterkit_data["preference"]
        result = train(trainer, base=str(tiny_base), data=str(rows), name=name, home=home,
                       plugins=pm, callbacks=[Record()],
                       options=guard_opts(max_steps=4, logging_steps=1, grad_accum=grad_accum,
                                          precision="fp32", **kw))
        return result, logs

    guarded_run, guarded_logs = run(f"logged-{trainer}-{grad_accum}")
    plain_run, plain_logs = run(f"unguarded-{trainer}-{grad_accum}", guard_weight=0)
    assert "guard" in guarded_run.metrics and len(guarded_logs) == len(plain_logs) == 4
    # step 1's loss is taken on the first batch at the starting weights in both runs (the KL
    # term of step 0, at the start, has no gradient): the unguarded run's is the reference
    assert guarded_logs[0]["loss"] == pytest.approx(plain_logs[0]["loss"], rel=1e-4)
    assert all(log["loss"] < 100 for log in guarded_logs)
    assert guarded_run.metrics["train_loss_final"] == guarded_logs[-1]["loss"] < 100
    # KL terms on steps 0 and 3 (every micro-batch of them), logged at steps 1 and 4: the
    # divergence before the weight, the +1000 divided by weight 0.5 × kl_every 3 with it
    kl = [log.get("guard_kl") for log in guarded_logs]
    assert kl[1] is None and kl[2] is None
    assert 1000 / 1.5 <= kl[0] < 1000 / 1.5 + 1 and 1000 / 1.5 <= kl[3] < 1000 / 1.5 + 1
    assert all("guard_kl" not in log for log in plain_logs)

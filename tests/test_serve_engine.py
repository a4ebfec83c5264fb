"""The serving engine: mixed-adapter batches answer exactly as each request would alone.

The reference is plain PEFT's ``generate`` of one prompt at a time (what ``adapterkit generate``
runs, :mod:`adapterkit.runtime.peft_model`), never the engine's own math.
"""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch

from adapterkit.base.load import load_base
from adapterkit.errors import BaseMismatch, ConfigError, PocketBookNotFound, QueueFull
from adapterkit.library.metadata import WEIGHTS_FILE
from adapterkit.library.store import Library
from adapterkit.lora.combine import stack
from adapterkit.plugin_api.testing import make_peft_adapter
from adapterkit.runtime.generation import render_prompt
from adapterkit.runtime.peft_model import peft_model
from adapterkit.serving.engine import Engine

NEW = 12
#: name → make_peft_adapter arguments: four pocket books that differ in seed, rank and layers.
BOOKS = {
    "law": dict(seed=1, r=4, target_modules=["q_proj", "v_proj"]),
    "code": dict(seed=2, r=8, target_modules="all-linear"),
    "chem": dict(seed=3, r=2, target_modules=["o_proj", "down_proj"], lora_alpha=5),
    "bio": dict(seed=4, r=4, target_modules=["k_proj", "up_proj", "gate_proj"],
                use_rslora=True),
    "deep": dict(seed=5, r=4, target_modules=["q_proj", "o_proj"]),  # trained --on law
}
QUESTIONS = ["Name 1?", "The patient reports chest pain and shortness of breath.",
             "A mild rash?", "Rivers carve valleys over thousands of years; why?",
             "def add(a, b):", "Colour of item 3?", "Greet person 4.", "Name 2?"]


@pytest.fixture(scope="module")
def lib(tiny_base, tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("serve-engine")
    library = Library(root / "home")
    for name, kwargs in BOOKS.items():
        library.import_peft(make_peft_adapter(tiny_base, root / name, **kwargs), name,
                            base=str(tiny_base))
    # as `train --on law` records it: loading deep brings law back underneath, at weight 1
    library.update_meta("deep", lambda meta: setattr(meta, "stacked_on", ["law@1"]))
    stack(library, ["law", "code"], [1.0, 0.5], name="mix")
    return library


def fresh(tiny_base: Path, lib: Library):
    return load_base(str(tiny_base), home=lib.home)


def prompt_ids(base, question: str) -> list[int]:
    text = render_prompt(base.tokenizer, question, chat=True)  # as `adapterkit generate` does
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


_REFERENCE: dict[tuple[str, str, int], tuple[list[int], str]] = {}


def reference(tiny_base, lib, model: str, question: str, new: int = NEW) -> tuple[list[int], str]:
    """Plain PEFT (or the plain base) generating this one prompt alone: tokens, finish."""
    key = (model, question, new)
    if key not in _REFERENCE:
        base = fresh(tiny_base, lib)
        ids = prompt_ids(base, question)
        if model == base.name:
            net = base.model
        elif "+" in model:
            weights = [(lib.get(part.split("*")[0]), float(part.split("*")[1]))
                       for part in model.split("+")]
            net = peft_model(base, weights[-1][0], library=lib, weights=weights)
        else:
            net = peft_model(base, lib.get(model), library=lib)
        with torch.no_grad():
            out = net.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(
                1, len(ids), dtype=torch.long), max_new_tokens=new, do_sample=False,
                pad_token_id=base.tokenizer.pad_token_id)
        tokens = out[0, len(ids):].tolist()
        eos = base.model.generation_config.eos_token_id
        if tokens and tokens[-1] == eos:
            _REFERENCE[key] = (tokens[:-1], "stop")
        else:
            _REFERENCE[key] = (tokens, "length")
    return _REFERENCE[key]


def drain(request, timeout: float = 60) -> tuple[list[int], str, str | None]:
    tokens = []
    while True:
        event = request.events.get(timeout=timeout)
        if event.finish is not None:
            assert request.events.empty()
            return tokens, event.finish, event.error
        tokens.append(event.token)


def run_sync(engine: Engine, requests) -> list[tuple[list[int], str, str | None]]:
    while engine.step():
        pass
    return [drain(r, timeout=1) for r in requests]


MIXED = ["law", "code", "chem", "bio", "BASE", "mix", "deep", "law*1+chem*0.5"]


def test_mixed_batch_equals_each_request_alone(tiny_base, lib):
    """Four pocket books, the plain base, a saved stack, a book trained --on another and an
    inline stack, all decoded together in one batch by the background thread: every greedy
    answer equals plain PEFT's for that prompt alone, token for token."""
    base = fresh(tiny_base, lib)
    models = [base.name if m == "BASE" else m for m in MIXED]
    expected = [reference(tiny_base, lib, m, q) for m, q in zip(models, QUESTIONS)]
    # the pocket books really differ: from the base and from each other, on one prompt
    same_prompt = [reference(tiny_base, lib, m, QUESTIONS[1])[0] for m in models]
    assert len({tuple(t) for t in same_prompt}) == len(models), same_prompt
    engine = Engine(base, lib, max_batch=8)
    requests = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
                for m, q in zip(models, QUESTIONS)]
    engine.start()  # after the submits, so that all eight share the first prefill
    try:
        got = [drain(r) for r in requests]
        stats = engine.stats()
    finally:
        engine.close()
    for model, (tokens, finish, error), (want, want_finish) in zip(models, got, expected):
        assert error is None
        assert (tokens, finish) == (want, want_finish), model
    assert stats["prefills_total"] == 1  # all eight joined in one prefill: one batch
    assert stats["steps_total"] <= NEW  # and decoded together: one forward per step
    assert stats["tokens_total"] == sum(len(t) for t, _, _ in got)


def test_requests_joining_mid_decode_still_equal_alone(tiny_base, lib):
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_batch=8)
    first = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
             for m, q in (("code", QUESTIONS[0]), (base.name, QUESTIONS[2]))]
    for _ in range(3):
        engine.step()
    # longer prompts than the running rows have (those are left-padded) and a shorter one
    later = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
             for m, q in (("law", QUESTIONS[3]), ("mix", QUESTIONS[4]), ("chem", QUESTIONS[1]))]
    engine.step()  # the later ones are prefilled and join the running two
    assert all(r.finish is None and r.completion_tokens >= 3 for r in first)
    assert engine.stats()["batch_size"] == 5
    got = run_sync(engine, first + later)
    models = ["code", base.name, "law", "mix", "chem"]
    questions = [QUESTIONS[i] for i in (0, 2, 3, 4, 1)]
    for model, question, (tokens, finish, _) in zip(models, questions, got):
        assert (tokens, finish) == reference(tiny_base, lib, model, question), model
    engine.close()


def test_cancel_frees_the_row_and_the_rest_complete(tiny_base, lib):
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib)
    # the longest row leaves: the cache columns only it used are trimmed away
    doomed = engine.submit(prompt_ids(base, QUESTIONS[1]), engine.resolve("code"),
                           max_tokens=NEW)
    kept = engine.submit(prompt_ids(base, QUESTIONS[0]), engine.resolve("law"), max_tokens=NEW)
    engine.step()
    engine.step()
    doomed.cancel()
    engine.step()
    assert engine.stats()["batch_size"] == 1
    assert engine._mask.shape[1] == len(prompt_ids(base, QUESTIONS[0])) + 3  # 3 steps
    tokens, finish, _ = drain(doomed, timeout=1)
    assert finish == "cancelled" and 1 <= len(tokens) < NEW
    assert run_sync(engine, [kept])[0][:2] == reference(tiny_base, lib, "law", QUESTIONS[0])
    waiting = engine.submit(prompt_ids(base, QUESTIONS[2]), engine.resolve("law"), max_tokens=4)
    waiting.cancel()  # cancelled before it got a row
    assert run_sync(engine, [waiting]) == [([], "cancelled", None)]
    engine.max_batch = 1  # a full batch: a cancelled request still leaves the queue at once
    running = engine.submit(prompt_ids(base, QUESTIONS[0]), engine.resolve("law"),
                            max_tokens=NEW)
    engine.step()
    queued = engine.submit(prompt_ids(base, QUESTIONS[2]), engine.resolve("code"),
                           max_tokens=NEW)
    queued.cancel()
    engine.step()
    assert queued.finish == "cancelled" and running.finish is None
    assert engine.stats()["queue_depth"] == 0
    engine.close()


def test_a_corrupt_book_fails_alone(tiny_base, lib, tmp_path):
    book = lib.import_peft(make_peft_adapter(tiny_base, tmp_path / "bad", seed=9), "bad",
                           base=str(tiny_base))
    weights = book.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8  # a damaged disk: the file is no longer what was saved
    weights.write_bytes(bytes(data))
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib)
    models = ["law", "bad", base.name, "bad+chem", "chem"]
    requests = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
                for m, q in zip(models, QUESTIONS)]
    got = run_sync(engine, requests)
    for model, question, (tokens, finish, error) in zip(models, QUESTIONS, got):
        if "bad" in model:
            assert (tokens, finish) == ([], "error")
            assert "bad@1" in error and "doctor" in error and "\n" not in error
        else:
            assert (tokens, finish) == reference(tiny_base, lib, model, question), model
    assert "bad@1" not in engine.stats()["attached"]
    engine.close()


def test_lru_keeps_max_attached_frees_the_oldest_and_never_a_running_one(tiny_base, lib):
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_attached=2)
    for name in ("law", "code"):
        run_sync(engine, [engine.submit(prompt_ids(base, "Name 1?"), engine.resolve(name),
                                        max_tokens=2)])
    law = weakref.ref(next(a.loaded for a in engine._books.values() if a.ref == "law@1"))
    run_sync(engine, [engine.submit(prompt_ids(base, "Name 1?"), engine.resolve("chem"),
                                    max_tokens=2)])
    assert engine.stats()["attached"] == ["code@1", "chem@1"]  # law was used least recently
    gc.collect()
    assert law() is None  # and its tensors are gone
    # two running rows hold both places: a third pocket book waits for one of them to finish
    running = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=m_tokens)
               for q, m, m_tokens in ((QUESTIONS[0], "code", 3), (QUESTIONS[1], "chem", NEW))]
    engine.step()
    third = engine.submit(prompt_ids(base, QUESTIONS[3]), engine.resolve("bio"), max_tokens=NEW)
    engine.step()
    assert third.first_token_at is None and engine.stats()["queue_depth"] == 1
    got = run_sync(engine, running + [third])
    assert got[2][:2] == reference(tiny_base, lib, "bio", QUESTIONS[3])
    assert got[1][:2] == reference(tiny_base, lib, "chem", QUESTIONS[1])
    assert sorted(engine.stats()["attached"]) == ["bio@1", "chem@1"]
    with pytest.raises(ConfigError, match="attaches at most 2"):
        engine.preload(["law+code+chem"])
    engine.close()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_base, lib):
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib)
    ids, target = prompt_ids(base, QUESTIONS[1]), engine.resolve("law")

    def sampled(*others):
        request = engine.submit(ids, target, max_tokens=NEW, temperature=0.9, top_p=0.9, seed=7)
        extra = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW,
                               temperature=1.0) for m, q in others]
        return run_sync(engine, [request, *extra])[0]

    alone = sampled()
    assert sampled(("code", QUESTIONS[0]), (base.name, QUESTIONS[2])) == alone
    assert alone[0] != reference(tiny_base, lib, "law", QUESTIONS[1])[0]  # it did sample
    engine.close()


def test_names_resolve_or_are_refused(tiny_base, other_base, lib, tmp_path):
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib)
    assert engine.resolve(base.name).members == ()
    assert engine.resolve("law").key == "law@1"
    assert dict(engine.resolve("mix").members) == {"law@1": 1.0, "code@1": 0.5}
    assert engine.resolve("deep").members == (("law@1", 1.0), ("deep@1", 1.0))
    assert engine.resolve("deep+law*0.5").members == (("deep@1", 1.0), ("law@1", 0.5))
    assert engine.resolve(" law@1 * 1 + chem*0.25").key == "law@1*1+chem@1*0.25"
    for unknown in ("nope", "nope@1", "law@7", "gpt-4o", "org/model"):
        with pytest.raises(PocketBookNotFound):
            engine.resolve(unknown)
    for bad in ("", "law+", "+law", "law*", "law*x", "law*nan", "law*inf", "law+law",
                "mix+law", "mix*0.5", "law+org/model", "law+law@1", "law@1*1+law@01*2"):
        with pytest.raises(ConfigError):
            engine.resolve(bad)
    lib.import_peft(make_peft_adapter(other_base, tmp_path / "alien"), "alien",
                    base=str(other_base))
    alien = lib.get("alien")
    with pytest.raises(BaseMismatch) as info:
        engine.resolve("alien")
    assert alien.meta.base_fingerprint[:12] in str(info.value)
    assert base.fingerprint[:12] in str(info.value)
    with pytest.raises(BaseMismatch):
        engine.resolve("law+alien")
    listed = {m["id"]: m["kind"] for m in engine.models()}
    assert listed[base.name] == "base" and listed["mix"] == "stack"
    assert {"law", "code", "chem", "bio", "deep"} <= {k for k, v in listed.items()
                                                      if v == "adapter"}
    assert "alien" not in listed
    engine.close()


def test_bad_requests_and_a_full_queue_are_refused(tiny_base, lib):
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_queue=2, max_new_tokens_cap=64)
    ids, target = prompt_ids(base, "Name 1?"), engine.resolve("law")
    for kwargs in (dict(max_tokens=0), dict(max_tokens=65), dict(max_tokens=4, temperature=-1),
                   dict(max_tokens=4, top_p=0.0), dict(max_tokens=4, seed=-1)):
        with pytest.raises(ConfigError):
            engine.submit(ids, target, **kwargs)
    for prompt in ([], [10**6], list(range(5)) * engine.context_length):
        with pytest.raises(ConfigError):
            engine.submit(prompt, target, max_tokens=4)
    engine.submit(ids, target, max_tokens=4)
    engine.submit(ids, target, max_tokens=4)
    with pytest.raises(QueueFull):
        engine.submit(ids, target, max_tokens=4)
    engine.close()  # the waiting ones end with a reason, not silently
    assert engine.stats()["queue_depth"] == 0


def test_ignore_eos_decodes_past_the_end_of_sequence_for_its_own_request_only(tiny_base, lib):
    """vLLM's ``ignore_eos``: with the base's end-of-sequence token set to the first token
    ``law`` answers, a request asking for it decodes all its tokens — plain PEFT's greedy
    tokens with no end-of-sequence token — while the same prompt without it in the same batch
    stops at once."""
    question = QUESTIONS[1]
    plain = fresh(tiny_base, lib)
    ids = prompt_ids(plain, question)
    # no end-of-sequence token at all (one set to None in a config passed to generate is
    # filled back from the model's own)
    plain.model.generation_config.eos_token_id = None
    net = peft_model(plain, lib.get("law"), library=lib)
    with torch.no_grad():
        out = net.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(
            1, len(ids), dtype=torch.long), max_new_tokens=NEW, do_sample=False,
            pad_token_id=plain.tokenizer.pad_token_id)
    expected = out[0, len(ids):].tolist()
    assert len(expected) == NEW

    base = fresh(tiny_base, lib)
    base.model.generation_config.eos_token_id = expected[0]  # law's first token ends answers
    engine = Engine(base, lib, max_batch=4)
    target = engine.resolve("law")
    past = engine.submit(ids, target, max_tokens=NEW, ignore_eos=True)
    stops = engine.submit(ids, target, max_tokens=NEW)
    (tokens, finish, _), (stopped, why, _) = run_sync(engine, [past, stops])
    assert (tokens, finish) == (expected, "length")
    assert (stopped, why) == ([], "stop")
    engine.close()


@pytest.mark.parametrize("rows, form", [
    ([0, 1, 0, -1, 1], "gather"),  # a target's rows apart
    ([0, 0, 1, 1, -1], "views"),  # even runs in the pool's order: views, one baddbmm
    ([-1, 1, 1, 2, 2], "views"),  # target 0 unused: the stack's slice 1:3
    ([0, 0, 0, 1, -1], "gather"),  # uneven runs: padded with zero rows
    ([1, 1, 0, 0, -1], "gather"),  # even, but not in the pool's order
    ([0, -1, 2, -1, -1], "gather"),  # target 1 unused between two used ones: a zero block
    ([0, 0, 0, 0, 1, 2], "gather"),  # blocks of 12 rows for 6: at the limit
    ([0, 0, 0, 0, 0, 1, 2], "runs"),  # 15 for 7: two GEMMs per run instead
    ([2, 0, 0, 0, 0, 0, -1, 0], "runs"),
])
@pytest.mark.parametrize("tokens", [1, 3])
def test_row_lora_adds_each_rows_own_delta_by_hand(rows, form, tokens):
    """Rows on three targets of other ranks (and plain-base rows), one token each (a decode
    step) or three (a prefill): every row is ``W x`` plus its own ``s·B A x``, computed here by
    hand one row at a time, whichever form the layer takes. A second layer that only one
    target's pocket book adapts adds that one's delta to its rows alone."""
    from types import SimpleNamespace

    from adapterkit.lora.factors import Factors
    from adapterkit.serving.rows import Pool, RowLora

    torch.manual_seed(0)
    layer, other = torch.nn.Linear(6, 5, bias=True), torch.nn.Linear(6, 4, bias=False)
    slots = {"l": RowLora(layer, 6, 5), "m": RowLora(other, 6, 4)}
    books = [SimpleNamespace(factors={"l": Factors(torch.randn(r, 6), torch.randn(5, r), s)})
             for r, s in ((3, 0.5), (2, 2.0), (4, 1.0))]
    books[1].factors["m"] = Factors(torch.randn(3, 6), torch.randn(4, 3), 0.25)
    weights = (1.0, 0.5, 1.0)
    pool = Pool([[(book, w)] for book, w in zip(books, weights)])
    pool.bind(slots, rows)
    assert slots["l"].plan.form == form
    x = torch.randn(len(rows), tokens, 6)
    with torch.inference_mode():
        for path, module in (("l", layer), ("m", other)):
            got = slots[path](x)
            for i, target in enumerate(rows):
                want = module(x[i])
                f = books[target].factors.get(path) if target >= 0 else None
                if f is not None:
                    want = want + weights[target] * f.scale * (x[i] @ f.a.T @ f.b.T)
                torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match=r"need this layer's input as \d+ rows × tokens"):
            slots["l"](x.reshape(1, -1, 6))  # flattened (mixture of experts): refused
        pool.bind(slots, [-1] * len(rows))
        assert slots["l"].plan is None and torch.equal(slots["l"](x), layer(x))


@pytest.mark.parametrize("rows, form", [([0, 0, 1, 1], "views"), ([0, 1, 1, 1], "gather"),
                                        ([0, 0, 0, 0, 0, 1, 2], "runs")])
def test_row_lora_casts_between_a_bfloat16_base_and_float32_factors(rows, form):
    """A bfloat16 base with float32 factors (each form): the delta is taken in the factors'
    dtype and added in the base's, close to the float32 sum by hand."""
    from types import SimpleNamespace

    from adapterkit.lora.factors import Factors
    from adapterkit.serving.rows import Pool, RowLora

    torch.manual_seed(1)
    layer = torch.nn.Linear(8, 6).to(torch.bfloat16)
    slot = RowLora(layer, 8, 6)
    books = [SimpleNamespace(factors={"l": Factors(torch.randn(2, 8), torch.randn(6, 2), 1.0)})
             for _ in range(3)]
    Pool([[(book, 1.0)] for book in books]).bind({"l": slot}, rows)
    assert slot.plan.form == form
    x = torch.randn(len(rows), 2, 8).to(torch.bfloat16)
    with torch.inference_mode():
        got = slot(x)
        assert got.dtype == torch.bfloat16
        for i, target in enumerate(rows):
            f = books[target].factors["l"]
            want = layer(x[i]).float() + x[i].float() @ f.a.T @ f.b.T
            torch.testing.assert_close(got[i].float(), want, rtol=2e-2, atol=5e-2)


def test_rows_of_one_target_stay_adjacent_after_joins(tiny_base, lib):
    """A join sorts the batch by target, so each LoRA layer adds one slice per target."""
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_batch=8)
    first = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
             for m, q in (("code", QUESTIONS[0]), ("law", QUESTIONS[2]), ("code", QUESTIONS[3]))]
    engine.step()
    later = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
             for m, q in (("law", QUESTIONS[4]), (base.name, QUESTIONS[1]),
                          ("code", QUESTIONS[5]))]
    engine.step()
    keys = [row.identity for row in engine._rows]
    assert len(keys) == 6
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(keys)) == 3  # code, law, plain base: one run each
    got = run_sync(engine, first + later)
    models = ["code", "law", "code", "law", base.name, "code"]
    questions = [QUESTIONS[i] for i in (0, 2, 3, 4, 1, 5)]
    for model, question, (tokens, finish, _) in zip(models, questions, got):
        assert (tokens, finish) == reference(tiny_base, lib, model, question), model
    engine.close()


def test_a_listener_is_called_after_each_event_is_queued(tiny_base, lib):
    """The HTTP layer waits on a request's listener instead of a blocked thread: it must fire
    after every token and after the finish, with the event already in the queue."""
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_batch=2)
    request = engine.submit(prompt_ids(base, QUESTIONS[0]), engine.resolve("law"),
                            max_tokens=4, ignore_eos=True)
    seen: list[int] = []
    request.listen(lambda: seen.append(request.events.qsize()))
    while engine.step():
        pass
    # one call per event (4 tokens, then the finish), each after its event was queued
    assert seen == [1, 2, 3, 4, 5]
    tokens, finish, _ = drain(request, timeout=1)
    assert len(tokens) == 4 and finish == "length"
    engine.close()


def test_a_pocket_book_with_infinite_factors_cannot_spoil_another_rows_delta():
    """The gathered form pads a target's rows with zero lines; with a pocket book whose B holds
    infinities, 0·inf is NaN. Those padding products must land nowhere, least of all in
    another request's row (they used to be added to row 0)."""
    from types import SimpleNamespace

    from adapterkit.lora.factors import Factors
    from adapterkit.serving.rows import Pool, RowLora

    torch.manual_seed(2)
    layer = torch.nn.Linear(6, 5)
    slot = RowLora(layer, 6, 5)
    good = SimpleNamespace(factors={"l": Factors(torch.randn(2, 6), torch.randn(5, 2), 1.0)})
    b = torch.randn(5, 3)
    b[0, 0] = float("inf")
    bad = SimpleNamespace(factors={"l": Factors(torch.randn(3, 6), b, 1.0)})
    rows = [0, 0, 0, 1, -1]  # uneven: target 1's block is padded with two zero lines
    Pool([[(good, 1.0)], [(bad, 1.0)]]).bind({"l": slot}, rows)
    assert slot.plan.form == "gather"
    x = torch.randn(len(rows), 1, 6)
    with torch.inference_mode():
        got = slot(x)
    f = good.factors["l"]
    for i in (0, 1, 2):
        torch.testing.assert_close(got[i], layer(x[i]) + x[i] @ f.a.T @ f.b.T)
    torch.testing.assert_close(got[4], layer(x[4]))
    assert not torch.isfinite(got[3]).all()  # the bad book's own row carries its fault


def test_a_rows_failure_to_sample_fails_it_alone_and_tiny_temperatures_are_greedy(tiny_base,
                                                                                  lib,
                                                                                  tmp_path):
    """In one prefill: a request at temperature 1e-45 (which in float32 divides the logits
    into infinities) decodes greedily, as vLLM treats temperatures below 1e-5; a pocket book
    whose B holds an infinity gets non-finite logits and fails alone with that reason (an
    argmax over NaN would have answered anyway); the others answer as alone."""
    from safetensors.torch import load_file, save_file

    from adapterkit.files import sha256_file

    book = lib.import_peft(make_peft_adapter(tiny_base, tmp_path / "inf"), "infinite",
                           base=str(tiny_base))  # (import refuses such weights: planted after)
    tensors = load_file(book.path / WEIGHTS_FILE)
    b = next(name for name in sorted(tensors) if "lora_B" in name)
    tensors[b][0, 0] = float("inf")
    save_file(tensors, book.path / WEIGHTS_FILE)
    digest = sha256_file(book.path / WEIGHTS_FILE)
    lib.update_meta("infinite", lambda meta: meta.files.update({WEIGHTS_FILE: digest}))
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_batch=8)
    models = ["law", "code", base.name, "infinite"]
    temperatures = [0.0, 1e-45, 0.0, 0.0]
    requests = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW,
                              temperature=t)
                for m, q, t in zip(models, QUESTIONS, temperatures)]
    got = run_sync(engine, requests)
    assert engine.stats()["prefills_total"] == 1
    for model, question, (tokens, finish, error) in zip(models[:3], QUESTIONS, got):
        assert error is None and (tokens, finish) == reference(tiny_base, lib, model, question)
    tokens, finish, error = got[3]
    assert (tokens, finish) == ([], "error") and "not finite" in error
    engine.close()
    lib.remove("infinite", all_versions=True)


def chem_peak(lib) -> float:
    """The largest ``|s·B|`` of chem's factors, read with safetensors (a hand value)."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((lib.get("chem").path / "adapter_config.json").read_text())
    weights = load_file(lib.get("chem").path / "adapter_model.safetensors")
    peak = max(t.abs().max().item() for name, t in weights.items() if "lora_B" in name)
    return peak * cfg["lora_alpha"] / cfg["r"]


def test_a_stack_weight_its_factors_cannot_hold_is_a_400_and_fails_alone(tiny_base, lib):
    """``chem*1e300`` makes chem's scaled B infinite in float32 (checked here by hand): the
    request ends with 400 saying so, and the request beside it answers as alone."""
    base = fresh(tiny_base, lib)
    assert not torch.isfinite(torch.tensor(chem_peak(lib)) * 1e300)
    engine = Engine(base, lib, max_batch=8)
    requests = [engine.submit(prompt_ids(base, q), engine.resolve(m), max_tokens=NEW)
                for m, q in zip(["chem*1e300", "law"], QUESTIONS)]
    while engine.step():
        pass
    refused = requests[0].events.get(timeout=1)
    assert (refused.finish, refused.status) == ("error", 400) and requests[0].events.empty()
    assert "weight 1e+300 makes the largest LoRA factor of chem@1" in refused.error and "float32" in refused.error
    tokens, finish, error = drain(requests[1], timeout=1)
    assert error is None and (tokens, finish) == reference(tiny_base, lib, "law", QUESTIONS[1])
    engine.close()


def test_more_books_than_stay_attached_are_refused_up_front(tiny_base, lib):
    """A stack of more members than --max-attached is refused when named (400), not after it
    queued; a --preload of more books than stay attached is refused before the server
    listens, where it used to detach the first ones again without a word."""
    base = fresh(tiny_base, lib)
    engine = Engine(base, lib, max_attached=2)
    with pytest.raises(ConfigError, match="needs 3 pocket books attached at once"):
        engine.resolve("law+code+chem")
    with pytest.raises(ConfigError, match="--preload law,code,chem needs 3"):
        engine.preload(["law", "code", "chem"])
    assert engine.stats()["attached"] == []
    engine.preload(["law", "law+code"])  # two distinct books: they fit
    assert sorted(engine.stats()["attached"]) == ["code@1", "law@1"]
    engine.close()


def test_generation_settings_generate_applies_and_the_engine_does_not_are_named(tiny_base,
                                                                               lib):
    """The engine takes the plain argmax; a base whose generation config sets a repetition
    penalty (Qwen2.5-Instruct: 1.05) answers otherwise through `generate`. It is named, so
    that `serve` can say so, and transformers itself confirms it matters here."""
    from transformers import GenerationConfig

    base = fresh(tiny_base, lib)
    engine = Engine(base, lib)
    assert engine.unmatched == []
    engine.close()
    base.model.generation_config = GenerationConfig.from_dict(
        {**base.model.generation_config.to_dict(), "repetition_penalty": 1.3,
         "no_repeat_ngram_size": 2})
    engine = Engine(base, lib)
    assert engine.unmatched == ["repetition_penalty=1.3", "no_repeat_ngram_size=2"]
    ids = torch.tensor([prompt_ids(base, QUESTIONS[1])])
    with torch.inference_mode():
        plain = base.model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                    repetition_penalty=1.0, no_repeat_ngram_size=0)
        configured = base.model.generate(ids, max_new_tokens=NEW, do_sample=False)
    got = run_sync(engine, [engine.submit(ids[0].tolist(), engine.resolve(base.name),
                                          max_tokens=NEW)])[0][0]
    assert got == plain[0, ids.shape[1]:].tolist()[:len(got)]  # the engine: plain argmax
    assert not torch.equal(plain, configured)  # which `generate` does not give here
    engine.close()


def test_a_pocket_book_named_like_the_base_is_listed_and_reached_as_name_at_version(
        tiny_base, tmp_path):
    """`/v1/models` listed such a book under the base's id (two entries, kinds base and
    adapter), which always means the base; "BASE " (a trailing space) reached the book, or was
    a 404 without one; and "BASE+law" silently meant the book. Now every listed id means what
    it is listed as, the base id is read with the spaces every name is read without, and the
    bare base id inside a stack is refused naming the book's NAME@V."""
    from adapterkit.serving.names import PLAIN

    library = Library(tmp_path / "home")
    base = load_base(str(tiny_base), home=library.home)
    name = base.name
    engine = Engine(base, library)
    try:
        for spaced in (f"{name} ", f" {name}", f"\t{name}\n"):
            assert engine.resolve(spaced) == PLAIN, spaced  # before: a 404 naming no book
        for book, seed in (("law", 1), (name, 2)):
            library.import_peft(make_peft_adapter(tiny_base, tmp_path / book, seed=seed, r=4),
                                book, base=str(tiny_base))
        listed = [(m["id"], m["kind"]) for m in engine.models()]
        ids = [i for i, _ in listed]
        assert len(ids) == len(set(ids)), listed
        assert (name, "base") in listed and (f"{name}@1", "adapter") in listed
        for model, kind in listed:  # every listed id means what it is listed as
            target = engine.resolve(model)
            assert (target.key == "") == (kind == "base"), (model, target)
            if kind == "adapter":
                assert target.key == library.get(model).ref
        assert engine.resolve(f"{name} ") == PLAIN  # before: the pocket book
        assert engine.resolve(f"{name}@1").key == f"{name}@1"
        assert engine.resolve(f"{name}@1+law*0.5").key == f"{name}@1*1+law@1*0.5"
        for model in (f"{name}+law", f"law+{name}*0.5", f"{name}*1"):
            with pytest.raises(ConfigError, match=rf"^'{name}' in model '{re.escape(model)}' "
                                                  rf"is the base's name, which means the plain "
                                                  rf"base; the pocket book named {name} is "
                                                  rf"{name}@1: write {name}@1 in the stack$"):
                engine.resolve(model)
        library.remove(name)
        with pytest.raises(ConfigError, match=rf"^'{name}' in model '{name}\+law' is the base, "
                                              "which is under every stack already"):
            engine.resolve(f"{name}+law")
    finally:
        engine.close()


def test_removed_and_replaced_pocket_books_are_let_go_but_never_under_a_running_row(
        tiny_base, tmp_path, monkeypatch):
    """After ``rm caps`` and ``pirate@1`` re-created with other weights, the engine used to
    keep the old ones attached (memory and ``--max-attached`` room) until least-recently-used
    eviction, and ``/metrics`` listed ``adapterkit_attached_book{book="pirate@1"}`` twice (a
    duplicate series). Now a removed book is let go at the next check, a replaced one as soon
    as no running row uses it — that row answers on, with the old weights — and each series
    is unique."""
    from prometheus_client.parser import text_string_to_metric_families

    from adapterkit.serving import engine as engine_module
    from adapterkit.serving.metrics import ServerMetrics

    library = Library(tmp_path / "home")

    def make(name: str, seed: int) -> None:
        library.import_peft(make_peft_adapter(tiny_base, tmp_path / f"{name}{seed}", seed=seed,
                                              r=4, target_modules="all-linear"),
                            name, base=str(tiny_base))

    make("pirate", 11)
    make("caps", 12)
    monkeypatch.setattr(engine_module, "STALE_CHECK_S", 0.0, raising=False)  # every step checks
    base = load_base(str(tiny_base), home=library.home)
    engine = Engine(base, library, max_attached=3)
    ids = prompt_ids(base, QUESTIONS[1])
    [(alone, _, _)] = run_sync(engine, [engine.submit(ids, engine.resolve("pirate"),
                                                      max_tokens=NEW, ignore_eos=True)])
    run_sync(engine, [engine.submit(ids, engine.resolve("caps"), max_tokens=2)])
    running = engine.submit(ids, engine.resolve("pirate"), max_tokens=NEW, ignore_eos=True)
    engine.step()
    assert running.completion_tokens >= 1

    library.remove("caps")
    library.remove("pirate")
    make("pirate@1", 13)  # asked for by number (a plain name would take pirate@2)
    assert library.get("pirate").ref == "pirate@1"
    engine.step()  # caps goes at once; the old pirate@1 stays under its running row
    assert engine.stats()["attached"] == ["pirate@1"]
    new = engine.submit(ids, engine.resolve("pirate"), max_tokens=NEW, ignore_eos=True)
    engine.step()
    both = engine.stats()["attached_content"]
    assert [ref for ref, _ in both] == ["pirate@1", "pirate@1"] and both[0] != both[1]
    metrics = ServerMetrics(engine).render().decode()
    [family] = [f for f in text_string_to_metric_families(metrics)
                if f.name == "adapterkit_attached_book"]
    series = [tuple(sorted(s.labels.items())) for s in family.samples]
    assert len(series) == 2 and len(set(series)) == 2, metrics
    old_tokens, new_tokens = run_sync(engine, [running, new])
    assert old_tokens[0] == alone and len(alone) == NEW  # as it answered before
    assert new_tokens[0] != old_tokens[0]  # the new weights answer the new request
    engine.step()  # the old pirate@1's row has ended: it goes too
    assert [label for _, label in engine.stats()["attached_content"]] == [both[1][1]]
    engine.close()


def test_stack_names_read_signed_and_exponent_weights_and_say_a_missing_one():
    """``code@1*1e+30`` (how the server wrote such a weight back in ``model``) parted at its
    "+" into two terms; ``caps*`` said "weight '' is not a number"."""
    from adapterkit.library.names import weight_text
    from adapterkit.serving.names import parse

    assert parse("code@1*1e+30") == [("code@1", 1e30)]
    assert parse("a*+0.5+b*-2") == [("a", 0.5), ("b", -2.0)]
    assert parse("law2e+code") == [("law2e", None), ("code", None)]  # a name, not a weight
    assert parse("a * +0.5") == [("a", 0.5)]
    assert all(parse(f"a*{weight_text(w)}") == [("a", w)] for w in (1e30, 1e-5, 0.5, 2.0, -3e20))
    with pytest.raises(ConfigError, match=r"^'caps\*' in model 'law\+caps\*' has no weight "
                                          r"after '\*'; write NAME\*WEIGHT"):
        parse("law+caps*")

"""`adapterkit serve` over HTTP: the real server (uvicorn on a free port, the real Engine on the
tiny base) driven by the official `openai` client, checked against `Session.generate` — a
second code path that never touches the server — and every bad input answered with an
OpenAI-shaped error."""

from __future__ import annotations

import hmac
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

import adapterkit
from adapterkit.base.load import load_base
from adapterkit.library.metadata import WEIGHTS_FILE
from adapterkit.library.store import Library
from adapterkit.plugin_api.testing import make_peft_adapter, tiny_tokenizer
from adapterkit.serving.app import create_app
from adapterkit.serving.engine import Engine
from adapterkit.serving.listen import check_exposure, is_loopback, running
from adapterkit.serving.openai_io import Detokenizer, StopText

BOOKS = {"law": dict(seed=1, r=4, target_modules=["q_proj", "v_proj"]),
         "code": dict(seed=2, r=8, target_modules="all-linear"),
         "chem": dict(seed=3, r=2, target_modules=["o_proj", "down_proj"], lora_alpha=5),
         "bedside": dict(seed=4, r=4, target_modules=["q_proj", "k_proj", "gate_proj"])}
PROMPT = "The patient reports chest pain."
TOKENS = 24


def wait_for(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


@pytest.fixture(scope="module")
def served(tiny_base, other_base, tmp_path_factory):
    """One library (four pocket books of the tiny base, one of another base, one damaged), one
    engine, one server for the module."""
    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    library = Library(home)
    for name, options in BOOKS.items():
        library.import_peft(make_peft_adapter(tiny_base, root / name, **options), name,
                            base=str(tiny_base))
    library.import_peft(make_peft_adapter(other_base, root / "foreign"), "foreign",
                        base=str(other_base))
    library.import_peft(make_peft_adapter(tiny_base, root / "broken", seed=9), "broken",
                        base=str(tiny_base))
    weights = library.get("broken").path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # damaged on disk after it was saved: its checksum no longer holds
    weights.write_bytes(bytes(data))
    engine = Engine(load_base(str(tiny_base), home=home), library, max_batch=8)
    engine.start()
    try:
        with running(create_app(engine)) as url:
            yield SimpleNamespace(url=url, engine=engine, home=home, library=library,
                                  base=engine.base, tiny_base=tiny_base, root=root)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def session(served):
    """The reference: a session on its own copy of the base (never the server's)."""
    return adapterkit.open(str(served.tiny_base), home=served.home)


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def slow(tiny_base, served):
    """A second server whose engine takes ~20 ms a step, one row and one waiting request:
    room to disconnect mid-answer and to fill the queue."""
    base = load_base(str(tiny_base), home=served.home)
    base.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: time.sleep(0.02))
    engine = Engine(base, served.library, max_batch=1, max_queue=1)
    engine.start()
    try:
        with running(create_app(engine)) as url:
            yield SimpleNamespace(url=url, engine=engine,
                                  client=OpenAI(base_url=url + "/v1", api_key="unused",
                                                max_retries=0))
    finally:
        engine.close()


def chat(client: OpenAI, model: str, prompt: str = PROMPT, **options: Any) -> Any:
    options.setdefault("max_tokens", TOKENS)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **options)


def post(served: Any, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served.url + path, content=content,
                      headers={"Content-Type": "application/json"}, timeout=30, **kwargs)


def spy_requests(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    submit = engine.submit

    def spy(*args: Any, **kwargs: Any) -> Any:
        request = submit(*args, **kwargs)
        seen.append(request)
        return request

    monkeypatch.setattr(engine, "submit", spy)
    return seen


# -- the openai client against the server ----------------------------------------------------

def test_models_lists_the_base_and_every_pocket_book_of_that_base(served, client):
    ids = {m.id for m in client.models.list().data}
    assert {served.engine.base_id, *BOOKS} <= ids
    assert "foreign" not in ids  # made on another base
    assert client.models.retrieve("law").id == "law"


def test_chat_answers_come_from_the_requested_pocket_book_in_one_mixed_batch(
        served, client, session, monkeypatch):
    """Four pocket books and the plain base asked at once (one batch): each answer equals
    Session.generate of the same prompt with that pocket book, and they all differ."""
    seen = spy_requests(served.engine, monkeypatch)
    models = [served.engine.base_id, *BOOKS]
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: chat(client, m), models))
    got = {m: a.choices[0].message.content for m, a in zip(models, answers)}
    expected = {m: session.generate(PROMPT, adapter=None if m == served.engine.base_id else m,
                                    max_new_tokens=TOKENS) for m in models}
    assert {m: text.strip() for m, text in got.items()} == expected
    assert len(set(got.values())) == len(models)
    assert [a.model for a in answers] == [served.engine.base_id, *(f"{b}@1" for b in BOOKS)]
    assert len(seen) == len(models)
    for answer in answers:
        assert answer.usage.completion_tokens <= TOKENS
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + \
            answer.usage.completion_tokens


def test_completion_takes_the_prompt_raw_and_counts_usage(served, client, session):
    answer = client.completions.create(model="code", prompt=PROMPT, max_tokens=TOKENS,
                                       temperature=0)
    assert answer.choices[0].text.strip() == session.generate(
        PROMPT, adapter="code", chat=False, max_new_tokens=TOKENS)
    prompt_ids = served.base.tokenizer(PROMPT)["input_ids"]
    assert answer.usage.prompt_tokens == len(prompt_ids)
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == TOKENS


def test_stream_sends_the_same_answer_in_chunks_then_usage(served, client):
    whole = chat(client, "chem").choices[0].message.content
    stream = chat(client, "chem", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == whole and len(texts) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    completion = client.completions.create(model="chem", prompt=PROMPT, max_tokens=TOKENS,
                                           temperature=0)
    streamed = client.completions.create(model="chem", prompt=PROMPT, max_tokens=TOKENS,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_ignore_eos_reaches_the_engine_and_answers_exactly_max_tokens(served, client,
                                                                      monkeypatch):
    """vLLM's ``ignore_eos`` extension, as its client sends it (``extra_body``); the engine's
    test checks the tokens past end-of-sequence against plain PEFT."""
    seen = spy_requests(served.engine, monkeypatch)
    for model in ("law", "chem"):
        answer = chat(client, model, extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == TOKENS, model
        assert answer.choices[0].finish_reason == "length"
    chat(client, "law")
    assert [r.ignore_eos for r in seen] == [True, True, False]


def test_stack_and_version_names_answer_as_a_session_stack(client, session):
    answer = chat(client, "law*1+code*0.5")
    assert answer.model == "law@1*1+code@1*0.5"
    assert answer.choices[0].message.content.strip() == session.generate(
        PROMPT, adapter={"law": 1.0, "code": 0.5}, max_new_tokens=TOKENS)
    assert chat(client, "law@1").choices[0].message.content == \
        chat(client, "law").choices[0].message.content


def test_n_choices_each_a_row_with_its_own_seed(client, session):
    greedy = chat(client, "law", n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content.strip() for c in greedy.choices} == {
        session.generate(PROMPT, adapter="law", max_new_tokens=TOKENS)}
    assert greedy.usage.completion_tokens == 3 * chat(client, "law").usage.completion_tokens
    sampled = chat(client, "law", n=3, temperature=1.0, seed=11)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # seed + j for choice j: the choices differ
    assert chat(client, "law", temperature=1.0, seed=11).choices[0].message.content == texts[0]


def test_stop_string_is_cut_from_the_answer_and_finishes_with_stop(client):
    full = chat(client, "bedside").choices[0].message.content
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2)
                if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    cut = full[:full.index(stop)]
    answer = chat(client, "bedside", stop=stop)
    assert answer.choices[0].message.content == cut
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens <= chat(client, "bedside").usage.completion_tokens
    chunks = list(chat(client, "bedside", stop=["never there", stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_pocket_book_added_while_serving_is_servable_at_once(served, client, session):
    path = make_peft_adapter(served.tiny_base, served.root / "late", seed=21)
    served.library.import_peft(path, "late", base=str(served.tiny_base))
    assert "late" in {m.id for m in client.models.list().data}
    assert chat(client, "late").choices[0].message.content.strip() == session.generate(
        PROMPT, adapter="late", max_new_tokens=TOKENS)


# -- bad input: an OpenAI-shaped error, never a traceback, never a wrong answer ---------------

def test_unknown_model_is_404_never_the_plain_base(served, client):
    for call in (lambda: chat(client, "nosuch"),
                 lambda: client.completions.create(model="nosuch", prompt="x", max_tokens=4),
                 lambda: chat(client, "law+nosuch")):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    response = post(served, "/v1/chat/completions",
                    {"model": "nosuch", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404 and set(response.json()["error"]) == {
        "message", "type", "param", "code"}


def test_a_pocket_book_of_another_base_is_400_naming_both_fingerprints(served, client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "foreign")
    foreign = served.library.get("foreign").meta.base_fingerprint
    message = info.value.body["message"]  # type: ignore[index]
    assert served.base.fingerprint[:12] in message and foreign[:12] in message
    # the advice holds for a server: no --force here, and `chat` has none at all
    assert "a server started on its own base" in message
    assert "`adapterkit generate` or `swap` --force (without --server" in message
    assert "attach it anyway with --force" not in message


OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body", [
    b"not json",
    b'{"model": "law", "messages": [',
    b"[1, 2, 3]",
    {"messages": OK_MESSAGES},
    {"model": 5, "messages": OK_MESSAGES},
    {"model": "law", "messages": "hi"},
    {"model": "law", "messages": []},
    {"model": "law", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "law", "messages": OK_MESSAGES, "max_tokens": "5"},
    {"model": "law", "messages": OK_MESSAGES, "temperature": "hot"},
    {"model": "law", "messages": OK_MESSAGES, "temperature": 3},
    {"model": "law", "messages": OK_MESSAGES, "top_p": 0},
    {"model": "law", "messages": OK_MESSAGES, "n": True},
    {"model": "law", "messages": OK_MESSAGES, "n": 0},
    {"model": "law", "messages": OK_MESSAGES, "stop": 3},
    {"model": "law", "messages": OK_MESSAGES, "stop": ""},
    {"model": "law", "messages": OK_MESSAGES, "seed": -1},
    {"model": "law", "messages": OK_MESSAGES, "stream": "yes"},
    {"model": "law", "messages": OK_MESSAGES, "ignore_eos": "yes"},
    {"model": "law", "messages": OK_MESSAGES, "bogus": 1},
    {"model": "law*x+code", "messages": OK_MESSAGES},
    {"model": "law+law@1", "messages": OK_MESSAGES},  # one version named twice
    b"[" * 100_000 + b"]" * 100_000,  # nested past Python's recursion limit
    b'{"model": "law", "max_tokens": ' + b"9" * 5000 + b"}",  # past Python's 4300 digits
])
def test_malformed_json_and_wrong_types_are_400(served, body):
    response = post(served, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert "Traceback" not in response.text


def test_null_sampling_options_mean_the_default_as_openai_takes_them(served, client,
                                                                     monkeypatch):
    """OpenAI's API marks ``temperature``, ``top_p``, ``n`` and ``stream`` nullable: ``None``
    from the official client, or ``null`` in raw JSON, asks for the default (they were 400
    "Input should be a valid number")."""
    seen = spy_requests(served.engine, monkeypatch)
    answer = chat(client, "law", temperature=None, top_p=None, n=None, stream=None, seed=3)
    assert len(answer.choices) == 1 and answer.usage.completion_tokens > 0
    response = post(served, "/v1/completions", {"model": "law", "prompt": "x", "max_tokens": 2,
                                                "temperature": None, "top_p": None, "n": None,
                                                "stream": None, "echo": None,
                                                "suffix": None, "best_of": None})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1
    assert [(r.temperature, r.top_p) for r in seen] == [(1.0, 1.0), (1.0, 1.0)]  # the defaults


@pytest.mark.parametrize("options,param", [
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_options_it_cannot_honour_are_refused_by_name(client, options, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "law", **options)
    assert info.value.body["param"] == param  # type: ignore[index]


def test_a_participants_name_and_completions_logprobs_0_are_refused_not_dropped(client):
    """A message's ``name`` has no place in the chat template (it used to be dropped), and
    /v1/completions' ``logprobs: 0`` still asks for the chosen tokens' log-probabilities
    (it used to pass as if unset)."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="law", max_tokens=2, messages=[
            {"role": "user", "content": "hi", "name": "dana"}])
    assert "messages[].name is not supported" in info.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="law", prompt="x", max_tokens=2, logprobs=0)
    assert info.value.body["param"] == "logprobs"  # type: ignore[index]


def test_max_tokens_at_most_zero_or_above_the_cap_is_400(served, client):
    cap = served.engine.max_new_tokens_cap
    for value in (0, -1, cap + 1):
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, "law", max_tokens=value)
        assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="law", prompt="x", max_tokens=0)


def test_a_prompt_longer_than_the_context_is_400(served, client):
    context = served.engine.context_length
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="law", prompt=[5] * context, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:  # fits alone, not with its answer
        client.completions.create(model="law", prompt=[5] * (context - 10), max_tokens=20)
    assert "lower max_tokens" in info.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        chat(client, "law", prompt="chest pain " * context)
    with pytest.raises(openai.BadRequestError):  # token ids outside the vocabulary
        client.completions.create(model="law", prompt=[10**6], max_tokens=4)


def test_a_full_queue_is_429_with_retry_after(slow):
    engine, client = slow.engine, slow.client
    running_one = chat(client, "law", max_tokens=200, stream=True)
    assert wait_for(lambda: engine.stats()["batch_size"] == 1)
    waiting = chat(client, "code", max_tokens=200, stream=True)
    assert wait_for(lambda: engine.stats()["queue_depth"] == 1)
    with pytest.raises(openai.RateLimitError) as info:
        chat(client, "chem", max_tokens=4)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "queue_full"  # type: ignore[index]
    message = info.value.body["message"]  # type: ignore[index]
    assert message.count("retry") == 1, message  # once, and Retry-After says when
    running_one.close()
    waiting.close()
    assert wait_for(lambda: engine.stats()["batch_size"] == 0
                    and engine.stats()["queue_depth"] == 0)


def test_a_client_leaving_mid_stream_frees_its_row(slow, monkeypatch):
    seen = spy_requests(slow.engine, monkeypatch)
    stream = chat(slow.client, "law", max_tokens=200, stream=True)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 3:
            break
    stream.close()
    (request,) = seen
    assert wait_for(lambda: request.finish == "cancelled", timeout=5)
    assert request.completion_tokens < 100  # 200 would take 4 s at 20 ms a step
    assert wait_for(lambda: slow.engine.stats()["batch_size"] == 0)


def test_a_client_leaving_before_a_whole_answer_frees_its_row(slow, monkeypatch):
    seen = spy_requests(slow.engine, monkeypatch)
    # every token decoded (no early end-of-sequence, which sampling could draw): the answer
    # takes ~4 s, so the client surely leaves first
    body = {"model": "law", "max_tokens": 200, "messages": OK_MESSAGES, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/chat/completions", json=body, timeout=0.4)
    (request,) = seen
    assert wait_for(lambda: request.finish == "cancelled", timeout=5)
    assert request.completion_tokens < 150


def _good_beside_bad(client, session, model: str, error: type[openai.APIError]) -> dict:
    """Ask for ``model`` while a good request for ``law`` shares its prefill: the good one must
    get its own answer (what a session alone gives), the bad one ``error``, whose body comes
    back."""
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(chat, client, "law", max_tokens=48)
        bad = pool.submit(chat, client, model)
        with pytest.raises(error) as info:
            bad.result()
        assert good.result().choices[0].message.content.strip() == session.generate(
            PROMPT, adapter="law", max_new_tokens=48)
    return info.value.body  # type: ignore[return-value]


def test_a_damaged_pocket_book_fails_alone(client, session):
    body = _good_beside_bad(client, session, "broken", openai.InternalServerError)
    assert "broken@1" in body["message"]
    with pytest.raises(openai.APIError):  # streaming: an error event, then the stream ends
        list(chat(client, "broken", stream=True))
    assert chat(client, "law").choices[0].finish_reason in ("stop", "length")


def test_a_pocket_book_the_server_cannot_apply_exactly_is_400_and_fails_alone(
        served, client, session):
    """DoRA is refused when the engine loads the book (it cannot apply it exactly): that is
    the request's model, not a server fault — 400 naming why, whole or streamed — and the
    request sharing its prefill still gets its own answer."""
    served.library.import_peft(make_peft_adapter(served.tiny_base, served.root / "dora",
                                                 seed=6, use_dora=True), "dora",
                               base=str(served.tiny_base))
    body = _good_beside_bad(client, session, "dora", openai.BadRequestError)
    assert body["code"] == "model_not_servable" and "DoRA" in body["message"]
    # and it is not listed among the models this server answers with (it was), nor is a
    # saved stack that holds it
    from adapterkit.lora.combine import stack

    stack(served.library, ["dora", "law"], None, name="with-dora")
    listed = {m.id for m in client.models.list().data}
    assert "law" in listed and not {"dora", "with-dora"} & listed, listed
    with pytest.raises(openai.BadRequestError, match="DoRA"):
        chat(client, "with-dora")
    response = post(served, "/v1/completions", {"model": "dora", "prompt": "x", "stream": True,
                                                "max_tokens": 4})
    events = [json.loads(line[len("data: "):]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "model_not_servable"


def test_a_saved_stack_whose_member_was_removed_is_not_listed(served, client):
    """It was listed in /v1/models though every request for it is refused (the member is
    gone); the request still says why."""
    from adapterkit.lora.combine import stack

    served.library.import_peft(make_peft_adapter(served.tiny_base, served.root / "terse",
                                                 seed=7), "terse", base=str(served.tiny_base))
    stack(served.library, ["terse", "law"], None, name="with-terse")
    assert {"terse", "with-terse"} <= {m.id for m in client.models.list().data}
    served.library.remove("terse", force=True)
    listed = {m.id for m in client.models.list().data}
    assert "law" in listed and not {"terse", "with-terse"} & listed, listed
    with pytest.raises(openai.BadRequestError, match="with-terse@1 is a stack of terse@1, which "
                                                    "this library no longer holds"):
        chat(client, "with-terse")


def test_a_stack_weight_the_base_cannot_take_is_400_naming_it_and_fails_alone(client, session):
    """``code*1e30`` passes the factors' own overflow check but drives the base's scores to
    infinity from the first token: the request's weight, not a server fault — 400 naming it
    (it was a 500 "generation failed"), while the request sharing its prefill is answered."""
    body = _good_beside_bad(client, session, "code*1e30", openai.BadRequestError)
    assert body["type"] == "invalid_request_error" and body["param"] == "model"
    assert "code@1 at weight 1e+30" in body["message"]
    assert chat(client, "law*2").choices[0].finish_reason in ("stop", "length")


def test_a_request_for_more_completions_than_the_queue_holds_is_400_not_429(served):
    """A 429 says retry; this one never fits, so it is refused for what it is."""
    room = served.engine.max_queue
    response = post(served, "/v1/completions", {"model": "law", "prompt": ["a"] * (room + 1),
                                                "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert f"at most {room}" in response.json()["error"]["message"]
    assert served.engine.stats()["queue_depth"] == 0


def test_unknown_route_and_method_are_openai_errors(served):
    response = httpx.get(served.url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(served.url + "/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


# -- health, metrics, the library, the page ---------------------------------------------------

def test_health_metrics_and_library(served, client):
    chat(client, "law")
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(served.url + "/metrics").text
    for name in ("adapterkit_http_requests_total", "adapterkit_completion_tokens_total",
                 "adapterkit_engine_tokens_total", "adapterkit_queue_depth",
                 "adapterkit_batch_size", "adapterkit_attached_books"):
        assert name in metrics
    assert 'adapterkit_attached_book{book="law@1",content="' in metrics
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("adapterkit_engine_")}
    stats = served.engine.stats()  # the engine's own counters, read after the scrape
    assert 1 <= counts["adapterkit_engine_prefills_total"] <= stats["prefills_total"]
    assert 1 <= counts["adapterkit_engine_steps_total"] <= stats["steps_total"]
    assert counts["adapterkit_engine_errors_total"] <= stats["errors_total"]
    library = httpx.get(served.url + "/api/library").json()
    assert library["base"] == served.engine.base_id
    books = {b["name"]: b for b in library["books"]}
    assert "foreign" not in books and set(BOOKS) <= set(books)
    assert (books["law"]["rank"], books["code"]["rank"]) == (4, 8)
    assert books["law"]["id"] == "law@1" and books["law"]["kind"] == "adapter"
    assert books["law"]["forgetting"] is None  # imported: never measured here


def test_a_removed_pocket_book_leaves_metrics_and_its_room_within_seconds(served, client):
    """`adapterkit rm` while serving: the server lets go of the book (its memory, its
    --max-attached place) on its own, rather than keeping it until least-recently-used
    eviction, and /metrics stops listing it."""
    served.library.import_peft(make_peft_adapter(served.tiny_base, served.root / "brief",
                                                 seed=12), "brief", base=str(served.tiny_base))
    chat(client, "brief", max_tokens=2)

    def listed() -> bool:
        return 'book="brief@1"' in httpx.get(served.url + "/metrics").text

    assert listed()
    served.library.remove("brief")
    assert wait_for(lambda: not listed(), timeout=5)
    assert "brief@1" not in served.engine.stats()["attached"]


def test_a_loss_curve_is_only_ever_the_books_own_png(served, tmp_path):
    """Metadata names the loss curve; a pulled book's metadata could name any file. The server
    serves only the book's own loss_curve.png, a plain file inside its folder."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web", encoding="utf-8")
    library, ref = served.library, "law@1"
    for named in (str(secret), "../../../../../../../.." + str(secret), "adapter_config.json"):
        served.library.update_meta(ref, lambda meta, n=named: meta.metrics.update(loss_curve=n))
        answer = httpx.get(f"{served.url}/api/library/{ref}/loss_curve.png")
        assert answer.status_code == 404 and "not for the web" not in answer.text, named
        listed = {b["id"]: b for b in httpx.get(served.url + "/api/library").json()["books"]}
        assert listed[ref]["loss_curve_png"] is None
    png = library.get(ref).path / "loss_curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    try:
        answer = httpx.get(f"{served.url}/api/library/{ref}/loss_curve.png")
        assert answer.status_code == 200 and answer.content.endswith(b"fake")
    finally:
        png.unlink()
        served.library.update_meta(ref, lambda meta: meta.metrics.pop("loss_curve", None))


def test_a_body_that_is_not_json_typed_is_refused(served):
    """A web page can POST text/plain or a form to a local server without a CORS preflight;
    such a request is refused before it reaches the engine."""
    body = json.dumps({"model": "law", "messages": [{"role": "user", "content": "hi"}]})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": kind} if kind else {}
        answer = httpx.post(served.url + "/v1/chat/completions", content=body, headers=headers)
        assert answer.status_code == 415, (kind, answer.text)
        assert "Content-Type: application/json" in answer.json()["error"]["message"]
    ok = httpx.post(served.url + "/v1/chat/completions", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_the_page_and_its_files_are_served(served):
    static = Path(adapterkit.__file__).parent / "serving" / "static"
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and page.text == (static / "index.html").read_text()
    for path in static.iterdir():
        assert httpx.get(f"{served.url}/static/{path.name}").content == path.read_bytes()
    assert httpx.get(served.url + "/static/nothing.js").status_code == 404


# -- the key and the address ------------------------------------------------------------------

def test_api_key_is_required_and_compared_in_constant_time(served, monkeypatch, caplog):
    key = "s3cret-key-for-tests"
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    with running(create_app(served.engine, api_key=key)) as url:
        for wrong in (None, "wrong", key + "x"):
            headers = {"Authorization": f"Bearer {wrong}"} if wrong else {}
            response = httpx.get(url + "/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert key not in response.text
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/api/library").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # the page can load
        assert httpx.get(url + "/").status_code == 200
        good = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert chat(good, "law").choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            chat(OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0), "law")
    assert compared and all(b == key.encode() for _, b in compared)
    assert key not in caplog.text


def test_loopback_rule():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host)
        check_exposure(host, None, False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(adapterkit.errors.ConfigError, match="--api-key"):
            check_exposure(host, None, False)
        check_exposure(host, "key", False)
        check_exposure(host, None, True)


def test_serve_refuses_a_public_host_without_a_key_before_loading(adapterkit_cli, tmp_path):
    missing = tmp_path / "no-such-base"
    result = adapterkit_cli("serve", "--base", missing, "--host", "0.0.0.0")
    assert result.exit_code == 1
    assert "--api-key" in result.output and "no-such-base" not in result.output
    result = adapterkit_cli("serve", "--base", missing, "--host", "0.0.0.0", "--api-key", " ")
    assert result.exit_code == 1 and "must not be empty" in result.output


def test_serve_says_when_the_port_is_taken(adapterkit_cli, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = adapterkit_cli("serve", "--base", tmp_path / "none", "--port", port)
    assert result.exit_code == 1 and f"port {port}" in result.output and "--port" in result.output
    assert "Traceback" not in result.output


def serve_and_ask(adapterkit_cli, monkeypatch, tiny_base, options: tuple[Any, ...],
                  bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """``adapterkit serve OPTIONS`` on the tiny base, its app answering ``bodies`` (chat
    completions for the plain base) where it would start listening; the answers."""
    import uvicorn
    from fastapi.testclient import TestClient

    answers: list[httpx.Response] = []

    def answer_instead(self: Any, sockets: Any = None) -> None:
        with TestClient(self.config.app) as http:
            base_id = http.get("/v1/models").json()["data"][0]["id"]
            answers.extend(http.post("/v1/chat/completions", json={"model": base_id, **body})
                           for body in bodies)

    monkeypatch.setattr(uvicorn.Server, "run", answer_instead)
    result = adapterkit_cli("serve", "--base", tiny_base, "--port", 0, *options)
    assert result.exit_code == 0, result.output
    return answers


def test_serve_max_tokens_sets_the_cap_and_chats_default(adapterkit_cli, monkeypatch, tiny_base):
    """``--max-tokens`` is the most one request may ask for (above it: 400 naming the option)
    and chat's default length; without it the cap stays 2048."""
    ask = {"messages": OK_MESSAGES, "temperature": 0, "ignore_eos": True}
    above, at, unset = serve_and_ask(adapterkit_cli, monkeypatch, tiny_base, ("--max-tokens", 6),
                                     [{**ask, "max_tokens": 7}, {**ask, "max_tokens": 6}, ask])
    assert above.status_code == 400 and above.json()["error"]["param"] == "max_tokens"
    assert "cap of 6 tokens" in above.json()["error"]["message"]
    assert "--max-tokens" in above.json()["error"]["message"]
    assert at.status_code == 200, at.text
    assert at.json()["usage"]["completion_tokens"] == 6
    assert unset.status_code == 200 and unset.json()["usage"]["completion_tokens"] == 6
    [default] = serve_and_ask(adapterkit_cli, monkeypatch, tiny_base, (),
                              [{**ask, "max_tokens": 2049}])
    assert default.status_code == 400 and "cap of 2048 tokens" in default.text
    refused = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--max-tokens", 6)
    assert refused.exit_code == 1 and "--max-tokens does not apply to --engine vllm" in \
        refused.output


def test_serve_help_teaches_and_the_cli_stays_light():
    code = ("import sys\nfrom adapterkit.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'fastapi', 'uvicorn', 'openai') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in out.stderr, out.stderr
    assert "curl" in out.stdout and "from openai import OpenAI" in out.stdout
    assert "--api-key" in out.stdout and "--insecure" in out.stdout
    assert "--max-tokens" in out.stdout


# -- swap and chat through a server -----------------------------------------------------------

def test_swap_with_server_answers_every_book_at_once(served, session, adapterkit_cli):
    result = adapterkit_cli("swap", "law", "code", "--prompt", PROMPT, "--max-new-tokens",
                            TOKENS, "--server", served.url, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["plain"] == session.generate(PROMPT, adapter=None, max_new_tokens=TOKENS)
    assert {r["pocket_book"]: r["answer"] for r in out["pocket_books"]} == {
        f"{b}@1": session.generate(PROMPT, adapter=b, max_new_tokens=TOKENS)
        for b in ("law", "code")}
    text = adapterkit_cli("swap", "law", "--prompt", PROMPT, "--server", served.url + "/v1")
    assert text.exit_code == 0 and "[law@1]" in text.stdout and "[plain base]" in text.stdout
    refused = adapterkit_cli("swap", "law", "--prompt", "x", "--server", served.url, "--force")
    assert refused.exit_code == 1 and "--force" in refused.output
    keyless = adapterkit_cli("swap", "law", "--prompt", "x", "--api-key", "k")
    assert keyless.exit_code == 1 and "--server" in keyless.output
    missing = adapterkit_cli("swap", "nosuch", "--prompt", "x", "--server", served.url)
    assert missing.exit_code == 1 and "404" in missing.output and "Traceback" not in missing.output


def test_chat_with_server_streams_from_the_chosen_model(served, session, adapterkit_cli):
    lines = ["/swap law", PROMPT, "/off", "/reset", PROMPT, "/swap nosuch",
             "/stack law=1 code=0.5", "/reset", PROMPT, "/list", "/swap law", "/reset", PROMPT,
             "And then?", "/quit"]
    result = adapterkit_cli("chat", "--server", served.url, "--max-new-tokens", TOKENS,
                            input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    for adapter in ("law", None, {"law": 1.0, "code": 0.5}):
        assert session.generate(PROMPT, adapter=adapter, max_new_tokens=TOKENS) in result.stdout
    # the last message goes with the conversation so far, as a chat client sends it: the first
    # answer as the client received it (streamed text: a random model's bytes may decode
    # otherwise than generate's whole-sequence decode), the second as the session answers it
    from adapterkit.serving.client import ServerClient

    first = "".join(text for text, _ in ServerClient(served.url).stream_chat(
        "law", PROMPT, max_tokens=TOKENS))
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And then?"}]
    assert session.generate([conversation], adapter="law", max_new_tokens=TOKENS)[0] \
        in result.stdout
    assert "now answering with law@1" in result.stdout
    assert "law@1*1+code@1*0.5" in result.stdout
    assert "Error:" in result.output and "nosuch" in result.output
    unreachable = adapterkit_cli("chat", "--server", "http://127.0.0.1:9", input="/quit\n")
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.output


def test_chat_with_server_drops_the_oldest_turns_its_context_cannot_hold(served, adapterkit_cli):
    """Before: a conversation past the server's context was refused (400 ``context_length
    _exceeded``) and the user told to /reset, where a local chat drops the oldest turns. The
    first message leaves exactly the room asked for; the second cannot fit beside it."""
    from adapterkit.serving.client import ServerClient

    ids = served.base.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    room = served.base.model.config.max_position_embeddings - len(ids)
    result = adapterkit_cli("chat", "--server", served.url, "--max-new-tokens", str(room),
                            input=f"{PROMPT}\nAnd then?\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "Error:" not in result.output
    assert result.output.count("(the oldest 2 turns were dropped to leave room for the answer") == 1
    alone = "".join(text for text, _ in ServerClient(served.url).stream_chat(
        served.engine.base_id, "And then?", max_tokens=room))
    assert alone and alone in result.stdout


def test_chat_with_server_keeps_the_conversation_when_even_dropping_turns_cannot_help(
        served, adapterkit_cli):
    """A message too long for the context on its own: the oldest turns were dropped one by
    one and then the request failed anyway, the whole conversation gone. Now nothing is
    dropped for a request that fails; the next message goes with the earlier turns."""
    from adapterkit.serving.client import ServerClient

    first = "".join(text for text, _ in ServerClient(served.url).stream_chat(
        "law", PROMPT, max_tokens=TOKENS))
    result = adapterkit_cli("chat", "--server", served.url, "--adapter", "law",
                            "--max-new-tokens", TOKENS,
                            input=f"{PROMPT}\n{'word ' * 400}\nShort?\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "Error:" in result.output and "context" in result.output
    assert "turns were dropped" not in result.output
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "Short?"}]
    third = "".join(text for text, _ in ServerClient(served.url).stream_chat(
        "law", conversation, max_tokens=TOKENS))
    assert third and third in result.stdout


# -- the text side, unit by unit ---------------------------------------------------------------

def test_detokenizer_streams_characters_split_over_tokens():
    tokenizer = tiny_tokenizer()
    text = "naïve 🎉🎉 — wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: some characters span several tokens
    detok = Detokenizer(tokenizer, tokenizer("Hi", add_special_tokens=False)["input_ids"])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a token that ends mid-character waits for the next one


def test_stop_text_holds_back_what_could_become_a_stop_string():
    stop = StopText(["END", "xyz"])
    assert stop.feed("hello E") == "hello "  # "E" may start "END"
    assert stop.feed("x") == "E"  # "E" cannot start "END" now; "x" may start "xyz"
    stop = StopText(["END"])
    assert [stop.feed(c) for c in "ab EN"] == ["a", "b", " ", "", ""]
    assert stop.feed("D and more") == "" and stop.stopped
    assert stop.text == "ab "
    loose = StopText(["END"])
    assert loose.feed("ab EN") == "ab " and loose.feed("d") == "ENd" and not loose.stopped
    assert StopText([]).feed("anything") == "anything"
    tail = StopText(["END"])
    assert tail.feed("ab EN") == "ab " and tail.flush() == "EN"


def test_concurrent_streams_each_get_their_own_answer(client, session):
    """Many streams at once over the books: none receives another's tokens."""
    models = list(BOOKS) * 3
    lock = threading.Lock()
    got: dict[int, str] = {}

    def one(i: int) -> None:
        text = "".join(c.choices[0].delta.content or "" for c in
                       chat(client, models[i], stream=True) if c.choices)
        with lock:
            got[i] = text

    with ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(one, range(len(models))))
    expected = {b: session.generate(PROMPT, adapter=b, max_new_tokens=TOKENS) for b in BOOKS}
    assert all(got[i].strip() == expected[m] for i, m in enumerate(models))


def test_a_wrong_body_names_each_field_once(served):
    response = post(served, "/v1/chat/completions",
                    {"model": "law", "messages": OK_MESSAGES, "stop": 3, "max_tokens": "5",
                     "bogus": 1})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "max_tokens"
    assert error["message"] == ("'max_tokens': Input should be a valid integer; "
                                "'stop' must be a string or a list of strings; "
                                "unrecognized request argument 'bogus'")


def test_a_model_entry_is_dated_by_its_pocket_books_never_by_the_request(served, client):
    """`GET /v1/models/NAME@V` (and an inline stack) says when its newest pocket book was made;
    it used to give the time of the request."""
    from datetime import datetime

    def made(name: str) -> int:
        stamp = served.library.get(name).meta.created
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())

    assert client.models.retrieve("law@1").created == made("law")
    assert client.models.retrieve("law*1+chem*0.5").created == max(made("law"), made("chem"))


def test_metrics_count_answers_delivered_and_500s(served, client, monkeypatch):
    """Prompt tokens count answers delivered (a failed one's never did reach a client), and
    an unhandled error's 500 is counted (Starlette answers it outside the counting layer)."""
    def scrape() -> dict[str, float]:
        text = httpx.get(served.url + "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    before = scrape()
    with pytest.raises(openai.InternalServerError):
        chat(client, "broken")
    with pytest.raises(openai.APIError):  # streamed: an error event, then the end
        list(chat(client, "broken", stream=True))
    assert scrape()["adapterkit_prompt_tokens_total"] == before["adapterkit_prompt_tokens_total"]
    answer = chat(client, "law", max_tokens=3)
    after = scrape()
    assert after["adapterkit_prompt_tokens_total"] - before["adapterkit_prompt_tokens_total"] \
        == answer.usage.prompt_tokens
    monkeypatch.setattr(served.engine, "models", lambda: 1 / 0)
    assert httpx.get(served.url + "/v1/models").status_code == 500
    key = 'adapterkit_http_requests_total{endpoint="/v1/models",status="500"}'
    assert scrape().get(key) == before.get(key, 0.0) + 1


@pytest.mark.parametrize("weight", [0.1234567, 1e20, 1e-7, 2.0, -0.5])
def test_chat_server_stack_weights_reach_the_server_exactly(weight):
    """`chat --server`'s /stack writes each weight so the server's parser reads it back
    exactly: `:g` kept six digits (0.1234567 → 0.123457), and 1e+20's `+` split the stack."""
    from adapterkit.library.names import weight_text
    from adapterkit.serving.names import parse

    assert parse(f"law*{weight_text(weight)}+chem") == [("law", weight), ("chem", None)]


def test_serve_dtype_sets_the_resident_bases_number_format(adapterkit_cli, monkeypatch,
                                                           tiny_base):
    """``--dtype bfloat16`` loads the served base's weights in bfloat16 (the default on a CPU
    is float32), the loading line says so, and the server still answers; vLLM is refused it."""
    import torch
    import uvicorn
    from fastapi.testclient import TestClient

    seen: dict[str, Any] = {}

    def answer_instead(self: Any, sockets: Any = None) -> None:
        engine = self.config.app.state.engine
        seen["dtypes"] = {p.dtype for p in engine.model.parameters()}
        with TestClient(self.config.app) as http:
            base_id = http.get("/v1/models").json()["data"][0]["id"]
            seen["answer"] = http.post("/v1/chat/completions", json={
                "model": base_id, "messages": OK_MESSAGES, "temperature": 0, "max_tokens": 3,
                "ignore_eos": True})

    monkeypatch.setattr(uvicorn.Server, "run", answer_instead)
    result = adapterkit_cli("serve", "--base", tiny_base, "--port", 0, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "in bfloat16 (--dtype)" in result.output
    assert seen["dtypes"] == {torch.bfloat16}
    assert seen["answer"].status_code == 200, seen["answer"].text
    assert seen["answer"].json()["usage"]["completion_tokens"] == 3
    result = adapterkit_cli("serve", "--base", tiny_base, "--port", 0)
    assert result.exit_code == 0, result.output
    assert seen["dtypes"] == {torch.float32}
    refused = adapterkit_cli("serve", "--engine", "vllm", "--base", tiny_base, "--dtype",
                             "float32")
    assert refused.exit_code == 1 and "--dtype" in refused.output
    assert "Traceback" not in refused.output

"""Answering one completion request: the body checked and turned into prompt tokens and a
target, one engine request per choice, and the engine's token events turned back into OpenAI's
answer — one JSON body, or server-sent events (sse-starlette) in OpenAI's chunk format.

Everything is checked before anything is queued. Text is detokenized incrementally and cut at
stop strings here (:mod:`adapterkit.serving.openai_io`); the engine sees only tokens. The
engine decodes in its own thread and hands tokens over in thread-safe queues, waking the event
loop for each (a request's listener): nothing here blocks on them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from adapterkit.errors import ConfigError, InexactAdapter, QueueFull
from adapterkit.serving.metrics import ServerMetrics
from adapterkit.serving.openai_io import (
    APIError,
    ChatRequest,
    Detokenizer,
    StopText,
    from_validation,
    queue_full,
)
from adapterkit.serving.requests import DEFAULT_MAX_TOKENS

__all__ = ["Answers"]

log = logging.getLogger("adapterkit.serve")

#: Completion length when a /v1/completions request names none (OpenAI's default).
DEFAULT_COMPLETION_TOKENS = 16


@dataclass
class _Job:
    """A checked request, ready to submit: prompts as token ids, the target, the limits."""

    body: Any
    chat: bool
    model: str
    target: Any
    prompts: list[list[int]]
    max_tokens: int
    stops: list[str]
    include_usage: bool


@dataclass
class _Choice:
    """One choice of the answer: one engine request, its text so far and how it ended."""

    index: int
    request: Any
    detok: Detokenizer
    stop: StopText
    tokens: int = 0
    finish: str | None = None
    error: str | None = None
    #: The HTTP status of an error: 400 for a pocket book that cannot be served as asked.
    status: int = 500
    text: list[str] = field(default_factory=list)
    #: Set (on the event loop) whenever the decode thread queues an event for this choice.
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Answers:
    """Turns bodies into engine requests and their events into OpenAI answers."""

    def __init__(self, engine: Any, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def answer(self, request: Request, model_cls: type[BaseModel], *,
                     chat: bool) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a form or text/plain POST from some web page (no
            # CORS preflight for those) must not drive a server that has no key
            raise APIError(415, "send the body as JSON with Content-Type: application/json "
                           f"(got {kind or 'none'})", code="unsupported_media_type")
        try:
            raw = await request.json()
        except (ValueError, RecursionError) as exc:  # ValueError: JSON's and UTF-8's errors,
            # and an integer past Python's 4300 digits; RecursionError: nesting too deep
            why = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise APIError(400, f"the body is not valid JSON: {why}", code="invalid_json") \
                from None
        try:
            body: Any = model_cls.model_validate(raw)
        except ValidationError as exc:
            raise from_validation(exc) from None
        job = await run_in_threadpool(self._prepare, body, chat)
        choices = await run_in_threadpool(self._submit, job, asyncio.get_running_loop())
        if body.stream:
            return EventSourceResponse(self._stream(job, choices), sep="\n", ping=15)
        return await self._whole(request, job, choices)

    # -- before anything is queued: every check ------------------------------------------------

    def _prepare(self, body: Any, chat: bool) -> _Job:
        body.refuse_unsupported()
        stops, include_usage = body.stops(), body.include_usage()
        engine = self.engine
        try:
            target = engine.resolve(body.model)
        except InexactAdapter as exc:  # (e.g. trained on a base quantized otherwise)
            raise APIError(400, str(exc), code="model_not_servable", param="model") from None
        prompts = [self._chat_ids(body)] if chat else [self._text_ids(p) for p in body.prompts()]
        cap = int(getattr(engine, "max_new_tokens_cap", DEFAULT_MAX_TOKENS))
        context = int(engine.context_length)
        asked = body.token_limit() if chat else body.max_tokens
        param = "max_completion_tokens" if chat and body.max_completion_tokens is not None \
            else "max_tokens"
        if asked is not None and asked < 1:
            raise APIError(400, f"{param} must be at least 1, got {asked}", param=param)
        if asked is not None and asked > cap:
            raise APIError(400, f"{param} {asked} is above this server's cap of {cap} tokens "
                           "(serve --max-tokens); ask for fewer", param=param)
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise APIError(400, f"the prompt is {longest} tokens but this base's context is "
                           f"{context} tokens (prompt and completion together); shorten it",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if asked is not None and longest + asked > context:
            raise APIError(400, f"this base's context is {context} tokens; the prompt is "
                           f"{longest} and {param} asks for {asked}: lower {param} to at most "
                           f"{context - longest}", param=param, code="context_length_exceeded")
        room = context - longest
        max_tokens = asked if asked is not None else min(
            room, cap, cap if chat else DEFAULT_COMPLETION_TOKENS)
        return _Job(body, chat, target.key or engine.base_id, target, prompts, max_tokens,
                    stops, include_usage)

    def _chat_ids(self, body: ChatRequest) -> list[int]:
        """The messages as the base's chat template renders them, as ``adapterkit generate``
        does: a base without a template gets the contents joined (what sessions do too)."""
        from adapterkit.runtime.generation import render_prompt, uses_chat

        tokenizer = self.engine.tokenizer
        templated = uses_chat(tokenizer, None)
        messages = [m.plain() for m in body.messages]
        try:
            text = render_prompt(tokenizer, messages, chat=templated)
        except Exception as exc:  # jinja's own errors: the template refused these messages
            raise APIError(400, f"this base's chat template cannot render these messages: {exc}",
                           param="messages") from None
        ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if not ids:
            raise APIError(400, "the messages are empty", param="messages")
        return ids

    def _text_ids(self, prompt: str | list[int]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            vocab = len(tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token ids {bad[:5]} are outside this base's vocabulary "
                               f"(0..{vocab - 1})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def _submit(self, job: _Job, loop: asyncio.AbstractEventLoop) -> list[_Choice]:
        """One engine request per choice (index = prompt × n + j; seed + j for choice j, so
        the n choices differ and the first equals a request with ``seed`` alone), each
        waking ``loop`` when it has events."""
        body, choices = job.body, []
        wanted = len(job.prompts) * body.n
        if wanted > self.engine.max_queue:  # a 429 would send it back to retry for ever
            raise APIError(400, f"this request asks for {wanted} completions (prompts × n); "
                           f"this server queues at most {self.engine.max_queue} at once "
                           "(--max-queue): send fewer per request", param="n")
        try:
            for i, ids in enumerate(job.prompts):
                for j in range(body.n):
                    seed = None if body.seed is None else body.seed + j
                    request = self.engine.submit(ids, job.target, max_tokens=job.max_tokens,
                                                 temperature=body.temperature, top_p=body.top_p,
                                                 seed=seed, ignore_eos=body.ignore_eos)
                    choice = _Choice(i * body.n + j, request,
                                     Detokenizer(self.engine.tokenizer, ids),
                                     StopText(job.stops))
                    request.listen(functools.partial(_wake, loop, choice.ready))
                    choices.append(choice)
        except BaseException as exc:
            for choice in choices:
                choice.request.cancel()
            if isinstance(exc, QueueFull):
                raise queue_full(exc) from None
            if isinstance(exc, ConfigError):  # the engine's own checks of the arguments
                raise APIError(400, str(exc)) from None
            raise
        return choices

    # -- reading the engine's events -------------------------------------------------------------

    async def _events(self, choice: _Choice) -> list[Any]:
        """The choice's next events (at least one). The decode thread wakes this loop through
        the request's listener (one ``call_soon_threadsafe`` per event): no thread of ours
        blocks on the queue, however many streams wait, and a reader that is cancelled (its
        client left) simply stops waiting."""
        events = choice.request.events
        while True:
            choice.ready.clear()  # before reading: an event queued after it sets it again
            out = []
            while True:
                try:
                    out.append(events.get_nowait())
                except queue.Empty:
                    break
            if out:
                return out
            await choice.ready.wait()

    async def _run(self, choice: _Choice, emit: Callable[[str], Awaitable[None]]) -> None:
        """Read one choice to its end, emitting its text as it becomes final."""
        try:
            while choice.finish is None:
                for event in await self._events(choice):
                    if event.token is not None:
                        choice.tokens += 1
                        text = choice.stop.feed(choice.detok.add(event.token))
                        if text:
                            await emit(text)
                        if choice.stop.stopped:
                            choice.request.cancel()  # its row is free at the next step
                            choice.finish = "stop"
                            return
                    if event.finish is not None:
                        await self._end(choice, event, emit)
                        return
        except asyncio.CancelledError:
            choice.request.cancel()
            raise

    async def _end(self, choice: _Choice, event: Any,
                   emit: Callable[[str], Awaitable[None]]) -> None:
        if event.finish == "error":
            choice.finish, choice.error = "error", event.error or "the request failed"
            choice.status = event.status
            return
        tail = choice.stop.feed(choice.detok.flush())
        tail += choice.stop.flush()
        if tail:
            await emit(tail)
        # eos → "stop", the token limit → "length"; "cancelled" only reaches a client that left
        choice.finish = "stop" if choice.stop.stopped else event.finish

    def _usage(self, job: _Job, choices: list[_Choice]) -> dict[str, int]:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def _whole(self, request: Request, job: _Job, choices: list[_Choice]) -> Response:
        """Wait for every choice; a client that leaves meanwhile frees the rows at once."""

        def collect(choice: _Choice) -> Callable[[str], Awaitable[None]]:
            async def emit(text: str) -> None:
                choice.text.append(text)
            return emit

        work = asyncio.gather(*(self._run(c, collect(c)) for c in choices))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    work.cancel()
                    return Response(status_code=499)
            work.result()
        finally:
            for choice in choices:
                if choice.finish is None:
                    choice.request.cancel()
        failed = [c for c in choices if c.finish == "error"]
        if failed:
            raise _failed(failed[0])
        self._count(job, choices)
        return JSONResponse(self._whole_body(job, choices))

    def _count(self, job: _Job, choices: list[_Choice]) -> None:
        """An answer delivered: its tokens go into ``/metrics`` (a failed or abandoned one's
        never do)."""
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        self.metrics.completion_tokens.inc(sum(c.tokens for c in choices))

    def _whole_body(self, job: _Job, choices: list[_Choice]) -> dict[str, Any]:
        if job.chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": None, "finish_reason": c.finish} for c in choices]
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            out = [{"index": c.index, "text": "".join(c.text), "logprobs": None,
                    "finish_reason": c.finish} for c in choices]
            kind, prefix = "text_completion", "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": job.model, "system_fingerprint": None,
                "choices": out, "usage": self._usage(job, choices)}

    async def _stream(self, job: _Job, choices: list[_Choice]) -> AsyncIterator[dict[str, str]]:
        """Server-sent events: OpenAI chunks as each choice's text becomes final, its
        finish_reason, usage if asked, then ``[DONE]``. Leaving early cancels every choice."""
        ident = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion.chunk" if job.chat else "text_completion"
        pieces: asyncio.Queue[tuple[_Choice, str | None]] = asyncio.Queue()

        def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> dict[str, str]:
            return {"data": json.dumps({"id": ident, "object": kind, "created": created,
                                        "model": job.model, "system_fingerprint": None,
                                        "choices": choice_list, **extra})}

        def piece(choice: _Choice, text: str | None, finish: str | None = None) -> dict[str, Any]:
            if job.chat:
                delta = {} if text is None else {"content": text}
                return {"index": choice.index, "delta": delta, "logprobs": None,
                        "finish_reason": finish}
            return {"index": choice.index, "text": text or "", "logprobs": None,
                    "finish_reason": finish}

        async def run(choice: _Choice) -> None:
            async def emit(text: str) -> None:
                await pieces.put((choice, text))
            try:
                await self._run(choice, emit)
            except Exception as exc:  # our bug: this choice fails, the others go on
                log.exception("internal error streaming a choice")
                choice.finish, choice.error = "error", f"internal error ({type(exc).__name__})"
            await pieces.put((choice, None))

        tasks = [asyncio.create_task(run(c)) for c in choices]
        try:
            if job.chat:  # the role comes first, as OpenAI sends it
                for c in choices:
                    yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            open_choices = len(choices)
            while open_choices:
                choice, text = await pieces.get()
                if text is not None:
                    yield chunk([piece(choice, text)])
                    continue
                open_choices -= 1
                if choice.finish == "error":
                    yield {"data": json.dumps(_failed(choice).body())}
                else:
                    yield chunk([piece(choice, None, choice.finish)])
            if not any(c.finish == "error" for c in choices):  # as a whole answer's failure
                self._count(job, choices)
            if job.include_usage:
                yield chunk([], usage=self._usage(job, choices))
            yield {"data": "[DONE]"}
        finally:
            for task in tasks:
                task.cancel()
            for choice in choices:
                if choice.finish is None:
                    choice.request.cancel()


def _failed(choice: _Choice) -> APIError:
    """The error a failed choice answers with: 400 where the model asked for cannot be served
    as asked (the engine found out while loading it), else 500."""
    if choice.status == 400:
        return APIError(400, f"{choice.error}", code="model_not_servable", param="model")
    return APIError(500, f"generation failed: {choice.error}", type="server_error",
                    code="generation_failed")


def _wake(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
    """Set ``ready`` on ``loop`` (called from the decode thread); nothing once the loop has
    closed (the server is shutting down)."""
    try:
        loop.call_soon_threadsafe(ready.set)
    except RuntimeError:
        pass

"""One request to the engine: its arguments checked, the events it gets back, its sampling.

What the HTTP layer hands the engine and reads back; the engine's decode thread is the only
writer of a request's events (:meth:`Request.send` and :meth:`Request.end`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.serving.names import Target


@dataclass
class Event:
    """One item of a request's event queue: a new token, or (last, exactly once) how it ended.

    ``finish`` is ``"stop"`` (the base's end-of-sequence token, which is not sent as a token),
    ``"length"`` (``max_tokens`` or the context length reached), ``"cancelled"`` or ``"error"``
    (``error`` says why in one line: a pocket book that cannot be loaded, the server closing;
    ``status`` is the HTTP status it answers with: 400 where the request asked for what cannot
    be served, 500 where the server failed).
    """

    token: int | None = None
    finish: str | None = None
    error: str | None = None
    status: int = 500


#: The most tokens one request may ask for unless the server says otherwise (``serve
#: --max-tokens``); also chat's default length where the context leaves more room.
DEFAULT_MAX_TOKENS = 2048

#: Temperatures below this decode greedily, as vLLM does (its ``_SAMPLING_EPS``): dividing the
#: logits by them would overflow to infinities, whose softmax is not a distribution.
GREEDY_BELOW = 1e-5


class Request:
    """A submitted request: read :attr:`events` until the finish event; :meth:`cancel` at will."""

    def __init__(self, prompt_ids: list[int], target: Target, *, max_tokens: int,
                 temperature: float, top_p: float, seed: int | None,
                 wake: Callable[[], None], ignore_eos: bool = False) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.prompt_ids = list(prompt_ids)
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.target = target
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.ignore_eos = ignore_eos
        #: ``time.monotonic()`` when submitted, at its first token, when finished.
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        #: How it ended, once it has (the finish event's ``finish``).
        self.finish: str | None = None
        #: Its own random stream when it samples (set when it is prefilled).
        self.generator: Any = None
        self._cancelled = threading.Event()
        self._wake = wake
        #: Called (from the decode thread) after each event is queued; see :meth:`listen`.
        self._listener: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop this request (thread-safe); its batch row is freed before the next step."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the decode thread after each event is queued, so a reader
        can wait without a thread of its own blocked on :attr:`events` (the HTTP layer
        wakes its event loop with it). Events queued before this call are in :attr:`events`
        already: read them after setting the listener."""
        self._listener = callback

    def send(self, token: int) -> None:
        """Deliver one new token (the decode thread only)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += 1
        self._deliver(Event(token=token))

    def end(self, finish: str, error: str | None = None, *, status: int = 500) -> None:
        """Deliver the finish event, once (later calls change nothing)."""
        if self.finish is not None:
            return
        self.finish, self.finished_at = finish, time.monotonic()
        self._deliver(Event(finish=finish, error=error, status=status))

    def _deliver(self, event: Event) -> None:
        """Queue ``event``, then tell the listener (so it always finds the event there)."""
        self.events.put(event)
        if self._listener is not None:
            self._listener()

    def seed_generator(self, device: Any) -> None:
        """A sampling request's own generator on ``device``: seeded, it draws the same tokens
        whatever else shares the batch."""
        if self.temperature < GREEDY_BELOW:
            return
        import torch

        self.generator = torch.Generator(device=device)
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)


def sample(logits: Any, requests: Sequence[Request]) -> tuple[list[int], dict[int, str]]:
    """One token per row of ``logits`` (rows × vocabulary, float): the argmax where the
    request's temperature is 0 (as ``generate`` decodes greedily; below
    :data:`GREEDY_BELOW` too), else nucleus sampling (``top_p``) at its temperature from its
    own generator. Rows whose logits are not all finite (a pocket book's weights, or a stack's
    weight, too large for the base's dtype) get no token: their index maps to the reason, so
    that only their requests fail — an argmax over NaN would answer with a token anyway."""
    import torch

    tokens = logits.argmax(-1)
    finite = torch.isfinite(logits).all(-1).tolist()
    failed = {i: "the model's next-token scores are not finite numbers (NaN or infinity): "
                 "this pocket book's weights, or a stack's weights, are too large for the "
                 "base's number format" for i, ok in enumerate(finite) if not ok}
    for i, request in enumerate(requests):
        if request.temperature < GREEDY_BELOW or i in failed:
            continue
        probs = torch.softmax(logits[i] / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= request.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        tokens[i] = torch.multinomial(probs, 1, generator=request.generator)[0]
    return [int(t) for t in tokens.tolist()], failed


def check_request(prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
                  seed: int | None, *, context: int, cap: int, vocab: int) -> None:
    """Every argument problem at once, as one :class:`ConfigError`."""
    problems = []
    if not isinstance(prompt_ids, list) or not prompt_ids or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
            for t in prompt_ids):
        problems.append(f"the prompt must be a non-empty list of token ids below {vocab}")
    elif len(prompt_ids) >= context:
        problems.append(f"the prompt is {len(prompt_ids)} tokens; this base's context holds "
                        f"{context} tokens, prompt and answer together")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) \
            or not 1 <= max_tokens <= cap:
        problems.append(f"max_tokens must be an integer from 1 to {cap}, got {max_tokens!r}")
    if not _finite(temperature) or temperature < 0:
        problems.append(f"temperature must be a number ≥ 0, got {temperature!r}")
    if not _finite(top_p) or not 0 < top_p <= 1:
        problems.append(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)

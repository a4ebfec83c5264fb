"""The OpenAI wire format: request bodies checked field by field, errors in OpenAI's shape, and
the text side of an answer — incremental detokenization and stop strings.

Pure Python (pydantic, no torch, no web framework), so every rule here is unit-tested without a
server. Bodies are validated strictly: ``"5"`` is not a number, ``true`` is not a count, and a
field adapterkit cannot honour (``logprobs``, ``tools``, penalties...) is refused by name rather
than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from adapterkit.errors import (
    AdapterkitError,
    BaseMismatch,
    ConfigError,
    InexactAdapter,
    InvalidName,
    PocketBookNotFound,
)

__all__ = ["APIError", "ChatRequest", "CompletionRequest", "Detokenizer", "StopText",
           "error_body", "from_exception", "from_validation", "queue_full", "MAX_N", "MAX_STOPS",
           "RETRY_AFTER_S"]

#: Most choices one request may ask for (each is a row of the batch).
MAX_N = 16
#: Most stop strings, as OpenAI allows.
MAX_STOPS = 4


class APIError(Exception):
    """An answer that is an OpenAI-shaped error: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


#: Seconds a client is told to wait after a 429.
RETRY_AFTER_S = 1


def queue_full(exc: Exception) -> APIError:
    """429 with ``Retry-After``: the engine's queue of waiting requests is full."""
    # the engine's message already says to retry; ``Retry-After`` says when
    return APIError(429, str(exc) or "the server queue is full; retry in a moment",
                    type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON OpenAI's API (and its Python client) uses for every error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_exception(exc: AdapterkitError) -> APIError:
    """The HTTP answer for one of adapterkit's own errors: an unknown pocket book is 404 (never
    an answer from the plain base), a pocket book of another base or a bad name is 400."""
    if isinstance(exc, PocketBookNotFound):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, BaseMismatch):
        return APIError(400, str(exc), param="model", code="base_mismatch")
    if isinstance(exc, (InvalidName, ConfigError)):
        return APIError(400, str(exc), param="model", code="invalid_model")
    if isinstance(exc, InexactAdapter):  # a sound pocket book this server cannot answer with
        return APIError(400, str(exc), param="model", code="model_not_servable")
    return APIError(400, str(exc), code=type(exc).__name__)


#: What a field of several accepted shapes takes, said once instead of once per shape.
_SHAPES = {"stop": "a string or a list of strings",
           "prompt": "a string, a list of strings, a list of token ids or a list of those",
           "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


def from_validation(exc: ValidationError | Any) -> APIError:
    """One 400 naming every field that is wrong (pydantic's errors, or FastAPI's)."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    problems, first = [], None
    for err in errors:
        # a union reports each of its arms; the field itself is what the user wrote
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_name(str(p))]
        where = ".".join(loc)
        kind = err.get("type", "")
        if kind == "json_invalid":
            problems.append("the body is not valid JSON")
        elif not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
            problems.append("the body must be a JSON object")
        elif kind == "extra_forbidden":
            problems.append(f"unrecognized request argument {where!r}")
        elif kind == "missing":
            problems.append(f"{where!r} is required")
        elif loc and _shape_of(loc) and kind.endswith("_type"):
            head = ".".join(loc[:_shape_index(loc) + 1])
            problems.append(f"{head!r} must be {_shape_of(loc)}")
        else:
            problems.append(f"{where!r}: {err.get('msg', 'invalid')}" if where
                            else str(err.get("msg", "invalid body")))
        first = first or (loc[0] if loc else None)
    unique = list(dict.fromkeys(problems)) or ["the request body is not what this endpoint takes"]
    return APIError(400, "; ".join(unique), param=first, code="invalid_request")


def _shape_index(loc: list[str]) -> int:
    return next((i for i, part in enumerate(loc) if part in _SHAPES), -1)


def _shape_of(loc: list[str]) -> str | None:
    i = _shape_index(loc)
    return _SHAPES[loc[i]] if i >= 0 else None


def _is_type_name(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict", "none"} or \
        part.startswith(("list[", "function-", "literal[", "constrained-", "json-or-python["))


# -- request bodies ---------------------------------------------------------------------------

class _Body(BaseModel):
    """Strict: no string-to-number coercion, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63 - MAX_N)
    stream: bool = False
    #: vLLM's extension (the ``openai`` client sends it as ``extra_body={"ignore_eos": True}``):
    #: decode past the end-of-sequence token up to ``max_tokens``, so that a benchmark's
    #: requests all do the same work whatever the pocket book answers
    ignore_eos: bool = False
    stream_options: dict[str, Any] | None = None
    #: an end-user id for abuse tracking; adapterkit keeps no such record, so it is accepted
    #: and has nothing to act on
    user: str | None = None
    # OpenAI fields adapterkit cannot honour: refused in `refuse_unsupported` when set
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's API marks these nullable: ``null`` (the ``openai`` client's ``None``)
        means the default, as leaving the field out does."""
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    def stops(self) -> list[str]:
        """Stop strings as a list; empty strings are refused (they would stop at once)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}",
                           param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops

    def include_usage(self) -> bool:
        options = self.stream_options or {}
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise APIError(400, f"unknown stream_options {sorted(unknown)}; only include_usage",
                           param="stream_options")
        if not self.stream and options:
            raise APIError(400, "stream_options is only allowed with stream: true",
                           param="stream_options")
        value = options.get("include_usage", False)
        if not isinstance(value, bool):
            raise APIError(400, "stream_options.include_usage must be true or false",
                           param="stream_options")
        return value

    def refuse_unsupported(self) -> None:
        """An option that is accepted acts: the ones this server cannot honour say so."""
        unsupported = {
            "frequency_penalty": self.frequency_penalty not in (None, 0, 0.0),
            "presence_penalty": self.presence_penalty not in (None, 0, 0.0),
            "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs not in (None, False),
        }
        for field, is_set in unsupported.items():
            if is_set:
                raise APIError(400, f"{field} is not supported by adapterkit serve; leave it out",
                               param=field, code="unsupported_parameter")


class CompletionRequest(_Body):
    """``POST /v1/completions``: a raw prompt, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        # here logprobs is a count of alternatives, and 0 still asks for the chosen tokens'
        for field, is_set in {"echo": bool(self.echo), "suffix": self.suffix is not None,
                              "best_of": self.best_of not in (None, 1),
                              "logprobs": self.logprobs is not None}.items():
            if is_set:
                raise APIError(400, f"{field} is not supported by adapterkit serve; leave it out",
                               param=field, code="unsupported_parameter")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text, or token ids (OpenAI allows both, and batches)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """``{"role", "content"}`` as chat templates take it (``developer`` is a system turn).
        A participant's ``name`` has no place in a chat template: refused, not dropped."""
        if self.name is not None:
            raise APIError(400, "messages[].name is not supported by adapterkit serve (the "
                           "base's chat template has no place for it); leave it out",
                           param="messages", code="unsupported_parameter")
        text = self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Body):
    """``POST /v1/chat/completions``: messages rendered with the base's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        fmt = (self.response_format or {}).get("type", "text")
        for field, is_set in {"top_logprobs": self.top_logprobs is not None,
                              "tools": bool(self.tools),
                              "tool_choice": self.tool_choice not in (None, "none"),
                              "response_format": fmt != "text"}.items():
            if is_set:
                raise APIError(400, f"{field} is not supported by adapterkit serve; leave it out",
                               param=field, code="unsupported_parameter")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


# -- the text of an answer --------------------------------------------------------------------

class Detokenizer:
    """The text of a growing list of token ids, handed out as new suffixes while it grows.

    Decoding each new token alone breaks characters split over several byte-level tokens (an
    emoji is often three) and drops the space some tokenizers fold into a word's first token.
    So, as vLLM and text-generation-inference do, the last few tokens are decoded together with
    the new one and only the text past them is new; a decode that ends in U+FFFD (an
    unfinished UTF-8 sequence) waits for the next token. The concatenation of what
    :meth:`add` and :meth:`flush` return equals decoding all tokens at once.
    """

    #: prompt tokens kept as context for the first generated token
    CONTEXT = 5

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])[-self.CONTEXT:]
        self._prefix = 0
        self._read = len(self.ids)
        self._start = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one token; return the text it completes (may be empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back at the end (an unfinished character, as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]

    @property
    def generated(self) -> list[int]:
        return self.ids[self._start:]


class StopText:
    """Stop strings over streamed text: the answer ends before the first stop string, which is
    never sent. Text that could still become a stop string is held back until it cannot."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the text now safe to send. Sets :attr:`stopped` on a match."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.sent, self.stopped = self.text[self.sent:end], end, True
            self.text = self.text[:end]
            return out
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        """At the end of generation: what was held back (it never became a stop string)."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

"""A small client for a running ``adapterkit serve``: what ``swap --server`` and ``chat --server``
use instead of loading the base themselves.

Standard library only (``urllib``), so the commands work with the base install; anything
richer should use the official ``openai`` client, which the server speaks. Errors come back as
:class:`~adapterkit.errors.ServerError` carrying the server's own message.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from adapterkit.errors import ServerError

__all__ = ["Answer", "ServerClient"]


@dataclass
class Answer:
    """One chat answer and what it cost: seconds to the first text and to the end."""

    model: str
    text: str
    finish_reason: str | None
    completion_tokens: int
    first_text_s: float | None
    total_s: float


class ServerClient:
    """``adapterkit serve`` at ``url`` (``http://host:port``, with or without ``/v1``)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600) -> None:
        url = url.rstrip("/")
        self.url = url[:-3] if url.endswith("/v1") else url
        if not self.url.startswith(("http://", "https://")):
            raise ServerError(f"--server must be an http:// or https:// URL, got {url!r}")
        self.api_key = api_key
        self.timeout = timeout

    def _open(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            message, code = _error_of(exc)
            raise ServerError(f"{self.url} answered {exc.code}: {message}", code=code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach {self.url} ({reason}); is `adapterkit serve` "
                              "running there?") from None

    def get(self, path: str) -> Any:
        with self._open(path) as response:
            return json.loads(response.read())

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models``: the plain base first, then pocket books and stacks."""
        return list(self.get("/v1/models")["data"])

    def base_id(self) -> str:
        """The model id that answers with the plain base."""
        for entry in self.models():
            if entry.get("kind") == "base":
                return str(entry["id"])
        raise ServerError(f"{self.url} lists no base model in /v1/models")

    def stream_chat(self, model: str, content: str | list[dict[str, str]], *, max_tokens: int,
                    temperature: float = 0.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Stream the answer to one user message (``content``, a string) or to a conversation
        (a list of messages): ``(text, chunk)`` per piece of text, then ``("", final)`` where
        ``final`` has ``model``, ``finish_reason`` and ``usage``."""
        messages = [{"role": "user", "content": content}] if isinstance(content, str) \
            else content
        body = {"model": model, "messages": messages,
                "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        final: dict[str, Any] = {"model": model, "finish_reason": None, "usage": None}
        with self._open("/v1/chat/completions", body) as response:
            for data in _sse_data(response):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(f"{self.url}: {chunk['error'].get('message')}")
                final["model"] = chunk.get("model", model)
                if chunk.get("usage"):
                    final["usage"] = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("finish_reason"):
                        final["finish_reason"] = choice["finish_reason"]
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text, chunk
        yield "", final

    def answer(self, model: str, content: str, *, max_tokens: int,
               temperature: float = 0.0) -> Answer:
        """One user message answered by ``model``, streamed, timed from the request on."""
        start = time.perf_counter()
        first, parts, final = None, [], {}
        for text, chunk in self.stream_chat(model, content, max_tokens=max_tokens,
                                            temperature=temperature):
            if text:
                first = first if first is not None else time.perf_counter() - start
                parts.append(text)
            else:
                final = chunk
        usage = final.get("usage") or {}
        return Answer(str(final.get("model", model)), "".join(parts),
                      final.get("finish_reason"), int(usage.get("completion_tokens", 0)),
                      first, time.perf_counter() - start)


def _error_of(exc: urllib.error.HTTPError) -> tuple[str, str | None]:
    """The ``error.message`` and ``error.code`` of an OpenAI-shaped error body, or the body
    itself and None."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except OSError:
        return str(exc.reason), None
    try:
        error = json.loads(raw)["error"]
        code = error.get("code")
        return str(error["message"]), code if isinstance(code, str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw.strip()[:300] or str(exc.reason), None


def _sse_data(response: Any) -> Iterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined with newlines)."""
    lines: list[str] = []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)

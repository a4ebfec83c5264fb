"""The HTTP face of the engine: OpenAI's API, the library for the page, health and metrics.

:func:`create_app` wraps a running :class:`~adapterkit.serving.engine.Engine` in a FastAPI app:
the routes, the API key, and the errors. Answering a completion is
:mod:`adapterkit.serving.answers`; the wire format, :mod:`adapterkit.serving.openai_io`.

Every failure is an OpenAI-shaped JSON error: adapterkit's own errors map to 4xx
(:func:`~adapterkit.serving.openai_io.from_exception`), a full queue to 429 with
``Retry-After``, anything else to a 500 whose traceback goes to the server log, not the client.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterkit.errors import AdapterkitError, QueueFull
from adapterkit.serving.answers import Answers
from adapterkit.serving.library_view import library_view, loss_curve_file
from adapterkit.serving.metrics import CONTENT_TYPE, ServerMetrics
from adapterkit.serving.names import epoch
from adapterkit.serving.openai_io import (
    APIError,
    ChatRequest,
    CompletionRequest,
    from_exception,
    from_validation,
    queue_full,
)

__all__ = ["create_app", "STATIC_DIR"]

log = logging.getLogger("adapterkit.serve")

#: The playground page: plain HTML/JS/CSS shipped with adapterkit.
STATIC_DIR = Path(__file__).parent / "static"


def create_app(engine: Any, *, api_key: str | None = None,
               static_dir: str | Path = STATIC_DIR) -> FastAPI:
    """The ASGI app serving ``engine`` (already started; its owner closes it).

    :param api_key: when given, ``/v1/*``, ``/api/*`` and ``/metrics`` answer only requests
        with ``Authorization: Bearer KEY`` (compared in constant time); ``/``, ``/static`` and
        ``/health`` stay open so the page can load and ask for the key.
    :param static_dir: the page's files (``index.html`` at ``/``, the rest under ``/static``).
    """
    static_dir = Path(static_dir)
    metrics = ServerMetrics(engine)
    app = FastAPI(title="adapterkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    _add_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    guarded = [Depends(_key_check(api_key))]
    serve = Answers(engine, metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(engine.models)}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def model(model: str) -> dict[str, Any]:
        return await run_in_threadpool(_model_entry, engine, model)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        return await serve.answer(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        return await serve.answer(request, ChatRequest, chat=True)

    @app.get("/api/library", dependencies=guarded)
    async def library() -> dict[str, Any]:
        return await run_in_threadpool(library_view, engine.library, engine.base, engine.base_id)

    @app.get("/api/library/{ref}/loss_curve.png", dependencies=guarded)
    async def loss_curve(ref: str) -> Response:
        path = await run_in_threadpool(loss_curve_file, engine.library, engine.base, ref)
        return FileResponse(path, media_type="image/png")

    @app.get("/")
    async def page() -> Response:
        index = static_dir / "index.html"
        if not index.is_file():
            raise APIError(404, f"no page at {index}; the API is under /v1", code="not_found")
        return FileResponse(index, media_type="text/html")

    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")
    return app


# -- errors and the key ---------------------------------------------------------------------

def _json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": {...}}`` with the status OpenAI would use."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(from_validation(exc))

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull) -> JSONResponse:
        return _json_error(queue_full(exc))

    @app.exception_handler(AdapterkitError)
    async def ours(request: Request, exc: AdapterkitError) -> JSONResponse:
        return _json_error(from_exception(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return _json_error(APIError(exc.status_code, message, code="not_found"
                                    if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return _json_error(APIError(500, f"internal error ({type(exc).__name__}); the server "
                                    "log has the details", type="server_error"))


def _key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """The dependency guarding the API: the key in constant time, never echoed or logged."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), expected)
        if not (ok and scheme.lower() == "bearer"):
            raise APIError(401, "missing or wrong API key: send the header "
                           "'Authorization: Bearer KEY' with the key the server was started "
                           "with", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


class _CountRequests:
    """ASGI middleware counting answers by endpoint and status (streams untouched)."""

    KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/api/library",
             "/health", "/metrics")

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = next((k for k in self.KNOWN if path == k or path.startswith(k + "/")),
                        "/" if path == "/" else "/static" if path.startswith("/static/")
                        else "other")

        started = False

        async def counted(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            # Starlette answers an unhandled error (our bug: 500) outside this middleware
            if not started:
                self.metrics.http_requests.labels(endpoint, "500").inc()
            raise


def _model_entry(engine: Any, model: str) -> dict[str, Any]:
    """``GET /v1/models/{model}``: the listed entry, or one for a stack named on the fly."""
    target = engine.resolve(model)
    canonical = target.key or engine.base_id
    for entry in engine.models():
        if entry["id"] in (model, canonical):
            return entry
    # a version or an inline stack: when its newest pocket book was made (not this request's
    # time, which would read as a model made just now)
    created = max(epoch(engine.library.get(ref).meta.created) for ref, _ in target.members)
    return {"id": canonical, "object": "model", "owned_by": "adapterkit",
            "kind": "stack" if len(target.members) > 1 else "adapter", "created": created}

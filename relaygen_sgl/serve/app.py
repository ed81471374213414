"""`relaygen serve`: the relay as an OpenAI-compatible model.

POST /v1/chat/completions (plain, or streamed as server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus), GET /openapi.json. Each relay runs in its own
thread; at most `max_concurrency` run and `max_queue` more wait, past that 429 with
Retry-After. A body must arrive within `body_timeout_s` (else 408). A client that goes
away, or a request past its deadline, stops its relay (the stream to SGLang is closed,
which aborts the request there). Errors use OpenAI's error JSON; no traceback, file path,
file content or SGLang address ever reaches a client. Every request gets one access-log
line (serve/observe.py). The process around the app (uvicorn, its connection limit and
deadlines) is serve/server.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, DEFAULT_REQUEST_TOKENS
from relaygen_sgl.serve.admission import Busy, Gate, Health, Job
from relaygen_sgl.serve.observe import KEY, METRICS_TYPE, Metrics, Observe, Outcome, log_path
from relaygen_sgl.serve.protocol import (
    BODY_TIMEOUT_S,
    ERROR_SCHEMA,
    ApiError,
    ChatRequest,
    chat_schema,
    parse_request,
    read_json,
)
from relaygen_sgl.serve.setup import allowed_profiles
from relaygen_sgl.serve.stream import Gone, JobStream, complete, sse, timeout_error

log = logging.getLogger("relaygen.serve")
POLL_S = 0.25  # how often a waiting request checks its client and deadline
CONNECTION_HEADROOM = 128  # connections beyond the relays' slots and queue: keep-alive pools, /health, /metrics


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "relaygen"
    max_budget: int = DEFAULT_BUDGET  # --max-tokens: the most a request may ask for
    default_max_tokens: int | None = None  # a request without max_tokens gets this (None: DEFAULT_REQUEST_TOKENS),
    # at most max_budget
    request_timeout_s: float = 600.0  # deadline per request, queue wait included
    max_concurrency: int = 16  # relays running at once
    max_queue: int = 64  # requests waiting for a slot; past this, 429
    health_interval_s: float = 30.0  # background check when no request said how the servers are; 0: none
    body_timeout_s: float = BODY_TIMEOUT_S  # a request body must arrive within this after its headers, else 408
    header_timeout_s: float = 10.0  # a request's head must arrive within this of its first byte (or of the
    # connection opening), else the connection is closed
    send_timeout_s: float = 30.0  # a response its client reads nothing of for this long is cut off
    max_connections: int | None = None  # uvicorn's limit_concurrency: past it, a request gets 503 (None: the
    # relays' slots and queue plus CONNECTION_HEADROOM)

    @property
    def connection_limit(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        return self.max_concurrency + self.max_queue + CONNECTION_HEADROOM

    @property
    def request_default(self) -> int:
        """max_tokens of a request that gives none."""
        return min(DEFAULT_REQUEST_TOKENS if self.default_max_tokens is None else self.default_max_tokens,
                   self.max_budget)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_ok(header: bytes, digest: bytes) -> bool:
    """`Authorization: Bearer KEY` (the scheme in any case), compared as SHA-256 digests in
    constant time."""
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(parts[1].strip()).digest(), digest)


class _Auth:
    """Pure ASGI (streams and disconnects pass through untouched): every route but
    /health and /openapi.json needs the key (/metrics too: a scraper sends it as a bearer
    token)."""

    OPEN = ("/health", "/openapi.json")

    def __init__(self, app: Any, digest: bytes | None) -> None:
        self.app, self.digest = app, digest

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.digest is not None and scope.get("path") not in self.OPEN:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not key_ok(header, self.digest):
                err = ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", code="invalid_api_key", headers={"www-authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _admit(gate: Gate, request: Request, deadline: float) -> None:
    try:
        fut = gate.enter()
    except Busy:
        wait = gate.retry_after()
        raise ApiError(429, f"the server is at capacity ({gate.running} relays running, {gate.waiting} waiting); "
                            f"retry after {wait} s", "rate_limit_error", code="server_busy",
                       headers={"retry-after": str(wait)}) from None
    if fut is None:
        return
    try:
        while not fut.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise timeout_error("waiting for a free slot")
            await asyncio.wait({fut}, timeout=min(POLL_S, left))
            if not fut.done() and await request.is_disconnected():
                raise Gone
    except BaseException:
        gate.leave_queue(fut)
        raise


def create_app(relay: Any, settings: ServeSettings | None = None, *, api_key: str | None = None,
               profiles: Mapping[str, CueProfile] | None = None, **overrides: Any) -> FastAPI:
    """The ASGI app. `profiles`: the names a request may pick with relay.profile (default:
    the shipped ones); `overrides`: ServeSettings fields."""
    s = replace(settings or ServeSettings(), **overrides)
    allowed = dict(profiles) if profiles is not None else allowed_profiles()
    digest = key_digest(api_key) if api_key else None
    gate = Gate(s.max_concurrency, s.max_queue)
    health = Health(relay.engines, s.health_interval_s)
    if getattr(relay, "small_down", None):  # started degraded: /health says so before any request
        health.known["small"] = False
    pools = getattr(getattr(relay, "backend", None), "pools", None)  # runtime/pools.py, where the relay has one
    metrics = Metrics(gate, (lambda: pools.waiting) if pools is not None else None)
    app = FastAPI(title="relaygen-sgl", description="The RelayGen relay as an OpenAI-compatible model",
                  docs_url=None, redoc_url=None, lifespan=_lifespan(health))
    app.add_middleware(_Auth, digest=digest)
    app.add_middleware(Observe, metrics=metrics)  # added last: outermost, it sees every answer
    app.state.gate, app.state.health, app.state.settings, app.state.metrics = gate, health, s, metrics
    _add_error_handlers(app)
    _add_info_routes(app, s, health, metrics)
    _add_chat_route(app, relay, s, allowed, gate, health, metrics)
    return app


def _lifespan(health: Health) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The background health check runs while the app serves; its thread is joined off the event loop."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        health.start()
        try:
            yield
        finally:
            await asyncio.to_thread(health.close)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error JSON: unknown URLs and methods, invalid parameters, and
    anything unexpected (its type only, no traceback or message)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        path = log_path(request.scope)  # as sent, escaped
        if e.status_code == 404:
            err = ApiError(404, f"unknown URL ({request.method} {path})", code="not_found")
        elif e.status_code == 405:
            err = ApiError(405, f"method {request.method} not allowed on {path}", code="method_not_allowed",
                           headers=e.headers)
        else:
            err = ApiError(e.status_code, str(e.detail)[:200], headers=e.headers)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> Response:
        return ApiError(400, "invalid request parameters", code="invalid_value").response()

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> Response:
        log.exception("internal error")
        return ApiError(500, f"internal error ({type(e).__name__})", "server_error").response()


def _add_info_routes(app: FastAPI, s: ServeSettings, health: Health, metrics: Metrics) -> None:
    """/health, /metrics and the model list. (The routes' function names give their
    operationIds in /openapi.json.)"""

    @app.get("/health", summary="Whether the process is up and the SGLang servers worked last time")
    async def health_route() -> Response:
        status, body = health.report()
        return JSONResponse(body, status_code=status)

    def card() -> dict[str, Any]:
        return {"id": s.model_name, "object": "model", "created": 0, "owned_by": "relaygen-sgl"}

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=METRICS_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [card()]})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Response:
        if model_id != s.model_name:
            return ApiError(404, f"the model {model_id[:80]!r} does not exist", param="model",
                            code="model_not_found").response()
        return JSONResponse(card())


def _error_responses() -> dict[str, Any]:
    """The chat route's error answers, for /openapi.json."""
    return {str(code): {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for code, what in ((400, "malformed, an unknown field, a value of the wrong type or out of range, or "
                                     "unsupported"), (401, "missing or wrong API key"),
                               (404, "unknown model"), (408, "the body did not arrive in time"),
                               (413, "body over 1 MiB"), (415, "not declared as JSON (Content-Type: application/json)"),
                               (429, "at capacity; see Retry-After"),
                               (502, "an SGLang server failed"), (504, "past the deadline"))}


def _add_chat_route(app: FastAPI, relay: Any, s: ServeSettings, allowed: dict[str, CueProfile], gate: Gate,
                    health: Health, metrics: Metrics) -> None:
    """POST /v1/chat/completions: read and check the body, wait for a slot, run the relay in
    its own thread (Job), answer whole or streamed."""

    def ended(job: Job) -> None:  # in the job's thread, once the relay has really stopped
        gate.record(time.monotonic() - job.started_at)
        gate.release()
        health.outcome(job.result, job.error)
        metrics.relay_ended(job)

    body_schema = chat_schema(s.model_name, s.max_budget, sorted(allowed), s.request_timeout_s)

    @app.post("/v1/chat/completions", summary="Chat completion by the relay (OpenAI-compatible)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": body_schema}}},
                             "responses": _error_responses()})
    async def chat(request: Request) -> Response:
        out: Outcome = request.scope.get(KEY) or Outcome()
        try:
            body = await read_json(request, timeout_s=s.body_timeout_s)
        except ClientDisconnect:  # nobody to answer; the access line says what happened
            out.note = "client left mid-body"
            return Response(status_code=499)
        except ApiError as e:
            return e.response()
        try:
            req: ChatRequest = parse_request(body, model_name=s.model_name,
                                             max_budget=s.max_budget, default_max_tokens=s.request_default,
                                             profiles=allowed, timeout_s=s.request_timeout_s)
            out.stream = req.stream
            deadline = time.monotonic() + req.timeout_s
            await _admit(gate, request, deadline)
        except ApiError as e:
            return e.response()
        except Gone:
            out.note = "client left while queued"
            return Response(status_code=499)
        try:
            job = Job(relay, req.messages, req.settings, on_end=ended)
            job.start()
        except BaseException:
            gate.release()
            raise
        out.job = job
        if req.stream:
            return JobStream(sse(relay, job, req, deadline, s.model_name, request), job)
        return await complete(relay, job, req, deadline, s.model_name, request)

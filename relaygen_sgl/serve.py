"""`relaygen serve`: the relay as an OpenAI-compatible model.

POST /v1/chat/completions (plain and streamed as server-sent events), GET /v1/models,
GET /health. The usage object carries the relay's stats. Requests run concurrently
(each in a worker thread), so both SGLang servers batch them. Errors use OpenAI's error
JSON with the right status; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .api import Relay
from .errors import ConfigError, EngineRejected, RelayAborted, RelayGenError
from .policy import DEFAULT_BUDGET, METHODS
from .result import RelayResult

MAX_BODY_BYTES = 1 << 20
SAMPLING_KEYS = {"temperature": (int, float), "top_p": (int, float), "top_k": (int,), "seed": (int,)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def parse_request(body: dict[str, Any], model_name: str, max_budget: int) -> dict[str, Any]:
    """Validate a chat completion request; returns keyword arguments for Relay.run."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       code="model_not_found", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] needs a role (system|user|assistant) and string content",
                           param="messages")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in clean if m["role"] == "user"):
        raise ApiError(400, "messages hold no user content", param="messages")
    kwargs: dict[str, Any] = {"question": clean}
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_budget:
            raise ApiError(422, f"max_tokens must be an integer in 1..{max_budget}", param="max_tokens")
        kwargs["max_tokens"] = max_tokens
    for key, types in SAMPLING_KEYS.items():
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise ApiError(422, f"{key} has the wrong type", param=key)
        if key == "temperature" and not 0 <= value <= 2 or key == "top_p" and not 0 < value <= 1:
            raise ApiError(422, f"{key} is out of range", param=key)
        kwargs[key] = value
    opts = body.get("relay") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "relay must be an object", param="relay")
    method = opts.get("method", "relay")
    if method not in METHODS:
        raise ApiError(422, f"relay.method must be one of {', '.join(METHODS)}", param="relay.method")
    kwargs["method"] = method
    if "answer_role" in opts:
        if opts["answer_role"] not in ("large", "small"):
            raise ApiError(422, "relay.answer_role must be large or small", param="relay.answer_role")
        kwargs["answer_role"] = opts["answer_role"]
    if "profile" in opts:
        kwargs["profile"] = opts["profile"]
    kwargs["stream"] = bool(body.get("stream", False))
    kwargs["include_usage"] = bool((body.get("stream_options") or {}).get("include_usage", False))
    return kwargs


def usage(result: RelayResult) -> dict[str, Any]:
    s = result.stats
    completion = s.large_tokens + s.small_tokens
    return {"prompt_tokens": len(result.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(result.prompt_ids) + completion,
            "relay": {"large_tokens": s.large_tokens, "small_tokens": s.small_tokens, "switches": s.switches,
                      "large_share": s.large_share, "method": result.method}}


def finish_reason(result: RelayResult) -> str:
    return "length" if result.stats.finish == "budget" else "stop"


def create_app(relay: Relay, *, model_name: str = "relaygen", api_key: str | None = None,
               max_budget: int = DEFAULT_BUDGET) -> FastAPI:
    app = FastAPI(title="relaygen-sgl", docs_url=None, redoc_url=None)
    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(ApiError(401, "invalid or missing API key", "authentication_error",
                                      code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes"))
        try:
            return await call_next(request)
        except Exception as e:  # never a traceback to the client
            return error(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.get("/health")
    async def health() -> Response:
        ok = {role: await run_in_threadpool(e.health, 10.0) for role, e in relay.engines.items()}
        return JSONResponse({"status": "ok" if all(ok.values()) else "degraded", "servers": ok},
                            status_code=200 if all(ok.values()) else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "relaygen-sgl"}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes"))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return error(ApiError(400, f"malformed JSON body: {e}"))
        try:
            kw = parse_request(body, model_name, max_budget)
            if kw.get("profile") is not None:
                relay.plan(profile=kw["profile"])  # an unknown profile is the request's fault: 422 now
        except ApiError as e:
            return error(e)
        except ConfigError as e:
            return error(ApiError(422, str(e), param="relay.profile"))
        stream, include_usage = kw.pop("stream"), kw.pop("include_usage")
        question, method = kw.pop("question"), kw.pop("method")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            try:
                result = await run_in_threadpool(relay.run, question, method, **kw)
            except (RelayAborted, RelayGenError) as e:
                return error(_engine_error(e))
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "finish_reason": finish_reason(result),
                             "message": {"role": "assistant", "content": result.answer,
                                         "reasoning_content": result.reasoning}}],
                "usage": usage(result)})
        return StreamingResponse(_sse(relay, question, method, kw, rid, created, model_name, include_usage),
                                 media_type="text/event-stream")

    return app


def _engine_error(e: Exception) -> ApiError:
    cause = e.__cause__ if isinstance(e, RelayAborted) else e
    if isinstance(cause, EngineRejected) or isinstance(e, ConfigError):
        return ApiError(400, str(e))
    return ApiError(502, str(e), "server_error")


async def _sse(relay: Relay, question: Any, method: str, kw: dict[str, Any], rid: str, created: int,
               model_name: str, include_usage: bool):
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    splitter = _ReasoningSplitter(relay.family.think_end)
    def on_delta(role: str, delta: str) -> None:
        loop.call_soon_threadsafe(q.put_nowait, ("delta", role, delta))

    def work() -> None:
        try:
            res = relay.run(question, method, on_delta=on_delta, **kw)
            loop.call_soon_threadsafe(q.put_nowait, ("done", res, None))
        except Exception as e:
            loop.call_soon_threadsafe(q.put_nowait, ("error", e, None))

    def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> bytes:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    threading.Thread(target=work, daemon=True).start()
    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, a, b = await q.get()
        if kind == "delta":
            for field, text in splitter.feed(b):
                yield chunk({field: text, "relay_role": a})
        elif kind == "done":
            res: RelayResult = a
            for field, text in splitter.flush():
                yield chunk({field: text})
            yield chunk({}, finish_reason(res), {"usage": usage(res)} if include_usage else None)
            break
        else:
            err = _engine_error(a)
            yield b"data: " + orjson.dumps(err.body()) + b"\n\n"
            break
    yield b"data: [DONE]\n\n"


class _ReasoningSplitter:
    """Splits streamed text into reasoning (before </think>) and answer (after it), holding
    back a tail that could still turn out to be the start of </think>."""

    def __init__(self, think_end: str) -> None:
        self.end = think_end
        self.text = ""
        self.sent = {"reasoning_content": 0, "content": 0}

    def _parts(self, final: bool) -> tuple[str, str]:
        cut = self.text.find(self.end)
        if cut < 0:
            keep = len(self.text) if final else max(0, len(self.text) - len(self.end) + 1)
            return self.text[:keep], ""
        return self.text[:cut], self.text[cut + len(self.end):].lstrip()

    def _emit(self, final: bool) -> list[tuple[str, str]]:
        out = []
        for field, part in zip(("reasoning_content", "content"), self._parts(final)):
            if len(part) > self.sent[field]:
                out.append((field, part[self.sent[field]:]))
                self.sent[field] = len(part)
        return out

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.text += delta
        return self._emit(final=False)

    def flush(self) -> list[tuple[str, str]]:
        return self._emit(final=True)


def serve(relay: Relay, host: str, port: int, api_key: str | None, model_name: str) -> None:
    import uvicorn

    app = create_app(relay, model_name=model_name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=30)

"""Answering a chat completion from a running relay Job: one JSON answer, or server-sent
events shaped as OpenAI's chunks, plus `relay_role` on each delta and a `relay_event`
chunk when a small turn failed over to the large model (its text, already sent, is void)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from relaygen_sgl.core.errors import ConfigError, EngineRejected, RelayAborted, RelayGenError, one_line
from relaygen_sgl.core.result import REROUTED, RelayResult
from relaygen_sgl.serve.admission import Job
from relaygen_sgl.serve.observe import KEY
from relaygen_sgl.serve.protocol import ApiError, ChatRequest
from relaygen_sgl.serve.shaper import CONTENT, REASONING, TextShaper, stop_cut

log = logging.getLogger("relaygen.serve")
POLL_S = 0.25
_ADDRESS = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")


class Deadline(Exception):
    """The request passed its deadline."""


class Gone(Exception):
    """The client disconnected."""


def timeout_error(where: str) -> ApiError:
    return ApiError(504, f"the request passed its deadline {where}", "server_error", code="timeout")


async def events(job: Job, deadline: float, poll: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple]:
    """The job's items up to and including its last ("done" or "error"); `poll` says
    whether the client is gone (asked every POLL_S, however fast the items come)."""
    next_poll = time.monotonic() + POLL_S
    while True:
        now = time.monotonic()
        if poll is not None and now >= next_poll:
            if await poll():
                raise Gone
            next_poll = now + POLL_S
        if now >= deadline:
            raise Deadline
        try:
            item = await asyncio.wait_for(job.get(), min(POLL_S, deadline - now))
        except TimeoutError:
            continue
        yield item
        if item[0] != "delta":
            return


def usage(result: RelayResult, extra: tuple[str | None, int] = (None, 0)) -> dict[str, Any]:
    s = result.stats
    large, small = s.large_tokens, s.small_tokens
    if extra[1]:  # tokens of a turn stopped by a stop string, not in the result's segments
        large, small = (large, small + extra[1]) if extra[0] == "small" else (large + extra[1], small)
    completion = large + small
    return {"prompt_tokens": len(result.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(result.prompt_ids) + completion,
            "relay": {"large_tokens": large, "small_tokens": small, "switches": s.switches,
                      "large_share": round(large / completion, 4) if completion else 0.0, "method": result.method}}


def finish_reason(result: RelayResult) -> str:
    return "length" if result.stats.finish in ("budget", "limit") else "stop"  # limit: a KV pool or context


def public(message: str, urls: Mapping[str, str]) -> str:
    """An error's message as a client sees it: each SGLang server's URL as its role, any
    other address as <server> (the full message goes to the log)."""
    for role, url in urls.items():
        if url:
            message = message.replace(url.rstrip("/"), f"the {role} server")
    return _ADDRESS.sub("<server>", one_line(message, 1000))


def engine_error(e: BaseException, urls: Mapping[str, str]) -> ApiError:
    """A failed relay as an answer: 400 when the request was at fault (SGLang's 4xx), 502
    when a server failed, 500 with no detail otherwise; no internal address in any."""
    root: BaseException = e
    while isinstance(root, RelayAborted) and root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, (EngineRejected, ConfigError)):
        return ApiError(400, public(str(e), urls))
    if isinstance(root, RelayGenError):
        log.warning("the relay failed: %s", one_line(e, 1000))
        return ApiError(502, public(str(e), urls), "server_error", code="engine_error")
    log.error("the relay failed", exc_info=e)
    return ApiError(500, f"internal error ({type(root).__name__})", "server_error")


def stopped_usage(relay: Any, error: BaseException, text: str, last_role: str | None) -> dict[str, Any] | None:
    """Usage of a relay stopped at a stop string: its finished segments, plus the stopped
    turn's streamed text counted in tokens."""
    partial = getattr(error, "partial", None)
    if not isinstance(partial, RelayResult):
        return None
    extra = text[len(partial.text):] if text.startswith(partial.text) else ""
    return usage(partial, (last_role, len(relay.tokenizer.encode(extra)) if extra else 0))


async def complete(relay: Any, job: Job, req: ChatRequest, deadline: float, model_name: str,
                   request: Request) -> Response:
    """The non-streamed answer; the client is polled while the relay runs."""
    shaper = TextShaper(relay.family.think_end, req.stops)
    last_role, end = None, None
    try:
        async for item in events(job, deadline, request.is_disconnected):
            if item[0] != "delta":
                end = item
            elif item[1] == REROUTED:
                shaper.rewind(item[2])
            elif not shaper.stopped:
                last_role = item[1]
                shaper.feed(item[1], item[2])
                if shaper.stopped:  # the rest of the answer would be cut anyway
                    job.stop("stop")
    except Deadline:
        job.stop("deadline")
        return timeout_error(f"of {req.timeout_s:g} s").response()
    except Gone:
        job.stop("disconnect")
        return Response(status_code=499)
    except BaseException:  # the server shutting down: nobody reads the rest
        job.stop("disconnect")
        raise
    assert end is not None
    if end[0] == "done":
        result: RelayResult = end[1]
        answer, reasoning, use = result.answer, result.reasoning, usage(result)
        cut = stop_cut(answer, req.stops)
        content, finish = (answer, finish_reason(result)) if cut is None else (answer[:cut], "stop")
    elif job.reason == "stop":
        parts, _ = shaper.fields(final=True)
        reasoning, content, finish = parts[REASONING], parts[CONTENT], "stop"
        use = stopped_usage(relay, end[1], shaper.text, last_role)
    else:
        return engine_error(end[1], relay.urls).response()
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                     "message": {"role": "assistant", "content": content, "reasoning_content": reasoning}}],
        "usage": use})


async def sse(relay: Any, job: Job, req: ChatRequest, deadline: float, model_name: str,
              request: Request) -> AsyncIterator[bytes]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choices = [] if "usage" in extra else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return b"data: " + orjson.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                         "model": model_name, "choices": choices, **extra}) + b"\n\n"

    shaper = TextShaper(relay.family.think_end, req.stops)
    spec = tuple(int(x) for x in str(request.scope.get("asgi", {}).get("spec_version", "2.0")).split("."))
    # ASGI < 2.4: Starlette itself listens for the disconnect and cancels this generator
    poll = request.is_disconnected if spec >= (2, 4) else None
    last_role = None
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for item in events(job, deadline, poll):
            if item[0] == "delta" and item[1] == REROUTED:
                if shaper.stopped:
                    continue
                here = CONTENT if shaper.answering else REASONING
                for name, void in shaper.rewind(item[2]) or [(here, "")]:
                    yield chunk({}, relay_event={"type": "small_failed", "field": name, "discard": void})
            elif item[0] == "delta":
                if shaper.stopped:
                    continue
                last_role = item[1]
                for name, piece in shaper.feed(item[1], item[2]):
                    yield chunk({name: piece, "relay_role": item[1]})
                if shaper.stopped:
                    job.stop("stop")
                    if not req.include_usage:  # nothing to wait for
                        yield chunk({}, "stop")
                        break
            elif item[0] == "done":
                result: RelayResult = item[1]
                for name, piece in shaper.flush():
                    yield chunk({name: piece})
                yield chunk({}, "stop" if shaper.stopped else finish_reason(result))
                if req.include_usage:
                    yield chunk({}, usage=usage(result))
            elif job.reason == "stop":
                yield chunk({}, "stop")
                use = stopped_usage(relay, item[1], shaper.text, last_role)
                if use is not None:
                    yield chunk({}, usage=use)
            else:
                yield b"data: " + orjson.dumps(engine_error(item[1], relay.urls).body()) + b"\n\n"
    except Deadline:
        job.stop("deadline")
        yield b"data: " + orjson.dumps(timeout_error(f"of {req.timeout_s:g} s").body()) + b"\n\n"
    except Gone:  # (ASGI >= 2.4 only) the client left: nothing more to send
        job.stop("disconnect")
        return
    out = request.scope.get(KEY)
    if out is not None:
        out.streamed_to_end = True
    yield b"data: [DONE]\n\n"


class JobStream(StreamingResponse):
    """A streamed answer whose relay stops however the response ends: finished, the
    client gone (Starlette cancels the stream), or the server shutting down."""

    def __init__(self, content: AsyncIterator[bytes], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop("disconnect")  # a no-op once the relay ended
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]

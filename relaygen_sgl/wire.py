"""SGLang's wire format on the client side: the client's settings, what a generation
returns (Finish, Generation, ChatUsage), and turning SGLang's answers and error bodies into
those types and one-line typed errors.

Streams are parsed as SGLang 0.5.23 sends them (http_server.py serve_generate_request,
tokenizer_manager.py _handle_batch_output): SSE `data: {...}` lines carrying `text`,
`output_ids` and `meta_info`, ending in `data: [DONE]`. With --incremental-streaming-output
`output_ids` and `text` are deltas, without it the whole output so far; a chunk may carry
several tokens (stream_interval, a held-back stop-string prefix, coalesced chunks), and
`meta_info.completion_tokens` always counts all tokens so far, which tells the two apart.
A failure inside a started stream arrives as `data: {"error": {...}}`, an abort as a last
chunk with finish_reason {"type": "abort", "message": ..., "status_code": ...}."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from .errors import EngineError, EngineFailed

_JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout_s: float = 5.0
    # Longest wait for the next byte of an answer. A request can sit queued on a busy GPU
    # server for many minutes before its first token (32k-token trajectories at concurrency
    # 16), so this is generous; `deadline_s` on a run bounds the whole run instead.
    read_timeout_s: float = 3600.0
    retries: int = 2
    backoff_s: float = 0.5
    max_connections: int = 256
    api_key: str | None = field(default=None, repr=False)  # SGLang's --api-key; EngineClient's own wins


@dataclass(frozen=True)
class Finish:
    """Why the server stopped. kind: "stop" (a stop string), "regex" (a stop_regex),
    "eos" (EOS or a stop token id), "length" (max_new_tokens)."""

    kind: str
    matched: str | int | None = None


@dataclass(frozen=True)
class Generation:
    output_ids: list[int]
    text: str
    finish: Finish
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    server_latency_s: float  # the server's own e2e_latency
    latency_s: float  # request sent to last byte, measured here
    ttft_s: float  # request sent to first token, measured here (== latency_s unless streamed)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


class ChatUsage(NamedTuple):
    """One streamed /v1/chat/completions call: its usage and time to first token.
    cached_tokens is 0 unless the server runs with --enable-cache-report."""

    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


def _finish(meta: dict[str, Any], regexes: Sequence[str]) -> Finish:
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type")
    matched = reason.get("matched")
    if kind == "length":
        return Finish("length")
    if kind == "stop":
        if isinstance(matched, int):
            return Finish("eos", matched)
        if matched in regexes:
            return Finish("regex", matched)
        return Finish("stop", matched)
    if kind == "abort":
        raise EngineFailed(f"server aborted the request: {reason.get('message', reason)}")
    raise EngineFailed(f"unexpected finish_reason {reason!r}")


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _error_text(raw: bytes) -> str:
    """The message in an SGLang error body: {"error": {"message"}} (most endpoints),
    {"error": "..."} (the /generate contract gate, auth), {"detail": ...} (FastAPI), text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _one_line(raw.decode(errors="replace")) or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return _one_line(err if isinstance(err, str) else orjson.dumps(err).decode())
    return _one_line(raw.decode(errors="replace"))


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _err(cls: type[EngineError], message: str, url: str, status: int | None = None,
         retryable: bool = False) -> EngineError:
    e = cls(message, url=url, status=status)
    e.retryable = retryable  # type: ignore[attr-defined]  # read by _with_retries only
    return e


class _Attempt:
    """What one attempt has handed its caller so far: once tokens went out, no retry."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens = 0

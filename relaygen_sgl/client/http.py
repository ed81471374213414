"""The one client of an SGLang server: native /generate with input_ids, output_ids kept.

Every HTTP call the package makes to SGLang goes through EngineClient: generation
(token ids or text, streamed or not), the health probe, /flush_cache, /tokenize, the
OpenAI chat endpoint (for the handoff benchmark) and the info endpoints.

Connections are pooled (httpx), every request has connect and read timeouts, and
connection errors and 5xx answers are retried a bounded number of times with backoff;
4xx answers are never retried, and nothing is retried once a stream has handed tokens to
its caller (a retry would splice two generations). Errors leave as typed EngineError
subclasses with a one-line message.

The wire format on the client side: the client's settings, what a generation
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

import functools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import orjson

from relaygen_sgl.client.cancel import Stop, watchdog
from relaygen_sgl.core.errors import (
    STOPPED,
    Cancelled,
    ConfigError,
    EngineError,
    EngineFailed,
    EngineRejected,
    EngineUnreachable,
    one_line,
)

_JSON = {"content-type": "application/json"}
INFO_TIMEOUT_S = 30.0  # longest wait for an info endpoint (/server_info asks the scheduler)
# meta_info keys that --incremental-streaming-output sends per chunk, like output_ids
# (tokenizer_manager._INCREMENTAL_STREAMING_META_INFO_KEYS, the logprob ones): the client adds
# them up, so a Generation's meta holds the whole output's as a non-streamed answer does
STREAMED_DELTA_KEYS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


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
    "eos" (EOS or a stop token id), "length" (max_new_tokens). A relay turn adds "cue"
    (a verified switch cue) and "limit" (the trajectory is as long as a server accepts)."""

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


class Limits(NamedTuple):
    """How long one request to a server may be. SGLang refuses an input of `max_input` tokens
    or more (HTTP 400) and silently shortens max_new_tokens to what its KV pool holds
    (managers/tp_worker.py: max_req_len = min(context - 1, pool - 1), max_req_input_len =
    max_req_len - 5; scheduler.py clips max_new_tokens to max_req_len - input - 1), so a
    trajectory that must stay sendable to this server holds at most `request_tokens`.
    None where the server does not say (SGLang's router has no /server_info)."""

    context: int | None  # max_model_len less EAGLE's reserved slots (see context_length)
    kv_tokens: int | None  # max_total_num_tokens: the KV pool every request in flight shares
    max_input: int | None  # max_req_input_len

    @property
    def request_tokens(self) -> int | None:
        """Input plus output of one request, so that the whole can be sent again as an input."""
        bounds = [b for b in (self.context, None if self.max_input is None else self.max_input - 1) if b is not None]
        return min(bounds) if bounds else None


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


def _error_text(raw: bytes) -> str:
    """The message in an SGLang error body: {"error": {"message"}} (most endpoints),
    {"error": "..."} (the /generate contract gate, auth), {"detail": ...} (FastAPI), text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return one_line(raw.decode(errors="replace"), 300) or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return one_line(err if isinstance(err, str) else orjson.dumps(err).decode(), 300)
    return one_line(raw.decode(errors="replace"), 300)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _err(cls: type[EngineError], message: str, url: str, status: int | None = None,
         retryable: bool = False) -> EngineError:
    e = cls(message, url=url, status=status)
    e.retryable = retryable  # type: ignore[attr-defined]  # read by _with_retries only
    return e


def _socket(resp: httpx.Response) -> Any:
    """The socket under a response (httpcore's network stream); None under a test transport."""
    stream = resp.extensions.get("network_stream")
    return stream.get_extra_info("socket") if stream is not None else None


class _Attempt:
    """What one attempt has handed its caller so far: once tokens went out, no retry."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens = 0


class EngineClient:
    """A pooled connection to one SGLang server (or SGLang's router in front of several).
    `api_key` is sent as `Authorization: Bearer KEY` (SGLang's --api-key)."""

    def __init__(self, url: str, config: ClientConfig = ClientConfig(),
                 transport: httpx.BaseTransport | None = None, api_key: str | None = None) -> None:
        try:  # an http(s) URL with a host and a valid port, else one line naming it
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
        except (ValueError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise ConfigError(f"invalid server URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.config = config
        api_key = api_key if api_key is not None else config.api_key
        self._http = httpx.Client(
            base_url=self.url,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _with_retries(self, call: Callable[[_Attempt], Any], what: str, retries: int | None = None,
                      stop: Stop | None = None) -> Any:
        retries = self.config.retries if retries is None else retries
        attempt = 0
        while True:
            state = _Attempt()
            try:
                return call(state)
            except httpx.ReadTimeout as e:
                # A read timeout may mean a long generation still running: not retried.
                raise EngineUnreachable(f"{self.url}: {what}: no answer within "
                                        f"{self.config.read_timeout_s:.0f}s", url=self.url) from e
            except httpx.TransportError as e:
                after = f" after {state.tokens} streamed tokens" if state.tokens else ""
                err: EngineError = EngineUnreachable(
                    f"{self.url}: {what}: {type(e).__name__}{after}: {one_line(e, 300)}", url=self.url)
                if state.tokens:
                    raise err from e
            except httpx.HTTPError as e:  # decoding errors and the like: one line, not retried
                raise EngineFailed(f"{self.url}: {what}: {type(e).__name__}: {one_line(e, 300)}",
                                   url=self.url) from e
            except EngineError as e:
                # `retryable` says what kind of failure it is; nothing is retried once a
                # stream handed tokens to its caller (a retry would splice two generations)
                if state.tokens or not getattr(e, "retryable", False):
                    raise
                err = e
            if attempt >= retries or (stop is not None and stop.is_set()):
                raise err
            time.sleep(self.config.backoff_s * (2**attempt))
            attempt += 1

    def _check(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code < 400:
            return
        message = f"{self.url}: {what}: HTTP {resp.status_code}: {_error_text(resp.read()[:4000])}"
        if resp.status_code < 500:
            raise _err(EngineRejected, message, self.url, resp.status_code)
        raise _err(EngineFailed, message, self.url, resp.status_code, retryable=True)

    def generate(
        self,
        input_ids: Sequence[int],
        sampling: dict[str, Any],
        *,
        on_tokens: Callable[[list[int], bool], None] | None = None,
        extra: dict[str, Any] | None = None,
        retries: int | None = None,
        stop: Stop | None = None,
    ) -> Generation:
        """One /generate call. With `on_tokens`, the answer is streamed and the callback
        receives the cumulative output_ids as they arrive (the client's own list: copy it
        to keep it) and whether the chunk is the request's last. An exception from the
        callback ends the request (the stream is closed, which aborts it in SGLang) and
        propagates. `retries` overrides the client's own count for this call (0: a hint
        such as a prefetch, which must not hold a worker through backoffs to a dead server).
        With `stop`, the request ends as soon as it is set, queued, prefilling or decoding
        (client/cancel.py), no read waits past its deadline, and it raises Cancelled."""
        return self._generate({"input_ids": list(input_ids)}, sampling, on_tokens, extra, retries, stop)

    def generate_text(
        self,
        text: str,
        sampling: dict[str, Any],
        *,
        on_tokens: Callable[[list[int], bool], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Generation:
        """generate() with `text` for the server to tokenize instead of input_ids."""
        return self._generate({"text": text}, sampling, on_tokens, extra)

    def _generate(self, body: dict[str, Any], sampling: dict[str, Any],
                  on_tokens: Callable[[list[int], bool], None] | None, extra: dict[str, Any] | None,
                  retries: int | None = None, stop: Stop | None = None) -> Generation:
        body["sampling_params"] = sampling
        if extra:
            body.update(extra)
        regexes = tuple(sampling.get("stop_regex") or ())
        if stop is not None:
            return self._stoppable(body, regexes, on_tokens, retries, stop)
        if on_tokens is None:
            return self._with_retries(lambda a: self._generate_once(body, regexes), "POST /generate", retries)
        body["stream"] = True
        return self._with_retries(lambda a: self._generate_stream(body, regexes, on_tokens, a), "POST /generate",
                                  retries)

    def _stoppable(self, body: dict[str, Any], regexes: Sequence[str],
                   on_tokens: Callable[[list[int], bool], None] | None, retries: int | None,
                   stop: Stop) -> Generation:
        """A generation its caller can end at any point: each attempt has a request id of its
        own, which the watchdog aborts in SGLang when `stop` is set, and a stream's socket,
        which it shuts down; reads wait no longer than the deadline leaves."""

        def attempt(a: _Attempt) -> Generation:
            if stop.is_set():
                raise Cancelled(STOPPED)
            mine = {**body, "rid": uuid.uuid4().hex, **({"stream": True} if on_tokens is not None else {})}
            left = stop.left()
            timeout = None if left is None else httpx.Timeout(
                min(self.config.read_timeout_s, left + 0.5), connect=min(self.config.connect_timeout_s, left + 0.5))
            with watchdog().watch(stop, functools.partial(self.abort, mine["rid"])) as watch:
                if on_tokens is None:
                    return self._generate_once(mine, regexes, timeout)
                return self._generate_stream(mine, regexes, on_tokens, a, timeout, watch.attach)

        try:
            return self._with_retries(attempt, "POST /generate", retries, stop)
        except EngineError as e:
            if stop.is_set():  # what the abort or the shut socket made of the request
                raise Cancelled(STOPPED) from e
            raise

    def abort(self, rid: str) -> None:
        """Ask the server to abort request `rid` wherever it is (SGLang's /abort_request;
        a request it no longer holds is ignored). One short try; errors are the caller's."""
        self._http.post("/abort_request", content=orjson.dumps({"rid": rid}), headers=_JSON,
                        timeout=httpx.Timeout(5.0, connect=min(self.config.connect_timeout_s, 5.0)))

    def _generate_once(self, body: dict[str, Any], regexes: Sequence[str],
                       timeout: httpx.Timeout | None = None) -> Generation:
        what = "POST /generate"
        t0 = time.perf_counter()
        resp = self._http.post("/generate", content=orjson.dumps(body), headers=_JSON,
                               **({"timeout": timeout} if timeout is not None else {}))
        self._check(resp, what)
        out = self._json(resp.content, what)
        if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict):
            raise self._malformed(what, "an answer without meta_info")
        reason = out["meta_info"].get("finish_reason")
        if isinstance(reason, dict) and reason.get("type") == "abort":
            raise self._abort(reason, what, 0)
        dt = time.perf_counter() - t0
        return self._to_generation(out, regexes, dt, dt, what)

    def _generate_stream(self, body: dict[str, Any], regexes: Sequence[str],
                         on_tokens: Callable[[list[int], bool], None], attempt: _Attempt,
                         timeout: httpx.Timeout | None = None,
                         on_socket: Callable[[Any], None] | None = None) -> Generation:
        what = "POST /generate"
        t0 = time.perf_counter()
        ttft: float | None = None
        ids: list[int] = []
        text = ""
        meta: dict[str, Any] | None = None
        deltas: dict[str, list] = {}  # the output logprobs so far (STREAMED_DELTA_KEYS)
        finished = False
        with self._http.stream("POST", "/generate", content=orjson.dumps(body), headers=_JSON,
                               **({"timeout": timeout} if timeout is not None else {})) as resp:
            if on_socket is not None:
                on_socket(_socket(resp))
            for chunk in self._stream_chunks(resp, what, lambda: len(ids)):
                m = chunk.get("meta_info")
                if not isinstance(m, dict):
                    raise self._malformed(what, "a stream chunk without meta_info")
                reason = m.get("finish_reason")
                if isinstance(reason, dict) and reason.get("type") == "abort":
                    # (its output_ids are not a delta even with incremental streaming)
                    raise self._abort(reason, what, len(ids))
                new = chunk.get("output_ids")
                new = [] if new is None else new
                done = m.get("completion_tokens")
                if not _is_ids(new) or not isinstance(done, int):
                    raise self._malformed(what, "a stream chunk without output_ids and completion_tokens")
                piece = chunk.get("text")
                piece = piece if isinstance(piece, str) else ""
                # completion_tokens counts every token so far: a chunk holding that many ids
                # (and starting with those already seen) is the whole output, one that adds up
                # to it is a delta. The two agree on a first chunk, and only there.
                before = len(ids)
                if len(new) == done and new[:before] == ids:
                    ids, text = new, piece
                    for key in STREAMED_DELTA_KEYS:  # whole too (its own list for the caller)
                        if key in m:
                            deltas[key] = list(m[key] or [])
                elif before + len(new) == done:
                    ids.extend(new)
                    text += piece
                    for key in STREAMED_DELTA_KEYS:  # this chunk's tokens' logprobs only
                        if key in m:
                            deltas.setdefault(key, []).extend(m[key] or [])
                else:
                    raise self._malformed(what, f"a chunk of {len(new)} ids with completion_tokens={done} "
                                                f"after {before} ids")
                meta = {**m, **deltas}
                if reason is not None:
                    finished = True
                if len(ids) > before:
                    attempt.tokens = len(ids)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    on_tokens(ids, finished)
        if meta is None:
            raise _err(EngineFailed, f"{self.url}: {what}: the stream ended with no data", self.url, retryable=True)
        if not finished:
            after = f" after {len(ids)} streamed tokens" if ids else ""
            raise _err(EngineUnreachable, f"{self.url}: {what}: the stream ended before the generation "
                                          f"finished{after}", self.url, retryable=True)
        dt = time.perf_counter() - t0
        out = {"output_ids": ids, "text": text, "meta_info": meta}
        return self._to_generation(out, regexes, dt, ttft if ttft is not None else dt, what)

    def _to_generation(self, out: dict[str, Any], regexes: Sequence[str], latency: float, ttft: float,
                       what: str = "POST /generate") -> Generation:
        meta = out.get("meta_info") or {}
        ids = out.get("output_ids") or []
        if not _is_ids(ids):
            raise self._malformed(what, "output_ids is not a list of token ids")
        try:
            finish = _finish(meta, regexes)
        except EngineFailed as e:
            raise _err(EngineFailed, f"{self.url}: {what}: {e}", self.url) from None
        try:
            return Generation(
                output_ids=list(ids),
                text=out.get("text") or "",
                finish=finish,
                prompt_tokens=int(meta.get("prompt_tokens", 0)),
                cached_tokens=int(meta.get("cached_tokens", 0)),
                completion_tokens=int(meta.get("completion_tokens", len(ids))),
                server_latency_s=float(meta.get("e2e_latency", latency)),
                latency_s=latency,
                ttft_s=ttft,
                meta=meta,
            )
        except (TypeError, ValueError) as e:
            raise self._malformed(what, f"meta_info: {e}") from None

    # ------------------------------------------------------------------ non-generating calls
    def _malformed(self, what: str, detail: str) -> EngineError:
        return _err(EngineFailed, f"{self.url}: {what}: malformed answer: {one_line(detail, 200)}", self.url)

    def _json(self, raw: bytes | str, what: str) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            text = raw if isinstance(raw, str) else raw.decode(errors="replace")
            raise self._malformed(what, f"not JSON: {text[:80]!r}") from None

    def _sse(self, line: str, what: str) -> str | None:
        """The payload of one SSE line; None for a line that carries none."""
        if not line or line.startswith(":"):
            return None
        if line.startswith("data:"):
            return line[5:].strip()
        if line.startswith(("event:", "id:", "retry:")):
            return None
        raise self._malformed(what, f"not an SSE data line: {line[:80]!r}")

    def _stream_chunks(self, resp: httpx.Response, what: str, tokens: Callable[[], int]) -> Iterator[dict[str, Any]]:
        """The JSON objects of an SSE answer up to `data: [DONE]`, checked: a non-object chunk is
        malformed, an error chunk raises (`tokens()`: how many the caller already holds)."""
        self._check(resp, what)
        for line in resp.iter_lines():
            payload = self._sse(line, what)
            if payload is None:
                continue
            if payload == "[DONE]":
                return
            chunk = self._json(payload, what)
            if not isinstance(chunk, dict):
                raise self._malformed(what, f"a stream chunk that is not an object: {payload[:80]!r}")
            if "error" in chunk:
                raise self._stream_error(chunk["error"], what, tokens())
            yield chunk

    def _stream_error(self, err: Any, what: str, tokens: int) -> EngineError:
        """`data: {"error": {...}}` inside a started stream (SGLang sends it with HTTP 200,
        for a request it refused after the stream began, e.g. a too long input: code 400)."""
        message = err.get("message", err) if isinstance(err, dict) else err
        code = err.get("code") if isinstance(err, dict) else None
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        after = f" after {tokens} streamed tokens" if tokens else ""
        where = f"HTTP {code} in the stream" if code else "error in the stream"
        text = f"{self.url}: {what}: {where}{after}: {one_line(message, 300)}"
        if code is not None and 400 <= code < 500:
            return _err(EngineRejected, text, self.url, code)
        retryable = bool(isinstance(err, dict) and err.get("retryable"))  # SGLang sends False
        return _err(EngineFailed, text, self.url, code if code and code >= 500 else None, retryable)

    def _abort(self, reason: dict[str, Any], what: str, tokens: int) -> EngineError:
        """finish_reason {"type": "abort"}: status_code 4xx is the request's fault, 5xx (an
        overloaded or failing server) may be retried (while nothing was streamed), none
        (aborted on purpose, e.g. /abort_request) is final."""
        status = reason.get("status_code")
        status = status if isinstance(status, int) and not isinstance(status, bool) else None
        after = f" after {tokens} streamed tokens" if tokens else ""
        text = (f"{self.url}: {what}: the server aborted the request{after}: "
                f"{one_line(reason.get('message') or 'Aborted', 300)}")
        if status is not None and 400 <= status < 500:
            return _err(EngineRejected, text, self.url, status)
        server_side = status is not None and status >= 500
        return _err(EngineFailed, text, self.url, status if server_side else None, server_side)

    # ------------------------------------------------------------------ JSON endpoints
    def get_json(self, path: str) -> dict[str, Any]:
        what = f"GET {path}"
        # an info endpoint answers at once or not at all (a stalled scheduler): not an hour's wait
        timeout = httpx.Timeout(min(self.config.read_timeout_s, INFO_TIMEOUT_S), connect=self.config.connect_timeout_s)

        def call(_: _Attempt) -> dict[str, Any]:
            resp = self._http.get(path, timeout=timeout)
            self._check(resp, what)
            out = self._json(resp.content, what)
            if not isinstance(out, dict):
                raise self._malformed(what, f"expected a JSON object, got {type(out).__name__}")
            return out

        return self._with_retries(call, what)

    # ------------------------------------------------------------------ info
    def _info(self, name: str) -> dict[str, Any]:
        # SGLang's router serves only the older /get_* spellings
        try:
            return self.get_json(f"/{name}")
        except EngineRejected as e:
            if e.status != 404:
                raise
            return self.get_json(f"/get_{name}")

    def model_info(self) -> dict[str, Any]:
        return self._info("model_info")

    @functools.cached_property
    def context_length(self) -> int | None:
        """What a request may fill: the server's max_model_len less the output slots an EAGLE
        server reserves for its drafts (SGLang refuses input + max_new_tokens beyond it)."""
        try:
            data = self.get_json("/v1/models").get("data") or []
            if not (data and data[0].get("max_model_len")):
                return None
            return int(data[0]["max_model_len"]) - self.reserved_tokens
        except (EngineError, KeyError, ValueError, TypeError, AttributeError):
            return None

    @functools.cached_property
    def limits(self) -> Limits:
        """The server's request limits (Limits), read once: its pool is sized at start."""
        try:
            info = self.server_info()
        except EngineError:
            info = {}

        def number(key: str) -> int | None:
            value = info.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        return Limits(self.context_length, number("max_total_num_tokens"), number("max_req_input_len"))

    @functools.cached_property
    def reserved_tokens(self) -> int:
        """sglang/srt/managers/utils.py compute_num_reserved_tokens: EAGLE, EAGLE3 (and
        FROZEN_KV_MTP) keep max(topk * steps, draft tokens) output slots per request."""
        try:
            info = self.server_info()
        except EngineError:
            return 0
        if str(info.get("speculative_algorithm") or "").upper() not in ("EAGLE", "EAGLE3", "FROZEN_KV_MTP"):
            return 0
        topk, steps = int(info.get("speculative_eagle_topk") or 0), int(info.get("speculative_num_steps") or 0)
        drafts = max(int(info.get("speculative_num_draft_tokens") or 0),
                     int(info.get("max_speculative_num_draft_tokens") or 0))
        return max(topk * steps, drafts)

    def server_info(self) -> dict[str, Any]:
        return self._info("server_info")

    # ------------------------------------------------------------------ control
    def health(self, timeout_s: float = 30.0) -> bool:
        """True when the server completes a real one-token generation within `timeout_s`.

        Not SGLang's GET /health_generate: that route skips --api-key checks and answers
        200 without generating while other requests run; this probe goes the way a relay
        request goes. One try, never raises."""
        body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        timeout = httpx.Timeout(timeout_s, connect=min(self.config.connect_timeout_s, timeout_s))
        try:
            resp = self._http.post("/generate", content=orjson.dumps(body), headers=_JSON, timeout=timeout)
            if resp.status_code != 200:
                return False
            out = orjson.loads(resp.content)
        except (httpx.HTTPError, orjson.JSONDecodeError):
            return False
        meta = out.get("meta_info") if isinstance(out, dict) else None
        reason = meta.get("finish_reason") if isinstance(meta, dict) else None
        return isinstance(reason, dict) and reason.get("type") in ("stop", "length")

    def flush_cache(self, timeout_s: float | None = None) -> None:
        """Empty the server's radix cache. SGLang refuses (HTTP 400, EngineRejected) while
        requests run; with `timeout_s` it waits up to that long for them to finish."""
        what = "POST /flush_cache"
        params = {"timeout": timeout_s} if timeout_s else None

        def call(_: _Attempt) -> None:
            self._check(self._http.post("/flush_cache", params=params), what)

        self._with_retries(call, what)

    def tokenize(self, text: str) -> list[int] | None:
        """The server's own tokenization of `text` (as /generate with `text` tokenizes it);
        None where there is no /tokenize (a 404: SGLang's router does not serve it)."""
        what = "POST /tokenize"

        def call(_: _Attempt) -> list[int] | None:
            resp = self._http.post("/tokenize", content=orjson.dumps({"prompt": text}), headers=_JSON)
            if resp.status_code == 404:
                return None
            self._check(resp, what)
            out = self._json(resp.content, what)
            tokens = out.get("tokens") if isinstance(out, dict) else None
            if not _is_ids(tokens):
                raise self._malformed(what, "no token list in the answer")
            return tokens

        return self._with_retries(call, what)

    def chat_stream(self, messages: list[dict[str, str]], continue_final_message: bool = False,
                    max_tokens: int = 1, *, temperature: float = 0.0) -> ChatUsage:
        """One streamed /v1/chat/completions call with usage: (prompt_tokens, cached_tokens,
        ttft_s). With `continue_final_message` the last (assistant) message is continued."""
        what = "POST /v1/chat/completions"
        body = {"model": "default", "messages": messages, "continue_final_message": continue_final_message,
                "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}}

        def call(_: _Attempt) -> ChatUsage:
            t0 = time.perf_counter()
            ttft: float | None = None
            usage: dict[str, Any] | None = None
            with self._http.stream("POST", "/v1/chat/completions", content=orjson.dumps(body),
                                   headers=_JSON) as resp:
                for chunk in self._stream_chunks(resp, what, lambda: 0):
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") if isinstance(choice, dict) else None
                        if ttft is None and isinstance(delta, dict) and (delta.get("content")
                                                                         or delta.get("reasoning_content")):
                            ttft = time.perf_counter() - t0
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
            if usage is None:
                raise self._malformed(what, "the stream carried no usage")
            try:
                details = usage.get("prompt_tokens_details") or {}
                return ChatUsage(int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0),
                                 ttft if ttft is not None else time.perf_counter() - t0)
            except (TypeError, ValueError, AttributeError) as e:
                raise self._malformed(what, f"usage {usage!r}: {e}") from None

        return self._with_retries(call, what)

"""The one client of an SGLang server: native /generate with input_ids, output_ids kept.

Every HTTP call the package makes to SGLang goes through EngineClient: generation
(token ids or text, streamed or not), the health probe, /flush_cache, /tokenize, the
OpenAI chat endpoint (for the handoff benchmark) and the info endpoints.

Connections are pooled (httpx), every request has connect and read timeouts, and
connection errors and 5xx answers are retried a bounded number of times with backoff;
4xx answers are never retried, and nothing is retried once a stream has handed tokens to
its caller (a retry would splice two generations). Errors leave as typed EngineError
subclasses with a one-line message.

Streams are parsed as wire.py describes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson

from .errors import ConfigError, EngineError, EngineFailed, EngineRejected, EngineUnreachable
from .server_calls import ServerCalls
from .wire import (  # noqa: F401  (the types are re-exported: callers import them from here)
    _JSON,
    ChatUsage,
    ClientConfig,
    Finish,
    Generation,
    _Attempt,
    _err,
    _error_text,
    _finish,
    _is_ids,
    _one_line,
)


class EngineClient(ServerCalls):
    """A pooled connection to one SGLang server (or SGLang's router in front of several).
    `api_key` is sent as `Authorization: Bearer KEY` (SGLang's --api-key)."""

    def __init__(self, url: str, config: ClientConfig = ClientConfig(),
                 transport: httpx.BaseTransport | None = None, api_key: str | None = None) -> None:
        from urllib.parse import urlsplit

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
    def _with_retries(self, call: Callable[[_Attempt], Any], what: str) -> Any:
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
                    f"{self.url}: {what}: {type(e).__name__}{after}: {_one_line(e)}", url=self.url)
                if state.tokens:
                    raise err from e
            except httpx.HTTPError as e:  # decoding errors and the like: one line, not retried
                raise EngineFailed(f"{self.url}: {what}: {type(e).__name__}: {_one_line(e)}",
                                   url=self.url) from e
            except EngineError as e:
                # `retryable` says what kind of failure it is; nothing is retried once a
                # stream handed tokens to its caller (a retry would splice two generations)
                if state.tokens or not getattr(e, "retryable", False):
                    raise
                err = e
            if attempt >= self.config.retries:
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
    ) -> Generation:
        """One /generate call. With `on_tokens`, the answer is streamed and the callback
        receives the cumulative output_ids as they arrive (the client's own list: copy it
        to keep it) and whether the chunk is the request's last. An exception from the
        callback ends the request (the stream is closed, which aborts it in SGLang) and
        propagates."""
        return self._generate({"input_ids": list(input_ids)}, sampling, on_tokens, extra)

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
                  on_tokens: Callable[[list[int], bool], None] | None, extra: dict[str, Any] | None) -> Generation:
        body["sampling_params"] = sampling
        if extra:
            body.update(extra)
        regexes = tuple(sampling.get("stop_regex") or ())
        if on_tokens is None:
            return self._with_retries(lambda a: self._generate_once(body, regexes), "POST /generate")
        body["stream"] = True
        return self._with_retries(lambda a: self._generate_stream(body, regexes, on_tokens, a), "POST /generate")

    def _generate_once(self, body: dict[str, Any], regexes: Sequence[str]) -> Generation:
        what = "POST /generate"
        t0 = time.perf_counter()
        resp = self._http.post("/generate", content=orjson.dumps(body), headers=_JSON)
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
                         on_tokens: Callable[[list[int], bool], None], attempt: _Attempt) -> Generation:
        what = "POST /generate"
        t0 = time.perf_counter()
        ttft: float | None = None
        ids: list[int] = []
        text = ""
        meta: dict[str, Any] | None = None
        finished = False
        with self._http.stream("POST", "/generate", content=orjson.dumps(body), headers=_JSON) as resp:
            self._check(resp, what)
            for line in resp.iter_lines():
                payload = self._sse(line, what)
                if payload is None:
                    continue
                if payload == "[DONE]":
                    break
                chunk = self._json(payload, what)
                if not isinstance(chunk, dict):
                    raise self._malformed(what, f"a stream chunk that is not an object: {payload[:80]!r}")
                if "error" in chunk:
                    raise self._stream_error(chunk["error"], what, len(ids))
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
                elif before + len(new) == done:
                    ids.extend(new)
                    text += piece
                else:
                    raise self._malformed(what, f"a chunk of {len(new)} ids with completion_tokens={done} "
                                                f"after {before} ids")
                meta = m
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

"""The one client of an SGLang server: native /generate with input_ids, output_ids kept.

Connections are pooled (httpx), every request has connect and read timeouts, and
connection errors and 5xx answers are retried a bounded number of times with backoff;
4xx answers are never retried. Errors leave as typed EngineError subclasses.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from .errors import EngineError, EngineFailed, EngineRejected, EngineUnreachable


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    retries: int = 2
    backoff_s: float = 0.5
    max_connections: int = 256


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


class EngineClient:
    """A pooled connection to one SGLang server."""

    def __init__(self, url: str, config: ClientConfig = ClientConfig(),
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.config = config
        self._http = httpx.Client(
            base_url=self.url,
            transport=transport,
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
    def _with_retries(self, call: Callable[[], Any], what: str) -> Any:
        attempt = 0
        while True:
            try:
                return call()
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.ConnectTimeout, httpx.WriteError) as e:
                err: EngineError = EngineUnreachable(f"{self.url}: {what}: {type(e).__name__}: {e}", url=self.url)
            except httpx.ReadTimeout as e:
                # A read timeout may mean a long generation still running: not retried.
                raise EngineUnreachable(f"{self.url}: {what}: no answer within "
                                        f"{self.config.read_timeout_s:.0f}s", url=self.url) from e
            except EngineFailed as e:
                if e.status is None:  # an abort inside a 200 answer is final
                    raise
                err = e
            if attempt >= self.config.retries:
                raise err
            time.sleep(self.config.backoff_s * (2**attempt))
            attempt += 1

    def _check(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code < 400:
            return
        body = resp.read().decode(errors="replace")[:300]
        try:
            body = orjson.loads(body).get("error", {}).get("message", body) if body.startswith("{") else body
        except (orjson.JSONDecodeError, AttributeError):
            pass
        cls = EngineRejected if resp.status_code < 500 else EngineFailed
        raise cls(f"{self.url}: {what}: HTTP {resp.status_code}: {body}", url=self.url, status=resp.status_code)

    def get_json(self, path: str) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            resp = self._http.get(path)
            self._check(resp, f"GET {path}")
            return orjson.loads(resp.content)

        return self._with_retries(call, f"GET {path}")

    # ------------------------------------------------------------------ API
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
        """The server's max_model_len (SGLang refuses input + max_new_tokens beyond it)."""
        try:
            data = self.get_json("/v1/models").get("data") or []
            return int(data[0]["max_model_len"]) if data and data[0].get("max_model_len") else None
        except (EngineError, KeyError, ValueError, TypeError):
            return None

    def server_info(self) -> dict[str, Any]:
        return self._info("server_info")

    def generate(
        self,
        input_ids: Sequence[int],
        sampling: dict[str, Any],
        *,
        on_tokens: Callable[[list[int]], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Generation:
        """One /generate call. With `on_tokens`, the answer is streamed and the callback
        receives the cumulative output_ids as they arrive."""
        body: dict[str, Any] = {"input_ids": list(input_ids), "sampling_params": sampling}
        if extra:
            body.update(extra)
        regexes = tuple(sampling.get("stop_regex") or ())
        if on_tokens is None:
            return self._with_retries(lambda: self._generate_once(body, regexes), "POST /generate")
        body["stream"] = True
        return self._with_retries(lambda: self._generate_stream(body, regexes, on_tokens), "POST /generate")

    def _generate_once(self, body: dict[str, Any], regexes: Sequence[str]) -> Generation:
        t0 = time.perf_counter()
        resp = self._http.post("/generate", content=orjson.dumps(body),
                               headers={"content-type": "application/json"})
        self._check(resp, "POST /generate")
        out = orjson.loads(resp.content)
        dt = time.perf_counter() - t0
        return self._to_generation(out, regexes, dt, dt)

    def _generate_stream(self, body: dict[str, Any], regexes: Sequence[str],
                         on_tokens: Callable[[list[int]], None]) -> Generation:
        t0 = time.perf_counter()
        ttft: float | None = None
        last: dict[str, Any] | None = None
        acc: list[int] = []
        with self._http.stream("POST", "/generate", content=orjson.dumps(body),
                               headers={"content-type": "application/json"}) as resp:
            self._check(resp, "POST /generate")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                last = orjson.loads(payload)
                if "error" in last:
                    raise EngineFailed(f"{self.url}: stream error: {last['error']}", url=self.url)
                ids = last.get("output_ids") or []
                done = int((last.get("meta_info") or {}).get("completion_tokens", len(acc) + len(ids)))
                # Servers started with --incremental-streaming-output send deltas; others
                # send the whole output so far. The token count tells which.
                if len(acc) + len(ids) == done and len(ids) != done:
                    acc.extend(ids)
                else:
                    acc = list(ids)
                if acc:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    on_tokens(acc)
        if last is None:
            raise EngineFailed(f"{self.url}: stream ended with no data", url=self.url)
        dt = time.perf_counter() - t0
        last["output_ids"] = list(acc)
        return self._to_generation(last, regexes, dt, ttft if ttft is not None else dt)

    def _to_generation(self, out: dict[str, Any], regexes: Sequence[str], latency: float, ttft: float) -> Generation:
        meta = out.get("meta_info") or {}
        return Generation(
            output_ids=list(out.get("output_ids") or []),
            text=out.get("text", ""),
            finish=_finish(meta, regexes),
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
            server_latency_s=float(meta.get("e2e_latency", latency)),
            latency_s=latency,
            ttft_s=ttft,
            meta=meta,
        )

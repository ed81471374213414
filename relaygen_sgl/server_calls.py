"""The EngineClient's non-generating calls: the info endpoints, the context it may fill,
the health probe, /flush_cache, /tokenize and the OpenAI chat endpoint (the handoff bench)."""

from __future__ import annotations

import functools
import time
from typing import Any

import httpx
import orjson

from .errors import EngineError, EngineFailed, EngineRejected
from .wire import _JSON, ChatUsage, _Attempt, _err, _is_ids, _one_line


class ServerCalls:
    """Mixed into EngineClient, which provides _http, url, config, _with_retries and _check;
    the answer-parsing helpers here serve its generation calls too."""

    def _malformed(self, what: str, detail: str) -> EngineError:
        return _err(EngineFailed, f"{self.url}: {what}: malformed answer: {_one_line(detail, 200)}", self.url)

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

    def _stream_error(self, err: Any, what: str, tokens: int) -> EngineError:
        """`data: {"error": {...}}` inside a started stream (SGLang sends it with HTTP 200,
        for a request it refused after the stream began, e.g. a too long input: code 400)."""
        message = err.get("message", err) if isinstance(err, dict) else err
        code = err.get("code") if isinstance(err, dict) else None
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        after = f" after {tokens} streamed tokens" if tokens else ""
        where = f"HTTP {code} in the stream" if code else "error in the stream"
        text = f"{self.url}: {what}: {where}{after}: {_one_line(message)}"
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
                f"{_one_line(reason.get('message') or 'Aborted')}")
        if status is not None and 400 <= status < 500:
            return _err(EngineRejected, text, self.url, status)
        server_side = status is not None and status >= 500
        return _err(EngineFailed, text, self.url, status if server_side else None, server_side)

    # ------------------------------------------------------------------ generation

    def get_json(self, path: str) -> dict[str, Any]:
        what = f"GET {path}"

        def call(_: _Attempt) -> dict[str, Any]:
            resp = self._http.get(path)
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
                        raise self._stream_error(chunk["error"], what, 0)
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

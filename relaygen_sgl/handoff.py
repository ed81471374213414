"""Handoff cost, measured by replaying a finished trajectory in three handoff formats.

For each format the caches are flushed, then every turn is replayed in order: one
measured request (the handoff: the turn's prefix in that format, max_new_tokens=1,
streamed for the time to first token) and one warming request, so that the server's
cache holds what it would hold in a real relay of that format: the prefix as that
format tokenizes it, followed by the token ids the model generated. (A text relay's
next request re-tokenizes those generated ids as text; wherever the two differ, the
cache misses from there on.)

  tokens: /generate with input_ids, exactly the ids the models wrote (relaygen-sgl)
  text:   /generate with the joined text, re-tokenized by the server
  chat:   /v1/chat/completions with continue_final_message (the reference's way)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from .engine import EngineClient
from .errors import EngineFailed
from .result import RelayResult
from .tokenizer import Tokenizer

FORMATS = ("tokens", "text", "chat")


@dataclass(frozen=True)
class HandoffSample:
    format: str
    role: str
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float

    @property
    def reprefilled(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def _chat(url: str, question: str, partial: str, max_tokens: int, http: httpx.Client) -> tuple[int, int, float]:
    body = {"model": "default", "messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": partial}],
            "continue_final_message": True, "add_generation_prompt": False, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = orjson.loads(line[5:])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    return int(usage.get("prompt_tokens", 0)), cached, ttft if ttft is not None else time.perf_counter() - t0


def _server_tokens(http: httpx.Client, url: str, text: str, tok: Tokenizer) -> list[int]:
    """The server's own tokenization of `text`; SGLang's router does not proxy /tokenize,
    and there the client's tokenizer (the same vocabulary) stands in."""
    r = http.post(f"{url}/tokenize", json={"prompt": text})
    if r.status_code == 404:
        return tok.encode(text)
    r.raise_for_status()
    return list(r.json()["tokens"])


def replay(result: RelayResult, question: str, engines: dict[str, EngineClient], tok: Tokenizer,
           think_prefix: str) -> list[HandoffSample]:
    try:
        return _replay(result, question, engines, tok, think_prefix)
    except httpx.HTTPError as e:  # one line at the CLI, like every other server failure
        raise EngineFailed(f"handoff replay: {type(e).__name__}: {e}") from e


def _replay(result: RelayResult, question: str, engines: dict[str, EngineClient], tok: Tokenizer,
            think_prefix: str) -> list[HandoffSample]:
    samples: list[HandoffSample] = []
    http = httpx.Client(timeout=600)
    try:
        for fmt in FORMATS:
            for e in set(engines.values()):
                http.post(f"{e.url}/flush_cache").raise_for_status()
            prefix = list(result.prompt_ids)
            for i, seg in enumerate(result.segments):
                if seg.role not in engines:
                    prefix += seg.token_ids
                    continue
                eng = engines[seg.role]
                completion = prefix[len(result.prompt_ids):]
                if fmt == "tokens":
                    g = eng.generate(prefix, {"max_new_tokens": 1, "temperature": 0}, on_tokens=lambda ids: None)
                    sample = (g.prompt_tokens, g.cached_tokens, g.ttft_s)
                    as_sent = prefix
                elif fmt == "text":
                    text = tok.decode(prefix, skip_special=False)
                    t0 = time.perf_counter()
                    r = http.post(f"{eng.url}/generate", json={"text": text, "sampling_params":
                                                                {"max_new_tokens": 1, "temperature": 0}}).json()
                    meta = r["meta_info"]
                    sample = (meta["prompt_tokens"], meta["cached_tokens"], time.perf_counter() - t0)
                    as_sent = _server_tokens(http, eng.url, text, tok)
                else:
                    partial = think_prefix + tok.decode(completion, skip_special=False)
                    sample = _chat(eng.url, question, partial, 1, http)
                    rendered = tok.apply_chat_template([{"role": "user", "content": question},
                                                        {"role": "assistant", "content": partial}],
                                                       continue_final_message=True, add_generation_prompt=False)
                    as_sent = _server_tokens(http, eng.url, rendered, tok)
                # what the server caches after this turn: what it was sent, then what it generated
                eng.generate(as_sent + seg.token_ids, {"max_new_tokens": 1, "temperature": 0})
                samples.append(HandoffSample(fmt, seg.role, i, *sample))
                prefix += seg.token_ids
    finally:
        http.close()
    return samples


def handoffs_only(samples: list[HandoffSample]) -> list[HandoffSample]:
    """Drop each role's first turn in each format: a cold prefill, not a handoff."""
    seen: set[tuple[str, str]] = set()
    out = []
    for s in samples:
        if (s.format, s.role) in seen:
            out.append(s)
        seen.add((s.format, s.role))
    return out

"""Handoff cost, measured by replaying a finished trajectory in three handoff formats.

For each format the caches are flushed, then every turn is replayed in order: one
measured request (the handoff: the turn's prefix, max_new_tokens=1, streamed for the
time to first token) and one warming request (prefix + the turn's output) so the
server's cache holds what it would hold in a real relay of that format.

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


def replay(result: RelayResult, question: str, engines: dict[str, EngineClient], tok: Tokenizer,
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
                    eng.generate(prefix + seg.token_ids, {"max_new_tokens": 1, "temperature": 0})
                elif fmt == "text":
                    body = {"text": tok.decode(prefix, skip_special=False),
                            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
                    t0 = time.perf_counter()
                    r = http.post(f"{eng.url}/generate", json=body).json()
                    sample = (r["meta_info"]["prompt_tokens"], r["meta_info"]["cached_tokens"], time.perf_counter() - t0)
                    warm = {**body, "text": tok.decode(prefix + seg.token_ids, skip_special=False)}
                    http.post(f"{eng.url}/generate", json=warm)
                else:
                    partial = think_prefix + tok.decode(completion, skip_special=False)
                    sample = _chat(eng.url, question, partial, 1, http)
                    _chat(eng.url, question, partial + seg.text, 1, http)
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

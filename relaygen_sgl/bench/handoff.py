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

from dataclasses import dataclass

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.result import RelayResult

FORMATS = ("tokens", "text", "chat")
ONE_TOKEN = {"max_new_tokens": 1, "temperature": 0}


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


def _server_tokens(eng: EngineClient, text: str, tok: Tokenizer) -> list[int]:
    """The server's own tokenization of `text`; SGLang's router does not proxy /tokenize,
    and there the client's tokenizer (the same vocabulary) stands in."""
    ids = eng.tokenize(text)
    return tok.encode(text) if ids is None else ids


def replay(result: RelayResult, question: str, engines: dict[str, EngineClient], tok: Tokenizer,
           think_prefix: str) -> list[HandoffSample]:
    """Every server failure leaves as a typed EngineError (one line at the CLI)."""
    samples: list[HandoffSample] = []
    for fmt in FORMATS:
        for e in set(engines.values()):
            e.flush_cache(timeout_s=30.0)
        prefix = list(result.prompt_ids)
        for i, seg in enumerate(result.segments):
            if seg.role not in engines:
                prefix += seg.token_ids
                continue
            eng = engines[seg.role]
            completion = prefix[len(result.prompt_ids):]
            if fmt == "tokens":
                g = eng.generate(prefix, ONE_TOKEN, on_tokens=lambda ids, last: None)
                sample = (g.prompt_tokens, g.cached_tokens, g.ttft_s)
                as_sent = prefix
            elif fmt == "text":
                text = tok.decode(prefix, skip_special=False)
                g = eng.generate_text(text, ONE_TOKEN, on_tokens=lambda ids, last: None)
                sample = (g.prompt_tokens, g.cached_tokens, g.ttft_s)
                as_sent = _server_tokens(eng, text, tok)
            else:
                partial = think_prefix + tok.decode(completion, skip_special=False)
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": partial}]
                sample = tuple(eng.chat_stream(messages, continue_final_message=True, max_tokens=1))
                rendered = tok.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=False)
                as_sent = _server_tokens(eng, rendered, tok)
            # what the server caches after this turn: what it was sent, then what it generated
            eng.generate(as_sent + seg.token_ids, ONE_TOKEN)
            samples.append(HandoffSample(fmt, seg.role, i, *sample))
            prefix += seg.token_ids
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

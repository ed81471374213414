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

And the floor a live handoff is read against (`idle_floor`): the cheapest handoff one server
can take, a request that adds two tokens to a prefix it has just cached, after each of a few
idle gaps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.result import RelayResult

FORMATS = ("tokens", "text", "chat")
ONE_TOKEN = {"max_new_tokens": 1, "temperature": 0}
# The floor: tokens a request adds to the cached prefix (a cue's last token and the one after
# it: a prefetched handoff's +1), idle gaps before it, tokens streamed to time the decode step.
FLOOR_NEW = 2
FLOOR_GAPS_S = (0.0, 0.1, 0.3)
FLOOR_STREAM = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
FLOOR_SPACING = 8  # positions between two samples' cuts: more than a sample's 6 tokens leave cached
FLOOR_TRIALS = 8  # requests per gap and server


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


def idle_floor(eng: EngineClient, sequences: Sequence[tuple[list[int], int]], trials: int = FLOOR_TRIALS,
               gaps: Sequence[float] = FLOOR_GAPS_S, sleep: Callable[[float], None] = time.sleep,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cheapest handoff `eng` can take, after each idle gap: a prefill-only request leaves
    a prefix cached (as a prefetch does), `gap` seconds later a request adds FLOOR_NEW tokens
    to it and streams 6. Returns each gap's first tokens (sent to received, in seconds, listed
    by the gap's str), the tokens each re-prefilled as the server reports them, and the
    server's own decode step in those streams (`stream_step_s`).
    A live handoff's receiver has idled since its last prefetch or for the other role's whole
    turn, and on some machines any work after idle runs slower (docs/cpu.md, "The receiving
    server's floor"). `sequences`: (token ids, where the prompt ends), with distinct prompts;
    each cut is FLOOR_SPACING tokens past the one before, so no sample finds its new tokens
    cached. Only whole trials run (every gap as often); gaps are interleaved, their order
    reversed every trial. `extra`: fields of every request (a DP rank to pin both to)."""
    cuts = [(seq, p) for seq, start in sequences for p in range(start + FLOOR_SPACING, len(seq) + 1, FLOOR_SPACING)]
    first: dict[float, list[float]] = {g: [] for g in gaps}
    steps: list[float] = []
    refilled: list[int] = []  # what each request re-prefilled, as the server reports it: FLOOR_NEW if all went right
    for i, (seq, p) in enumerate(cuts[: min(trials, len(cuts) // len(gaps)) * len(gaps)]):
        t, k = divmod(i, len(gaps))
        gap = gaps[k] if t % 2 == 0 else gaps[-1 - k]
        eng.generate(seq[: p - FLOOR_NEW], {"max_new_tokens": 0}, extra=extra)
        sleep(gap)
        stamps: list[tuple[float, int]] = []  # (arrival, tokens so far): a chunk may carry several
        g = eng.generate(seq[:p], FLOOR_STREAM, extra=extra,
                         on_tokens=lambda ids, last: stamps.append((time.perf_counter(), len(ids))))
        first[gap].append(g.ttft_s)
        refilled.append(g.prompt_tokens - g.cached_tokens)
        steps += [(b - a) / (m - n) for (a, n), (b, m) in zip(stamps, stamps[1:]) if m > n]
    return {"new_tokens": FLOOR_NEW, "reprefilled_tokens": refilled,
            "first_token_s": {f"{g:g}": v for g, v in first.items()},
            "stream_step_s": round(statistics.median(steps), 4) if steps else None}

"""The one owner of a program's trajectory: its token ids, its segments, whether the small
server failed (degraded), the error that stopped it, and the caller's control of the run
(who listens to its deltas, what cancels it).

The routing backend keeps one Trajectory per SGLang program state (in the state's
variables, so a `fork` hands each branch a copy of its parent's). The interpreter's
`s.text_` is the program's view; the trajectory knows which of those characters it has
already turned into token ids, tokenizes only text the program itself adds, and records
each model turn as the ids the model wrote, so a handoff never re-tokenizes generated text.
"""

from __future__ import annotations

import time
from typing import Any

from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.result import INSERTED, RelayResult, Segment, compute_stats
from relaygen_sgl.runtime.plan import RunControl

KEY = "_relaygen_trajectory"  # where a program state keeps its trajectory (s.variables)


class Trajectory:
    def __init__(self, sid: str, tokenizer: Tokenizer, slot: int = 0) -> None:
        self.sid = sid
        self.tokenizer = tokenizer
        self.slot = slot  # pins the trajectory to one data-parallel rank per role
        self.prompt_ids: list[int] = []
        self.prompt = ""
        self.segments: list[Segment] = []
        self.consumed = 0  # characters of the program's text already in the ids
        self.degraded: dict[str, Any] | None = None
        # what stopped a turn: the interpreter stores it only after waking the program, so
        # the backend records it here for the relay loop to read at once
        self.error: BaseException | None = None
        self.control = RunControl()  # a relay's plan brings the caller's
        self.pending: Any = None  # the relay loop's TurnSpec for the next gen (None: a plain gen)
        self.unseeded = False  # a seeded, sampled turn ran where the seed cannot reproduce it
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self._last_end: float | None = None  # when the last model turn finished
        self.writing = 0  # tokens the turn in progress has streamed so far (the pool gate reads it)

    # ------------------------------------------------------------------ reading
    @property
    def ids(self) -> list[int]:
        """The whole trajectory: prompt, then every segment's ids."""
        return [*self.prompt_ids, *(t for s in self.segments for t in s.token_ids)]

    def tokens(self) -> int:
        """How many tokens the trajectory holds, the turn in progress included: what a server
        writing it has in its KV pool (runtime/pools.py reads it as the trajectory grows)."""
        return len(self.prompt_ids) + sum(len(s.token_ids) for s in self.segments) + self.writing

    @property
    def completion_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def last_writer(self) -> str | None:
        """The role whose turn the trajectory ends with (None before any, or after inserted
        text): that server holds all of it but the last token."""
        return self.segments[-1].role if self.segments and self.segments[-1].role != INSERTED else None

    def model_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.segments if s.role != INSERTED)

    def result(self, method: str, finish: str, think_end: str, budget: int = 0) -> RelayResult:
        e2e = time.perf_counter() - self.t0
        stats = compute_stats(self.segments, e2e, self.ttft or 0.0, budget, finish)
        return RelayResult(method=method, prompt=self.prompt, prompt_ids=list(self.prompt_ids),
                           segments=list(self.segments), stats=stats, think_end=think_end,
                           degraded=self.degraded)

    # ------------------------------------------------------------------ writing
    def absorb(self, text: str) -> list[int]:
        """Take in the text the program appended since the last turn (a prompt, an inserted
        "</think>", a selected choice); returns its ids. The first text is the prompt."""
        added = text[self.consumed:]
        self.consumed = len(text)
        if not added:
            return []
        ids = self.tokenizer.encode(added)
        if not self.prompt_ids and not self.segments:
            self.prompt, self.prompt_ids = added, ids
        else:
            self.segments.append(Segment(INSERTED, added, ids, len(ids), 0, 0, 0.0, finish="inserted"))
        return ids

    def add(self, segment: Segment) -> None:
        """A model turn that finished; its text is what the program's text grew by."""
        now = time.perf_counter()
        first_token_at = now - segment.latency_s + segment.ttft_s
        if self.ttft is None:
            self.ttft = first_token_at - self.t0
        if self._last_end is not None:
            segment.handoff_s = round(first_token_at - self._last_end, 4)
        self._last_end = now
        self.segments.append(segment)
        self.writing = 0
        self.consumed += len(segment.text)

    def fork(self, sid: str, at_chars: int) -> Trajectory:
        """A branch of `fork`: the history up to the fork point (`at_chars` of the program's
        text; the parent may have gone on since), then its own future."""
        child = Trajectory(sid, self.tokenizer, self.slot)
        child.degraded, child.control, child.t0, child.ttft = self.degraded, self.control, self.t0, self.ttft
        if not self.prompt_ids or len(self.prompt) > at_chars:
            return child  # nothing taken in before the fork: the branch starts from text
        child.prompt, child.prompt_ids = self.prompt, list(self.prompt_ids)
        pos = len(self.prompt)
        for seg in self.segments:
            if pos + len(seg.text) > at_chars:
                break
            child.segments.append(seg)
            pos += len(seg.text)
        child.consumed = pos
        return child

"""Collects a program's turns into a RelayResult as they finish."""

from __future__ import annotations

import time
from typing import Any

from .errors import RelayAborted
from .policy import RelayPlan
from .result import INSERTED, RelayResult, Segment, compute_stats
from .tokenizer import load_tokenizer
from .turn import TurnResult


class Trace:
    def __init__(self, plan: RelayPlan) -> None:
        self.plan = plan
        self.tok = load_tokenizer(plan.tokenizer_path)
        self.t0 = time.perf_counter()
        self.prompt = ""
        self.prompt_ids: list[int] = []
        self.segments: list[Segment] = []
        self.ttft: float | None = None
        self.degraded: dict[str, Any] | None = None

    def start(self, question: str) -> str:
        self.prompt = self.plan.render(question)
        self.prompt_ids = self.tok.encode(self.prompt)
        return self.prompt

    def insert(self, text: str) -> None:
        ids = self.tok.encode(text)
        self.segments.append(Segment(INSERTED, text, ids, 0, 0, 0, 0.0, finish="inserted"))

    def add(self, meta: dict[str, Any] | None) -> TurnResult:
        if meta is None or "error" in meta:
            err = (meta or {}).get("error")
            role = getattr(err, "role", None)
            raise RelayAborted(f"relay stopped after {len(self.segments)} segments: {err}",
                               partial=self.result("error"), role=role) from err
        turn: TurnResult = meta["turn"]
        self.degraded = meta.get("degraded") or self.degraded
        if self.ttft is None:
            self.ttft = (time.perf_counter() - self.t0) - turn.latency_s + turn.ttft_s
        self.segments.append(Segment(
            role=turn.role, text=turn.text, token_ids=turn.ids, completion_tokens=len(turn.ids),
            prompt_tokens=turn.prompt_tokens, cached_tokens=turn.cached_tokens,
            latency_s=round(turn.latency_s, 4), server_latency_s=round(turn.server_latency_s, 4),
            ttft_s=round(turn.ttft_s, 4), finish=turn.finish.kind, matched=turn.finish.matched,
            requests=turn.requests, discarded_tokens=turn.discarded_tokens, rerouted_from=turn.rerouted_from,
        ))
        return turn

    def result(self, finish: str) -> RelayResult:
        e2e = time.perf_counter() - self.t0
        stats = compute_stats(self.segments, e2e, self.ttft or 0.0, self.plan.budget, finish)
        return RelayResult(method=self.plan.method, prompt=self.prompt, prompt_ids=self.prompt_ids,
                           segments=list(self.segments), stats=stats, think_end=self.plan.family.think_end,
                           degraded=self.degraded)

"""What a run returns: segments by role, the trajectory's token ids, and its stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from relaygen_sgl.core.config import ROLES

INSERTED = "inserted"  # text the program itself adds (the forced "\n</think>")
# A listener's (role, text) event: the small server failed mid-turn; `text`, already delivered,
# is void, and the large model's version of the turn follows.
REROUTED = "rerouted"


@dataclass
class Segment:
    role: str  # "large" | "small" | "inserted"
    text: str
    token_ids: list[int]
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    latency_s: float
    server_latency_s: float = 0.0
    ttft_s: float = 0.0
    finish: str = ""  # cue | stop | eos | length | inserted
    matched: str | int | None = None
    requests: int = 0
    discarded_tokens: int = 0
    rerouted_from: str | None = None  # "small": the large model ran this turn after the small failed
    handoff_s: float | None = None  # the previous model turn's end to this turn's first token
    # with return_logprob: the turn's input_/output_ token and top logprobs, as SGLang's meta_info
    # holds them ([logprob, token id, text or None] per token), the output ones one per token_ids
    logprobs: dict[str, list] | None = None

    @property
    def reprefilled(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def meta_info(self) -> dict[str, Any]:
        """SGLang-like meta_info for the interpreter (`s.get_meta_info(name)`)."""
        return {"role": self.role, "finish_reason": {"type": self.finish, "matched": self.matched},
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "e2e_latency": self.server_latency_s,
                "rerouted_from": self.rerouted_from, **(self.logprobs or {})}


def warm_turns(prompt_tokens: int, segments: list[Segment], handoffs_only: bool = True) -> list[dict[str, Any]]:
    """Every turn that follows the other role's turn where the receiving role had a turn before
    (its server then holds the trajectory up to that turn's end): its segment's index, the
    tokens written since (`new`: the other role's and any inserted text), what the turn
    re-prefilled, and `beyond_floor`, what it re-prefilled beyond new + 1 (the +1: the receiving
    role's last token, whose KV it never computed), 0 where a prefetch or a cut follower left
    less. A turn above the floor found part of what its server held evicted.
    `handoffs_only=False`: every turn of a role that had one before, the same role's after
    inserted text too (a single-large run's answer turn)."""
    out = []
    pos, ends, prev = prompt_tokens, {}, None  # ends: role -> where its last turn ended
    for i, seg in enumerate(segments):
        if seg.role in ROLES:
            if seg.role in ends and (prev != seg.role or not handoffs_only):
                new = pos - ends[seg.role]
                out.append({"segment": i, "role": seg.role, "at": pos, "new": new, "reprefilled": seg.reprefilled,
                            "beyond_floor": max(0, seg.reprefilled - new - 1)})
            prev = seg.role
            ends[seg.role] = pos + len(seg.token_ids)
        pos += len(seg.token_ids)
    return out


@dataclass
class RelayStats:
    large_tokens: int
    small_tokens: int
    switches: int
    large_share: float
    e2e_s: float
    ttft_s: float
    discarded_tokens: int = 0
    budget: int = 0
    finish: str = ""  # think_end | eos | budget


@dataclass
class RelayResult:
    method: str
    prompt: str
    prompt_ids: list[int]
    segments: list[Segment]
    stats: RelayStats
    think_end: str = "</think>"
    degraded: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def reasoning(self) -> str:
        text = self.text
        i = text.find(self.think_end)
        return text if i < 0 else text[:i]

    @property
    def answer(self) -> str:
        text = self.text
        i = text.find(self.think_end)
        return "" if i < 0 else text[i + len(self.think_end):].strip()

    def to_dict(self, *, token_ids: bool = True) -> dict[str, Any]:
        segs = []
        for s in self.segments:
            d = asdict(s)
            if not token_ids:
                d.pop("token_ids")
            if d["logprobs"] is None:  # asked for by few runs: records without it stay as they were
                d.pop("logprobs")
            segs.append(d)
        out: dict[str, Any] = {
            "method": self.method, "text": self.text, "reasoning": self.reasoning, "answer": self.answer,
            "segments": segs, "stats": asdict(self.stats),
        }
        if token_ids:
            out["prompt_ids"] = self.prompt_ids
        if self.degraded is not None:
            out["degraded"] = self.degraded
        out.update(self.extra)
        return out


def compute_stats(segments: list[Segment], e2e_s: float, ttft_s: float, budget: int, finish: str) -> RelayStats:
    large = sum(s.completion_tokens for s in segments if s.role == "large")
    small = sum(s.completion_tokens for s in segments if s.role == "small")
    roles = [s.role for s in segments if s.role in ROLES]
    switches = sum(1 for a, b in zip(roles, roles[1:]) if a != b)
    total = large + small
    return RelayStats(
        large_tokens=large, small_tokens=small, switches=switches,
        large_share=round(large / total, 4) if total else 0.0,
        e2e_s=round(e2e_s, 4), ttft_s=round(ttft_s, 4),
        discarded_tokens=sum(s.discarded_tokens for s in segments), budget=budget, finish=finish,
    )

"""The RelayGen routing policy as an object: given the last turn, what runs next.

think phase: large until a verified cue or </think>; small until a sentence end or
</think>; back to large. The large model needs `min_large_tokens` before a cue may end
its turn. After </think> one answer turn (small by default). One completion budget
spans both models; if it runs out inside thinking, "\\n</think>\\n\\n" is inserted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaygen_sgl.client.tokenizer import load_tokenizer
from relaygen_sgl.core.config import METHODS, ROLES, Family
from relaygen_sgl.core.cues import CUE_MATCHES, CueProfile
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.result import Segment

MIN_LARGE_TOKENS = 5
DEFAULT_BUDGET = 32768  # completion tokens across both models, as in the paper


DeltaSink = Callable[[str, str], None]  # (role, text delta)


@dataclass(frozen=True)
class TurnSpec:
    """What to run next. The policy decides one (role None: the trajectory is over, with
    `finish` saying why); the backend rebuilds one from the gen's sampling parameters."""

    role: str | None
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    cue_patterns: tuple[str, ...] = ()
    # A cue may not end the turn before this many tokens. Enforced here, not with SGLang's
    # min_new_tokens: that masks EOS (and not stop strings), which would change what the
    # model writes; gating only the cue keeps a greedy relay equal to the single model.
    min_tokens: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # top-level request fields (routed_dp_rank)
    insert: str = ""  # text the program appends before this turn (the forced "\n</think>\n\n")
    finish: str = ""  # why the trajectory ended (role None)


@dataclass(frozen=True)
class RelayPlan:
    """One run's settings: method, cues, family (template, think_end), budget, sampling."""

    method: str
    profile: CueProfile
    family: Family
    tokenizer_path: str
    budget: int = DEFAULT_BUDGET
    answer_role: str = "small"
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k
    seed: int | None = None
    min_large_tokens: int = MIN_LARGE_TOKENS
    answer: bool = True  # False: stop once thinking is closed (the caller goes on)
    cue_match: str = "word"  # "substring": the reference's stop-string matching ("now" in "know")
    prefetch: bool | None = None  # warm the other server during each turn (None: the backend's default)
    on_delta: DeltaSink | None = field(default=None, compare=False, repr=False)
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)  # set: stop the run

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget < 1:
            raise ConfigError(f"the token budget must be positive, got {self.budget}")
        if self.answer_role not in ROLES:
            raise ConfigError(f"answer role must be 'large' or 'small', got {self.answer_role!r}")
        if self.cue_match not in CUE_MATCHES:
            raise ConfigError(f"cue matching must be one of {', '.join(CUE_MATCHES)}, got {self.cue_match!r}")

    def render(self, question: str | list[dict[str, str]]) -> str:
        """The prompt for a question, or for a conversation (OpenAI-style messages)."""
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
        if not messages or not any(str(m.get("content") or "").strip() for m in messages):
            raise ConfigError("the question is empty")
        tok = load_tokenizer(self.tokenizer_path)
        prompt = tok.apply_chat_template(messages, **self.family.template_kwargs)
        return prompt + self.family.think_prefix

    @property
    def closing_text(self) -> str:
        return f"\n{self.family.think_end}\n\n"

    @property
    def cue_patterns(self) -> tuple[str, ...]:
        return self.profile.patterns_for(self.cue_match)

    @property
    def large_stops(self) -> tuple[str, ...]:
        return (self.family.think_end,)

    @property
    def small_stops(self) -> tuple[str, ...]:
        return (*self.profile.sentence_ends, self.family.think_end)


class RelayPolicy:
    def __init__(self, plan: RelayPlan) -> None:
        self.plan = plan
        self.used = 0
        self.phase = "think"
        self.single_role = {"single-large": "large", "single-small": "small"}.get(plan.method)

    @property
    def remaining(self) -> int:
        return self.plan.budget - self.used

    def _large(self) -> TurnSpec:
        return TurnSpec("large", self.remaining, self.plan.large_stops, self.plan.cue_patterns,
                        min(self.plan.min_large_tokens, self.remaining))

    def _small(self) -> TurnSpec:
        return TurnSpec("small", self.remaining, self.plan.small_stops)

    def _end(self, finish: str, insert: str = "") -> TurnSpec:
        return TurnSpec(None, insert=insert, finish=finish)

    def _answer(self, insert: str = "") -> TurnSpec:
        self.phase = "answer"
        if not self.plan.answer:
            return self._end("think_end", insert)
        if self.remaining <= 0:
            return self._end("budget", insert)
        return TurnSpec(self.single_role or self.plan.answer_role, self.remaining, insert=insert)

    def start(self) -> TurnSpec:
        if self.single_role:
            return TurnSpec(self.single_role, self.remaining, self.plan.large_stops)
        return self._large()

    def after(self, turn: Segment, degraded: bool = False) -> TurnSpec:
        """The next turn, given the one that just finished; `degraded`: the small server
        failed, so the large model goes on alone (no more switching, it answers too)."""
        self.used += len(turn.token_ids)
        if degraded:
            self.single_role = "large"
        if self.phase == "answer":
            return self._end("eos" if turn.finish == "eos" else ("budget" if turn.finish == "length" else "done"))
        think_end = self.plan.family.think_end
        if turn.finish == "stop" and turn.matched == think_end:
            return self._answer()
        if turn.finish == "eos":
            if self.plan.family.eos_in_thinking == "close":
                return self._answer(insert=self.plan.closing_text)
            return self._end("eos")
        if turn.finish == "length" or self.remaining <= 0:
            return self._end("budget", insert=self.plan.closing_text)
        if self.single_role:  # a stop string other than </think> cannot end a single turn
            return TurnSpec(self.single_role, self.remaining, self.plan.large_stops)
        return self._small() if turn.role == "large" else self._large()

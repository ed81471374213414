"""The RelayGen routing policy as an object: given the last turn, what happens next.

think phase: large until a verified cue or </think>; small until a sentence end or
</think>; back to large. The large model needs `min_large_tokens` before a cue may end
its turn. After </think> one answer turn (small by default). One completion budget
spans both models; if it runs out inside thinking, "\\n</think>\\n\\n" is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Family
from .cues import CueProfile
from .errors import ConfigError
from .tokenizer import load_tokenizer
from .turn import TurnResult

METHODS = ("relay", "single-large", "single-small")
MIN_LARGE_TOKENS = 5
DEFAULT_BUDGET = 32768  # completion tokens across both models, as in the paper


@dataclass(frozen=True)
class RelayPlan:
    method: str
    profile: CueProfile
    family: Family
    tokenizer_path: str
    budget: int = DEFAULT_BUDGET
    answer_role: str = "small"
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k
    seed: int | None = None
    min_large_tokens: int = MIN_LARGE_TOKENS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget < 1:
            raise ConfigError(f"the token budget must be positive, got {self.budget}")
        if self.answer_role not in ("large", "small"):
            raise ConfigError(f"answer role must be 'large' or 'small', got {self.answer_role!r}")

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


@dataclass(frozen=True)
class Decision:
    role: str | None  # None: the trajectory is over
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    cue_patterns: tuple[str, ...] = ()
    min_tokens: int = 0
    insert: str = ""  # text the program appends before this turn
    finish: str = ""  # why the trajectory ended (with role None)


class RelayPolicy:
    def __init__(self, plan: RelayPlan) -> None:
        self.plan = plan
        self.used = 0
        self.phase = "think"
        self.single_role = {"single-large": "large", "single-small": "small"}.get(plan.method)
        self.degraded = False  # the small server failed: the large model goes on alone

    @property
    def remaining(self) -> int:
        return self.plan.budget - self.used

    def _large(self) -> Decision:
        p = self.plan.profile
        return Decision("large", self.remaining, p.large_stops, p.patterns,
                        min(self.plan.min_large_tokens, self.remaining))

    def _small(self) -> Decision:
        return Decision("small", self.remaining, self.plan.profile.small_stops)

    def _answer(self, insert: str = "") -> Decision:
        self.phase = "answer"
        if self.remaining <= 0:
            return Decision(None, insert=insert, finish="budget")
        role = self.single_role or self.plan.answer_role
        return Decision(role, self.remaining, insert=insert)

    def start(self) -> Decision:
        if self.single_role:
            return Decision(self.single_role, self.remaining, (self.plan.family.think_end,))
        return self._large()

    def after(self, turn: TurnResult) -> Decision:
        self.used += len(turn.ids)
        if turn.rerouted_from == "small" and not self.degraded:
            self.degraded = True
            self.single_role = "large"  # no more switching; the large model answers too
        kind = turn.finish.kind
        if self.phase == "answer":
            return Decision(None, finish="eos" if kind == "eos" else ("budget" if kind == "length" else "done"))
        think_end = self.plan.family.think_end
        if kind == "stop" and turn.finish.matched == think_end:
            return self._answer()
        if kind == "eos":
            if self.plan.family.eos_in_thinking == "close":
                return self._answer(insert=self.plan.closing_text)
            return Decision(None, finish="eos")
        if kind == "length" or self.remaining <= 0:
            return Decision(None, insert=self.plan.closing_text, finish="budget")
        if self.single_role:  # a stop string other than </think> cannot end a single turn
            return Decision(self.single_role, self.remaining, (think_end,))
        return self._small() if turn.role == "large" else self._large()

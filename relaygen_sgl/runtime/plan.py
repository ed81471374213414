"""A run's plan: its settings (already validated, core/run_settings.py) with what the
routing backend resolves for them: the cue profile, the family, the tokenizer, the
sampling, the prefetch mode and the protocol's rules. Built by `RelayBackend.plan`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.core.config import Family
from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.run_settings import RunSettings
from relaygen_sgl.runtime.protocol import MIN_LARGE_TOKENS, PROTOCOL_RULES, Ours

DeltaSink = Callable[[str, str], None]  # (role, text delta)


@dataclass
class RunControl:
    """How a caller listens to a run and stops it: not a setting (it is not compared, not
    printed), handed to the trajectory, which owns it while the run goes."""

    on_delta: DeltaSink | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() past which the run stops (the settings' deadline_s)

    @property
    def stop(self) -> Stop:
        """What ends the run's requests early (client/cancel.py)."""
        return Stop(self.cancel, self.deadline)


@dataclass(frozen=True)
class RelayPlan:
    settings: RunSettings
    profile: CueProfile
    family: Family
    tokenizer_path: str
    prefetch: str  # the mode: the settings' own, else the backend's default
    control: RunControl = field(default_factory=RunControl, compare=False, repr=False)
    min_large_tokens: int = MIN_LARGE_TOKENS
    # the largest budget the servers hold for this run's prompt, where a run that set none
    # must keep within it (RelayBackend.fit, once the prompt is known); None: not cut
    fits: int | None = None

    def __post_init__(self) -> None:
        self.rules.check(self)

    # the settings, read where the relay uses them
    method = property(lambda self: self.settings.method)
    budget = property(lambda self: self.settings.budget if self.settings.max_tokens is not None or self.fits is None
                      else min(self.settings.budget, self.fits))
    seed = property(lambda self: self.settings.seed)
    answer = property(lambda self: self.settings.answer)
    answer_role = property(lambda self: self.settings.answer_role)
    cue_match = property(lambda self: self.settings.cue_match)
    protocol = property(lambda self: self.settings.protocol)

    def but(self, **changes: Any) -> RelayPlan:
        """The same plan with some settings changed (e.g. a fork's branch seed)."""
        return RelayPlan(self.settings.but(**changes), self.profile, self.family, self.tokenizer_path,
                         self.prefetch, self.control, self.min_large_tokens, self.fits)

    @property
    def rules(self) -> Ours:
        """The protocol's rules: every point where ours and the reference's differ."""
        return PROTOCOL_RULES[self.settings.protocol]

    @property
    def sampling(self) -> dict[str, Any]:
        """temperature, top_p, top_k: the family's, with the run's overrides."""
        return {**self.family.sampling, **self.settings.sampling_overrides}

    @property
    def prefetch_mode(self) -> str:
        """Off for single-large and single-small (the other server is never used)."""
        return self.prefetch if self.method == "relay" else "off"

    @property
    def reserve(self) -> int:
        return self.rules.reserve(self)

    @property
    def think_budget(self) -> int:
        return self.budget - self.reserve

    @property
    def closing_text(self) -> str:
        return self.rules.closing_text(self)

    @property
    def cue_patterns(self) -> tuple[str, ...]:
        return self.rules.cue_patterns(self)

    @property
    def large_stops(self) -> tuple[str, ...]:
        return self.rules.large_stops(self)

    @property
    def small_stops(self) -> tuple[str, ...]:
        return self.rules.small_stops(self)

    def render(self, question: str | list[dict[str, str]]) -> str:
        """The prompt for a question, or for a conversation (OpenAI-style messages)."""
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
        if not messages or not any(str(m.get("content") or "").strip() for m in messages):
            raise ConfigError("the question is empty")
        return self.rules.render(self, messages, question if isinstance(question, str) else None)

    def continuation(self, prompt: str) -> Callable[[str], str] | None:
        return self.rules.continuation(self, prompt)

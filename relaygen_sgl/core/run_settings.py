"""A run's settings: the one place they are defaulted and validated.

The CLI, `serve`, the Python API, batch, eval and bench each build one `RunSettings` from
what their user gave and pass it on unchanged; the routing backend turns it into a
RelayPlan (runtime/plan.py) by adding what it resolves itself (the cue profile, the family,
the tokenizer). Nothing below this module re-checks a value, and nothing converts one and
back: prefetch is its mode string throughout, a seed an int in one range.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from relaygen_sgl.core.config import METHODS, ROLES
from relaygen_sgl.core.cues import CUE_MATCHES, CueProfile
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.reference import DEFAULT_PROTOCOL, PROTOCOLS, REFERENCE

DEFAULT_BUDGET = 32768  # completion tokens across both models, as in the paper
# max_tokens of a `relaygen serve` chat request that gives none, as vLLM's and SGLang's servers
# leave it short (or what the servers' pools hold, where that is less)
DEFAULT_REQUEST_TOKENS = 4096
# Tokens kept for the answer (at most a quarter of the budget): thinking is closed when only
# this many are left, as Qwen3's documentation does at a thinking budget (force </think>, then
# let the model answer); a worked final answer fits in it.
DEFAULT_ANSWER_RESERVE = 1024
# The seeded sampler's range, the same in the CLI, serve (OpenAI's `seed`) and the API.
SEED_MIN, SEED_MAX = 0, 2**63 - 1
TEMPERATURE_MAX = 2.0  # OpenAI's range; SGLang itself takes any temperature >= 0
PREFETCH_MODES = ("auto", "on", "off")
DEFAULT_PREFETCH = "auto"
DEFAULT_ANSWER_ROLE = "small"
DEFAULT_CUE_MATCH = "word"


class SettingError(ConfigError):
    """A run setting refused; `setting` names it (serve answers with it as the error's param)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def _integer(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """An int in [lo, hi]; a bool is not an int here (Python's `True == 1` would make it one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        where = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise SettingError(name, f"{name} must be an integer {where}, got {value!r}")


def _number(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (lo < value if lo_open else lo <= value) or value > hi:
        low = "(" if lo_open else "["
        raise SettingError(name, f"{name} must be a number in {low}{lo:g}, {hi:g}], got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices or not isinstance(value, str):
        raise SettingError(name, f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class RunSettings:
    """What one run asks for. None means "not set here": the family's sampling value, the
    backend's prefetch mode, the default answer reserve, no seed, no deadline."""

    method: str = "relay"
    # completion tokens across both models; None: default_max_tokens, or what the servers hold
    # where that is less (an explicit budget that does not fit is refused instead)
    max_tokens: int | None = None
    # the budget of a run that sets no max_tokens, before the servers' pools cut it (serve's
    # requests without max_tokens: DEFAULT_REQUEST_TOKENS)
    default_max_tokens: int = DEFAULT_BUDGET
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1: no top-k cut
    seed: int | None = None
    answer: bool = True  # False: stop once thinking is closed (the caller goes on)
    answer_role: str = DEFAULT_ANSWER_ROLE
    cue_match: str = DEFAULT_CUE_MATCH  # "substring": the reference's stop-string matching
    prefetch: str | None = None  # auto | on | off; None: the backend's default
    protocol: str = DEFAULT_PROTOCOL  # "reference": reproduce the reference implementation
    answer_reserve: int | None = None  # tokens of max_tokens kept for the answer; 0: none
    deadline_s: float | None = None  # past it the run stops as a cancelled one
    profile: str | CueProfile | None = None  # a cue profile's name or path; None: the backend's

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1)
        _integer("default_max_tokens", self.default_max_tokens, 1)
        if self.temperature is not None:
            _number("temperature", self.temperature, 0.0, TEMPERATURE_MAX)
        if self.top_p is not None:
            _number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k is not None and not (type(self.top_k) is int and self.top_k == -1):
            _integer("top_k", self.top_k, 1)
        if self.seed is not None:
            _integer("seed", self.seed, SEED_MIN, SEED_MAX)
        if not isinstance(self.answer, bool):
            raise SettingError("answer", f"answer must be true or false, got {self.answer!r}")
        _choice("answer_role", self.answer_role, ROLES)
        _choice("cue_match", self.cue_match, CUE_MATCHES)
        if self.prefetch is not None:
            _choice("prefetch", self.prefetch, PREFETCH_MODES)
        _choice("protocol", self.protocol, PROTOCOLS)
        if self.answer_reserve is not None:
            _integer("answer_reserve", self.answer_reserve, 0)
        if self.deadline_s is not None:
            _number("deadline_s", self.deadline_s, 0.0, float("inf"), lo_open=True)
        if self.profile is not None and not isinstance(self.profile, (str, CueProfile)):
            raise SettingError("profile", f"profile must be a name, a path or a CueProfile, got {self.profile!r}")
        if self.protocol == REFERENCE and self.answer_reserve:
            raise SettingError("answer_reserve", "the reference protocol shares the budget between thinking and "
                               "the answer, as the reference does: it takes no answer reserve")

    @classmethod
    def of(cls, values: dict[str, Any]) -> RunSettings:
        """From keyword arguments, an unknown name refused with the known ones listed."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingError(unknown[0], f"unknown run setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def given(cls, settings: RunSettings | None, kwargs: dict[str, Any], **fixed: Any) -> RunSettings:
        """A caller's settings, given whole or as keyword arguments (not both), with `fixed`
        (e.g. the method a call names) over them."""
        if settings is None:
            return cls.of({**kwargs, **fixed})
        if kwargs:
            raise SettingError(sorted(kwargs)[0], "give settings or keyword settings, not both: "
                               f"{', '.join(sorted(kwargs))}")
        return settings.but(**fixed) if fixed else settings

    def but(self, **changes: Any) -> RunSettings:
        """A copy with some settings changed, validated again."""
        return RunSettings.of({**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @property
    def budget(self) -> int:
        """The budget asked for: max_tokens, else the default."""
        return self.default_max_tokens if self.max_tokens is None else self.max_tokens

    @property
    def reference(self) -> bool:
        return self.protocol == REFERENCE

    @property
    def sampling_overrides(self) -> dict[str, Any]:
        """The sampling values this run sets over the family's."""
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                  ("top_k", self.top_k)) if v is not None}

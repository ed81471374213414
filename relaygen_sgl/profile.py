"""Cue profiles: which cues end a large segment, which strings end a small one, per model pair."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cues import MAX_STOP_STRINGS, cue_patterns
from .errors import ConfigError
from .resources import data_path

DEFAULT_SENTENCE_ENDS = (".", "!", "?", "\n\n")


@dataclass(frozen=True)
class CueProfile:
    name: str
    models: dict[str, str]
    cues: tuple[str, ...]
    sentence_ends: tuple[str, ...] = DEFAULT_SENTENCE_ENDS
    think_end: str = "</think>"
    provenance: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def patterns(self) -> tuple[str, ...]:
        return cue_patterns(self.cues)

    @property
    def large_stops(self) -> tuple[str, ...]:
        return (self.think_end,)

    @property
    def small_stops(self) -> tuple[str, ...]:
        return (*self.sentence_ends, self.think_end)

    def validate(self) -> CueProfile:
        if not self.cues:
            raise ConfigError(f"profile {self.name!r} has no cues")
        if len(set(self.cues)) != len(self.cues):
            raise ConfigError(f"profile {self.name!r} lists a cue twice")
        _ = self.patterns  # raises on an invalid cue or too many cues
        if len(self.small_stops) > MAX_STOP_STRINGS:
            raise ConfigError(f"profile {self.name!r}: {len(self.small_stops)} stop strings, "
                              f"SGLang takes at most {MAX_STOP_STRINGS}")
        if any(not s for s in self.small_stops):
            raise ConfigError(f"profile {self.name!r} has an empty stop string")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "models": self.models, "cues": list(self.cues),
                "sentence_ends": list(self.sentence_ends), "think_end": self.think_end,
                "provenance": self.provenance, "stats": self.stats}


def profile_from_dict(raw: dict[str, Any], origin: str) -> CueProfile:
    try:
        return CueProfile(
            name=str(raw.get("name", origin)),
            models=dict(raw.get("models", {})),
            cues=tuple(raw["cues"]),
            sentence_ends=tuple(raw.get("sentence_ends", DEFAULT_SENTENCE_ENDS)),
            think_end=str(raw.get("think_end", "</think>")),
            provenance=dict(raw.get("provenance", {})),
            stats=dict(raw.get("stats", {})),
        ).validate()
    except (KeyError, TypeError) as e:
        raise ConfigError(f"profile {origin}: missing or malformed field {e}") from e


def available_profiles() -> list[str]:
    return sorted(p.stem for p in data_path("profiles").glob("*.json"))


def load_profile(name_or_path: str) -> CueProfile:
    """A bundled profile by name, or a JSON file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = data_path("profiles") / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(f"unknown profile {name_or_path!r}; bundled: {', '.join(available_profiles())}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read profile {path}: {e}") from e
    return profile_from_dict(raw, str(path))

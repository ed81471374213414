"""Model families: chat template with thinking on, where thinking ends, default sampling."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .resources import data_path


@dataclass(frozen=True)
class Family:
    name: str
    think_prefix: str = ""
    think_end: str = "</think>"
    eos_in_thinking: str = "end"  # "end" | "close"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)


def load_families() -> dict[str, Family]:
    raw = tomllib.loads(data_path("families.toml").read_text())
    out = {}
    for name, spec in raw.items():
        fam = Family(name=name, **spec)
        if fam.eos_in_thinking not in ("end", "close"):
            raise ConfigError(f"family {name}: eos_in_thinking must be 'end' or 'close'")
        out[name] = fam
    return out


def load_family(name: str) -> Family:
    families = load_families()
    if name not in families:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]

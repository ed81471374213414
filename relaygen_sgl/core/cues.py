"""Switch cues: cue profiles (which cues end a large turn, which strings end a small one,
per model pair; data/profiles/*.json) and cues matched as words.

SGLang's stop strings match substrings ("now" inside "know"), so cues go to the server
as stop_regex patterns instead: `\\b(now)\\W` needs a word boundary before the cue and,
for a cue ending in a letter, one non-word character after it ("Other" never fires in
"Otherwise"). The pattern's group 1 is the cue; the character after it is the only text
the large model writes past the cue, and that token is cut from the segment.

The patterns use no look-around on purpose: SGLang sizes its stop window from the
pattern, and treats look-around as unbounded (it would decode the whole output on every
step). `\\b` at the start of that window cannot see the text before it, so every server
match is verified here against the trajectory text before it is accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaygen_sgl.core.config import data_path
from relaygen_sgl.core.errors import ConfigError

MAX_STOP_STRINGS = 32  # SGLang's MAX_STOP_COUNT
MAX_STOP_REGEXES = 32  # SGLang's MAX_STOP_REGEX_COUNT
MAX_REGEX_BYTES = 256  # SGLang's MAX_STOP_REGEX_LEN
CONTEXT_CHARS = 64  # trajectory text kept before a segment to check the left boundary


def _is_word(ch: str) -> bool:
    return bool(re.match(r"\w", ch))


CUE_MATCHES = ("word", "substring")  # ours (default) | the reference's plain stop strings


def cue_pattern(cue: str, match: str = "word") -> str:
    """The stop_regex for one cue. 'So ' keeps its space as the required follower. With
    match="substring" the cue fires anywhere, as the reference's stop strings do ("now" inside
    "know"); the pattern then has no boundary and no follower to cut."""
    if not cue or not cue.strip() or cue != cue.lstrip():
        raise ConfigError(f"invalid cue {cue!r}: must be non-empty and not start with whitespace")
    if match not in CUE_MATCHES:
        raise ConfigError(f"unknown cue matching {match!r}; choose one of {', '.join(CUE_MATCHES)}")
    if match == "substring":
        return f"({re.escape(cue)})"
    core = cue.rstrip()
    tail = cue[len(core):]
    head = r"\b" if _is_word(core[0]) else ""
    if tail:
        follow = re.escape(tail)
    elif _is_word(core[-1]):
        follow = r"\W"
    else:
        follow = ""
    pattern = f"{head}({re.escape(core)}){follow}"
    if len(pattern.encode()) > MAX_REGEX_BYTES:
        raise ConfigError(f"cue {cue!r} is too long for an SGLang stop_regex ({MAX_REGEX_BYTES} bytes)")
    return pattern


@dataclass(frozen=True)
class CueMatch:
    cue: str
    start: int  # character offsets in the searched text
    end: int  # end of the cue itself (the cut point), before any follower


def find_cue(text: str, patterns: Iterable[str], *, after: int = 0) -> CueMatch | None:
    """Earliest cue (by the position where the match completes) whose cue ends past `after`.

    `text` must include the trajectory text before the new output, so `\\b` sees it.
    """
    best: tuple[tuple[int, int], CueMatch] | None = None
    for pattern in patterns:
        for m in re.finditer(pattern, text):
            cut = m.end(1) if m.re.groups else m.end()
            if cut <= after:
                continue
            # Earliest completion first (that is where the server stopped); on a tie the longer
            # cue wins, so "Thus," keeps its comma in the large model's segment.
            key = (m.end(), -cut)
            if best is None or key < best[0]:
                best = (key, CueMatch(m.group(1) if m.re.groups else m.group(), m.start(), cut))
            break
    return best[1] if best else None


# Characters that end a word: if one of them would complete a cue after the text so far,
# the model's next token may end the turn.
NEXT_CHARS = (" ", ",", ".", ":", "\n")


def cue_next(text: str, patterns: Iterable[str]) -> bool:
    """One more non-word character after `text` could complete a cue ("... Therefore" + " ",
    "... Now" + ","). `text` needs the characters before the cue, so `\\b` sees them."""
    candidates = [text + ch for ch in NEXT_CHARS]
    return any(m.end() > len(text)  # not a match the server has already seen
               for pattern in patterns for c in candidates for m in re.finditer(pattern, c))


def cue_patterns(cues: Sequence[str], match: str = "word") -> tuple[str, ...]:
    if len(cues) > MAX_STOP_REGEXES:
        raise ConfigError(f"{len(cues)} cues, but SGLang takes at most {MAX_STOP_REGEXES} stop_regex patterns")
    return tuple(cue_pattern(c, match) for c in cues)


def word_occurrences(text: str, cue: str) -> list[tuple[int, int]]:
    """(start, cut) of every word occurrence of `cue` in a finished text (end of text counts
    as a boundary here, unlike during generation)."""
    pattern = cue_pattern(cue)
    if pattern.endswith(r"\W"):
        pattern = pattern[: -len(r"\W")] + r"(?:\W|$)"
    return [(m.start(), m.end(1)) for m in re.finditer(pattern, text)]


DEFAULT_SENTENCE_ENDS = (".", "!", "?", "\n\n")


@dataclass(frozen=True)
class CueProfile:
    name: str
    models: dict[str, str]
    cues: tuple[str, ...]
    sentence_ends: tuple[str, ...] = DEFAULT_SENTENCE_ENDS
    provenance: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def patterns(self) -> tuple[str, ...]:
        return cue_patterns(self.cues)

    def patterns_for(self, match: str) -> tuple[str, ...]:
        return cue_patterns(self.cues, match)

    def validate(self) -> CueProfile:
        if not self.cues:
            raise ConfigError(f"profile {self.name!r} has no cues")
        if len(set(self.cues)) != len(self.cues):
            raise ConfigError(f"profile {self.name!r} lists a cue twice")
        _ = self.patterns  # raises on an invalid cue or too many cues
        # A small turn also stops at the family's think_end and the chat template's stop string.
        if len(self.sentence_ends) + 2 > MAX_STOP_STRINGS:
            raise ConfigError(f"profile {self.name!r}: {len(self.sentence_ends)} sentence ends; with </think> and "
                              f"the template's stop string SGLang takes at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in self.sentence_ends):
            raise ConfigError(f"profile {self.name!r} has an empty stop string")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "models": self.models, "cues": list(self.cues),
                "sentence_ends": list(self.sentence_ends),
                "provenance": self.provenance, "stats": self.stats}


def profile_from_dict(raw: dict[str, Any], origin: str) -> CueProfile:
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {origin}: expected a JSON object with a 'cues' list, got {type(raw).__name__}")
    for key, kind in (("cues", list), ("sentence_ends", list), ("models", dict), ("provenance", dict),
                      ("stats", dict)):
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigError(f"profile {origin}: {key!r} must be a JSON {'array' if kind is list else 'object'}")
    for key in ("cues", "sentence_ends"):
        if any(not isinstance(item, str) for item in raw.get(key, ())):
            raise ConfigError(f"profile {origin}: every item of {key!r} must be a string")
    try:
        return CueProfile(
            name=str(raw.get("name", origin)),
            models=dict(raw.get("models", {})),
            cues=tuple(raw["cues"]),
            sentence_ends=tuple(raw.get("sentence_ends", DEFAULT_SENTENCE_ENDS)),
            provenance=dict(raw.get("provenance", {})),
            stats=dict(raw.get("stats", {})),
        ).validate()
    except (KeyError, TypeError, ValueError) as e:
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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read profile {path}: {e}") from e
    return profile_from_dict(raw, str(path))

"""The pair you talk to is the pair you think: what each server serves, checked against a
preset, or, with no preset, used to pick the family and the shipped cue profile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.core.config import ROLES, Family, Preset, load_families, load_preset, load_settings, preset_names
from relaygen_sgl.core.cues import CueProfile, available_profiles, load_profile
from relaygen_sgl.core.errors import ConfigError


def _name(model: str) -> str:
    return PurePath(model.rstrip("/")).name.lower()


def same_model(served: str, expected: str) -> bool:
    """A server started with `--model-path X` reports X; a local folder or a hub snapshot
    of the same model ends in the model's name."""
    return served == expected or _name(served) == _name(expected)


def expected_model(preset: Preset, role: str) -> str:
    spec = preset.roles[role]
    return spec.local_model or spec.model or ""


def served_models(engines: dict[str, EngineClient], down: frozenset[str] = frozenset()) -> dict[str, str | None]:
    """What each server serves; None for a role in `down` (not asked: it did not answer)."""
    out: dict[str, str | None] = {}
    for role in ROLES:
        if role in down:
            out[role] = None
            continue
        info = engines[role].model_info()
        out[role] = str(info.get("model_path") or info.get("served_model_name") or "")
    return out


def _fits(served: dict[str, str | None], want: Callable[[str], str]) -> bool:
    """Every role that answered serves what `want(role)` names (a role that is down is not held against it)."""
    return all(same_model(served[r], want(r)) for r in ROLES if served[r] is not None)


def check_preset(preset: Preset, served: dict[str, str | None], urls: dict[str, str]) -> None:
    want = {role: expected_model(preset, role) for role in ROLES}
    if not _fits(served, want.__getitem__):
        raise ConfigError(f"the servers ({urls['large']}, {urls['small']}) serve large {served['large']!r} and small "
                          f"{served['small']!r}, but preset {preset.name} expects large {want['large']!r} and small "
                          f"{want['small']!r} (pick the preset these servers run, or leave --preset out to detect it)")


@dataclass(frozen=True)
class Pairing:
    preset: Preset | None
    family: Family
    profile: CueProfile | None  # None: no shipped profile fits; the caller must give one


def detect(served: dict[str, str | None]) -> Pairing:
    """The preset whose models the servers serve, else the family from the large model's
    name and a shipped profile calibrated for these models (a server that is down: by the
    other one alone)."""
    families = load_families()
    for name in preset_names():
        preset = load_preset(name)
        if _fits(served, lambda r, preset=preset: expected_model(preset, r)):
            return Pairing(preset, families[preset.family], load_profile(preset.profile))
    large = _name(served["large"] or "")
    family = next((f for f in families.values() if any(m in large for m in f.models)), None)
    if family is None:
        raise ConfigError(f"cannot tell the model family of {served['large']!r}; give --preset or --family "
                          f"({', '.join(sorted(families))})")
    for name in available_profiles():
        prof = load_profile(name)
        if _fits(served, lambda r, prof=prof: str(prof.models.get(r, ""))):
            return Pairing(None, family, prof)
    return Pairing(None, family, None)


RECHECK_S = 30.0  # how often a relay that started without its small server looks for it again


class SmallDown:
    """The small server did not answer when the relay connected (--on-small-failure large).
    Each trajectory started meanwhile is degraded from its first token (the large model
    alone, no switching), as one whose small server failed mid-run; `probe` (the server
    answers and serves the right model) runs at most every `recheck_s`, on its own thread,
    never on a request's path; once it passes, new trajectories relay again."""

    def __init__(self, error: str, probe: Callable[[], bool], recheck_s: float | None = None) -> None:
        self.error, self.probe = error, probe
        self.recheck_s = RECHECK_S if recheck_s is None else recheck_s
        self.back = False
        self._next = time.monotonic() + self.recheck_s
        self._probing = False
        self._lock = threading.Lock()

    def record(self) -> dict[str, Any] | None:
        """A new trajectory's `degraded` record while the server is down, else None."""
        if self.back:
            return None
        with self._lock:
            due = not self._probing and time.monotonic() >= self._next
            self._probing |= due
        if due:
            threading.Thread(target=self._probe, name="relaygen-small-probe", daemon=True).start()
        return {"role": "small", "from_token": 0, "error": self.error}

    def _probe(self) -> None:
        try:
            ok = bool(self.probe())
        except Exception:  # noqa: BLE001 - a probe that fails in any way says "still down"
            ok = False
        with self._lock:
            self.back, self._probing = ok, False
            self._next = time.monotonic() + self.recheck_s


def default_preset() -> str:
    """The preset `relaygen up` recorded, else the embedded default."""
    from relaygen_sgl.core.state import read_state

    state = read_state(load_settings())
    return str(state["preset"]) if state and state.get("preset") else "cpu-tiny"

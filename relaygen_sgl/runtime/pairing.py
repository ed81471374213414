"""The pair you talk to is the pair you think: what each server serves, checked against a
preset, or, with no preset, used to pick the family and the shipped cue profile."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

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


def served_models(engines: dict[str, EngineClient]) -> dict[str, str]:
    out = {}
    for role in ROLES:
        info = engines[role].model_info()
        out[role] = str(info.get("model_path") or info.get("served_model_name") or "")
    return out


def check_preset(preset: Preset, served: dict[str, str], urls: dict[str, str]) -> None:
    want = {role: expected_model(preset, role) for role in ROLES}
    if not all(same_model(served[r], want[r]) for r in ROLES):
        raise ConfigError(f"the servers ({urls['large']}, {urls['small']}) serve large {served['large']!r} and small "
                          f"{served['small']!r}, but preset {preset.name} expects large {want['large']!r} and small "
                          f"{want['small']!r} (pick the preset these servers run, or leave --preset out to detect it)")


@dataclass(frozen=True)
class Pairing:
    preset: Preset | None
    family: Family
    profile: CueProfile | None  # None: no shipped profile fits; the caller must give one


def detect(served: dict[str, str]) -> Pairing:
    """The preset whose models the servers serve, else the family from the large model's
    name and a shipped profile calibrated for these models."""
    families = load_families()
    for name in preset_names():
        preset = load_preset(name)
        if all(same_model(served[r], expected_model(preset, r)) for r in ROLES):
            return Pairing(preset, families[preset.family], load_profile(preset.profile))
    large = _name(served["large"])
    family = next((f for f in families.values() if any(m in large for m in f.models)), None)
    if family is None:
        raise ConfigError(f"cannot tell the model family of {served['large']!r}; give --preset or --family "
                          f"({', '.join(sorted(families))})")
    for name in available_profiles():
        prof = load_profile(name)
        if all(same_model(served[r], str(prof.models.get(r, ""))) for r in ROLES):
            return Pairing(None, family, prof)
    return Pairing(None, family, None)


def default_preset() -> str:
    """The preset `relaygen up` recorded, else the embedded default."""
    from relaygen_sgl.core.state import read_state

    state = read_state(load_settings())
    return str(state["preset"]) if state and state.get("preset") else "cpu-tiny"

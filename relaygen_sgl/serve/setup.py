"""What `relaygen serve` settles before it listens: the profiles a request may name, the
API key and where it came from, and whether the address may go without a key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from relaygen_sgl.core.config import NAME, data_path, exposed
from relaygen_sgl.core.cues import CueProfile, available_profiles, load_profile
from relaygen_sgl.core.errors import ConfigError

KEY_ENV = "RELAYGEN_API_KEY"


def allowed_profiles(allow: Sequence[str] = ()) -> dict[str, CueProfile]:
    """Name -> profile, all loaded now: the shipped profiles, then each --profile-allow
    entry: a shipped NAME, a PATH (its name is the file stem) or NAME=PATH. A request picks
    one by name only; a path never comes from a request."""
    shipped = data_path("profiles")
    profiles = {name: load_profile(str(shipped / f"{name}.json")) for name in available_profiles()}
    for spec in allow:
        name, sep, path = spec.partition("=")
        if not sep:
            if spec in profiles and not Path(spec).is_file():
                continue  # a shipped name: allowed already
            name, path = Path(spec).stem, spec
        if not Path(path).is_file():
            raise ConfigError(f"--profile-allow {spec}: no such file, and not a shipped profile "
                              f"({', '.join(available_profiles())})")
        if not NAME.fullmatch(name):
            raise ConfigError(f"--profile-allow {spec}: the name {name!r} must be letters, digits, '.', '_' or '-' "
                              "(give one with NAME=PATH)")
        if name in profiles:
            raise ConfigError(f"--profile-allow {spec}: the name {name!r} is taken (a shipped profile or an earlier "
                              "--profile-allow); give another with NAME=PATH")
        profiles[name] = load_profile(path)
    return profiles


def resolve_api_key(key: str | None, key_file: str | None, environ: Mapping[str, str]) -> str | None:
    """--api-key, else the first line of --api-key-file, else $RELAYGEN_API_KEY; None: no key."""
    if key is not None and key_file is not None:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the API key file {key_file}: {getattr(e, 'strerror', None) or e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"the API key file {key_file} has an empty first line")
        return key
    if key is not None:
        if not key.strip():
            raise ConfigError("--api-key is empty")
        return key.strip()
    return environ.get(KEY_ENV, "").strip() or None


def check_exposure(host: str, key: str | None, insecure: bool) -> None:
    """A server on a non-loopback address needs a key unless the operator says --insecure."""
    if exposed(host, key) and not insecure:
        raise ConfigError(f"--host {host} is reachable from other machines and no API key is set: give --api-key-file, "
                          f"{KEY_ENV} or --api-key (or --insecure to serve without one)")

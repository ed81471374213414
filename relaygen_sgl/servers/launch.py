"""How a preset's servers are launched, the one place it is decided: every SGLang server's and
router's command line and environment, their ports, their order, and on a shared device their
--mem-fraction-static. `relaygen up` starts this LaunchPlan, `relaygen up --dry-run` prints it,
and `launch/serve.sh` runs one server of it; one plan for all three keeps what a user pastes
and what `up` starts the same. Which GPUs each server gets is servers.gpus.

A shared-device preset (`share_device = true`) starts its servers one after the other and
computes their --mem-fraction-static (shared_fractions), since each server sizes its cache
from the memory free when it starts.

Exposure: SGLang's --enable-custom-logit-processor unpickles code a client sends, so a server
with it binds beyond loopback only with an API key (check_exposure)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaygen_sgl.core.config import (
    API_KEY_ENV,
    CVD,
    LOOPBACK,
    ROLES,
    Preset,
    Settings,
    check_models,
    client_url,
    cpu_shim_dir,
    exposed,
    sglang_api_key,
)
from relaygen_sgl.core.errors import ConfigError, StackError
from relaygen_sgl.servers.gpus import devices_for, gpu_memory

KEY_PLACEHOLDER = "<api-key-config.yaml>"
CUSTOM_LOGITS = "--enable-custom-logit-processor"
DEVICE_ORDER = "CUDA_DEVICE_ORDER"


@dataclass(frozen=True)
class ServerCommand:
    argv: tuple[str, ...]
    env: dict[str, str]  # additions to the parent's environment


def _override(args: tuple[str, ...], flag: str, value: str | None) -> tuple[str, ...]:
    if value is None:
        return args
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return tuple(out)


def auth_config(settings: Settings, name: str, api_key: str) -> Path:
    """A YAML file for SGLang's --config holding `api_key`: SGLang 0.5.23 reads --api-key from
    its arguments only (no environment variable), and a file keeps the key out of `ps` and of
    the command lines printed to logs. Mode 0600 in a 0700 folder."""
    folder = settings.run_dir / "auth"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / f"{name}.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(f"api-key: {json.dumps(api_key)}\n")  # the flag's spelling; a JSON string is valid YAML
    return path


def server_command(preset: Preset, role: str, settings: Settings, host: str = LOOPBACK,
                   python: str = sys.executable, port: int | None = None,
                   kv_tokens: int | None = None, api_key: str | None = None,
                   devices: Sequence[str] | None = None) -> ServerCommand:
    """With `api_key` the server requires it (written to a --config file, see auth_config);
    with `devices` (its block from servers.gpus.allocate) it sees only those GPUs."""
    spec = preset.roles[role]
    args = _override(spec.args, "--max-total-tokens", str(kv_tokens) if kv_tokens else None)
    argv = (python, "-m", "sglang.launch_server", "--model-path", spec.model_path(settings),
            "--host", host, "--port", str(port or spec.port), *args)
    if api_key:
        argv += ("--config", str(auth_config(settings, f"{preset.name}-{role}-{port or spec.port}", api_key)))
    env = dict(spec.env)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if preset.device == "cuda" and DEVICE_ORDER not in os.environ:
        # CUDA numbers GPUs fastest first by default, nvidia-smi by PCI bus: the same order for
        # both, so CUDA_VISIBLE_DEVICES=2 is the GPU nvidia-smi calls 2.
        env[DEVICE_ORDER] = "PCI_BUS_ID"
    if preset.device == "cpu":
        # The stand-in for sgl-kernel's missing CPU ops: on CPU server processes only.
        shim = str(cpu_shim_dir())
        inherited = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = shim + os.pathsep + inherited if inherited else shim
    return ServerCommand(argv=argv, env=env)


def router_command(worker_urls: list[str], port: int, host: str = LOOPBACK,
                   python: str = sys.executable) -> ServerCommand:
    """SGLang's own router (sglang-router) in front of a role's replicas. cache_aware sends a
    request to the replica holding the longest matching prefix, so a trajectory's handoffs
    keep landing where its cache is."""
    argv = (python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--policy", "cache_aware", "--worker-urls", *worker_urls)
    return ServerCommand(argv=argv, env={})


def replica_port(base: int, index: int) -> int:
    """Replica i of a role listens at base + 200 + 10 i; the role's own port is its router's."""
    return base + 200 + 10 * index


@dataclass(frozen=True)
class Fraction:
    """A server's --mem-fraction-static on a shared device, and how it was reached."""
    role: str
    value: float
    why: str


def shared_fractions(preset: Preset, free_gib: float) -> dict[str, Fraction]:
    """--mem-fraction-static for each server of a shared-device preset, for `free_gib` free on
    the device before the first starts. SGLang 0.5.23 sizes a server's KV cache as (memory free
    after loading its weights) - (memory free when it started) x (1 - mem_fraction_static)
    (mem_cache/kv_cache_configurator.py, _profile_available_bytes, and the same headroom after
    CUDA-graph capture in kv_pool_runtime.py): weights + KV = fraction x the memory free AT ITS
    START, not of the card. So the servers start in ROLES order, each once the one before answers,
    and each fraction is its share over what the ones before it left. Each server gets its
    memory_gib plus, in proportion to it, whatever exceeds the sum and runtime_reserve_gib (the
    activations and CUDA graphs of both, never given out). The free memory the second server
    sees is estimated as what the first left beyond its static share, an upper bound (the first's
    activations and graphs are not counted), so a server never takes more than planned.
    ConfigError (one line) when the device is too small."""
    want = {role: preset.roles[role].memory_gib or 0.0 for role in ROLES}
    need = sum(want.values()) + preset.runtime_reserve_gib
    if free_gib < need:
        parts = " + ".join(f"{role} {want[role]:g}" for role in ROLES)
        raise ConfigError(f"preset {preset.name} needs {need:g} GiB free on its GPU ({parts} + "
                          f"{preset.runtime_reserve_gib:g} runtime reserve), it has {free_gib:.1f} GiB free")
    spare = free_gib - need
    total = sum(want.values())
    out: dict[str, Fraction] = {}
    left = free_gib
    for i, role in enumerate(ROLES):
        static = want[role] + spare * want[role] / total
        value = int(static / left * 1000) / 1000  # rounded down: never more than planned
        first = "starts first" if i == 0 else f"starts once the {ROLES[i - 1]} server answers"
        why = (f"{first}, with about {left:.1f} GiB free; SGLang holds mem_fraction_static x the memory free at "
               f"its start for weights + KV: {value} x {left:.1f} = {value * left:.1f} GiB (memory_gib "
               f"{want[role]:g} + {static - want[role]:.1f} of the {spare:.1f} GiB spare)")
        out[role] = Fraction(role, value, why)
        left -= value * left  # what it holds (the fraction is rounded down)
    return out


def check_exposure(preset: Preset, host: str, api_key: str | None) -> None:
    """A server with --enable-custom-logit-processor runs code a client sends (SGLang unpickles
    it): beyond loopback only with an API key. ConfigError (one line, exit 2) otherwise."""
    if not exposed(host, api_key or None):
        return
    roles = [role for role, spec in preset.roles.items() if CUSTOM_LOGITS in spec.args]
    if roles:
        raise ConfigError(f"--host {host} is reachable from other machines and the {' and '.join(roles)} "
                          f"server{'s' if len(roles) > 1 else ''} of {preset.name} run client code "
                          f"({CUSTOM_LOGITS}): set ${API_KEY_ENV} (every server then requires it), or bind "
                          f"{LOOPBACK}")


def check_counts(replicas: Mapping[str, int] | None, api_key: str | None) -> dict[str, int]:
    """Servers per role (default 1), checked."""
    counts = {role: (replicas or {}).get(role, 1) for role in ROLES}
    if any(n < 1 for n in counts.values()):
        raise StackError("replica counts must be at least 1")
    if api_key and any(n > 1 for n in counts.values()):
        raise StackError(f"${API_KEY_ENV} with more than one replica is not supported (SGLang's router would "
                         "need the key on its command line); unset it or use one replica per role")
    return counts


@dataclass(frozen=True)
class Process:
    """One process of the plan: a role's server (replica i) or the router in front of its
    replicas, on `port`, started by `command`; `after` are the ports of the servers that must
    answer before it starts (they share its GPU), `fraction` its computed memory share there."""
    role: str
    kind: str  # "server" | "router"
    replica: int
    port: int
    command: ServerCommand
    after: tuple[int, ...] = ()
    fraction: Fraction | None = None

    def url(self, host: str) -> str:
        return client_url(host, self.port)


@dataclass(frozen=True)
class LaunchPlan:
    preset: str
    host: str
    counts: dict[str, int]
    processes: tuple[Process, ...]  # in start order: large first, a router after its workers
    note: str | None  # what was assumed (no GPU visible in a dry run), or None
    shared_device: str | None = None  # the device both servers share (share_device presets)
    free_gib: float | None = None  # its free memory the fractions were computed for


def _shared_free(preset: Preset, devices: Sequence[str], assumed: bool) -> tuple[float, str]:
    """Free GiB on the shared device, and where the number came from: nvidia-smi, else the
    preset's min_free_gib (a dry run without a GPU, or a GPU nvidia-smi does not list)."""
    found = {} if assumed else gpu_memory()
    mem = [found[d] for d in devices if d in found]
    if mem:
        return min(m.free_gib for m in mem), f"{min(m.free_gib for m in mem):.1f} GiB free (nvidia-smi)"
    assume = preset.min_free_gib or 0.0
    return assume, f"free memory unknown: assumed {assume:g} GiB (the preset's min_free_gib)"


def launch_plan(preset: Preset, settings: Settings, host: str = LOOPBACK,
                replicas: Mapping[str, int] | None = None, kv_tokens: int | None = None,
                api_key: str | None = None, assume: bool = False, key_file: bool = True,
                free_gib: float | None = None) -> LaunchPlan:
    """Every process `up` starts, in order. A role with one server serves on its own port;
    with more, replica i on replica_port(base, i) and a router on the role's port, after its
    workers. With `api_key`, each server requires it: written to a 0600 --config file, or
    with `key_file=False` (a plan only shown) a placeholder. With `assume` and no GPU
    visible, devices 0..N-1 are assumed (said in the note); otherwise too few is a ConfigError."""
    counts = check_counts(replicas, api_key)
    if key_file:  # a plan to run (a dry run only notes it)
        check_exposure(preset, host, api_key)
    devices, note = devices_for(preset, counts, assume=assume)
    fractions: dict[str, Fraction] = {}
    shared = None
    if preset.share_device:
        shared = ",".join(devices[(ROLES[0], 0)])
        if free_gib is None:
            free, source = _shared_free(preset, devices[(ROLES[0], 0)], assumed=bool(note))
        else:  # a heal: the servers still up hold memory the first plan counted as free
            free, source = free_gib, f"{free_gib:.1f} GiB free when `up` first planned it"
        fractions = shared_fractions(preset, free)
        note = "; ".join(x for x in (note, f"device {shared} shared by both servers: {source}") if x)
    processes: list[Process] = []
    for role in ROLES:
        base = preset.roles[role].port
        ports = [base] if counts[role] == 1 else [replica_port(base, i) for i in range(counts[role])]
        for i, port in enumerate(ports):
            cmd = server_command(preset, role, settings, host=host, port=port, kv_tokens=kv_tokens,
                                 api_key=api_key if key_file else None, devices=devices[(role, i)])
            fraction = fractions.get(role)
            if fraction:
                cmd = ServerCommand(_override(cmd.argv, "--mem-fraction-static", str(fraction.value)), cmd.env)
            if api_key and not key_file:
                cmd = ServerCommand(argv=(*cmd.argv, "--config", KEY_PLACEHOLDER), env=cmd.env)
            mine = set(devices[(role, i)])
            after = tuple(p.port for p in processes if p.kind == "server"
                          and mine & set(p.command.env.get(CVD, "").split(",")))
            processes.append(Process(role, "server", i, port, cmd, after=after, fraction=fraction))
        if counts[role] > 1:
            workers = [client_url(host, p) for p in ports]
            processes.append(Process(role, "router", counts[role], base, router_command(workers, base, host=host)))
    return LaunchPlan(preset.name, host, counts, tuple(processes), note, shared_device=shared,
                free_gib=free if shared is not None else None)


def dry_run(preset: Preset, settings: Settings, host: str = LOOPBACK, replicas: Mapping[str, int] | None = None,
            kv_tokens: int | None = None) -> dict[str, Any]:
    """What `up` would start, in its order: {"preset", "servers": [{"role", "replica", "port",
    "argv", "env"}], "note"}. Starts nothing and writes nothing; the API key is never shown."""
    key = sglang_api_key()
    plan = launch_plan(preset, settings, host, replicas, kv_tokens, api_key=key, assume=True, key_file=False)
    notes = [plan.note] if plan.note else []
    try:
        check_exposure(preset, host, key)
    except ConfigError as e:
        notes.append(f"a real start would refuse: {e}")
    if key:
        notes.append(f"${API_KEY_ENV} is set: `up` passes it in a 0600 file (--config); shown here as "
                     f"{KEY_PLACEHOLDER}, never printed")
    try:
        check_models(preset, settings)
    except ConfigError as e:
        notes.append(str(e))
    by_port = {p.port: p for p in plan.processes}
    servers = []
    for p in plan.processes:
        entry: dict[str, Any] = {"role": p.role, "replica": "router" if p.kind == "router" else p.replica,
                                 "port": p.port, "argv": list(p.command.argv), "env": dict(p.command.env)}
        if p.after:
            entry["starts_after"] = [f"{by_port[a].role} server on port {a} answers (same GPU)" for a in p.after]
        if p.fraction:
            entry["mem_fraction_static"] = p.fraction.value
            entry["why"] = p.fraction.why
        servers.append(entry)
    out: dict[str, Any] = {"preset": preset.name, "order": [f"{p.role} {p.kind}" + (f" {p.replica}" if p.kind ==
                                                                                     "server" else "")
                                                            for p in plan.processes]}
    if plan.shared_device is not None:
        out["shared_device"] = plan.shared_device
        out["sequential"] = True
    return {**out, "servers": servers, "note": "; ".join(notes) or None}


def role_command(preset: Preset, role: str, settings: Settings, host: str = LOOPBACK,
                 assume: bool = False) -> tuple[ServerCommand, str | None]:
    """One server of `role`, for launch/serve.sh: the first server of that role in the plan
    `up` makes with one replica per role, so two roles started by hand on one machine do not
    share GPUs. Where only this role fits (a machine for one role) it takes the first visible
    devices; the note says so."""
    key = sglang_api_key()
    try:
        plan = launch_plan(preset, settings, host, api_key=key, assume=assume)
        note = plan.note
    except ConfigError as both:  # not enough for both roles: this one alone?
        alone = dataclasses.replace(preset, roles={**preset.roles,
                                                   **{r: dataclasses.replace(s, gpus=0) for r, s in
                                                      preset.roles.items() if r != role}})
        try:
            plan = launch_plan(alone, settings, host, api_key=key, assume=assume)
        except ConfigError:
            raise both from None
        note = f"{both}; the {role} server alone takes the first {preset.roles[role].gpus}"
    first = next(p for p in plan.processes if p.role == role and p.kind == "server")
    if first.after:  # its --mem-fraction-static counts on the memory the first server left
        note = "; ".join(x for x in (note, f"start it once the server on port {','.join(map(str, first.after))} "
                                           "answers a generation (same GPU)") if x)
    return first.command, note


def shell_lines(result: Mapping[str, Any]) -> list[str]:
    """The dry run as shell a user could paste: one line per process, env then argv, quoted."""
    lines = [f"# relaygen up --dry-run: preset {result['preset']}; one process per line, each in its own "
             "terminal (or add &); a router once its workers answer"]
    if result.get("note"):
        lines.append(f"# note: {result['note']}")
    for s in result["servers"]:
        what = "router" if s["replica"] == "router" else f"replica {s['replica']}"
        lines.append(f"# {s['role']} {what}, port {s['port']}")
        for after in s.get("starts_after", ()):
            lines.append(f"# start it once the {after}")
        if "why" in s:
            lines.append(f"# --mem-fraction-static {s['mem_fraction_static']}: {s['why']}")
        env = [f"{k}={shlex.quote(v)}" for k, v in s["env"].items()]
        lines.append(" ".join(env + [shlex.join(s["argv"])]))
    return lines

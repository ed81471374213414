"""The plan of a preset's servers, the one place it is made: every SGLang server's and
router's command line and environment, their ports, and their GPUs. `relaygen up` starts
this plan, `relaygen up --dry-run` prints it, and `launch/serve.sh` runs one server of it.

GPUs: a preset says how many GPUs one server of a role needs (`gpus = N`, which must equal
the server's --tp x --pp x --dp); devices are handed out from what is visible: the user's
$CUDA_VISIBLE_DEVICES when set (allocation happens inside it, never around it), else what
nvidia-smi lists, else none. Each server, large replicas first and then small ones, gets its
own consecutive block."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaygen_sgl.core.config import (
    API_KEY_ENV,
    CVD,
    ROLES,
    Preset,
    Settings,
    check_models,
    client_url,
    cpu_shim_dir,
    sglang_api_key,
)
from relaygen_sgl.core.errors import ConfigError, StackError

_SMI = ("nvidia-smi", "--query-gpu=index", "--format=csv,noheader")
KEY_PLACEHOLDER = "<api-key-config.yaml>"


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


def server_command(preset: Preset, role: str, settings: Settings, host: str = "127.0.0.1",
                   python: str = sys.executable, port: int | None = None,
                   kv_tokens: int | None = None, api_key: str | None = None,
                   devices: Sequence[str] | None = None) -> ServerCommand:
    """With `api_key` the server requires it (written to a --config file, see auth_config);
    with `devices` (its block from gpus.allocate) it sees only those GPUs."""
    spec = preset.roles[role]
    args = _override(spec.args, "--max-total-tokens", str(kv_tokens) if kv_tokens else None)
    argv = (python, "-m", "sglang.launch_server", "--model-path", spec.model_path(settings),
            "--host", host, "--port", str(port or spec.port), *args)
    if api_key:
        argv += ("--config", str(auth_config(settings, f"{preset.name}-{role}-{port or spec.port}", api_key)))
    env = dict(spec.env)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if preset.device == "cpu":
        # The stand-in for sgl-kernel's missing CPU ops: on CPU server processes only.
        shim = str(cpu_shim_dir())
        inherited = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = shim + os.pathsep + inherited if inherited else shim
    return ServerCommand(argv=argv, env=env)


def router_command(worker_urls: list[str], port: int, host: str = "127.0.0.1",
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
class Visible:
    devices: tuple[str, ...]
    source: str  # for messages: "CUDA_VISIBLE_DEVICES=4,5", "nvidia-smi", "CUDA_VISIBLE_DEVICES unset, ..."


def _nvidia_smi(run: Callable[..., Any] = subprocess.run) -> tuple[str, ...]:
    try:
        out = run(list(_SMI), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip().isdigit())


def visible_devices(environ: Mapping[str, str] | None = None,
                    run: Callable[..., Any] = subprocess.run) -> Visible:
    """The devices `up` may hand out: $CUDA_VISIBLE_DEVICES when set (even to nothing), else
    the GPUs nvidia-smi lists, else none."""
    env = os.environ if environ is None else environ
    if CVD in env:
        value = env[CVD]
        return Visible(tuple(d.strip() for d in value.split(",") if d.strip()), f"{CVD}={value}")
    found = _nvidia_smi(run)
    return Visible(found, f"{CVD} unset, nvidia-smi lists {','.join(found)}" if found
                   else f"{CVD} unset, no GPU from nvidia-smi")


def total_gpus(preset: Preset, counts: Mapping[str, int]) -> int:
    return sum(spec.gpus * counts.get(role, 1) for role, spec in preset.roles.items())


def allocate(preset: Preset, counts: Mapping[str, int], visible: Visible) -> dict[tuple[str, int], tuple[str, ...]]:
    """{(role, replica): its devices}, a consecutive block each, large replicas first; a role
    that needs no GPU gets none. ConfigError (one line) when the visible devices are too few."""
    need = total_gpus(preset, counts)
    if need > len(visible.devices):
        parts = ", ".join(f"{role}: {spec.gpus} x {counts.get(role, 1)}" + (" replicas" if counts.get(role, 1) > 1
                                                                             else "")
                          for role, spec in preset.roles.items())
        raise ConfigError(f"preset {preset.name} needs {need} GPUs ({parts}), only {len(visible.devices)} "
                          f"visible ({visible.source})")
    out: dict[tuple[str, int], tuple[str, ...]] = {}
    at = 0
    for role, spec in preset.roles.items():  # ROLES order: large, small
        for i in range(counts.get(role, 1)):
            out[(role, i)] = tuple(visible.devices[at:at + spec.gpus]) if spec.gpus else ()
            at += spec.gpus
    return out


def devices_for(preset: Preset, counts: Mapping[str, int], assume: bool = False,
                environ: Mapping[str, str] | None = None) -> tuple[dict[tuple[str, int], tuple[str, ...]], str | None]:
    """The allocation `up` uses, and a note. Nothing is asked when no role needs a GPU. With
    `assume` (a dry run) and no GPU visible at all, devices 0..N-1 are assumed, said in the note."""
    need = total_gpus(preset, counts)
    visible = visible_devices(environ) if need else Visible((), "no GPU needed")
    if assume and need and not visible.devices:
        assumed = Visible(tuple(str(i) for i in range(need)), "assumed")
        return allocate(preset, counts, assumed), (f"no GPU visible ({visible.source}): assumed devices "
                                                   f"0..{need - 1}; a real start here would refuse")
    return allocate(preset, counts, visible), None


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
    replicas, on `port`, started by `command`."""
    role: str
    kind: str  # "server" | "router"
    replica: int
    port: int
    command: ServerCommand

    def url(self, host: str) -> str:
        return client_url(host, self.port)


@dataclass(frozen=True)
class Plan:
    preset: str
    host: str
    counts: dict[str, int]
    processes: tuple[Process, ...]  # in start order: large first, a router after its workers
    note: str | None  # what was assumed (no GPU visible in a dry run), or None


def server_plan(preset: Preset, settings: Settings, host: str = "127.0.0.1",
                replicas: Mapping[str, int] | None = None, kv_tokens: int | None = None,
                api_key: str | None = None, assume: bool = False, key_file: bool = True) -> Plan:
    """Every process `up` starts, in order. A role with one server serves on its own port;
    with more, replica i on replica_port(base, i) and a router on the role's port, after its
    workers. With `api_key`, each server requires it: written to a 0600 --config file, or
    with `key_file=False` (a plan only shown) a placeholder. With `assume` and no GPU
    visible, devices 0..N-1 are assumed (said in the note); otherwise too few is a ConfigError."""
    counts = check_counts(replicas, api_key)
    devices, note = devices_for(preset, counts, assume=assume)
    processes: list[Process] = []
    for role in ROLES:
        base = preset.roles[role].port
        ports = [base] if counts[role] == 1 else [replica_port(base, i) for i in range(counts[role])]
        for i, port in enumerate(ports):
            cmd = server_command(preset, role, settings, host=host, port=port, kv_tokens=kv_tokens,
                                 api_key=api_key if key_file else None, devices=devices[(role, i)])
            if api_key and not key_file:
                cmd = ServerCommand(argv=(*cmd.argv, "--config", KEY_PLACEHOLDER), env=cmd.env)
            processes.append(Process(role, "server", i, port, cmd))
        if counts[role] > 1:
            workers = [client_url(host, p) for p in ports]
            processes.append(Process(role, "router", counts[role], base, router_command(workers, base, host=host)))
    return Plan(preset.name, host, counts, tuple(processes), note)


def dry_run(preset: Preset, settings: Settings, host: str = "127.0.0.1", replicas: Mapping[str, int] | None = None,
            kv_tokens: int | None = None) -> dict[str, Any]:
    """What `up` would start, in its order: {"preset", "servers": [{"role", "replica", "port",
    "argv", "env"}], "note"}. Starts nothing and writes nothing; the API key is never shown."""
    key = sglang_api_key()
    plan = server_plan(preset, settings, host, replicas, kv_tokens, api_key=key, assume=True, key_file=False)
    notes = [plan.note] if plan.note else []
    if key:
        notes.append(f"${API_KEY_ENV} is set: `up` passes it in a 0600 file (--config); shown here as "
                     f"{KEY_PLACEHOLDER}, never printed")
    try:
        check_models(preset, settings)
    except ConfigError as e:
        notes.append(str(e))
    servers = [{"role": p.role, "replica": "router" if p.kind == "router" else p.replica, "port": p.port,
                "argv": list(p.command.argv), "env": dict(p.command.env)} for p in plan.processes]
    return {"preset": preset.name, "servers": servers, "note": "; ".join(notes) or None}


def role_command(preset: Preset, role: str, settings: Settings, host: str = "127.0.0.1",
                 assume: bool = False) -> tuple[ServerCommand, str | None]:
    """One server of `role`, for launch/serve.sh: the first server of that role in the plan
    `up` makes with one replica per role, so two roles started by hand on one machine do not
    share GPUs. Where only this role fits (a machine for one role) it takes the first visible
    devices; the note says so."""
    key = sglang_api_key()
    try:
        plan = server_plan(preset, settings, host, api_key=key, assume=assume)
        note = plan.note
    except ConfigError as both:  # not enough for both roles: this one alone?
        alone = dataclasses.replace(preset, roles={**preset.roles,
                                                   **{r: dataclasses.replace(s, gpus=0) for r, s in
                                                      preset.roles.items() if r != role}})
        try:
            plan = server_plan(alone, settings, host, api_key=key, assume=assume)
        except ConfigError:
            raise both from None
        note = f"{both}; the {role} server alone takes the first {preset.roles[role].gpus}"
    first = next(p for p in plan.processes if p.role == role and p.kind == "server")
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
        env = [f"{k}={shlex.quote(v)}" for k, v in s["env"].items()]
        lines.append(" ".join(env + [shlex.join(s["argv"])]))
    return lines

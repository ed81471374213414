"""GPUs for the servers of a preset. A preset says how many GPUs one server of a role needs
(`gpus = N`, which must equal the server's --tp x --pp x --dp); devices are handed out at
`up` time from what is visible: the user's $CUDA_VISIBLE_DEVICES when set (allocation happens
inside it, never around it), else what nvidia-smi lists, else none. Each server, large
replicas first and then small ones, gets its own consecutive block.

Also `relaygen up --dry-run`: the plan `up` would carry out (argv and environment of every
server and router), printed as JSON or as shell lines, with nothing started or written."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Preset, Settings

CVD = "CUDA_VISIBLE_DEVICES"
_SIZES = {"tp": ("--tp", "--tp-size", "--tensor-parallel-size"),
          "pp": ("--pp-size", "--pipeline-parallel-size"),
          "dp": ("--dp", "--dp-size", "--data-parallel-size")}
_SMI = ("nvidia-smi", "--query-gpu=index", "--format=csv,noheader")
KEY_PLACEHOLDER = "<api-key-config.yaml>"


def parallel_size(args: Sequence[str]) -> int:
    """GPUs one SGLang server with these args uses: tp x pp x dp (dp not counted with
    --enable-dp-attention, where the DP attention groups live inside the TP group)."""
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
    if "--enable-dp-attention" in args:
        sizes["dp"] = 1
    return sizes["tp"] * sizes["pp"] * sizes["dp"]


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


def dry_run(preset: Preset, settings: Settings, host: str = "127.0.0.1", replicas: dict[str, int] | None = None,
            kv_tokens: int | None = None) -> dict[str, Any]:
    """What `up` would start, in its order: {"preset", "servers": [{"role", "replica", "port",
    "argv", "env"}], "note"}. Starts nothing and writes nothing; the API key is never shown."""
    from .config import check_models
    from .launcher import ServerCommand, client_url, router_command, server_command, sglang_api_key
    from .stack import check_counts, plan

    counts = check_counts(replicas, sglang_api_key())
    devices, note = devices_for(preset, counts, assume=True)
    notes = [note] if note else []
    if sglang_api_key():
        notes.append(f"$RELAYGEN_SGLANG_API_KEY is set: `up` passes it in a 0600 file (--config); shown here as "
                     f"{KEY_PLACEHOLDER}, never printed")
    try:
        check_models(preset, settings)
    except ConfigError as e:
        notes.append(str(e))
    servers: list[dict[str, Any]] = []
    for role, kind, index, port in plan(preset, counts):
        if kind == "router":
            workers = [client_url(host, s["port"]) for s in servers if s["role"] == role]
            cmd = router_command(workers, port, host=host)
        else:
            cmd = server_command(preset, role, settings, host=host, port=port, kv_tokens=kv_tokens,
                                 devices=devices[(role, index)])
            if sglang_api_key():
                cmd = ServerCommand(argv=(*cmd.argv, "--config", KEY_PLACEHOLDER), env=cmd.env)
        servers.append({"role": role, "replica": "router" if kind == "router" else index, "port": port,
                        "argv": list(cmd.argv), "env": dict(cmd.env)})
    return {"preset": preset.name, "servers": servers, "note": "; ".join(notes) or None}


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

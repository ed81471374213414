"""The GPUs a preset's servers get, kept apart from the commands that use them (servers.launch)
because `relaygen doctor` asks the same questions without planning a launch.

A preset says how many GPUs one server of a role needs (`gpus = N`, which must equal the
server's --tp x --pp x --dp). Devices are handed out from what is visible: the user's
$CUDA_VISIBLE_DEVICES when set (allocation happens inside it, never around it), else what
nvidia-smi lists, else none. Each server, large replicas first and then small ones, gets its
own consecutive block, so two servers never contend for one GPU unless the preset says they
share it (`share_device = true`: both roles on the same block)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.core.config import CVD, Preset
from relaygen_sgl.core.errors import ConfigError

_SMI = ("nvidia-smi", "--query-gpu=index", "--format=csv,noheader")
_SMI_MEMORY = ("nvidia-smi", "--query-gpu=index,uuid,memory.free,memory.total,name", "--format=csv,noheader,nounits")


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
    if preset.share_device:
        return max(spec.gpus for spec in preset.roles.values())
    return sum(spec.gpus * counts.get(role, 1) for role, spec in preset.roles.items())


def allocate(preset: Preset, counts: Mapping[str, int], visible: Visible) -> dict[tuple[str, int], tuple[str, ...]]:
    """{(role, replica): its devices}, a consecutive block each, large replicas first; a role
    that needs no GPU gets none. ConfigError (one line) when the visible devices are too few."""
    need = total_gpus(preset, counts)
    if preset.share_device:
        if any(counts.get(role, 1) != 1 for role in preset.roles):
            raise ConfigError(f"preset {preset.name} puts both servers on one device: one server per role "
                              "(no --replicas-large/--replicas-small)")
        if need > len(visible.devices):
            raise ConfigError(f"preset {preset.name} needs {need} GPU (both servers share it), none visible "
                              f"({visible.source})")
        return {(role, 0): tuple(visible.devices[:need]) for role in preset.roles}
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


@dataclass(frozen=True)
class GpuMemory:
    free_gib: float
    total_gib: float
    name: str = ""  # nvidia-smi's name ("NVIDIA H100 80GB HBM3"): servers.memory picks SGLang's attention backend by it


def gpu_memory(run: Callable[..., Any] = subprocess.run) -> dict[str, GpuMemory]:
    """Free and total memory (and the name) per GPU from nvidia-smi, keyed by its index and by its
    UUID (what CUDA_VISIBLE_DEVICES may hold); empty when nvidia-smi is missing or fails."""
    try:
        out = run(list(_SMI_MEMORY), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    found: dict[str, GpuMemory] = {}
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) not in (4, 5):
            continue
        try:
            mem = GpuMemory(float(parts[2]) / 1024, float(parts[3]) / 1024, parts[4] if len(parts) == 5 else "")  # MiB
        except ValueError:
            continue
        found[parts[0]] = found[parts[1]] = mem
    return found

"""Names the machine a number was measured on: CPU model, cores, memory, GPUs, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[dict[str, str]]:
    """The accelerators nvidia-smi sees (name, memory, driver); none on a CPU machine."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def describe() -> dict[str, Any]:
    return {
        "gpus": _gpus(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("relaygen-sgl", "sglang", "torch", "transformers")},
    }


def short() -> str:
    d = describe()
    host = f"{d['cpu']}, {d['cores']} cores, {d['memory_gib']} GiB"
    if not d["gpus"]:
        return host + ", no GPU"
    names = sorted({g["name"] for g in d["gpus"]})
    return f"{len(d['gpus'])}x {' + '.join(names)} (driver {d['gpus'][0]['driver']}); {host}"

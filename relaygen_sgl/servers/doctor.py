"""`relaygen doctor`: what this machine has against what a preset's servers need, one check
at a time, each with a verdict (ok, warn, FAIL, skip) and one line of detail. Nothing here
raises for a missing piece: that is a FAIL line. Versions come from package metadata (and
torch's own CUDA version), GPUs and the driver from nvidia-smi, models from their folders or
the Hugging Face cache, ports by binding them; a speculative preset whose servers are up gets
one real request, and its accept length is reported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from relaygen_sgl.client.http import ClientConfig, EngineClient
from relaygen_sgl.core.config import LOOPBACK, ROLES, Preset, Settings, load_preset, sglang_api_key
from relaygen_sgl.core.errors import ConfigError, RelayGenError, StackError
from relaygen_sgl.core.state import read_state
from relaygen_sgl.servers.gpus import allocate, gpu_memory, total_gpus, visible_devices
from relaygen_sgl.servers.launch import devices_memory
from relaygen_sgl.servers.processes import is_ours, port_in_use

SGLANG_PIN = "0.5.23"  # pyproject's gpu extra
TORCH_PIN = "2.14.1"  # SGLang 0.5.23's pin; its wheels are built for CUDA 13
PYTHON = (3, 11)  # pyproject: >=3.11,<3.12
ONE = {role: 1 for role in ROLES}


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # "ok" | "warn" | "FAIL" | "skip"
    detail: str

    @property
    def failed(self) -> bool:
        return self.verdict == "FAIL"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "verdict": self.verdict, "detail": self.detail}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro}"
    if (v.major, v.minor) == PYTHON:
        return Check("python", "ok", text)
    return Check("python", "FAIL", f"{text}; relaygen-sgl needs {PYTHON[0]}.{PYTHON[1]}")


def check_sglang() -> Check:
    v = _version("sglang")
    if v is None:
        return Check("sglang", "FAIL", f"not installed (pip install 'relaygen-sgl[gpu]' for sglang=={SGLANG_PIN}, "
                                       "or `make setup` on a CPU machine)")
    if v != SGLANG_PIN:
        return Check("sglang", "warn", f"{v}; relaygen-sgl is built and tested against {SGLANG_PIN}")
    return Check("sglang", "ok", v)


def torch_cuda() -> tuple[str | None, str | None]:
    """torch's version and the CUDA version it was built for (None: a CPU build or no torch)."""
    v = _version("torch")
    if v is None:
        return None, None
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken install is a FAIL line, not a traceback
        return v, None
    return v, torch.version.cuda


def check_torch(version: str | None, cuda: str | None) -> Check:
    if version is None:
        return Check("torch", "FAIL", f"not installed (SGLang {SGLANG_PIN} needs torch=={TORCH_PIN})")
    built = f"built for CUDA {cuda}" if cuda else "a CPU-only build"
    verdict = "ok" if version.split("+")[0] == TORCH_PIN else "warn"
    return Check("torch", verdict, f"{version}, {built}" + ("" if verdict == "ok" else f"; SGLang {SGLANG_PIN} pins "
                                                                                          f"{TORCH_PIN}"))


def driver_cuda(run: Callable[..., Any] = subprocess.run) -> tuple[str | None, str]:
    """The newest CUDA the installed driver supports (nvidia-smi's "CUDA Version"), and a
    reason when it cannot be told."""
    try:
        out = run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return None, "no GPU: nvidia-smi not found (no NVIDIA driver on this machine)"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no GPU: nvidia-smi failed ({e})"
    if out.returncode != 0:
        first = (out.stdout or out.stderr or "").strip().splitlines()[:1]
        return None, f"no GPU: nvidia-smi failed ({first[0] if first else f'exit {out.returncode}'})"
    found = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", out.stdout)
    if not found:
        return None, "nvidia-smi does not say which CUDA version the driver supports"
    return found.group(1), ""


def _major_minor(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def check_driver(preset: Preset, cuda: str | None, run: Callable[..., Any]) -> Check:
    if preset.device != "cuda":
        return Check("cuda driver", "skip", f"{preset.name} runs on the CPU")
    if cuda is None:
        return Check("cuda driver", "FAIL", f"the installed torch is not a CUDA build; a GPU preset needs "
                                            f"torch=={TORCH_PIN} for CUDA 13")
    have, why = driver_cuda(run)
    if have is None:
        return Check("cuda driver", "FAIL", f"{why}; torch is built for CUDA {cuda}")
    if _major_minor(have)[0] < _major_minor(cuda)[0]:
        return Check("cuda driver", "FAIL", f"the driver supports CUDA {have}, torch is built for CUDA {cuda}: "
                                            f"install an NVIDIA driver for CUDA {_major_minor(cuda)[0]}")
    if _major_minor(have) < _major_minor(cuda):
        return Check("cuda driver", "warn", f"the driver supports CUDA {have}, torch is built for {cuda} (minor "
                                            "version compatibility; a newer driver is safer)")
    return Check("cuda driver", "ok", f"supports CUDA {have}; torch is built for CUDA {cuda}")


def check_gpus(preset: Preset, servers_up: bool, environ: Mapping[str, str] | None,
               run: Callable[..., Any]) -> Check:
    if preset.device != "cuda":
        return Check("gpus", "skip", f"{preset.name} needs no GPU")
    visible = visible_devices(environ, run=run)
    need = total_gpus(preset, ONE)
    if not visible.devices:
        return Check("gpus", "FAIL", f"no GPU: {preset.name} needs {need}, none visible ({visible.source})")
    try:
        blocks = allocate(preset, ONE, visible)
    except ConfigError as e:
        return Check("gpus", "FAIL", str(e))
    used = sorted({d for block in blocks.values() for d in block}, key=lambda d: (len(d), d))
    counted = f"{len(visible.devices)} visible ({visible.source}), {need} needed"
    if servers_up:
        return Check("gpus", "ok", f"{counted}; the servers of {preset.name} are up and hold their memory")
    memory = gpu_memory(run)
    known = {d: memory[d] for d in used if d in memory}
    if not known:
        return Check("gpus", "warn", f"{counted}; free memory unknown (nvidia-smi lists none of {','.join(used)})")
    free = ", ".join(f"GPU {d} {m.free_gib:.1f} of {m.total_gib:.1f} GiB free" for d, m in known.items())
    try:  # the verdict `up --dry-run` gives on this machine (servers.memory)
        plan = devices_memory(preset, blocks, known)
    except ConfigError as e:
        return Check("gpus", "FAIL", f"{counted}; {free}; {e}")
    return Check("gpus", "ok" if plan.fits else "FAIL", f"{counted}; {free}; {plan.verdict}")


def _model_paths(preset: Preset, settings: Settings) -> list[tuple[str, str, bool]]:
    """(what, path or hub name, is a local folder we build) for each model the servers load."""
    out = []
    for role, spec in preset.roles.items():
        out.append((f"{role} model", spec.model_path(settings), bool(spec.local_model)))
        args = list(spec.args)
        if "--speculative-draft-model-path" in args:
            out.append((f"{role} draft", args[args.index("--speculative-draft-model-path") + 1], False))
    return out


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - a name the hub would refuse is "not cached"
        return False
    return isinstance(found, str)


def check_models(preset: Preset, settings: Settings, environ: Mapping[str, str]) -> list[Check]:
    checks = []
    offline = environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    for what, path, local in _model_paths(preset, settings):
        if local:
            if (Path(path) / "config.json").is_file():
                checks.append(Check(what, "ok", f"{path}"))
            else:
                checks.append(Check(what, "FAIL", f"{path} is missing (run: relaygen models fetch --preset "
                                                  f"{preset.name})"))
        elif Path(path).is_dir():
            verdict = "ok" if (Path(path) / "config.json").is_file() else "FAIL"
            checks.append(Check(what, verdict, f"{path}" + ("" if verdict == "ok" else " has no config.json")))
        elif _hub_cached(path):
            checks.append(Check(what, "ok", f"{path} (in the Hugging Face cache)"))
        elif offline:
            checks.append(Check(what, "FAIL", f"{path} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"))
        else:
            checks.append(Check(what, "warn", f"{path} is not in the Hugging Face cache: SGLang downloads it at the "
                                              f"first start (network needed; `hf download {path}` does it now)"))
    return checks


def check_ports(preset: Preset, up_ports: set[int], host: str = LOOPBACK) -> Check:
    busy, ours = [], []
    for role, spec in preset.roles.items():
        if spec.port in up_ports:
            ours.append(f"{spec.port} ({role})")
            continue
        try:
            if port_in_use(spec.port, host):
                busy.append(f"{spec.port} ({role})")
        except RelayGenError as e:
            return Check("ports", "FAIL", str(e))
    if busy:
        return Check("ports", "FAIL", f"in use by another process on {host}: {', '.join(busy)}")
    free = [f"{s.port} ({r})" for r, s in preset.roles.items() if f"{s.port} ({r})" not in ours]
    parts = ([f"free on {host}: {', '.join(free)}"] if free else []) + \
        ([f"served by the running servers: {', '.join(ours)}"] if ours else [])
    return Check("ports", "ok", "; ".join(parts))


def _speculative(preset: Preset) -> list[str]:
    return [role for role, spec in preset.roles.items() if "--speculative-algorithm" in spec.args]


def smoke_test(preset: Preset, urls: Mapping[str, str], transport: Any = None) -> list[Check]:
    """One short real request to each speculative server that is up; the accept length SGLang
    reports (tokens accepted per verify step: 1.0 means the draft never helped)."""
    roles = _speculative(preset)
    if not roles:
        return [Check("speculative smoke test", "skip", f"{preset.name} has no speculative server")]
    checks = []
    for role in roles:
        name = f"speculative smoke test ({role})"
        if role not in urls:
            checks.append(Check(name, "skip", f"servers not up: `relaygen up --preset {preset.name}`, then "
                                              "`relaygen doctor` again to send one request"))
            continue
        try:
            with EngineClient(urls[role], ClientConfig(retries=0, read_timeout_s=120), transport=transport,
                              api_key=sglang_api_key()) as engine:
                gen = engine.generate_text("Count from 1 to 20: 1, 2, 3,",
                                           {"max_new_tokens": 48, "temperature": 0})
        except RelayGenError as e:
            checks.append(Check(name, "FAIL", f"one request to {urls[role]} failed: {e}"))
            continue
        accept = gen.meta.get("spec_accept_length")
        if accept is None:
            checks.append(Check(name, "FAIL", f"{gen.completion_tokens} tokens but no spec_accept_length in the "
                                              "answer: is speculative decoding on?"))
        else:
            checks.append(Check(name, "ok" if float(accept) > 1.0 else "warn",
                                f"{gen.completion_tokens} tokens, accept length {float(accept):.2f} "
                                f"({gen.meta.get('spec_verify_ct', '?')} verify steps)"
                                + ("" if float(accept) > 1.0 else ": the draft is never accepted")))
    return checks


def _running(settings: Settings, preset: Preset) -> dict[str, str]:
    """{role: url} of this preset's servers `up` started and that are still ours."""
    try:
        state = read_state(settings)
    except StackError:
        return {}
    if not state or state.get("preset") != preset.name:
        return {}
    return {rec["role"]: rec["url"] for rec in state["servers"] if is_ours(rec) and rec.get("kind") != "router"}


def default_preset(settings: Settings) -> str:
    try:
        state = read_state(settings)
    except StackError:
        state = None
    return str(state["preset"]) if state and state.get("preset") else "cpu-tiny"


def diagnose(preset_name: str | None, settings: Settings, environ: Mapping[str, str] | None = None,
             run: Callable[..., Any] = subprocess.run) -> list[Check]:
    """Every check for `preset_name` (default: the preset `up` started, else cpu-tiny), in
    order. An unknown preset is a ConfigError; everything else is a Check."""
    env = os.environ if environ is None else environ
    preset = load_preset(preset_name or default_preset(settings))
    running = _running(settings, preset)
    version, cuda = torch_cuda()
    checks = [Check("preset", "ok", f"{preset.name}: {preset.description}"), check_python(), check_sglang(),
              check_torch(version, cuda), check_driver(preset, cuda, run),
              check_gpus(preset, bool(running), env, run)]
    checks += check_models(preset, settings, env)
    checks.append(check_ports(preset, {int(u.rsplit(":", 1)[1]) for u in running.values()}))
    checks += smoke_test(preset, running)
    return checks

"""One SGLang server process: its command line, its environment, and health probing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Preset, Settings, cpu_shim_dir
from .engine import ClientConfig, EngineClient
from .errors import LaunchError


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


def server_command(preset: Preset, role: str, settings: Settings, host: str = "127.0.0.1",
                   python: str = sys.executable, port: int | None = None,
                   kv_tokens: int | None = None) -> ServerCommand:
    spec = preset.roles[role]
    args = _override(spec.args, "--max-total-tokens", str(kv_tokens) if kv_tokens else None)
    argv = (python, "-m", "sglang.launch_server", "--model-path", spec.model_path(settings),
            "--host", host, "--port", str(port or spec.port), *args)
    env = dict(spec.env)
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


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def start_server(cmd: ServerCommand, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    try:
        # A session of its own, so `down` can stop the server with all its children.
        return subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def answers_generation(url: str, timeout_s: float = 30.0, api_key: str | None = None) -> bool:
    """True once the server completes a real one-token generation (EngineClient.health)."""
    with EngineClient(url, ClientConfig(retries=0), api_key=api_key) as engine:
        return engine.health(timeout_s)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, role: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"the {role} server exited with code {proc.returncode} during start-up; "
                              f"last lines of {log_path}:\n{tail(log_path)}")
        if answers_generation(url, timeout_s=10):
            return
        time.sleep(2)
    raise LaunchError(f"the {role} server at {url} did not answer a generation within {timeout_s:.0f}s; "
                      f"last lines of {log_path}:\n{tail(log_path)}")

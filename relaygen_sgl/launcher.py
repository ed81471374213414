"""One SGLang server process: its command line, its environment, and health probing."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import Preset, Settings, cpu_shim_dir
from .engine import ClientConfig, EngineClient
from .errors import ConfigError, LaunchError

API_KEY_ENV = "RELAYGEN_SGLANG_API_KEY"  # SGLang's --api-key, for the servers and every client


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


def sglang_api_key(environ: dict[str, str] | None = None) -> str | None:
    """$RELAYGEN_SGLANG_API_KEY, checked: it goes into an HTTP header and a YAML file."""
    key = (os.environ if environ is None else environ).get(API_KEY_ENV) or None
    if key is not None and not (key.isascii() and key.isprintable() and not any(c.isspace() for c in key)):
        raise ConfigError(f"${API_KEY_ENV} must be printable ASCII without spaces")
    return key


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


def client_url(host: str, port: int) -> str:
    """The URL clients use for a server bound to host:port: a wildcard address means this
    machine's loopback (as SGLang's own ServerArgs.url does), an IPv6 literal gets brackets."""
    h = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could not listen on host:port because something already does:
    the check binds the address the server will bind (IPv4 or IPv6), with SO_REUSEADDR as
    uvicorn sets it. A host this machine cannot bind is a LaunchError."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(f"cannot use --host {host!r}: {getattr(e, 'strerror', None) or e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise LaunchError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return False


def start_server(cmd: ServerCommand, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # 0600: SGLang logs its resolved arguments, an --api-key included
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    try:
        # A session of its own, so `down` can stop the server with all its children.
        return subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def answers_generation(url: str, timeout_s: float = 30.0, api_key: str | None = None) -> bool:
    """True once the server completes a real one-token generation (EngineClient.health);
    sends $RELAYGEN_SGLANG_API_KEY unless given a key."""
    with EngineClient(url, ClientConfig(retries=0), api_key=api_key or sglang_api_key()) as engine:
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

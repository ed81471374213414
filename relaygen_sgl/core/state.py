"""What `relaygen up` recorded: the state file's server records (role, URL, pid, log, port,
kind, when it started and how often `up`/`restart` started it again) and the URL clients use
per role; and the home's API key file, which its servers and clients read. Read by `connect()`
and written by servers.stack; reading needs nothing of server management.

The key file (config.KEY_FILE, mode 0600) lives while a server that read it runs: each server
holds a shared flock on it (an inherited descriptor, see servers.processes.start_server), so
the key is "in use" while any such server lives, and whoever finds it unused removes it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaygen_sgl.core import files
from relaygen_sgl.core.config import KEY_FILE, ROLES, Settings, read_key_file
from relaygen_sgl.core.errors import StackError


@dataclass(frozen=True)
class ServerRecord:
    role: str
    url: str
    pid: int
    log: str
    port: int
    kind: str = "server"  # "server" | "router"
    start_ticks: int | None = None  # /proc start time: the pid is still the process we started
    devices: str | None = None  # the server's CUDA_VISIBLE_DEVICES, when it got GPUs
    started_at: float | None = None  # time.time() at its start: `status` shows the uptime
    restarts: int = 0  # how often `up` (healing) or `restart` started this process again
    tmp_dir: str | None = None  # its private TMPDIR (SGLang's IPC sockets), removed once it stopped
    shm: dict[str, int] | None = None  # its /dev/shm files (name: inode), removed once it stopped


def _valid_record(rec: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return (isinstance(rec, dict) and rec.get("role") in ROLES and isinstance(rec.get("url"), str)
            and is_int(rec.get("pid")) and rec["pid"] > 0 and isinstance(rec.get("log"), str)
            and is_int(rec.get("port")) and rec.get("kind", "server") in ("server", "router")
            and (rec.get("start_ticks") is None or is_int(rec.get("start_ticks")))
            and is_int(rec.get("restarts", 0))
            and (rec.get("started_at") is None or isinstance(rec["started_at"], (int, float)))
            and (rec.get("tmp_dir") is None or isinstance(rec["tmp_dir"], str))
            and (rec.get("shm") is None or (isinstance(rec["shm"], dict)
                                            and all(is_int(v) for v in rec["shm"].values()))))


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The state `up` recorded: None when there is none; StackError (one line) when the file
    cannot be read or is not a state. Its `servers` holds the well-formed records only; the
    count of the others is in `malformed`."""
    path = settings.state_file
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StackError(f"cannot read the state file {path}: {e.strerror or e}") from None
    except ValueError as e:  # torn, not JSON, not UTF-8
        raise StackError(f"the state file {path} is corrupt ({str(e).splitlines()[0]}); stop any servers "
                         f"it listed by hand and delete it") from None
    if not isinstance(state, dict) or not isinstance(state.get("servers"), list):
        raise StackError(f"the state file {path} is corrupt (no server list); stop any servers it listed by "
                         f"hand and delete it")
    servers = state["servers"]
    state["servers"] = [r for r in servers if _valid_record(r)]
    state["malformed"] = len(servers) - len(state["servers"])
    return state


def write_state(settings: Settings, state: dict[str, Any]) -> None:
    """Replace the state file at once and durably (a reader, or `down` after a power loss, sees
    the old state or the new, never half or empty)."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    files.write_atomic(settings.state_file, json.dumps(state, indent=2).encode())


def role_urls(state: dict[str, Any]) -> dict[str, str]:
    """The URL clients use per role: the router where there is one, else the server."""
    urls: dict[str, str] = {}
    for rec in state["servers"]:
        if rec.get("kind", "server") == "router" or rec["role"] not in urls:
            urls[rec["role"]] = rec["url"]
    return urls


# ---------------------------------------------------------------- the home's API key file
def key_path(settings: Settings) -> Path:
    return settings.run_dir / KEY_FILE


def new_key() -> str:
    """256 random bits in hex: never a leading '-', which SGLang's argument parser takes for an option."""
    return secrets.token_hex(32)


def write_key(settings: Settings, key: str) -> Path:
    """The key file holding `key`, replaced at once: created 0600 under a temporary name in the
    run folder, then renamed over the old one."""
    path = key_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"api-key": key}) + "\n")  # JSON is YAML: SGLang's --config reads it
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_key(settings: Settings) -> str | None:
    return read_key_file(key_path(settings))


def key_in_use(settings: Settings) -> bool:
    """A server started with the key file still runs (it holds a shared flock on the file)."""
    try:
        fd = os.open(key_path(settings), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock


def remove_key_if_unused(settings: Settings) -> bool:
    """Remove the key file when no server started with it runs; True when it is gone."""
    path = key_path(settings)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not replaced meanwhile
                path.unlink()
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def key_held(settings: Settings):  # type: ignore[no-untyped-def]
    """A read-only descriptor of the key file with a shared flock, for the block: while it is
    held the key counts as in use; a process that inherits it holds the lock as long as it lives."""
    fd = os.open(key_path(settings), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)

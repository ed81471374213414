"""What `relaygen up` recorded: the state file's server records (role, URL, pid, log, port,
kind, when it started and how often `up`/`restart` started it again) and the URL clients use
per role. Read by `connect()` and written by servers.stack;
reading needs nothing of server management."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.core import files
from relaygen_sgl.core.config import ROLES, Settings
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


def _valid_record(rec: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return (isinstance(rec, dict) and rec.get("role") in ROLES and isinstance(rec.get("url"), str)
            and is_int(rec.get("pid")) and rec["pid"] > 0 and isinstance(rec.get("log"), str)
            and is_int(rec.get("port")) and rec.get("kind", "server") in ("server", "router")
            and (rec.get("start_ticks") is None or is_int(rec.get("start_ticks")))
            and is_int(rec.get("restarts", 0))
            and (rec.get("started_at") is None or isinstance(rec["started_at"], (int, float))))


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

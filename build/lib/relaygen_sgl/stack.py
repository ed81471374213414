"""`relaygen up/status/down`: the two servers of a preset, started in the background and
recorded in a state file so that `down` stops exactly what `up` started."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ROLES, Preset, Settings, check_models
from .errors import LaunchError, StackError
from .launcher import (
    answers_generation,
    port_in_use,
    replica_port,
    router_command,
    server_command,
    start_server,
    wait_healthy,
)


@dataclass(frozen=True)
class ServerRecord:
    role: str
    url: str
    pid: int
    log: str
    port: int
    kind: str = "server"  # "server" | "router"
    start_ticks: int | None = None  # /proc start time: the pid is still the process we started


def read_state(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(settings.state_file.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StackError(f"the state file {settings.state_file} is corrupt: {e}") from e


def _write_state(settings: Settings, state: dict[str, Any]) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(settings.state_file)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) if fields[0] != "Z" else None  # field 22 of stat: starttime


def _is_ours(rec: dict[str, Any]) -> bool:
    """The recorded pid is alive and still the process `up` started. The start time decides:
    a pid can be reused, and the router renames itself (setproctitle), so its command line
    no longer says what it is."""
    ticks = _start_ticks(rec["pid"])
    return ticks is not None and ticks == rec.get("start_ticks")


def _stop(pid: int, timeout_s: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it is our child (up failed part way)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def live_servers(settings: Settings) -> list[ServerRecord]:
    state = read_state(settings)
    if not state:
        return []
    return [ServerRecord(**rec) for rec in state["servers"] if _is_ours(rec)]


def up(preset: Preset, settings: Settings, host: str = "127.0.0.1", timeout_s: float | None = None,
       replicas: dict[str, int] | None = None, kv_tokens: int | None = None) -> dict[str, Any]:
    """Start both roles. With replicas {role: n>1}, n servers for that role behind one
    SGLang router (cache-aware) on the role's own port."""
    if live_servers(settings):
        state = read_state(settings) or {}
        raise StackError(f"servers of preset {state.get('preset')!r} are already up; run `relaygen down` first")
    check_models(preset, settings)
    counts = {role: (replicas or {}).get(role, 1) for role in ROLES}
    if any(n < 1 for n in counts.values()):
        raise StackError("replica counts must be at least 1")
    plan: list[tuple[str, str, int]] = []  # (role, kind, port)
    for role in ROLES:
        base = preset.roles[role].port
        if counts[role] == 1:
            plan.append((role, "server", base))
        else:
            plan += [(role, "server", replica_port(base, i)) for i in range(counts[role])]
            plan.append((role, "router", base))
    for role, kind, port in plan:
        if port_in_use(port):
            raise LaunchError(f"port {port} for the {role} {kind} is already in use")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started: list[tuple[ServerRecord, Any]] = []
    timeout = timeout_s or preset.startup_timeout_s
    try:
        for role, kind, port in plan:
            if kind == "server":
                cmd = server_command(preset, role, settings, host=host, port=port, kv_tokens=kv_tokens)
            else:
                workers = [r.url for r, _ in started if r.role == role and r.kind == "server"]
                for rec, proc in started:  # a router needs healthy workers
                    if rec.role == role and rec.kind == "server":
                        wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role)
                cmd = router_command(workers, port, host=host)
            log = settings.run_dir / "logs" / f"{preset.name}-{role}-{kind}-{port}-{stamp}.log"
            proc = start_server(cmd, log)
            rec = ServerRecord(role=role, url=f"http://{host}:{port}", pid=proc.pid, log=str(log), port=port,
                               kind=kind, start_ticks=_start_ticks(proc.pid))
            started.append((rec, proc))
            # Recorded at once, so `down` can clean up even if this process dies mid-start.
            _write_state(settings, {"preset": preset.name, "started": stamp, "replicas": counts,
                                    "servers": [r.__dict__ for r, _ in started]})
        for rec, proc in started:
            wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role)
    except BaseException:
        for rec, _ in reversed(started):
            _stop(rec.pid)
        settings.state_file.unlink(missing_ok=True)
        raise
    return status(settings)


def role_urls(state: dict[str, Any]) -> dict[str, str]:
    """The URL clients use per role: the router where there is one, else the server."""
    urls: dict[str, str] = {}
    for rec in state["servers"]:
        if rec.get("kind", "server") == "router" or rec["role"] not in urls:
            urls[rec["role"]] = rec["url"]
    return urls


def status(settings: Settings) -> dict[str, Any]:
    state = read_state(settings)
    if not state:
        raise StackError("nothing is up (no servers recorded); start them with `relaygen up --preset P`")
    out: dict[str, Any] = {}
    entry_urls = role_urls(state)
    for role in ROLES:
        recs = [r for r in state["servers"] if r["role"] == role]
        entries = []
        for rec in recs:
            alive = _is_ours(rec)
            entries.append({"url": rec["url"], "pid": rec["pid"], "kind": rec.get("kind", "server"),
                            "healthy": alive and answers_generation(rec["url"], timeout_s=10), "log": rec["log"]})
        front = next((e for e in entries if e["url"] == entry_urls.get(role)), entries[0] if entries else None)
        if front is None:
            continue
        out[role] = {**front, "healthy": all(e["healthy"] for e in entries)}
        if len(entries) > 1:
            out[role]["replicas"] = [e for e in entries if e["kind"] == "server"]
    out["preset"] = state["preset"]
    return out


def down(settings: Settings) -> list[int]:
    state = read_state(settings)
    if not state:
        raise StackError("nothing is up: no servers recorded by `relaygen up`")
    stopped = []
    for rec in reversed(state["servers"]):  # routers first, then their workers
        if _is_ours(rec):
            _stop(rec["pid"])
            stopped.append(rec["pid"])
    settings.state_file.unlink(missing_ok=True)
    return stopped

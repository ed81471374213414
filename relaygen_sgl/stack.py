"""`relaygen up/status/down`: the two servers of a preset, started in the background and
recorded in a state file so that `down` stops exactly what `up` started."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gpus
from .config import ROLES, Preset, Settings, check_models
from .errors import LaunchError, RelayGenError, StackError
from .gpus import CVD, devices_for
from .launcher import (
    API_KEY_ENV,
    answers_generation,
    client_url,
    port_in_use,
    replica_port,
    router_command,
    server_command,
    sglang_api_key,
    start_server,
    wait_healthy,
)
from .stack_procs import exclusive, is_ours, orphans, start_ticks, stop_group

BUSY = "another relaygen up/down is running"


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


def _valid_record(rec: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return (isinstance(rec, dict) and rec.get("role") in ROLES and isinstance(rec.get("url"), str)
            and is_int(rec.get("pid")) and rec["pid"] > 0 and isinstance(rec.get("log"), str)
            and is_int(rec.get("port")) and rec.get("kind", "server") in ("server", "router")
            and (rec.get("start_ticks") is None or is_int(rec.get("start_ticks"))))


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


def _write_state(settings: Settings, state: dict[str, Any]) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(settings.state_file)


def live_servers(settings: Settings) -> list[ServerRecord]:
    state = read_state(settings)
    if not state:
        return []
    fields = set(ServerRecord.__dataclass_fields__)
    return [ServerRecord(**{k: v for k, v in rec.items() if k in fields}) for rec in state["servers"]
            if is_ours(rec) or orphans(rec)]


def _lock(settings: Settings) -> Any:
    return exclusive(settings.run_dir / "stack.lock", BUSY)


def check_counts(replicas: dict[str, int] | None, api_key: str | None) -> dict[str, int]:
    """Servers per role (default 1), checked."""
    counts = {role: (replicas or {}).get(role, 1) for role in ROLES}
    if any(n < 1 for n in counts.values()):
        raise StackError("replica counts must be at least 1")
    if api_key and any(n > 1 for n in counts.values()):
        raise StackError(f"${API_KEY_ENV} with more than one replica is not supported (SGLang's router would "
                         "need the key on its command line); unset it or use one replica per role")
    return counts


def plan(preset: Preset, counts: dict[str, int]) -> list[tuple[str, str, int, int]]:
    """(role, kind, replica, port) of every process `up` starts, in order: a role with one
    server serves on its own port; with more, replica i on replica_port(base, i) and a router
    on the role's port, after its workers."""
    steps: list[tuple[str, str, int, int]] = []
    for role in ROLES:
        base = preset.roles[role].port
        if counts[role] == 1:
            steps.append((role, "server", 0, base))
        else:
            steps += [(role, "server", i, replica_port(base, i)) for i in range(counts[role])]
            steps.append((role, "router", counts[role], base))
    return steps


def up(preset: Preset, settings: Settings, host: str = "127.0.0.1", timeout_s: float | None = None,
       replicas: dict[str, int] | None = None, kv_tokens: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Start both roles. With replicas {role: n>1}, n servers for that role behind one
    SGLang router (cache-aware) on the role's own port. With $RELAYGEN_SGLANG_API_KEY set
    every server requires that key. Each server gets its own block of GPUs (gpus.allocate).
    One `up`/`down` at a time (run/stack.lock). With `dry_run`, starts and writes nothing and
    returns the plan instead (gpus.dry_run)."""
    if dry_run:
        return gpus.dry_run(preset, settings, host=host, replicas=replicas, kv_tokens=kv_tokens)
    with _lock(settings):
        return _up(preset, settings, host, timeout_s, replicas, kv_tokens)


def _up(preset: Preset, settings: Settings, host: str, timeout_s: float | None,
        replicas: dict[str, int] | None, kv_tokens: int | None) -> dict[str, Any]:
    if live_servers(settings):
        state = read_state(settings) or {}
        raise StackError(f"servers of preset {state.get('preset')!r} are already up; run `relaygen down` first")
    check_models(preset, settings)
    api_key = sglang_api_key()
    counts = check_counts(replicas, api_key)
    devices, _ = devices_for(preset, counts)  # ConfigError (one line) when too few GPUs are visible
    steps = plan(preset, counts)
    for role, kind, _i, port in steps:
        if port_in_use(port, host):
            raise LaunchError(f"port {port} for the {role} {kind} is already in use on {host}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started: list[tuple[ServerRecord, Any]] = []
    timeout = timeout_s or preset.startup_timeout_s
    try:
        for role, kind, index, port in steps:
            if kind == "server":
                cmd = server_command(preset, role, settings, host=host, port=port, kv_tokens=kv_tokens,
                                     api_key=api_key, devices=devices[(role, index)])
            else:
                workers = [r.url for r, _ in started if r.role == role and r.kind == "server"]
                for rec, proc in started:  # a router needs healthy workers
                    if rec.role == role and rec.kind == "server":
                        wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role)
                cmd = router_command(workers, port, host=host)
            log = settings.run_dir / "logs" / f"{preset.name}-{role}-{kind}-{port}-{stamp}.log"
            proc = start_server(cmd, log)
            rec = ServerRecord(role=role, url=client_url(host, port), pid=proc.pid, log=str(log), port=port,
                               kind=kind, start_ticks=start_ticks(proc.pid), devices=cmd.env.get(CVD))
            started.append((rec, proc))
            # Recorded at once, so `down` can clean up even if this process dies mid-start.
            _write_state(settings, {"preset": preset.name, "started": stamp, "replicas": counts, "host": host,
                                    "api_key": bool(api_key), "servers": [r.__dict__ for r, _ in started]})
        for rec, proc in started:
            wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role)
    except BaseException:
        for rec, _ in reversed(started):
            stop_group(rec.pid)
        settings.state_file.unlink(missing_ok=True)
        raise
    finally:  # the servers read their key at start; the files are no longer needed
        for path in (settings.run_dir / "auth").glob(f"{preset.name}-*.yaml"):
            path.unlink(missing_ok=True)
    return status(settings)


def up_lines(out: dict[str, Any], dry_run: bool = False) -> list[str]:
    """What `relaygen up` prints: the dry run as shell lines, or where each role now serves."""
    if dry_run:
        return gpus.shell_lines(out)
    lines = []
    for role in ROLES:
        r = out[role]
        extra = f" (router over {len(r['replicas'])} replicas)" if r.get("replicas") else ""
        lines.append(f"{role}: {r['url']} pid {r['pid']}{extra} log {r['log']}")
    return lines


def role_urls(state: dict[str, Any]) -> dict[str, str]:
    """The URL clients use per role: the router where there is one, else the server."""
    urls: dict[str, str] = {}
    for rec in state["servers"]:
        if rec.get("kind", "server") == "router" or rec["role"] not in urls:
            urls[rec["role"]] = rec["url"]
    return urls


NOTHING_UP = "nothing is up (no servers recorded); start them with `relaygen up --preset P`"


def _absent(state: str) -> dict[str, Any]:
    return {"url": None, "pid": None, "kind": None, "log": None, "healthy": False, "state": state}


def _probe(rec: dict[str, Any]) -> dict[str, Any]:
    """One recorded process: "healthy", "not answering" (alive, no generation within 10 s)
    or "dead" (gone, or only the workers of a dead server are left)."""
    entry = {"url": rec["url"], "pid": rec["pid"], "kind": rec.get("kind", "server"), "log": rec["log"],
             "healthy": False}
    if not is_ours(rec):
        left = orphans(rec)
        entry["state"] = "dead" + (f" ({len(left)} orphaned processes left; `relaygen down` stops them)"
                                   if left else "")
        return entry
    try:
        entry["healthy"] = answers_generation(rec["url"], timeout_s=10)
    except RelayGenError as e:  # a bad URL in the file, a malformed API key in the environment
        entry["error"] = str(e)
    entry["state"] = "healthy" if entry["healthy"] else "not answering"
    return entry


def status(settings: Settings) -> dict[str, Any]:
    """What `up` started and how it is doing; never raises. Each role has a `state`
    ("healthy", "not answering", "dead", "missing", "not up", "unknown") and `healthy`;
    `healthy` at the top says all are, `problem` (one line, or None) says why not."""
    try:
        state = read_state(settings)
    except StackError as e:
        return {"preset": None, "healthy": False, "problem": str(e), **{r: _absent("unknown") for r in ROLES}}
    if not state:
        return {"preset": None, "healthy": False, "problem": NOTHING_UP, **{r: _absent("not up") for r in ROLES}}
    out: dict[str, Any] = {"preset": str(state.get("preset"))}
    entry_urls = role_urls(state)
    for role in ROLES:
        entries = [_probe(rec) for rec in state["servers"] if rec["role"] == role]
        front = next((e for e in entries if e["url"] == entry_urls.get(role)), entries[0] if entries else None)
        if front is None:
            out[role] = _absent("missing")
            continue
        healthy = all(e["healthy"] for e in entries)
        worst = next((e["state"] for e in entries if not e["healthy"]), "healthy")
        out[role] = {**front, "healthy": healthy, "state": "healthy" if healthy else worst}
        if len(entries) > 1:
            out[role]["replicas"] = [e for e in entries if e["kind"] == "server"]
    out["healthy"] = all(out[r]["healthy"] for r in ROLES)
    problems = [f"{role} {out[role]['state']}" for role in ROLES if not out[role]["healthy"]]
    if state["malformed"]:
        problems.append(f"{state['malformed']} malformed server record(s) in {settings.state_file}")
    try:
        keyless = state.get("api_key") and not sglang_api_key()
    except RelayGenError:
        keyless = False
    if keyless and not out["healthy"]:
        problems.append(f"the servers require an API key: set ${API_KEY_ENV}")
    out["problem"] = "not all servers are healthy: " + "; ".join(problems) if problems else None
    return out


def down(settings: Settings, warn: Callable[[str], None] | None = None) -> list[int]:
    """Stop what `up` started: each recorded process group whose leader is still the process
    started (by its start time), or, with the leader dead, the rest of its group. A pid
    that now belongs to another process is never signalled."""
    with _lock(settings):
        state = read_state(settings)
        if not state:
            raise StackError("nothing is up: no servers recorded by `relaygen up`")
        if state["malformed"] and warn:
            warn(f"{state['malformed']} malformed server record(s) in {settings.state_file} skipped; "
                 "stop those processes by hand")
        stopped = []
        for rec in reversed(state["servers"]):  # routers first, then their workers
            if is_ours(rec) or orphans(rec):
                stop_group(rec["pid"])
                stopped.append(rec["pid"])
        settings.state_file.unlink(missing_ok=True)
        return stopped

"""`relaygen up/status/down`: the two servers of a preset, started in the background and
recorded in a state file so that `down` stops exactly what `up` started."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaygen_sgl.core.config import API_KEY_ENV, CVD, ROLES, Preset, Settings, check_models, sglang_api_key
from relaygen_sgl.core.errors import LaunchError, RelayGenError, StackError
from relaygen_sgl.core.files import exclusive
from relaygen_sgl.core.state import ServerRecord, read_state, role_urls, write_state
from relaygen_sgl.servers.plan import dry_run as plan_dry_run
from relaygen_sgl.servers.plan import server_plan, shell_lines
from relaygen_sgl.servers.processes import (
    answers_generation,
    is_ours,
    orphans,
    port_in_use,
    start_server,
    start_ticks,
    stop_group,
    wait_healthy,
)

BUSY = "another relaygen up/down is running"


def live_servers(settings: Settings) -> list[ServerRecord]:
    state = read_state(settings)
    if not state:
        return []
    fields = set(ServerRecord.__dataclass_fields__)
    return [ServerRecord(**{k: v for k, v in rec.items() if k in fields}) for rec in state["servers"]
            if is_ours(rec) or orphans(rec)]


def _lock(settings: Settings) -> Any:
    return exclusive(settings.run_dir / "stack.lock", BUSY, StackError)


def up(preset: Preset, settings: Settings, host: str = "127.0.0.1", timeout_s: float | None = None,
       replicas: dict[str, int] | None = None, kv_tokens: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Start both roles. With replicas {role: n>1}, n servers for that role behind one
    SGLang router (cache-aware) on the role's own port. With $RELAYGEN_SGLANG_API_KEY set
    every server requires that key. Each server gets its own block of GPUs (plan.allocate).
    One `up`/`down` at a time (run/stack.lock). With `dry_run`, starts and writes nothing and
    returns the plan instead (plan.dry_run)."""
    if dry_run:
        return plan_dry_run(preset, settings, host=host, replicas=replicas, kv_tokens=kv_tokens)
    with _lock(settings):
        return _up(preset, settings, host, timeout_s, replicas, kv_tokens)


def _up(preset: Preset, settings: Settings, host: str, timeout_s: float | None,
        replicas: dict[str, int] | None, kv_tokens: int | None) -> dict[str, Any]:
    if live_servers(settings):
        state = read_state(settings) or {}
        raise StackError(f"servers of preset {state.get('preset')!r} are already up; run `relaygen down` first")
    check_models(preset, settings)
    api_key = sglang_api_key()
    # ConfigError (one line) when too few GPUs are visible
    plan = server_plan(preset, settings, host, replicas, kv_tokens, api_key=api_key)
    for p in plan.processes:
        if port_in_use(p.port, host):
            raise LaunchError(f"port {p.port} for the {p.role} {p.kind} is already in use on {host}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started: list[tuple[ServerRecord, Any]] = []
    timeout = timeout_s or preset.startup_timeout_s
    try:
        for p in plan.processes:
            if p.kind == "router":
                for rec, proc in started:  # a router needs healthy workers
                    if rec.role == p.role and rec.kind == "server":
                        wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role)
            log = settings.run_dir / "logs" / f"{preset.name}-{p.role}-{p.kind}-{p.port}-{stamp}.log"
            proc = start_server(p.command, log)
            rec = ServerRecord(role=p.role, url=p.url(host), pid=proc.pid, log=str(log), port=p.port,
                               kind=p.kind, start_ticks=start_ticks(proc.pid), devices=p.command.env.get(CVD))
            started.append((rec, proc))
            # Recorded at once, so `down` can clean up even if this process dies mid-start.
            write_state(settings, {"preset": preset.name, "started": stamp, "replicas": plan.counts, "host": host,
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
        return shell_lines(out)
    lines = []
    for role in ROLES:
        r = out[role]
        extra = f" (router over {len(r['replicas'])} replicas)" if r.get("replicas") else ""
        lines.append(f"{role}: {r['url']} pid {r['pid']}{extra} log {r['log']}")
    return lines


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

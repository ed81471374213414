"""`relaygen up/restart/status/down`: the two servers of a preset, started in the background
and recorded in a state file so that `down` stops exactly what `up` started, `up` again keeps
what still answers and starts what died, and `status` says how long each has been up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaygen_sgl.core.config import (
    API_KEY_ENV,
    CVD,
    ROLES,
    Preset,
    Settings,
    check_models,
    load_preset,
    sglang_api_key,
)
from relaygen_sgl.core.errors import LaunchError, RelayGenError, StackError
from relaygen_sgl.core.files import exclusive
from relaygen_sgl.core.state import ServerRecord, read_state, role_urls, write_state
from relaygen_sgl.servers.launch import LaunchPlan, Process, launch_plan, shell_lines, size_second
from relaygen_sgl.servers.launch import dry_run as plan_dry_run
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


def _lock(settings: Settings) -> Any:
    return exclusive(settings.run_dir / "stack.lock", BUSY, StackError)


def up(preset: Preset, settings: Settings, host: str = "127.0.0.1", timeout_s: float | None = None,
       replicas: dict[str, int] | None = None, kv_tokens: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Start both roles, or heal them: servers of this preset that are up and answer are kept
    (same pid), dead or missing ones are started again; servers of another preset still up are
    refused. With replicas {role: n>1}, n servers for that role behind one SGLang router
    (cache-aware) on the role's own port. With $RELAYGEN_SGLANG_API_KEY set every server
    requires that key. Each server gets its own block of GPUs (servers.gpus.allocate); servers that
    share a GPU start one after the other, each once the one before answers. One `up`/`down`
    at a time (run/stack.lock). With `dry_run`, starts and writes nothing and returns the plan
    instead (servers.launch.dry_run). The result is status() plus `kept` and `started` (what was done)."""
    if dry_run:
        return plan_dry_run(preset, settings, host=host, replicas=replicas, kv_tokens=kv_tokens)
    with _lock(settings):
        return _up(preset, settings, host, timeout_s, replicas, kv_tokens, restart=frozenset())


def restart(settings: Settings, role: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Stop and start the servers (and router) of one role with the settings `up` recorded;
    a server started after it on the same GPU is restarted too (it must start second)."""
    if role not in ROLES:
        raise StackError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    with _lock(settings):
        state = read_state(settings)
        if not state:
            raise StackError("nothing is up: no servers recorded by `relaygen up`; start them with `relaygen up`")
        preset = load_preset(str(state.get("preset")))
        return _up(preset, settings, str(state.get("host") or "127.0.0.1"), timeout_s, state.get("replicas"),
                   state.get("kv_tokens"), restart=frozenset({role}))


def _same_settings(state: dict[str, Any], host: str, counts: dict[str, int], kv_tokens: int | None,
                   api_key: bool) -> str | None:
    """What differs between the servers up and the ones asked for, or None."""
    diffs = []
    if state.get("host", host) != host:
        diffs.append(f"--host {state.get('host')}")
    if state.get("replicas", counts) != counts:
        diffs.append(f"replicas {state.get('replicas')}")
    if state.get("kv_tokens") != kv_tokens and "kv_tokens" in state:
        diffs.append(f"--kv-tokens {state.get('kv_tokens')}")
    if bool(state.get("api_key")) != api_key:
        diffs.append("an API key" if state.get("api_key") else "no API key")
    return ", ".join(diffs) or None


def _up(preset: Preset, settings: Settings, host: str, timeout_s: float | None,
        replicas: dict[str, int] | None, kv_tokens: int | None, restart: frozenset[str]) -> dict[str, Any]:
    state, old, plan, api_key = _check_running(preset, settings, host, replicas, kv_tokens)
    kept, why = _keep_or_start(plan, old, restart)
    to_start = [p for p in plan.processes if p.port in why]
    _clear_ports(to_start, old, host)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    head = {"preset": preset.name, "started": (state or {}).get("started", stamp) if kept else stamp,
            "replicas": plan.counts, "host": host, "kv_tokens": kv_tokens, "api_key": bool(api_key),
            "device_free_gib": plan.free_gib}
    started = _start_missing(preset, settings, host, plan, to_start, old, kept, head, stamp,
                             timeout_s or preset.startup_timeout_s)
    out = status(settings)
    out["kept"] = [{"role": r["role"], "kind": r.get("kind", "server"), "port": r["port"], "pid": r["pid"]}
                   for r in kept.values()]
    out["started"] = [{"role": rec.role, "kind": rec.kind, "port": rec.port, "pid": rec.pid, "why": why[port]}
                      for port, (rec, _) in started.items()]
    return out


def _check_running(preset: Preset, settings: Settings, host: str, replicas: dict[str, int] | None,
                   kv_tokens: int | None) -> tuple[dict[str, Any] | None, dict[tuple[str, str, int], dict[str, Any]],
                                                   LaunchPlan, str | None]:
    """What runs, and whether `up` may go on: servers still up must be of this preset and
    started with the same settings. Returns the state file, this preset's records by (role,
    kind, port) (its restarts count on), the plan and the servers' API key."""
    state = read_state(settings)
    records = state["servers"] if state else []
    alive = [r for r in records if is_ours(r) or orphans(r)]
    if alive and state and state.get("preset") != preset.name:
        raise StackError(f"servers of preset {state.get('preset')!r} are already up; run `relaygen down` first")
    check_models(preset, settings)
    api_key = sglang_api_key()
    # ConfigError (one line) when too few GPUs are visible or the host needs a key. On a shared
    # GPU with servers still up, the fractions of the first plan (free memory then, not now).
    recorded_free = state.get("device_free_gib") if alive and state else None
    plan = launch_plan(preset, settings, host, replicas, kv_tokens, api_key=api_key,
                       free_gib=float(recorded_free) if isinstance(recorded_free, (int, float)) else None)
    if alive and state:
        other = _same_settings(state, host, plan.counts, kv_tokens, bool(api_key))
        if other:
            raise StackError(f"servers of preset {preset.name!r} are up with {other}; run `relaygen down` first")
    same = bool(state) and state.get("preset") == preset.name
    old = {(r["role"], r.get("kind", "server"), r["port"]): r for r in records} if same else {}
    return state, old, plan, api_key


def _keep_or_start(plan: LaunchPlan, old: dict[tuple[str, str, int], dict[str, Any]],
                   restart: frozenset[str]) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Each planned process is kept (its record, by port) when it runs and answers, or starts,
    with the reason why (by port). A process that runs but does not answer is an error."""
    kept: dict[int, dict[str, Any]] = {}  # port -> record
    why: dict[int, str] = {}  # port -> why it starts
    for p in plan.processes:
        rec = old.get((p.role, p.kind, p.port))
        if rec is None:
            why[p.port] = "missing" if old else "new"
        elif p.role in restart:
            why[p.port] = "restart asked"
        elif not is_ours(rec):
            why[p.port] = "was dead"
        elif answers_generation(rec["url"], timeout_s=10):
            kept[p.port] = rec
        else:
            raise LaunchError(f"the {p.role} {p.kind} (pid {rec['pid']}, {rec['url']}) is running but does not answer "
                              f"a generation; `relaygen restart {p.role}` restarts it")
    for p in plan.processes:  # a server that must start second on its GPU restarts when the first does
        first = next((a for a in p.after if a in why), None)
        if p.port in kept and first is not None:
            del kept[p.port]
            why[p.port] = f"shares its GPU with the server on port {first}, which must start first"
    return kept, why


def _clear_ports(to_start: list[Process], old: dict[tuple[str, str, int], dict[str, Any]], host: str) -> None:
    """Stop what is left of the old processes (a forced restart, or a dead leader's workers);
    any other process on a port to start on is an error."""
    for p in to_start:
        rec = old.get((p.role, p.kind, p.port))
        if rec and (is_ours(rec) or orphans(rec)):
            stop_group(rec["pid"])
    for p in to_start:
        if port_in_use(p.port, host):
            raise LaunchError(f"port {p.port} for the {p.role} {p.kind} is already in use on {host}")


def _start_missing(preset: Preset, settings: Settings, host: str, plan: LaunchPlan, to_start: list[Process],
                   old: dict[tuple[str, str, int], dict[str, Any]], kept: dict[int, dict[str, Any]],
                   head: dict[str, Any], stamp: str, timeout: float) -> dict[int, tuple[ServerRecord, Any]]:
    """Start each process in plan order, each once those it depends on answer, and wait until
    all answer. Each start is recorded at once, so `down` can clean up even if this process dies
    mid-start; on any failure what this call started is stopped and the state keeps only what
    was kept. The key files are removed in every case: the servers read them at start."""
    started: dict[int, tuple[ServerRecord, Any]] = {}
    try:
        for p in to_start:
            for port in p.after:  # the servers before it on its GPU must be up: each sizes its memory at start
                _wait_started(started, port, timeout)
            if p.after:  # sized again from what nvidia-smi says they left (never above the plan's estimate)
                p = size_second(plan, p, preset)
            if p.kind == "router":  # a router needs healthy workers
                for port, (rec, _) in list(started.items()):
                    if rec.role == p.role and rec.kind == "server":
                        _wait_started(started, port, timeout)
            started[p.port] = _start_one(p, preset, settings, host, stamp, old.get((p.role, p.kind, p.port)))
            _record(settings, head, plan, kept, started)
        for port in started:
            _wait_started(started, port, timeout)
    except BaseException:
        for rec, _ in reversed(list(started.values())):
            stop_group(rec.pid)
        started.clear()
        if kept:
            _record(settings, head, plan, kept, started)
        else:
            settings.state_file.unlink(missing_ok=True)
        raise
    finally:
        for path in (settings.run_dir / "auth").glob(f"{preset.name}-*.yaml"):
            path.unlink(missing_ok=True)
    return started


def _start_one(p: Process, preset: Preset, settings: Settings, host: str, stamp: str,
               before: dict[str, Any] | None) -> tuple[ServerRecord, Any]:
    """Start one process, logging to its own file; `before` (its old record) counts restarts."""
    log = settings.run_dir / "logs" / f"{preset.name}-{p.role}-{p.kind}-{p.port}-{stamp}.log"
    proc = start_server(p.command, log)
    rec = ServerRecord(role=p.role, url=p.url(host), pid=proc.pid, log=str(log), port=p.port,
                       kind=p.kind, start_ticks=start_ticks(proc.pid), devices=p.command.env.get(CVD),
                       started_at=time.time(),
                       restarts=int(before.get("restarts", 0)) + 1 if before else 0)
    return rec, proc


def _wait_started(started: dict[int, tuple[ServerRecord, Any]], port: int, timeout: float) -> None:
    """Wait until the process this call started on `port` answers (nothing to wait for otherwise)."""
    if port in started:
        rec, proc = started[port]
        wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role)


def _record(settings: Settings, head: dict[str, Any], plan: LaunchPlan, kept: dict[int, dict[str, Any]],
            started: dict[int, tuple[ServerRecord, Any]]) -> None:
    """The state file: `head` (the run's settings), then each process kept or started so far, in plan order."""
    servers = [kept[p.port] if p.port in kept else started[p.port][0].__dict__ for p in plan.processes
               if p.port in kept or p.port in started]
    write_state(settings, {**head, "servers": servers})


def up_lines(out: dict[str, Any], dry_run: bool = False) -> list[str]:
    """What `relaygen up` prints: the dry run as shell lines, or what was kept and started and
    where each role now serves."""
    if dry_run:
        return shell_lines(out)
    lines = [f"kept {k['role']} {k['kind']} on port {k['port']}: pid {k['pid']} (healthy)" for k in out.get("kept", ())]
    lines += [f"started {s['role']} {s['kind']} on port {s['port']}: pid {s['pid']}"
              + ("" if s["why"] == "new" else f" ({s['why']})") for s in out.get("started", ())]
    for role in ROLES:
        r = out[role]
        extra = f" (router over {len(r['replicas'])} replicas)" if r.get("replicas") else ""
        lines.append(f"{role}: {r['url']} pid {r['pid']}{extra} log {r['log']}")
    return lines


def uptime_text(seconds: float | None) -> str:
    """12s, 5m03s, 2h07m, 3d04h."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


NOTHING_UP = "nothing is up (no servers recorded); start them with `relaygen up --preset P`"


def _absent(state: str) -> dict[str, Any]:
    return {"url": None, "pid": None, "kind": None, "log": None, "healthy": False, "state": state}


def _probe(rec: dict[str, Any]) -> dict[str, Any]:
    """One recorded process: "healthy", "not answering" (alive, no generation within 10 s)
    or "dead" (gone, or only the workers of a dead server are left)."""
    entry = {"url": rec["url"], "pid": rec["pid"], "kind": rec.get("kind", "server"), "log": rec["log"],
             "healthy": False, "restarts": rec.get("restarts", 0), "uptime_s": None}
    if not is_ours(rec):
        left = orphans(rec)
        entry["state"] = "dead" + (f" ({len(left)} orphaned processes left; `relaygen down` stops them)"
                                   if left else "")
        return entry
    if rec.get("started_at"):
        entry["uptime_s"] = max(0, round(time.time() - rec["started_at"]))
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

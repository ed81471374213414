"""`relaygen up/restart/status/down`: the two servers of a preset, started in the background
and recorded in a state file so that `down` stops exactly what `up` started, `up` again keeps
what still answers and starts what died, and `status` says how long each has been up.

Every server requires an API key unless `up` is told otherwise (keyless): SGLang runs code its
clients send (--enable-custom-logit-processor). The key is $RELAYGEN_SGLANG_API_KEY or a random
one, in the home's key file (core.state) while a server started with it runs; every client finds
it there (config.sglang_api_key). A server stopped (`down`, `restart`, a heal) leaves nothing
behind: its /dev/shm files and private TMPDIR go with it (servers.processes.remove_leftovers)."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import tempfile
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
    user_api_key,
)
from relaygen_sgl.core.errors import ConfigError, LaunchError, RelayGenError, StackError
from relaygen_sgl.core.files import exclusive
from relaygen_sgl.core.state import (
    ServerRecord,
    key_held,
    key_in_use,
    key_path,
    new_key,
    read_key,
    read_state,
    remove_key_if_unused,
    role_urls,
    write_key,
    write_state,
)
from relaygen_sgl.servers.launch import LaunchPlan, Process, launch_plan, shell_lines, size_second
from relaygen_sgl.servers.launch import dry_run as plan_dry_run
from relaygen_sgl.servers.processes import (
    answers_generation,
    is_ours,
    orphans,
    owned_shm,
    port_in_use,
    private_tmp,
    redact,
    remove_leftovers,
    scrub_log,
    start_server,
    start_ticks,
    stop_group,
    wait_group_gone,
    wait_healthy,
)

BUSY = "another relaygen up/down is running"


def _lock(settings: Settings) -> Any:
    return exclusive(settings.run_dir / "stack.lock", BUSY, StackError)


def up(preset: Preset, settings: Settings, host: str = "127.0.0.1", timeout_s: float | None = None,
       replicas: dict[str, int] | None = None, kv_tokens: int | None = None, dry_run: bool = False,
       keyless: bool | None = None) -> dict[str, Any]:
    """Start both roles, or heal them: servers of this preset that are up and answer are kept
    (same pid), dead or missing ones are started again; servers of another preset still up are
    refused. With replicas {role: n>1}, n servers for that role behind one SGLang router
    (cache-aware) on the role's own port. Every server and router requires the home's API key
    ($RELAYGEN_SGLANG_API_KEY, else a random one: _stack_key), unless `keyless` (`up --no-api-key`;
    None: keyless only when the servers still up were started so). Each server gets its own block of
    GPUs (servers.gpus.allocate); servers that share a GPU start one after the other, each once the
    one before answers. One `up`/`down` at a time (run/stack.lock). With `dry_run`, starts and writes
    nothing and returns the plan instead (servers.launch.dry_run). The result is status() plus `kept`
    and `started` (what was done)."""
    if dry_run:
        return plan_dry_run(preset, settings, host=host, replicas=replicas, kv_tokens=kv_tokens,
                            keyless=bool(keyless))
    with _lock(settings):
        return _up(preset, settings, host, timeout_s, replicas, kv_tokens, restart=frozenset(), keyless=keyless)


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
                   state.get("kv_tokens"), restart=frozenset({role}), keyless=not state.get("api_key"))


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
        replicas: dict[str, int] | None, kv_tokens: int | None, restart: frozenset[str],
        keyless: bool | None) -> dict[str, Any]:
    state, old, plan, api_key = _check_running(preset, settings, host, replicas, kv_tokens, keyless)
    kept, why = _keep_or_start(plan, old, restart, api_key)
    to_start = [p for p in plan.processes if p.port in why]
    _clear_ports(settings, to_start, old, host)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    head = {"preset": preset.name, "started": (state or {}).get("started", stamp) if kept else stamp,
            "replicas": plan.counts, "host": host, "kv_tokens": kv_tokens, "api_key": bool(api_key),
            "device_free_gib": plan.free_gib}
    started = _start_missing(preset, settings, host, plan, to_start, old, kept, head, stamp,
                             timeout_s or preset.startup_timeout_s, api_key)
    out = status(settings)
    out["kept"] = [{"role": r["role"], "kind": r.get("kind", "server"), "port": r["port"], "pid": r["pid"]}
                   for r in kept.values()]
    out["started"] = [{"role": rec.role, "kind": rec.kind, "port": rec.port, "pid": rec.pid, "why": why[port]}
                      for port, (rec, _) in started.items()]
    return out


Records = dict[tuple[str, str, int], dict[str, Any]]  # by (role, kind, port)


def _check_running(preset: Preset, settings: Settings, host: str, replicas: dict[str, int] | None,
                   kv_tokens: int | None, keyless: bool | None
                   ) -> tuple[dict[str, Any] | None, Records, LaunchPlan, str | None]:
    """What runs, and whether `up` may go on: servers still up must be of this preset and
    started with the same settings. Returns the state file, this preset's records by (role,
    kind, port) (its restarts count on), the plan and the servers' API key (None: keyless)."""
    state = read_state(settings)
    records = state["servers"] if state else []
    alive = [r for r in records if is_ours(r) or orphans(r)]
    if alive and state and state.get("preset") != preset.name:
        raise StackError(f"servers of preset {state.get('preset')!r} are already up; run `relaygen down` first")
    check_models(preset, settings)
    user_key = user_api_key()
    if keyless and user_key:
        raise ConfigError(f"--no-api-key and ${API_KEY_ENV} ask for opposite things: unset one")
    if keyless is None:  # the default: a key, unless the servers still up were started without one
        keyless = bool(alive and state and not state.get("api_key"))
    keyed = not keyless
    # ConfigError (one line) when too few GPUs are visible or the host needs a key. On a shared
    # GPU with servers still up, the fractions of the first plan (free memory then, not now).
    recorded_free = state.get("device_free_gib") if alive and state else None
    plan = launch_plan(preset, settings, host, replicas, kv_tokens, api_key=user_key if keyed else None, keyed=keyed,
                       free_gib=float(recorded_free) if isinstance(recorded_free, (int, float)) else None)
    if alive and state:
        other = _same_settings(state, host, plan.counts, kv_tokens, keyed)
        if other:
            raise StackError(f"servers of preset {preset.name!r} are up with {other}; run `relaygen down` first")
    same = bool(state) and state.get("preset") == preset.name
    old = {(r["role"], r.get("kind", "server"), r["port"]): r for r in records} if same else {}
    api_key = _stack_key(settings, user_key, kept_keyed=bool(alive) and keyed) if keyed else None
    return state, old, plan, api_key


def _stack_key(settings: Settings, user_key: str | None, kept_keyed: bool) -> str:
    """The key this home's servers require, in its key file: the one there while servers that
    read it run (those `up` keeps, or ones launch/serve.sh started), else $RELAYGEN_SGLANG_API_KEY,
    else a new random one. A different $RELAYGEN_SGLANG_API_KEY while servers use the file's is a
    StackError: the servers kept could not be reached with it."""
    path = key_path(settings)
    current = read_key(settings)
    if kept_keyed and current is None and user_key is None:
        raise StackError(f"the servers up require the API key that was in {path}, which is gone: stop them "
                         f"(`relaygen down`) and start again")
    if current is not None and (kept_keyed or key_in_use(settings)):
        if user_key is not None and user_key != current:
            raise StackError(f"servers of this home run with the API key in {path}, not ${API_KEY_ENV}: unset it, "
                             "or stop them first")
        return current
    key = user_key or new_key()
    write_key(settings, key)
    return key


def hand_key(settings: Settings) -> str:
    """The key of a server launch/serve.sh starts: the home's, as `up` chooses it (_stack_key), so
    servers started by hand and by `up` in one home, and their clients, share one key."""
    with _lock(settings):
        state = read_state(settings)
        kept_keyed = bool(state and state.get("api_key") and any(is_ours(r) for r in state["servers"]))
        return _stack_key(settings, user_api_key(), kept_keyed=kept_keyed)


def _keep_or_start(plan: LaunchPlan, old: dict[tuple[str, str, int], dict[str, Any]],
                   restart: frozenset[str], api_key: str | None) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
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
        elif answers_generation(rec["url"], timeout_s=10, api_key=api_key):
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


def _clear_ports(settings: Settings, to_start: list[Process], old: dict[tuple[str, str, int], dict[str, Any]],
                 host: str) -> None:
    """Stop what is left of the old processes (a forced restart, or a dead leader's workers) and
    remove what they left behind; any other process on a port to start on is an error."""
    key = _recorded_key(settings)
    for p in to_start:
        rec = old.get((p.role, p.kind, p.port))
        if rec:
            _stop(rec, key)
    for p in to_start:
        if port_in_use(p.port, host):
            raise LaunchError(f"port {p.port} for the {p.role} {p.kind} is already in use on {host}")


def _start_missing(preset: Preset, settings: Settings, host: str, plan: LaunchPlan, to_start: list[Process],
                   old: dict[tuple[str, str, int], dict[str, Any]], kept: dict[int, dict[str, Any]],
                   head: dict[str, Any], stamp: str, timeout: float,
                   api_key: str | None) -> dict[int, tuple[ServerRecord, Any]]:
    """Start each process in plan order, each once those it depends on answer, and wait until
    all answer. Each start is recorded at once, so `down` can clean up even if this process dies
    mid-start; on any failure what this call started is stopped and the state keeps only what
    was kept, and the key file goes unless a server still uses it. Each server inherits the key
    file's locked descriptor (it keeps the key in use while it lives) and, once it answers, its
    log is scrubbed of the key (SGLang logs its arguments) and its /dev/shm files recorded."""
    started: dict[int, tuple[ServerRecord, Any]] = {}
    with contextlib.ExitStack() as held:
        key_fd = held.enter_context(key_held(settings)) if api_key else None
        try:
            _start_all(preset, settings, host, plan, to_start, old, kept, head, stamp, timeout, api_key, key_fd,
                       started)
        except BaseException:
            for rec, _ in reversed(list(started.values())):
                _stop(rec.__dict__, api_key)
            started.clear()
            if kept:
                _record(settings, head, plan, kept, started)
            else:
                settings.state_file.unlink(missing_ok=True)
            held.close()  # this process's hold on the key file goes first
            if not kept:
                remove_key_if_unused(settings)
            raise
    return started


def _start_all(preset: Preset, settings: Settings, host: str, plan: LaunchPlan, to_start: list[Process],
               old: dict[tuple[str, str, int], dict[str, Any]], kept: dict[int, dict[str, Any]],
               head: dict[str, Any], stamp: str, timeout: float, api_key: str | None, key_fd: int | None,
               started: dict[int, tuple[ServerRecord, Any]]) -> None:
    """_start_missing's starts, in order (it stops them on any failure)."""
    for p in to_start:
        for port in p.after:  # the servers before it on its GPU must be up: each sizes its memory at start
            _wait_started(started, port, timeout, api_key)
        if p.after:  # sized again from what nvidia-smi says they left (never above the plan's estimate)
            p = size_second(plan, p, preset)
        if p.kind == "router":  # a router needs healthy workers
            for port, (rec, _) in list(started.items()):
                if rec.role == p.role and rec.kind == "server":
                    _wait_started(started, port, timeout, api_key)
        started[p.port] = _start_one(p, preset, settings, host, stamp, old.get((p.role, p.kind, p.port)), key_fd)
        _record(settings, head, plan, kept, started)
    for port in started:
        _wait_started(started, port, timeout, api_key)
    for port, (rec, proc) in started.items():  # what each left in /dev/shm, should it die before `down`
        started[port] = (dataclasses.replace(rec, shm=owned_shm(rec.pid)), proc)
    _record(settings, head, plan, kept, started)


def _start_one(p: Process, preset: Preset, settings: Settings, host: str, stamp: str,
               before: dict[str, Any] | None, key_fd: int | None) -> tuple[ServerRecord, Any]:
    """Start one process, logging to its own file; `before` (its old record) counts restarts.
    It gets a private TMPDIR (SGLang's IPC sockets go there, and with it once it stopped; torch's
    compile cache stays where it was) and, when keyed, the key file's locked descriptor."""
    log = settings.run_dir / "logs" / f"{preset.name}-{p.role}-{p.kind}-{p.port}-{stamp}.log"
    tmp = private_tmp(f"{p.role}-{p.port}")
    env = {**p.command.env, "TMPDIR": tmp}
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # torch's default, under the TMPDIR it had
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    cmd = dataclasses.replace(p.command, env=env, pass_fds=() if key_fd is None else (key_fd,))
    try:
        proc = start_server(cmd, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rec = ServerRecord(role=p.role, url=p.url(host), pid=proc.pid, log=str(log), port=p.port,
                       kind=p.kind, start_ticks=start_ticks(proc.pid), devices=p.command.env.get(CVD),
                       started_at=time.time(),
                       restarts=int(before.get("restarts", 0)) + 1 if before else 0, tmp_dir=tmp)
    return rec, proc


def _wait_started(started: dict[int, tuple[ServerRecord, Any]], port: int, timeout: float,
                  api_key: str | None) -> None:
    """Wait until the process this call started on `port` answers (nothing to wait for otherwise),
    then scrub the key from its log; the log lines a failure quotes never show it either."""
    if port in started:
        rec, proc = started[port]
        try:
            wait_healthy(rec.url, proc, Path(rec.log), timeout, rec.role, api_key)
        except LaunchError as e:
            raise LaunchError(redact(str(e), [api_key])) from None
        finally:
            scrub_log(Path(rec.log), [api_key])


def _stop(rec: dict[str, Any], api_key: str | None = None) -> bool:
    """Stop a recorded process group (when it is still the one `up` started, or its leader died and
    its workers live on), then remove what it left: the /dev/shm files recorded at its start and
    those its members hold now, and its private TMPDIR; scrub `api_key` from its log (an `up`
    killed before the server answered left it there). True when it had to be stopped."""
    running = is_ours(rec) or bool(orphans(rec))
    shm = dict(rec.get("shm") or {})
    if running:
        shm.update(owned_shm(rec["pid"]))
        stop_group(rec["pid"])
        wait_group_gone(rec["pid"])
    remove_leftovers(shm, rec.get("tmp_dir"))
    scrub_log(Path(rec["log"]), [api_key])
    return running


def _recorded_key(settings: Settings) -> str | None:
    """The key file's key, for scrubbing; None where there is none or it cannot be read."""
    try:
        return read_key(settings)
    except RelayGenError:
        return None


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
    if out.get("key_file"):
        lines.append(f"api key: every server requires the key in {out['key_file']} (0600; relaygen's clients on "
                     "this machine read it there)")
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


def _probe(rec: dict[str, Any], api_key: str | None) -> dict[str, Any]:
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
        entry["healthy"] = answers_generation(rec["url"], timeout_s=10, api_key=api_key)
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
    out: dict[str, Any] = {"preset": str(state.get("preset")), "api_key": bool(state.get("api_key"))}
    if state.get("api_key"):
        out["key_file"] = str(key_path(settings))  # where the key is, never the key
    try:
        key = sglang_api_key(settings=settings)
    except RelayGenError as e:  # a malformed key in the environment or the key file: one line per server
        key, bad_key = None, str(e)
    else:
        bad_key = None
    entry_urls = role_urls(state)
    for role in ROLES:
        entries = [_probe(rec, key) for rec in state["servers"] if rec["role"] == role]
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
    if bad_key:
        problems.append(bad_key)
    elif state.get("api_key") and not key and not out["healthy"]:
        problems.append(f"the servers require an API key, and neither ${API_KEY_ENV} nor {key_path(settings)} "
                        "holds one")
    out["problem"] = "not all servers are healthy: " + "; ".join(problems) if problems else None
    return out


def down(settings: Settings, warn: Callable[[str], None] | None = None) -> list[int]:
    """Stop what `up` started: each recorded process group whose leader is still the process
    started (by its start time), or, with the leader dead, the rest of its group. A pid
    that now belongs to another process is never signalled. What each server left (its /dev/shm
    files, its TMPDIR's sockets) and the key file go too."""
    with _lock(settings):
        state = read_state(settings)
        if not state:
            _remove_keys(settings)  # left by servers launch/serve.sh started, or an `up` killed before any start
            raise StackError("nothing is up: no servers recorded by `relaygen up`")
        if state["malformed"] and warn:
            warn(f"{state['malformed']} malformed server record(s) in {settings.state_file} skipped; "
                 "stop those processes by hand")
        stopped = []
        key = _recorded_key(settings)
        for rec in reversed(state["servers"]):  # routers first, then their workers
            if _stop(rec, key):
                stopped.append(rec["pid"])
        settings.state_file.unlink(missing_ok=True)
        _remove_keys(settings)
        return stopped


def _remove_keys(settings: Settings) -> None:
    """The key file, unless a server started with it still runs (launch/serve.sh's), and the
    per-server key files of earlier versions (run/auth)."""
    remove_key_if_unused(settings)
    shutil.rmtree(settings.run_dir / "auth", ignore_errors=True)

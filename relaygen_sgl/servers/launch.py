"""How a preset's servers are launched, the one place it is decided: every SGLang server's and
router's command line and environment, their ports, their order, and on a shared device their
--mem-fraction-static and --max-total-tokens. `relaygen up` starts this LaunchPlan, `relaygen up
--dry-run` prints it, and `launch/serve.sh` runs one server of it; one plan for all three keeps
what a user pastes and what `up` starts the same. Which GPUs each server gets is servers.gpus;
how much memory and KV cache each gets is servers.memory.

A shared-device preset (`share_device = true`) starts its servers one after the other, each
sized by servers.memory.plan_shared, since SGLang sizes a server's cache from the memory free
when it starts; the second is sized again from what nvidia-smi reports once the first is up
(size_second), and launch/serve.sh sizes it from what is free when it runs (role_command).

Keys and exposure: SGLang's --enable-custom-logit-processor unpickles code a client sends (dill),
so every server requires an API key unless the user opts out: the home's key file (config.KEY_FILE,
0600; SGLang reads it with --config, the router through run_with_key), never a command line. A
server reachable from other machines needs a key its remote clients know: $RELAYGEN_SGLANG_API_KEY
(check_exposure)."""

from __future__ import annotations

import dataclasses
import os
import runpy
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaygen_sgl.core.config import (
    API_KEY_ENV,
    CVD,
    LOOPBACK,
    ROLES,
    Preset,
    Settings,
    check_models,
    client_url,
    cpu_shim_dir,
    exposed,
    read_key_file,
    user_api_key,
)
from relaygen_sgl.core.errors import ConfigError, StackError
from relaygen_sgl.core.state import key_path
from relaygen_sgl.servers.gpus import GpuMemory, devices_for, gpu_memory
from relaygen_sgl.servers.memory import (
    Card,
    MemoryPlan,
    ServerMemory,
    last_on_device,
    measured_card,
    plan_cpu,
    plan_for_card,
    plan_separate,
    plan_shared,
    preset_cards,
    shape,
    trajectories_text,
)

KEY_PLACEHOLDER = "<api-key-config.yaml>"  # the key file's place in a plan that is only shown
CUSTOM_LOGITS = "--enable-custom-logit-processor"
DEVICE_ORDER = "CUDA_DEVICE_ORDER"


@dataclass(frozen=True)
class ServerCommand:
    argv: tuple[str, ...]
    env: dict[str, str]  # additions to the parent's environment
    pass_fds: tuple[int, ...] = ()  # descriptors it inherits: the key file's, locked (core.state)


def _override(args: tuple[str, ...], flag: str, value: str | None) -> tuple[str, ...]:
    if value is None:
        return args
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return tuple(out)


def server_command(preset: Preset, role: str, settings: Settings, host: str = LOOPBACK,
                   python: str = sys.executable, port: int | None = None,
                   kv_tokens: int | None = None, key_file: str | None = None,
                   devices: Sequence[str] | None = None) -> ServerCommand:
    """With `key_file` the server requires the key in it (SGLang's --config reads the file: 0.5.23
    takes --api-key from its arguments only, and a file keeps the key out of `ps` and of the command
    lines printed to logs); with `devices` (its block from servers.gpus.allocate) it sees only those GPUs."""
    spec = preset.roles[role]
    args = _override(spec.args, "--max-total-tokens", str(kv_tokens) if kv_tokens else None)
    argv = (python, "-m", "sglang.launch_server", "--model-path", spec.model_path(settings),
            "--host", host, "--port", str(port or spec.port), *args)
    if key_file:
        argv += ("--config", key_file)
    env = dict(spec.env)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if preset.device == "cuda" and DEVICE_ORDER not in os.environ:
        # CUDA numbers GPUs fastest first by default, nvidia-smi by PCI bus: the same order for
        # both, so CUDA_VISIBLE_DEVICES=2 is the GPU nvidia-smi calls 2.
        env[DEVICE_ORDER] = "PCI_BUS_ID"
    if preset.device == "cpu":
        # The stand-in for sgl-kernel's missing CPU ops: on CPU server processes only.
        shim = str(cpu_shim_dir())
        inherited = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = shim + os.pathsep + inherited if inherited else shim
    return ServerCommand(argv=argv, env=env)


def router_command(worker_urls: list[str], port: int, host: str = LOOPBACK,
                   python: str = sys.executable, key_file: str | None = None) -> ServerCommand:
    """SGLang's own router (sglang-router) in front of a role's replicas. cache_aware sends a
    request to the replica holding the longest matching prefix, so a trajectory's handoffs
    keep landing where its cache is. With `key_file` the router requires the key from its
    clients and sends it to its workers (sglang-router 0.3.2's --api-key, measured: 401 without
    it); it takes the key only as an argument, so `relaygen with-key` reads the file and passes
    it in-process (run_with_key)."""
    args = ("sglang_router.launch_router", "--host", host, "--port", str(port),
            "--policy", "cache_aware", "--worker-urls", *worker_urls)
    if key_file:
        return ServerCommand(argv=(python, "-m", "relaygen_sgl.cli", "with-key", key_file, *args), env={})
    return ServerCommand(argv=(python, "-m", *args), env={})


def run_with_key(key_file: str, module: str, args: Sequence[str]) -> None:
    """Run `python -m MODULE ARGS --api-key KEY` in this process, the key read from `key_file`:
    /proc/PID/cmdline (what `ps` shows) keeps the command line this process started with."""
    key = read_key_file(Path(key_file))
    if key is None:
        raise ConfigError(f"no API key file at {key_file}")
    sys.argv = [module, *args, "--api-key", key]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def replica_port(base: int, index: int) -> int:
    """Replica i of a role listens at base + 200 + 10 i; the role's own port is its router's."""
    return base + 200 + 10 * index


def device_card(preset: Preset, devices: Sequence[str], assumed: bool = False,
                found: Mapping[str, GpuMemory] | None = None) -> Card:
    """The GPU `devices` are, as nvidia-smi reports it (the one with least free memory), else
    (`assumed`, or nvidia-smi lists none of them) an idle card of the first kind the preset
    names: what a dry run on a machine without a GPU shows."""
    smi = {} if assumed else (gpu_memory() if found is None else found)
    mem = [smi[d] for d in devices if d in smi]
    if mem:
        least = min(mem, key=lambda m: m.free_gib)
        return measured_card(least.name, least.total_gib * 1024, least.free_gib * 1024)
    named = preset_cards(preset)
    if not named:
        raise ConfigError(f"preset {preset.name} names no cards (`cards` in launch/presets.toml) and nvidia-smi "
                          f"reports none of GPU {','.join(devices) or '-'}")
    return named[0]


def _sized(cmd: ServerCommand, mem: ServerMemory) -> ServerCommand:
    """The command with the plan's --mem-fraction-static and --max-total-tokens (pinned)."""
    argv = _override(cmd.argv, "--mem-fraction-static", str(mem.fraction))
    return dataclasses.replace(cmd, argv=_override(argv, "--max-total-tokens", str(mem.kv_tokens)))


def check_exposure(preset: Preset, host: str, api_key: str | None) -> None:
    """A server with --enable-custom-logit-processor runs code a client sends (SGLang unpickles
    it): beyond loopback only with a key its remote clients can be given, `api_key` (the user's
    $RELAYGEN_SGLANG_API_KEY; a key `up` makes is read by this machine's clients only). ConfigError
    (one line, exit 2) otherwise."""
    if not exposed(host, api_key or None):
        return
    roles = [role for role, spec in preset.roles.items() if CUSTOM_LOGITS in spec.args]
    if roles:
        raise ConfigError(f"--host {host} is reachable from other machines and the {' and '.join(roles)} "
                          f"server{'s' if len(roles) > 1 else ''} of {preset.name} run client code "
                          f"({CUSTOM_LOGITS}): set ${API_KEY_ENV} (every server then requires it; give it to "
                          f"the remote clients), or bind {LOOPBACK}")


def check_counts(replicas: Mapping[str, int] | None) -> dict[str, int]:
    """Servers per role (default 1), checked. A key and replicas go together: the router requires
    the key and passes it on to its workers (router_command)."""
    counts = {role: (replicas or {}).get(role, 1) for role in ROLES}
    if any(n < 1 for n in counts.values()):
        raise StackError("replica counts must be at least 1")
    return counts


@dataclass(frozen=True)
class Process:
    """One process of the plan: a role's server (replica i) or the router in front of its
    replicas, on `port`, started by `command`; `after` are the ports of the servers that must
    answer before it starts (they share its GPU), `memory` its sizing there (servers.memory)."""
    role: str
    kind: str  # "server" | "router"
    replica: int
    port: int
    command: ServerCommand
    after: tuple[int, ...] = ()
    memory: ServerMemory | None = None

    def url(self, host: str) -> str:
        return client_url(host, self.port)


@dataclass(frozen=True)
class LaunchPlan:
    preset: str
    host: str
    counts: dict[str, int]
    processes: tuple[Process, ...]  # in start order: large first, a router after its workers
    note: str | None  # what was assumed (no GPU visible in a dry run), or None
    shared_device: str | None = None  # the device both servers share (share_device presets)
    free_gib: float | None = None  # its free memory the fractions were computed for
    memory: MemoryPlan | None = None  # the shared device's plan (servers.memory.plan_shared)
    card: Card | None = None  # the shared device, as the plan saw it
    kv_tokens: int | None = None  # `up --kv-tokens`


def launch_plan(preset: Preset, settings: Settings, host: str = LOOPBACK,
                replicas: Mapping[str, int] | None = None, kv_tokens: int | None = None,
                api_key: str | None = None, assume: bool = False, key_file: bool = True,
                free_gib: float | None = None, keyed: bool = False) -> LaunchPlan:
    """Every process `up` starts, in order. A role with one server serves on its own port;
    with more, replica i on replica_port(base, i) and a router on the role's port, after its
    workers. With `keyed`, each server and router requires the key in the home's key file
    (state.key_path; whoever starts the plan writes it), or with `key_file=False` (a plan only
    shown) a placeholder; `api_key` is the user's key, which a host beyond loopback needs
    (check_exposure). With `assume` and no GPU visible, devices 0..N-1 are assumed (said in
    the note); otherwise too few is a ConfigError."""
    counts = check_counts(replicas)
    if key_file:  # a plan to run (a dry run only notes it)
        check_exposure(preset, host, api_key)
    key = (str(key_path(settings)) if key_file else KEY_PLACEHOLDER) if keyed else None
    devices, note = devices_for(preset, counts, assume=assume)
    memory, card, shared = None, None, None
    if preset.share_device:
        shared = ",".join(devices[(ROLES[0], 0)])
        card = device_card(preset, devices[(ROLES[0], 0)], assumed=bool(note))
        source = card.describe()
        if free_gib is not None:  # a heal: the servers still up hold memory the first plan counted as free
            card = dataclasses.replace(card, free_mib=free_gib * 1024)
            source = f"{free_gib:.1f} GiB free when `up` first planned it"
        memory = plan_shared(preset, card, kv_tokens=kv_tokens, source=source)
        note = "; ".join(x for x in (note, f"device {shared} shared by both servers: {source}") if x)
    processes: list[Process] = []
    for role in ROLES:
        base = preset.roles[role].port
        ports = [base] if counts[role] == 1 else [replica_port(base, i) for i in range(counts[role])]
        for i, port in enumerate(ports):
            cmd = server_command(preset, role, settings, host=host, port=port, kv_tokens=kv_tokens,
                                 key_file=key, devices=devices[(role, i)])
            sizing = memory.servers[role] if memory else None
            if sizing:
                cmd = _sized(cmd, sizing)
            mine = set(devices[(role, i)])
            after = tuple(p.port for p in processes if p.kind == "server"
                          and mine & set(p.command.env.get(CVD, "").split(",")))
            processes.append(Process(role, "server", i, port, cmd, after=after, memory=sizing))
        if counts[role] > 1:
            workers = [client_url(host, p) for p in ports]
            processes.append(Process(role, "router", counts[role], base,
                                     router_command(workers, base, host=host, key_file=key)))
    return LaunchPlan(preset.name, host, counts, tuple(processes), note, shared_device=shared,
                      free_gib=card.free_gib if card is not None else None, memory=memory, card=card,
                      kv_tokens=kv_tokens)


def size_second(plan: LaunchPlan, p: Process, preset: Preset,
                found: Mapping[str, GpuMemory] | None = None) -> Process:
    """A server that starts after another on its GPU, sized again just before it starts from
    what nvidia-smi reports free then (the first one up, its graphs captured): never above the
    plan's estimate, less where the first took more than estimated. Unchanged when nvidia-smi
    says nothing. ConfigError (one line) when no KV cache would be left."""
    if plan.memory is None or plan.card is None or p.memory is None or not p.after or p.memory.free_gib is None:
        return p
    smi = gpu_memory() if found is None else found
    now = [smi[d] for d in p.command.env.get(CVD, "").split(",") if d in smi]
    if not now:
        return p
    free = min(m.free_gib for m in now)
    if free >= p.memory.free_gib:
        return p
    mem = last_on_device(shape(preset, p.role, plan.kv_tokens), plan.card, p.role, free, preset.runtime_reserve_gib,
                         why=f"started once the {ROLES[0]} server answered, with {free:.1f} GiB free (nvidia-smi; "
                             f"{p.memory.free_gib:.1f} estimated)")
    return dataclasses.replace(p, command=_sized(p.command, mem), memory=mem)


def memory_plan(preset: Preset, plan: LaunchPlan, found: Mapping[str, GpuMemory] | None = None) -> MemoryPlan:
    """What each role's first server holds and serves (servers.memory): the shared device's
    plan, else each role on its own GPUs as nvidia-smi reports them (or an idle card of the
    first kind the preset names), else the CPU's."""
    if plan.memory is not None:
        return plan.memory
    blocks = {(p.role, p.replica): tuple(p.command.env.get(CVD, "").split(",")) for p in plan.processes
              if p.kind == "server"}
    return devices_memory(preset, blocks, found, plan.kv_tokens)


def devices_memory(preset: Preset, blocks: Mapping[tuple[str, int], Sequence[str]],
                   found: Mapping[str, GpuMemory] | None = None, kv_tokens: int | None = None) -> MemoryPlan:
    """The memory plan for the devices servers.gpus.allocate gave each role, as nvidia-smi
    reports them (`found`; else asked), a device it does not list as an idle card of the first
    kind the preset names. ConfigError (one line) when a shared device is too small."""
    if preset.device == "cpu":
        return plan_cpu(preset, kv_tokens)
    smi = gpu_memory() if found is None else found
    if preset.share_device:
        return plan_shared(preset, device_card(preset, blocks[(ROLES[0], 0)], found=smi), kv_tokens=kv_tokens)
    return plan_separate(preset, {role: device_card(preset, blocks[(role, 0)], found=smi) for role in ROLES}, kv_tokens)


def card_plans(preset: Preset, kv_tokens: int | None = None) -> dict[str, dict[str, Any]]:
    """The plan on each card the preset names, in brief: KV tokens per role and trajectories."""
    out: dict[str, dict[str, Any]] = {}
    for card in preset_cards(preset):
        try:
            mp = plan_for_card(preset, card, kv_tokens)
        except ConfigError as e:
            out[card.key] = {"free_gib": round(card.free_gib, 1), "refused": str(e)}
            continue
        out[card.key] = {"free_gib": round(card.free_gib, 1), "trajectories": mp.trajectories,
                         "kv_tokens": {role: s.kv_tokens for role, s in mp.servers.items()}}
    return out


def dry_run(preset: Preset, settings: Settings, host: str = LOOPBACK, replicas: Mapping[str, int] | None = None,
            kv_tokens: int | None = None, keyless: bool = False) -> dict[str, Any]:
    """What `up` would start, in its order: {"preset", "servers": [{"role", "replica", "port",
    "argv", "env", "memory"}], "memory", "cards", "note"}: each server's KV tokens and the
    trajectories of the budget that fit (servers.memory), here and on each card the preset
    names. Starts nothing and writes nothing; the API key is never shown."""
    key = None if keyless else user_api_key()
    plan = launch_plan(preset, settings, host, replicas, kv_tokens, api_key=key, assume=True, key_file=False,
                       keyed=not keyless)
    memory = memory_plan(preset, plan)
    notes = [plan.note] if plan.note else []
    try:
        check_exposure(preset, host, key)
    except ConfigError as e:
        notes.append(f"a real start would refuse: {e}")
    auth = None if keyless else (
        f"every server requires an API key ({'$' + API_KEY_ENV if key else 'a random one'}): `up` writes it to a "
        f"0600 file the servers and this machine's clients read (--config); shown here as {KEY_PLACEHOLDER}, never "
        "printed")
    try:
        check_models(preset, settings)
    except ConfigError as e:
        notes.append(str(e))
    by_port = {p.port: p for p in plan.processes}
    servers = []
    for p in plan.processes:
        entry: dict[str, Any] = {"role": p.role, "replica": "router" if p.kind == "router" else p.replica,
                                 "port": p.port, "argv": list(p.command.argv), "env": dict(p.command.env)}
        if p.after:
            entry["starts_after"] = [f"{by_port[a].role} server on port {a} answers (same GPU)" for a in p.after]
        if p.memory:
            entry["mem_fraction_static"] = p.memory.fraction
            entry["why"] = p.memory.why
        if p.kind == "server":
            entry["memory"] = (p.memory or memory.servers[p.role]).to_dict()
        servers.append(entry)
    out: dict[str, Any] = {"preset": preset.name, "order": [f"{p.role} {p.kind}" + (f" {p.replica}" if p.kind ==
                                                                                     "server" else "")
                                                            for p in plan.processes]}
    if plan.shared_device is not None:
        out["shared_device"] = plan.shared_device
        out["sequential"] = True
    out["memory"] = memory.to_dict()
    if preset.device == "cuda":
        out["cards"] = card_plans(preset, kv_tokens)
    return {**out, "servers": servers, "auth": auth, "note": "; ".join(notes + list(memory.notes)) or None}


def role_command(preset: Preset, role: str, settings: Settings, host: str = LOOPBACK, assume: bool = False,
                 listening: Callable[[int], bool] | None = None, keyed: bool = False,
                 key_file: bool = True) -> tuple[ServerCommand, str | None]:
    """One server of `role`, for launch/serve.sh: the first server of that role in the plan
    `up` makes with one replica per role, so two roles started by hand on one machine do not
    share GPUs. Where only this role fits (a machine for one role) it takes the first visible
    devices; the note says so. The second server on a shared GPU is sized from what is free
    now (_second_on_device); `listening(port)` tells whether the first one is up. `keyed` and
    `key_file` as for launch_plan."""
    key = user_api_key() if keyed else None
    check_exposure(preset, host, key)  # a dry run too: what it prints could not start
    if preset.share_device and role != ROLES[0]:
        return _second_on_device(preset, role, settings, host, key, assume, listening, keyed, key_file)
    try:
        plan = launch_plan(preset, settings, host, api_key=key, assume=assume, keyed=keyed, key_file=key_file)
        note = plan.note
    except ConfigError as both:  # not enough for both roles: this one alone?
        alone = dataclasses.replace(preset, roles={**preset.roles,
                                                   **{r: dataclasses.replace(s, gpus=0) for r, s in
                                                      preset.roles.items() if r != role}})
        try:
            plan = launch_plan(alone, settings, host, api_key=key, assume=assume, keyed=keyed, key_file=key_file)
        except ConfigError:
            raise both from None
        note = f"{both}; the {role} server alone takes the first {preset.roles[role].gpus}"
    first = next(p for p in plan.processes if p.role == role and p.kind == "server")
    return first.command, note


def _second_on_device(preset: Preset, role: str, settings: Settings, host: str, key: str | None, assume: bool,
                      listening: Callable[[int], bool] | None, keyed: bool = False,
                      key_file: bool = True) -> tuple[ServerCommand, str]:
    """launch/serve.sh for the server that starts second on a shared GPU: the first one is up
    (else one line: start it first), so what nvidia-smi reports free now is what this one may
    take, less its own context, its after-pool allocations and the reserve. With `assume` (a
    dry run) or no nvidia-smi, the plan's estimate for an idle card."""
    devices, note = devices_for(preset, {r: 1 for r in ROLES}, assume=assume)
    mine = devices[(role, 0)]
    before = preset.roles[ROLES[0]].port
    card = device_card(preset, mine, assumed=assume or bool(note))
    if card.measured:
        if listening is not None and not listening(before):
            raise ConfigError(f"start the {ROLES[0]} server first (launch/serve.sh {ROLES[0]} {preset.name}), and this "
                              f"one once it answers: the {role} server takes what the {ROLES[0]} server leaves on "
                              f"GPU {','.join(mine)}")
        mem = last_on_device(shape(preset, role), card, role, card.free_gib, preset.runtime_reserve_gib,
                             why=f"{card.free_gib:.1f} GiB free now (nvidia-smi) with the {ROLES[0]} server up")
    else:
        mem = plan_shared(preset, card).servers[role]
    config = (str(key_path(settings)) if key_file else KEY_PLACEHOLDER) if keyed else None
    cmd = _sized(server_command(preset, role, settings, host=host, key_file=config, devices=mine), mem)
    after = (f"start it once the server on port {before} answers a generation (same GPU); {mem.kv_tokens:,} KV tokens "
             f"({trajectories_text(mem.trajectories)} of {mem.trajectory_tokens:,}): {mem.why}")
    return cmd, "; ".join(x for x in (note, after) if x)


def shell_lines(result: Mapping[str, Any]) -> list[str]:
    """The dry run as shell a user could paste: one line per process, env then argv, quoted."""
    lines = [f"# relaygen up --dry-run: preset {result['preset']}; one process per line, each in its own "
             "terminal (or add &); a router once its workers answer"]
    if result.get("note"):
        lines.append(f"# note: {result['note']}")
    if result.get("auth"):
        lines.append(f"# api key: {result['auth']}")
    if result.get("memory"):
        lines.append(f"# memory (estimated from SGLang 0.5.23's allocation order): {result['memory']['verdict']}")
    for s in result["servers"]:
        what = "router" if s["replica"] == "router" else f"replica {s['replica']}"
        lines.append(f"# {s['role']} {what}, port {s['port']}")
        for after in s.get("starts_after", ()):
            lines.append(f"# start it once the {after}")
        if "why" in s:
            lines.append(f"# --mem-fraction-static {s['mem_fraction_static']}: {s['why']}")
        if "memory" in s:
            m = s["memory"]
            lines.append(f"# KV cache: {m['kv_tokens']:,} tokens, {trajectories_text(m['trajectories'])} of "
                         f"{m['trajectory_tokens']:,} at once")
        env = [f"{k}={shlex.quote(v)}" for k, v in s["env"].items()]
        lines.append(" ".join(env + [shlex.join(s["argv"])]))
    return lines

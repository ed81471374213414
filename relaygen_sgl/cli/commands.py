"""The `relaygen` commands: each takes the parsed arguments (cli/main.py parses argv), calls the
typed library functions and prints; errors travel up to cli.main as RelayGenError."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

import orjson

from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.config import ROLES
from relaygen_sgl.core.errors import EXIT_USAGE, ConfigError, RelayAborted, RelayGenError


def _emit_json(obj: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def open_relay(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The one place the CLI builds a Relay from its endpoint and client arguments (the
    servers' API key from $RELAYGEN_SGLANG_API_KEY)."""
    from relaygen_sgl.api import Relay
    from relaygen_sgl.core.config import sglang_api_key

    relay = Relay(preset=args.preset, large=args.large, small=args.small, profile=getattr(args, "profile", None),
                  on_small_failure=args.on_small_failure,
                  client=ClientConfig(read_timeout_s=args.timeout, api_key=sglang_api_key()))
    if relay.small_down:  # --on-small-failure large: say once that this runs on the large model alone
        sys.stderr.write(f"relaygen: warning: the small server {relay.urls['small']} is down; running degraded (the "
                         f"large model alone, no switching) until it answers again ({relay.small_down})\n")
    return relay


def _preset_name(r) -> str:  # type: ignore[no-untyped-def]
    return r.preset.name if r.preset is not None else f"custom ({r.family.name}, profile {r.profile.name})"


def _source(r) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    """The preset and the cue profile a run's records come from: part of the settings its output
    is tied to (jobs/output.py). A stand-in for a Relay without them names neither."""
    preset, profile = getattr(r, "preset", None), getattr(r, "profile", None)
    return {"preset": preset.name if preset is not None else None,
            "profile": profile.name if profile is not None else None}


# the run settings' flags (cli/main.py _add_server_args) and the RunSettings fields they set
_SETTING_FLAGS = {"max_tokens": "max_tokens", "temperature": "temperature", "seed": "seed",
                  "answer_role": "answer_role", "cue_match": "cue_match", "prefetch": "prefetch",
                  "protocol": "protocol", "answer_reserve": "answer_reserve", "deadline": "deadline_s"}


def run_settings(args: argparse.Namespace, **fixed: object):  # type: ignore[no-untyped-def]
    """The command's run settings, built once from the flags it was given (an unset flag
    leaves the setting's own default) and checked before any server is asked."""
    from relaygen_sgl.core.run_settings import RunSettings, SettingError

    given = {field: getattr(args, flag) for flag, field in _SETTING_FLAGS.items()
             if getattr(args, flag, None) is not None}
    try:
        return RunSettings.of({**given, **fixed})
    except SettingError as e:
        flag = next((f for f, field in _SETTING_FLAGS.items() if field == e.setting), None)
        if flag is None or e.setting in fixed:
            raise
        raise ConfigError(f"--{flag.replace('_', '-')}: {e}") from None


# ---------------------------------------------------------------- commands
def cmd_models_fetch(args: argparse.Namespace) -> int:
    from relaygen_sgl.core.config import load_preset, load_settings, local_model_specs
    from relaygen_sgl.servers.weights import fetch_model

    settings = load_settings()
    specs = local_model_specs()
    if not args.preset and not args.name:
        raise ConfigError("give --preset P or --name NAME (local models: " + ", ".join(sorted(specs)) + ")")
    names = load_preset(args.preset).local_models if args.preset else tuple(args.name)
    for unknown in (n for n in names if n not in specs):
        raise ConfigError(f"unknown local model {unknown!r}; choose one of {', '.join(sorted(specs))}")
    if not names:
        raise RelayGenError(f"preset {args.preset} serves no local model; nothing to fetch")
    for name in names:
        folder, built = fetch_model(specs[name], settings.models_dir)
        print(f"{'built' if built else 'ok (verified)'}: {folder}")
    return 0


KEYLESS_WARNING = ("the SGLang servers take requests without an API key (--no-api-key): any local user, container "
                   "neighbour or web page open in a browser here can run code as you through them (SGLang unpickles "
                   "what a client sends for --enable-custom-logit-processor)")


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP end `up`/`restart` as Ctrl-C does: what it started is stopped and the key
    file removed (a KeyboardInterrupt unwinds through their cleanup; the default would skip it)."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cmd_up(args: argparse.Namespace) -> int:
    from relaygen_sgl.core.config import load_preset, load_settings
    from relaygen_sgl.servers.stack import up, up_lines

    preset = load_preset(args.preset)
    sys.stderr.write("" if args.dry_run else f"starting {preset.name}: {preset.description}\n")
    with _interruptible():
        out = up(preset, load_settings(), host=args.host, timeout_s=args.timeout, kv_tokens=args.kv_tokens,
                 replicas={"large": args.replicas_large, "small": args.replicas_small}, dry_run=args.dry_run,
                 keyless=True if args.no_api_key else None)
    if not args.dry_run and out.get("api_key") is False:
        sys.stderr.write(f"relaygen: warning: {KEYLESS_WARNING}\n")
    if args.json:
        _emit_json(out)
    else:
        print("\n".join(up_lines(out, args.dry_run)))
    return 0


def cmd_server_command(args: argparse.Namespace) -> int:
    """For launch/serve.sh: `export K=V` lines, then the argv of one server of the plan
    `relaygen up` makes (servers.launch.role_command), one item per line. With $DRY_RUN set
    and no GPU visible, devices 0..N-1 are assumed; a note goes to stderr. The second server on
    a shared GPU is sized from what is free now, once the first listens on its port. The server
    requires the home's API key as `up`'s do (the argv names its file after --config; written
    now unless a server uses it already: stack.hand_key), unless --no-api-key; a dry run
    writes nothing."""
    import os

    from relaygen_sgl.core.config import load_preset, load_settings
    from relaygen_sgl.servers.launch import role_command
    from relaygen_sgl.servers.processes import port_in_use
    from relaygen_sgl.servers.stack import hand_key

    settings, dry = load_settings(), bool(os.environ.get("DRY_RUN"))
    keyed = not args.no_api_key
    cmd, note = role_command(load_preset(args.preset), args.role, settings, host=args.host, assume=dry,
                             listening=lambda port: port_in_use(port, args.host), keyed=keyed, key_file=not dry)
    if keyed and not dry:
        hand_key(settings)
    if not keyed:
        sys.stderr.write(f"relaygen: warning: {KEYLESS_WARNING}\n")
    if note:
        sys.stderr.write(f"relaygen: note: {note}\n")
    for key, value in cmd.env.items():
        print(f"export {key}={value}")
    for item in cmd.argv:
        print(item)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from relaygen_sgl.core.config import load_settings
    from relaygen_sgl.servers.stack import status

    st = status(load_settings())  # never raises: a per-role state and a `problem` line
    if args.json:
        _emit_json(st)
    else:
        print(f"preset {st['preset'] or '-'}")
        from relaygen_sgl.servers.stack import uptime_text

        for role in ROLES:
            r = st[role]
            up_for = f", up {uptime_text(r['uptime_s'])}" if r.get("uptime_s") is not None else ""
            restarts = r.get("restarts") or 0
            again = f", restarted {restarts}x" if restarts else ""
            print(f"{role}: {r['url'] or '-'} pid {r['pid'] or '-'} {r['state']}{up_for}{again}")
    if st["problem"]:
        sys.stderr.write(f"relaygen: {st['problem']}\n")
    return 0 if st["healthy"] else 1


def cmd_down(args: argparse.Namespace) -> int:
    from relaygen_sgl.core.config import load_settings
    from relaygen_sgl.servers.stack import down

    stopped = down(load_settings(), warn=lambda m: sys.stderr.write(f"relaygen: warning: {m}\n"))
    print(f"stopped {len(stopped)} server(s)" + (f": pids {', '.join(map(str, stopped))}" if stopped else ""))
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    from relaygen_sgl.core.config import load_settings
    from relaygen_sgl.servers.stack import restart, up_lines

    with _interruptible():
        out = restart(load_settings(), args.role, timeout_s=args.timeout)
    if args.json:
        _emit_json(out)
    else:
        print("\n".join(up_lines(out)))
    return 0


def cmd_with_key(args: argparse.Namespace) -> int:
    """The router's launcher (servers.launch.router_command): MODULE run with --api-key from KEY_FILE."""
    from relaygen_sgl.servers.launch import run_with_key

    run_with_key(args.key_file, args.module, args.args)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per check, `ok`/`warn`/`FAIL`/`skip` first; exit 1 when any check failed."""
    from relaygen_sgl.core.config import load_settings
    from relaygen_sgl.servers.doctor import diagnose

    checks = diagnose(args.preset, load_settings())
    if args.json:
        _emit_json({"ok": not any(ch.failed for ch in checks), "checks": [ch.to_dict() for ch in checks]})
    else:
        for ch in checks:
            print(f"{ch.verdict:<4}  {ch.name}: {ch.detail}")
    return 1 if any(ch.failed for ch in checks) else 0


def cmd_run(args: argparse.Namespace) -> int:
    if not args.question.strip():  # refused before any server is asked, as batch does
        raise ConfigError("the question is empty")
    settings = run_settings(args, method=args.method)
    with open_relay(args) as r:
        try:
            result = r.run(args.question, settings=settings)
        except RelayAborted as e:
            if args.json and e.partial is not None:
                _emit_json({**e.partial.to_dict(), "status": "error", "error": str(e)})
            raise
    if args.json:
        _emit_json(result.to_dict(token_ids=args.ids))
    else:
        from relaygen_sgl.show.render import print_result

        print_result(result)
    if result.extra.get("protocol") == "reference":
        sys.stderr.write("relaygen: protocol reference: the reference implementation's behaviour (docs/fidelity.md); "
                         + "; ".join(result.extra.get("reference", ())) + "\n")
    if result.extra.get("note"):  # why there is no answer, or why thinking closed early
        sys.stderr.write(f"relaygen: note: {result.extra['note']}\n")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relaygen_sgl.core.config import METHODS
    from relaygen_sgl.jobs.batch import read_prompts, run_batch
    from relaygen_sgl.jobs.output import check_output, claim_output, settings_header
    from relaygen_sgl.loader import load_program

    report = read_prompts(Path(args.prompts))
    check_output(Path(args.prompts), Path(args.out))  # before any line is printed or file touched
    for problem in report.problems:
        sys.stderr.write(f"relaygen: {problem}\n")
    func = load_program(args.program)  # a bad name or path fails here, once, not per prompt
    settings = run_settings(args, **({"method": args.program} if args.program in METHODS else {}))
    program = args.program if args.program in METHODS else str(Path(args.program).resolve())
    with claim_output(Path(args.prompts), Path(args.out)) as out, open_relay(args) as r:
        header = settings_header(settings, job="batch", program=program, **_source(r))
        if args.program in METHODS:
            def run_one(p):  # type: ignore[no-untyped-def]
                return r.run(p.question, settings=settings).to_dict(token_ids=args.ids)
        else:
            def run_one(p):  # type: ignore[no-untyped-def]
                return r.run_program(func, {"question": p.question, **p.extra}, settings)

        summary = run_batch(report.prompts, out, run_one, concurrency=args.concurrency,
                            progress=not args.no_progress, input_problems=report.problems, header=header,
                            fresh=args.fresh, waiting=_kv_waiting(r))
    line = (f"{summary.ok} ok, {summary.errors} error(s), {summary.skipped_done} already done, "
            f"{summary.completion_tokens} tokens in {summary.elapsed_s:.1f}s -> {args.out}")
    if summary.interrupted:
        sys.stderr.write(f"relaygen: interrupted; {line}; rerun the same command to finish\n")
        return 130
    print(line, file=sys.stderr)
    if report.problems:
        return EXIT_USAGE
    return 1 if summary.errors else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relaygen_sgl.bench import machine
    from relaygen_sgl.core.datasets import load_problems
    from relaygen_sgl.jobs.evaluate import (
        build_prompts,
        claim_folder,
        method_path,
        protocol_header,
        published_for,
        report,
        run_method,
    )
    from relaygen_sgl.jobs.output import check_settings, settings_header

    settings = run_settings(args)
    problems = load_problems(args.dataset)
    if args.limit:
        problems = problems[: args.limit]
    reference = settings.reference
    # unseeded unless --seed S (sample j: seed S + j): as the reference samples, and without the
    # seeded sampler's work in every timed step
    seeded = settings.seed is not None
    if seeded:
        settings.but(seed=settings.seed + args.k - 1)  # the last sample's seed is in range too
    prompts = build_prompts(problems, args.k, settings.protocol, seed=settings.seed)
    # the reference ran one request at a time and unseeded (docs/fidelity.md)
    concurrency = args.concurrency or (1 if reference else 4)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RelayGenError(f"cannot create {out}: {e}") from e
    methods = args.method or ["relay"]
    if args.label and len(methods) != 1:
        raise ConfigError("--label names one method's runs: give exactly one --method with it")
    with claim_folder(out), open_relay(args) as r:
        headers = {m: settings_header(settings.but(method=m), job="eval", dataset=args.dataset, **_source(r))
                   for m in methods}
        if not args.fresh:  # every method's output, before any of them runs
            for method in methods:
                check_settings(method_path(out, method, args.label), headers[method])
        for method in methods:
            def run_one(p, method=method):  # type: ignore[no-untyped-def]
                question = ([{"role": "user", "content": p.extra["user_message"]}] if "user_message" in p.extra
                            else p.question)
                return r.run(question, settings=settings.but(method=method, seed=p.extra["seed"])
                             ).to_dict(token_ids=False)

            print(f"{method}: {len(prompts)} samples ({len(problems)} problems x k={args.k})", file=sys.stderr)
            summary = run_method(method, prompts, out, run_one, concurrency, progress=not args.no_progress,
                                 label=args.label, header=headers[method], fresh=args.fresh)
            if summary.interrupted:
                sys.stderr.write("relaygen: interrupted; rerun the same command to finish\n")
                return 130
        preset = _preset_name(r)
        family = r.family.name
        published = published_for(r.preset.name if r.preset is not None else "", family, args.dataset)
        header = {"dataset": args.dataset, "preset": preset, "k": args.k, "limit": args.limit,
                  "max_tokens": settings.budget, "cue_match": settings.cue_match,
                  "machine": machine.short(), "machine_detail": machine.describe(),
                  **protocol_header(settings.protocol, k=args.k, max_tokens=settings.budget,
                                    concurrency=concurrency, seeded=seeded), "seed": settings.seed,
                  "published": published}
        result = report(out, header)  # DIR still held: no other eval changes what it reads
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'accuracy_vs_latency.png'}")
    return 0 if all(row["errors"] == 0 for row in result["methods"].values()) else 1


def cmd_show(args: argparse.Namespace) -> int:
    from relaygen_sgl.core.errors import ConfigError
    from relaygen_sgl.show.render import load_records, print_terminal, select, write_html

    def warn(message: str) -> None:
        sys.stderr.write(f"relaygen: warning: {args.file}: {message}\n")

    records = load_records(args.file, warn=warn)
    if not records:
        raise ConfigError(f"{args.file} holds no valid records")
    chosen = select(records, args.id)
    if args.html:
        print(write_html(chosen, args.html))
    else:
        print_terminal(chosen)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relaygen_sgl.bench.runner import BenchConfig, run_bench

    settings = run_settings(args)  # the protocol, checked before any server is asked
    with open_relay(args) as r:
        name = _preset_name(r)
        cfg = BenchConfig.quick(name) if args.quick else BenchConfig(preset=name)
        overrides = {k: v for k, v in (("questions", args.questions), ("max_tokens", args.max_tokens),
                                       ("dataset", args.dataset), ("load_prefetch", args.load_prefetch),
                                       ("load_rounds", args.load_rounds),
                                       ("pressure_max_tokens", args.pressure_max_tokens),
                                       ("pressure_rounds", args.pressure_rounds)) if v}
        if args.pressure is not None:  # 0 (no pressure part) is a value
            overrides["pressure"] = args.pressure
        overrides["settings"] = settings
        if overrides:
            import dataclasses

            cfg = dataclasses.replace(cfg, **overrides)
        result = run_bench(cfg, r, Path(args.out), log=lambda m: print(m, file=sys.stderr))
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {args.out}/bench.json, bench.md, bench.png ({result['elapsed_s']} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from relaygen_sgl.core.errors import ConfigError
    from relaygen_sgl.serve.app import ServeSettings
    from relaygen_sgl.serve.server import serve
    from relaygen_sgl.serve.setup import allowed_profiles, check_exposure, resolve_api_key

    key = resolve_api_key(args.api_key, args.api_key_file, os.environ)
    check_exposure(args.host, key, args.insecure)
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    for flag in ("request_timeout", "body_timeout", "header_timeout", "send_timeout"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be above 0")
    profiles = allowed_profiles(args.profile_allow)
    given = {field: getattr(args, flag) for flag, field in (("header_timeout", "header_timeout_s"),
                                                             ("send_timeout", "send_timeout_s"),
                                                             ("max_connections", "max_connections"))
             if getattr(args, flag) is not None}  # unset: ServeSettings' own default
    settings = ServeSettings(model_name=args.model_name, max_budget=args.max_tokens,
                             default_max_tokens=args.default_max_tokens,
                             request_timeout_s=args.request_timeout, max_concurrency=args.max_concurrency,
                             max_queue=args.max_queue, health_interval_s=args.health_interval,
                             body_timeout_s=args.body_timeout, **given)
    if settings.connection_limit <= settings.max_concurrency + settings.max_queue:
        raise ConfigError(f"--max-connections {settings.connection_limit} must be above --max-concurrency + "
                          f"--max-queue ({settings.max_concurrency + settings.max_queue}): each running or queued "
                          "request holds a connection")
    if args.timeout is None:  # no wait for SGLang outlasts the request that waits
        args.timeout = settings.request_timeout_s
    relay = open_relay(args)
    print(f"relaygen serving {args.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"(large {relay.urls['large']}, small {relay.urls['small']}; API key {'on' if key else 'off'}; "
          f"{settings.max_concurrency} running, {settings.max_queue} queued)", file=sys.stderr)
    try:
        serve(relay, args.host, args.port, settings, api_key=key, profiles=profiles)
    finally:
        relay.close()
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relaygen_sgl.calibration.calibrate import (
        CalibrationPaths,
        CalibrationSettings,
        check_writable,
        load_candidates,
        run_calibration,
    )
    from relaygen_sgl.core.datasets import load_problems

    problems = load_problems(args.data)
    if args.limit:
        problems = problems[: args.limit]
    paths = CalibrationPaths.for_output(Path(args.out), args.cache)
    check_writable(paths.out, "profile")  # before any server is asked anything
    check_writable(paths.trajectories, "trajectory cache")
    candidates = load_candidates(Path(args.candidates) if args.candidates else None)
    settings = CalibrationSettings(data=args.data, samples=args.samples, limit=args.limit,
                                   max_tokens=args.max_tokens, threshold=args.threshold,
                                   min_count=args.min_count, concurrency=args.concurrency, name=args.name)
    with open_relay(args) as r:
        try:
            rep = run_calibration(r, problems, settings, paths, candidates=candidates,
                                  progress=not args.no_progress, fresh=args.fresh)
        except KeyboardInterrupt:
            sys.stderr.write(f"relaygen: interrupted; the work done is cached in {paths.trajectories} and "
                             f"{paths.margins}; rerun the same command to go on\n")
            return 130
    selected = [s for s in rep.stats.cues.values() if s.selected]
    for s in selected:
        print(f"{s.rank:2d}. {s.cue!r:18} delta {s.delta:+.4f} +- {s.stderr or 0:.4f}  "
              f"x{s.occurrences}  ({s.n_tokens} tokens)", file=sys.stderr)
    print(f"{len(selected)} of {len(rep.stats.cues)} cues selected from {rep.trajectories} trajectories "
          f"(baseline margin {rep.stats.baseline_mean_margin or 0:.4f}) -> {paths.out}", file=sys.stderr)
    print(f"figures: {', '.join(rep.figures)}", file=sys.stderr)
    if rep.failed:
        sys.stderr.write(f"relaygen: {len(rep.failed)} trajectories failed and were left out (first: "
                         f"{next(iter(rep.failed.values()))}); rerun the same command to retry them\n")
        return 1
    return 0


def _kv_waiting(relay: Any) -> Any:
    """How many of the relay's runs wait for room in the KV pools (runtime/pools.py), for a
    progress bar; None where the relay has no pools (a stand-in)."""
    pools = getattr(getattr(relay, "backend", None), "pools", None)
    return (lambda: pools.waiting) if pools is not None else None

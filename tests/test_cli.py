"""Bad input at the command line: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from paths import REAL_MODELS


def relaygen(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_cli(*args: str, env_extra: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`relaygen ARGS` in this process, through the same main() (no interpreter start): for
    refusals and dry runs. `relaygen()` above stays for what needs a process of its own
    (argv bytes, servers that outlive the call, exit on signals)."""
    import contextlib
    import io
    import os

    from relaygen_sgl.cli import main as cli

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    saved = dict(os.environ)
    os.environ.update(env_extra or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = [stream.flush() or stream.buffer.getvalue().decode() for stream in (out, err)]
    return subprocess.CompletedProcess(["relaygen", *args], rc, *text)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("relaygen:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_unknown_preset():
    assert "unknown preset 'nope'" in one_line_error(run_cli("up", "--preset", "nope"))


def test_down_and_status_when_nothing_is_up():
    assert "nothing is up" in one_line_error(run_cli("down"))
    assert "nothing is up" in one_line_error(run_cli("status", "--json"))


def test_missing_model_folder(tmp_path):
    err = one_line_error(run_cli("up", "--preset", "cpu-tiny", env_extra={"RELAYGEN_MODELS": str(tmp_path)}))
    assert "model folder for large is missing" in err and "models fetch" in err


def test_bad_numbers_are_refused():
    assert run_cli("run", "hi", "--max-tokens", "0").returncode == 2
    assert run_cli("run", "hi", "--temperature", "-1").returncode == 2


def test_unreachable_server_is_one_line():
    err = one_line_error(run_cli("run", "hi", "--large", "http://127.0.0.1:9", "--small", "http://127.0.0.1:9"))
    assert "127.0.0.1:9" in err


def bind_when_free(s: socket.socket, port: int, within_s: float = 60.0) -> None:
    """Bind 127.0.0.1:port, waiting for a listener an earlier test's servers (the CLI stack on the
    preset's ports) may still hold for a moment after `relaygen down`."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        try:
            s.bind(("127.0.0.1", port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.integration
def test_port_in_use():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_when_free(s, 30000)
        s.listen()
        err = one_line_error(run_cli("up", "--preset", "cpu-tiny"))
    assert "port 30000" in err and "in use" in err


@pytest.mark.integration
def test_a_server_that_never_becomes_healthy_times_out_with_its_log():
    if not (REAL_MODELS / "smollm2-135m-instruct").is_dir():
        pytest.skip("models not built")
    proc = run_cli("up", "--preset", "cpu-tiny", "--timeout", "3")
    assert proc.returncode != 0 and "Traceback (most recent call last)" not in proc.stderr.split("last lines")[0]
    assert "did not answer a generation within 3s" in proc.stderr
    assert "last lines of" in proc.stderr
    # nothing left running, nothing recorded
    assert "nothing is up" in one_line_error(run_cli("status"))
    out = subprocess.run(["pgrep", "-f", "sglang.launch_server.*--port 3000[01]"], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_a_profile_with_too_many_cues_or_a_bad_cue(tmp_path):
    import json

    many = tmp_path / "many.json"
    many.write_text(json.dumps({"name": "many", "cues": [f"cue{i}" for i in range(40)]}))
    assert "at most 32" in one_line_error(run_cli("run", "hi", "--profile", str(many), "--large",
                                                   "http://127.0.0.1:9", "--small", "http://127.0.0.1:9"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "cues": ["Thus", ""]}))
    assert "invalid cue" in one_line_error(run_cli("run", "hi", "--profile", str(bad)))


def test_missing_prompts_file_for_batch(tmp_path):
    err = one_line_error(run_cli("batch", "relay", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")))
    assert "not found" in err

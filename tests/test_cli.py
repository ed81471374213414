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


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("relaygen:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_unknown_preset():
    assert "unknown preset 'nope'" in one_line_error(relaygen("up", "--preset", "nope"))


def test_down_and_status_when_nothing_is_up():
    assert "nothing is up" in one_line_error(relaygen("down"))
    assert "nothing is up" in one_line_error(relaygen("status", "--json"))


def test_missing_model_folder(tmp_path):
    err = one_line_error(relaygen("up", "--preset", "cpu-tiny", env_extra={"RELAYGEN_MODELS": str(tmp_path)}))
    assert "model folder for large is missing" in err and "models fetch" in err


def test_bad_numbers_are_refused():
    assert relaygen("run", "hi", "--max-tokens", "0").returncode == 2
    assert relaygen("run", "hi", "--temperature", "-1").returncode == 2


def test_unreachable_server_is_one_line():
    err = one_line_error(relaygen("run", "hi", "--large", "http://127.0.0.1:9", "--small", "http://127.0.0.1:9"))
    assert "127.0.0.1:9" in err


@pytest.mark.integration
def test_port_in_use():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 30000))
        s.listen()
        err = one_line_error(relaygen("up", "--preset", "cpu-tiny"))
    assert "port 30000" in err and "in use" in err


@pytest.mark.integration
def test_a_server_that_never_becomes_healthy_times_out_with_its_log():
    if not (REAL_MODELS / "smollm2-135m-instruct").is_dir():
        pytest.skip("models not built")
    proc = relaygen("up", "--preset", "cpu-tiny", "--timeout", "3")
    assert proc.returncode != 0 and "Traceback (most recent call last)" not in proc.stderr.split("last lines")[0]
    assert "did not answer a generation within 3s" in proc.stderr
    assert "last lines of" in proc.stderr
    # nothing left running, nothing recorded
    assert "nothing is up" in one_line_error(relaygen("status"))
    out = subprocess.run(["pgrep", "-f", "sglang.launch_server.*--port 3000[01]"], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_a_profile_with_too_many_cues_or_a_bad_cue(tmp_path):
    import json

    many = tmp_path / "many.json"
    many.write_text(json.dumps({"name": "many", "cues": [f"cue{i}" for i in range(40)]}))
    assert "at most 32" in one_line_error(relaygen("run", "hi", "--profile", str(many), "--large",
                                                   "http://127.0.0.1:9", "--small", "http://127.0.0.1:9"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "cues": ["Thus", ""]}))
    assert "invalid cue" in one_line_error(relaygen("run", "hi", "--profile", str(bad)))


def test_missing_prompts_file_for_batch(tmp_path):
    err = one_line_error(relaygen("batch", "relay", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")))
    assert "not found" in err

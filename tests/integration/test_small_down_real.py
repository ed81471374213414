"""A small server that is dead when a run or batch starts (kill -9 of its process group) on
a real cpu-tiny pair of its own, started with `relaygen up` in a private RELAYGEN_HOME on
the preset's own ports: --on-small-failure large starts degraded and says so in one
warning line; fail refuses in one line with a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest
from paths import REAL_MODELS

pytestmark = pytest.mark.integration

QUESTION = "What is 2 + 3? Answer briefly."


def relaygen(home, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", *args], capture_output=True, text=True,
                          timeout=timeout,
                          env={**os.environ, "RELAYGEN_HOME": str(home), "RELAYGEN_MODELS": str(REAL_MODELS)})


def gone(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read().split()
    except OSError:
        return True
    return stat[2] == "Z"


@pytest.fixture(scope="module")
def dead_small(tmp_path_factory):
    """`relaygen up --preset cpu-tiny`, then the small server's process group killed with -9."""
    home = tmp_path_factory.mktemp("small-down-home")
    up = relaygen(home, "up", "--preset", "cpu-tiny", timeout=900)
    assert up.returncode == 0, up.stderr[-2000:]
    try:
        st = json.loads(relaygen(home, "status", "--json").stdout)
        pid = st["small"]["pid"]
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid)
        yield home
    finally:
        down = relaygen(home, "down")
        assert down.returncode == 0, down.stderr


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


def test_run_with_the_small_server_dead_starts_degraded_with_one_warning_or_refuses(dead_small):
    t0 = time.monotonic()
    ok = relaygen(dead_small, "run", QUESTION, "--preset", "cpu-tiny", "--on-small-failure", "large",
                  "--max-tokens", "32", "--json")
    took = time.monotonic() - t0
    assert ok.returncode == 0, ok.stderr[-2000:]
    # one warning; any other line is a note about the run itself (e.g. the answer reserve)
    assert len(warning_lines(ok.stderr)) == 1, ok.stderr
    assert all(line.startswith(("relaygen: warning:", "relaygen: note:")) for line in ok.stderr.splitlines()), ok.stderr
    assert "small server" in ok.stderr and "degraded" in ok.stderr and "Traceback" not in ok.stderr
    rec = orjson.loads(ok.stdout)
    assert rec["degraded"]["role"] == "small" and rec["degraded"]["from_token"] == 0
    assert {s["role"] for s in rec["segments"]} <= {"large", "inserted"} and rec["stats"]["large_tokens"] > 0
    print(f"\nrun, small server dead: degraded in {took:.1f} s; stderr: {ok.stderr.strip()}")

    refused = relaygen(dead_small, "run", QUESTION, "--preset", "cpu-tiny", "--on-small-failure", "fail",
                       "--max-tokens", "32")
    assert refused.returncode != 0 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "small server" in refused.stderr and "--on-small-failure large" in refused.stderr
    print(f"run --on-small-failure fail: exit {refused.returncode}; stderr: {refused.stderr.strip()}")


def test_batch_with_the_small_server_dead_starts_degraded_with_one_warning_or_refuses(dead_small, tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}? Answer briefly."}) + "\n"
                           for i in range(3)))
    ok = relaygen(dead_small, "batch", "relay", str(src), "-o", str(out), "--preset", "cpu-tiny",
                  "--on-small-failure", "large", "--max-tokens", "24", "--concurrency", "2", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(warning_lines(ok.stderr)) == 1 and "degraded" in warning_lines(ok.stderr)[0], ok.stderr
    assert "Traceback" not in ok.stderr and "3 ok, 0 error(s)" in ok.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(recs) == 3 and all(r["status"] == "ok" and r["degraded"]["from_token"] == 0 for r in recs)
    assert all(s["role"] in ("large", "inserted") for r in recs for s in r["segments"])

    out2 = tmp_path / "out2.jsonl"
    refused = relaygen(dead_small, "batch", "relay", str(src), "-o", str(out2), "--preset", "cpu-tiny",
                       "--on-small-failure", "fail", "--max-tokens", "24", "--no-progress")
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "small server" in refused.stderr and not (out2.exists() and out2.read_bytes())

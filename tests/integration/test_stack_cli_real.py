"""One real cpu-tiny pair driven through the CLI, step by step (issue 31: one start for what
three modules started five times): exposure beyond loopback only with a key (issue 21 item 4),
a small server killed with -9 while runs and batches start degraded or refuse, then `relaygen
up` that heals it and keeps the large server and its radix cache (issue 23 item 1).

The pair runs on the preset's own ports with a private RELAYGEN_HOME (the module fixture, which
runs `relaygen down` at the end whatever happened). The tests run in file order and each uses
what the ones before it left: each first checks that its precondition holds and fails at once,
saying which step did not do its part, rather than timing out or failing later with a misleading
message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from paths import REAL_MODELS
from test_cli import one_line_error

from relaygen_sgl.api import Relay
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.config import API_KEY_ENV, sglang_api_key
from relaygen_sgl.servers.processes import start_ticks

pytestmark = pytest.mark.integration

PORTS = {"large": 30000, "small": 30001}  # the preset's own
QUESTION = "Tom has 3 apples and buys 5 more. Then he gives 2 away. How many apples does he have? Explain step by step."
SHORT = "What is 2 + 3? Answer briefly."
BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}


@dataclass
class Stack:
    """The pair and what each step found, for the steps after it."""
    home: Path
    key: str
    up_ok: bool = False  # the keyed `relaygen up --host 0.0.0.0` started both servers
    pids: dict[str, int] = field(default_factory=dict)  # by role, as the keyed `up` started them
    before: Any = field(default=None, repr=False)  # the relay run before the kill (a RelayResult)
    killed: bool = False  # the small server's process group is gone
    healed: bool = False  # `up` again: large kept, small started

    def env(self, key: bool = True) -> dict[str, str]:
        """The CLI's environment: the private home, the built models, and the key or none at all."""
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        env.update(RELAYGEN_HOME=str(self.home), RELAYGEN_MODELS=str(REAL_MODELS))
        if key:
            env[API_KEY_ENV] = self.key
        return env

    def cli(self, *args: str, key: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env(key))

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        return json.loads(out.stdout)

    # the preconditions, each a clear failure naming the step that did not do its part
    def need_up(self) -> None:
        if not self.up_ok:
            pytest.fail("the pair is not up: the keyed `relaygen up --host 0.0.0.0` step did not run or failed")

    def need_large_alive(self) -> None:
        self.need_up()
        if not alive(self.pids["large"]):
            pytest.fail(f"the large server (pid {self.pids['large']}) should still run here: it died in an "
                        "earlier step")

    def need_small_dead(self) -> None:
        self.need_large_alive()
        if not self.killed or alive(self.pids["small"]):
            pytest.fail("the small server should be dead here: the kill step did not run or failed")

    def need_healed(self) -> None:
        self.need_large_alive()
        if not self.healed:
            pytest.fail("the pair should be healed here: the `relaygen up` heal step did not run or failed")


def alive(pid: int) -> bool:
    return start_ticks(pid) is not None  # None: gone, or a zombie


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The private home and key; `relaygen down` at the end whatever happened, and no server left."""
    if not (REAL_MODELS / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.fail(f"no built model under {REAL_MODELS}: run `relaygen models fetch --preset cpu-tiny`")
    st = Stack(home=tmp_path_factory.mktemp("stack-home"), key="itest-" + os.urandom(8).hex())
    yield st
    down = st.cli("down")
    if st.pids:
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 30
        while any(alive(p) for p in st.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in st.pids.values() if alive(p)], "down left a server process behind"


@pytest.fixture
def relay(stack, monkeypatch):
    """An in-process Relay on the pair: the home and the key in its environment, the key sent."""
    monkeypatch.setenv("RELAYGEN_HOME", str(stack.home))
    monkeypatch.setenv(API_KEY_ENV, stack.key)

    def make() -> Relay:
        return Relay(preset="cpu-tiny", client=ClientConfig(api_key=sglang_api_key()))
    return make


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


# --- exposure: beyond loopback only with a key --------------------------------------------------

def test_up_beyond_loopback_without_a_key_is_refused_in_one_line(stack):
    refused = stack.cli("up", "--preset", "cpu-tiny", "--host", "0.0.0.0", key=False)
    assert refused.returncode == 2 and "reachable from other machines" in one_line_error(refused)
    assert "nothing is up" in one_line_error(stack.cli("status", "--json", key=False))  # nothing started


def test_up_beyond_loopback_with_a_key(stack):
    up = stack.cli("up", "--preset", "cpu-tiny", "--host", "0.0.0.0", timeout=600)
    st = stack.status() if up.returncode == 0 else {}
    stack.pids = {role: st[role]["pid"] for role in PORTS if st.get(role, {}).get("pid")}
    assert up.returncode == 0, up.stderr[-2000:]
    assert stack.key not in up.stdout + up.stderr
    assert st["healthy"] and {role: st[role]["url"] for role in PORTS} == \
        {role: f"http://127.0.0.1:{port}" for role, port in PORTS.items()}
    stack.up_ok = True


def test_keyless_and_wrong_key_requests_get_401_the_key_200_on_both_ports(stack):
    stack.need_up()
    for port in PORTS.values():
        url = f"http://127.0.0.1:{port}/generate"
        assert httpx.post(url, json=BODY, timeout=60).status_code == 401
        assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        ok = httpx.post(url, json=BODY, headers={"Authorization": f"Bearer {stack.key}"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


# --- a relay, then the small server killed ------------------------------------------------------

def test_a_relay_run_before_the_kill(stack, relay):
    stack.need_up()
    with relay() as r:
        res = r.run(QUESTION, max_tokens=12, temperature=0)
    assert any(s.role == "large" for s in res.segments), [s.role for s in res.segments]
    stack.before = res


def test_kill_9_of_the_small_servers_process_group(stack):
    stack.need_large_alive()
    pid = stack.pids["small"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
    st = stack.status()
    assert st["small"]["state"].startswith("dead") and st["large"]["state"] == "healthy", st
    stack.killed = True


# --- the small server dead when a run or batch starts --------------------------------------------

def test_run_with_the_small_server_dead_starts_degraded_with_one_warning_or_refuses(stack):
    stack.need_small_dead()
    t0 = time.monotonic()
    ok = stack.cli("run", SHORT, "--preset", "cpu-tiny", "--on-small-failure", "large", "--max-tokens", "12",
                   "--json", timeout=600)
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

    refused = stack.cli("run", SHORT, "--preset", "cpu-tiny", "--on-small-failure", "fail", "--max-tokens", "12")
    assert refused.returncode != 0 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "small server" in refused.stderr and "--on-small-failure large" in refused.stderr
    print(f"run --on-small-failure fail: exit {refused.returncode}; stderr: {refused.stderr.strip()}")


def test_batch_with_the_small_server_dead_starts_degraded_with_one_warning_or_refuses(stack, tmp_path):
    stack.need_small_dead()
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}? Answer briefly."}) + "\n"
                           for i in range(3)))
    ok = stack.cli("batch", "relay", str(src), "-o", str(out), "--preset", "cpu-tiny", "--on-small-failure", "large",
                   "--max-tokens", "8", "--concurrency", "2", "--no-progress", timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(warning_lines(ok.stderr)) == 1 and "degraded" in warning_lines(ok.stderr)[0], ok.stderr
    assert "Traceback" not in ok.stderr and "3 ok, 0 error(s)" in ok.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(recs) == 3 and all(r["status"] == "ok" and r["degraded"]["from_token"] == 0 for r in recs)
    assert all(s["role"] in ("large", "inserted") for r in recs for s in r["segments"])

    out2 = tmp_path / "out2.jsonl"
    refused = stack.cli("batch", "relay", str(src), "-o", str(out2), "--preset", "cpu-tiny",
                        "--on-small-failure", "fail", "--max-tokens", "8", "--no-progress")
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "small server" in refused.stderr and not (out2.exists() and out2.read_bytes())


# --- `relaygen up` heals --------------------------------------------------------------------------

def test_up_again_keeps_the_large_server_and_starts_the_dead_small_one(stack):
    stack.need_small_dead()
    large_pid, small_pid = stack.pids["large"], stack.pids["small"]
    healed = stack.cli("up", "--preset", "cpu-tiny", "--host", "0.0.0.0", timeout=600)
    assert healed.returncode == 0, healed.stderr[-2000:]
    assert stack.key not in healed.stdout + healed.stderr
    lines = healed.stdout.splitlines()
    assert lines[0] == f"kept large server on port 30000: pid {large_pid} (healthy)"
    assert lines[1].startswith("started small server on port 30001: pid ") and lines[1].endswith("(was dead)")
    st = stack.status()
    stack.pids["small"] = st["small"]["pid"]  # the fixture's teardown checks that `down` stops it
    assert st["healthy"] and st["large"]["pid"] == large_pid and st["small"]["pid"] != small_pid
    assert st["small"]["restarts"] == 1 and st["large"]["restarts"] == 0
    text = stack.cli("status").stdout
    assert "restarted 1x" in text.splitlines()[2] and "restarted" not in text.splitlines()[1]
    stack.healed = True


def test_the_large_servers_radix_cache_survived_the_heal(stack, relay):
    stack.need_healed()
    if stack.before is None:
        pytest.fail("no relay run before the kill to compare with: that step did not run or failed")
    with relay() as r:
        after = r.run(QUESTION, max_tokens=12, temperature=0)
    large0 = next(s for s in after.segments if s.role == "large")
    first0 = next(s for s in stack.before.segments if s.role == "large")
    assert large0.prompt_tokens == first0.prompt_tokens
    # only the prompt's last token is prefilled again
    assert large0.reprefilled == 1, (large0.prompt_tokens, large0.cached_tokens)
    small0 = next((s for s in after.segments if s.role == "small"), None)
    if small0 is not None:  # the restarted small server starts with an empty cache
        assert small0.cached_tokens < small0.prompt_tokens - 1

"""`relaygen up` that heals, and servers exposed only with a key, on a real cpu-tiny pair driven
through the CLI on the preset's own ports (issue 23 item 1, issue 21 item 4). Each test has its
own RELAYGEN_HOME (the autouse fixture) and stops what it started."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from test_cli import one_line_error, relaygen

from relaygen_sgl.api import Relay
from relaygen_sgl.servers.processes import start_ticks

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 apples and buys 5 more. Then he gives 2 away. How many apples does he have? Explain step by step."


@pytest.fixture
def cli_stack():
    """`relaygen down` at the end, whatever happened (the key in the environment if one was used)."""
    env: dict[str, str] = {}
    yield env
    relaygen("down", env_extra=env, timeout=120)


def _status(env: dict[str, str] | None = None) -> dict:
    out = relaygen("status", "--json", env_extra=env, timeout=120)
    return json.loads(out.stdout)


def test_up_after_a_kill_9_keeps_the_large_server_and_its_cache(cli_stack):
    first = relaygen("up", "--preset", "cpu-tiny", timeout=600)
    assert first.returncode == 0, first.stderr
    st = _status()
    large_pid, small_pid = st["large"]["pid"], st["small"]["pid"]
    with Relay(preset="cpu-tiny") as r:
        before = r.run(QUESTION, max_tokens=48, temperature=0)

    os.kill(small_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while start_ticks(small_pid) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _status()["small"]["state"].startswith("dead")

    healed = relaygen("up", "--preset", "cpu-tiny", timeout=600)
    assert healed.returncode == 0, healed.stderr
    lines = healed.stdout.splitlines()
    assert lines[0] == f"kept large server on port 30000: pid {large_pid} (healthy)"
    assert lines[1].startswith("started small server on port 30001: pid ") and lines[1].endswith("(was dead)")
    st = _status()
    assert st["healthy"] and st["large"]["pid"] == large_pid and st["small"]["pid"] != small_pid
    assert st["small"]["restarts"] == 1 and st["large"]["restarts"] == 0
    text = relaygen("status").stdout
    assert "restarted 1x" in text.splitlines()[2] and "restarted" not in text.splitlines()[1]

    with Relay(preset="cpu-tiny") as r:
        after = r.run(QUESTION, max_tokens=48, temperature=0)
    large0 = next(s for s in after.segments if s.role == "large")
    first0 = next(s for s in before.segments if s.role == "large")
    assert large0.prompt_tokens == first0.prompt_tokens
    # the large server's radix cache survived the heal: only the prompt's last token is prefilled again
    assert large0.reprefilled == 1, (large0.prompt_tokens, large0.cached_tokens)
    small0 = next((s for s in after.segments if s.role == "small"), None)
    if small0 is not None:  # the restarted small server starts with an empty cache
        assert small0.cached_tokens < small0.prompt_tokens - 1


def test_beyond_loopback_only_with_a_key_and_then_keyless_requests_get_401(cli_stack):
    keyless = {k: v for k, v in os.environ.items() if k != "RELAYGEN_SGLANG_API_KEY"}
    refused = relaygen("up", "--preset", "cpu-tiny", "--host", "0.0.0.0", env_extra=keyless, timeout=120)
    assert refused.returncode == 2 and "reachable from other machines" in one_line_error(refused)

    key = "itest-" + os.urandom(8).hex()
    cli_stack["RELAYGEN_SGLANG_API_KEY"] = key
    up = relaygen("up", "--preset", "cpu-tiny", "--host", "0.0.0.0", env_extra=cli_stack, timeout=600)
    assert up.returncode == 0, up.stderr
    assert key not in up.stdout + up.stderr
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    for port in (30000, 30001):
        url = f"http://127.0.0.1:{port}/generate"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2

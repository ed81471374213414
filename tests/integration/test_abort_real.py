"""A request ends when its client's deadline goes, even on a stalled server (client/cancel.py),
on the real CPU pair: the large server's scheduler is stopped (SIGSTOP) while relays wait in
its queue; `serve` answers 504 at the relay's timeout, its relays end at once, and the abort
reaches SGLang: once the scheduler runs again it never runs the request."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from test_serve_real import busy, start_serve, stop_serve

from relaygen_sgl.api import Relay

pytestmark = pytest.mark.integration


def scheduler_of(pid: int) -> int:
    """The SGLang scheduler process under server `pid` (setproctitle sglang::scheduler)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and cmdline.startswith(b"sglang::scheduler"):
            found.append(int(stat.parent.name))
    assert len(found) == 1, f"scheduler of {pid}: {found}"
    return found[0]


def relays_running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^relaygen_relays_running (\S+)$", text, re.M)[1])


def test_a_relay_on_a_stalled_server_ends_at_its_timeout_and_its_abort_reaches_sglang(cpu_pair, tmp_path_factory):
    served = start_serve(cpu_pair, tmp_path_factory, "abort", "--health-interval", "0")
    try:
        _stall_and_check(cpu_pair, served)
    finally:
        stop_serve(served)


def _stall_and_check(cpu_pair, served) -> None:
    # a question nobody asked before: its prompt is in no radix cache
    question = "Abort check " + " ".join(f"word{i}x{os.getpid()}" for i in range(120)) + ". Summarize."
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 64, "relay": {"timeout": 5}}
    sched = scheduler_of(cpu_pair.pids[0])
    os.kill(sched, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=30) as http:
            ahead = [http.build_request("POST", f"{served.url}/v1/chat/completions", json={
                **body, "messages": [{"role": "user", "content": f"Count to {n}."}]}) for n in (50, 60)]
            for req in ahead:  # relays queued in front of it on the stopped scheduler
                http.send(req, stream=True)
            t0 = time.monotonic()
            r = http.post(f"{served.url}/v1/chat/completions", json=body)
            took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert took < 6.0, took
        deadline = time.monotonic() + 10
        while relays_running(served.url) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert relays_running(served.url) == 0  # the relays ended though the server never answered
    finally:
        os.kill(sched, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while busy(cpu_pair.large) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert busy(cpu_pair.large) == 0
    # it never ran: the large server's cache does not hold its prompt
    with Relay(large=cpu_pair.large, small=cpu_pair.small) as relay:
        ids = relay.tokenizer.encode(relay.plan().render(question))
    out = httpx.post(f"{cpu_pair.large}/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": 0}}, timeout=60).json()
    assert out["meta_info"]["cached_tokens"] < len(ids) // 2, (out["meta_info"]["cached_tokens"], len(ids))

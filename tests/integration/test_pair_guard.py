"""The guard in front of every test on the shared pair (conftest.shared_pair_is_up) fails a
test at once, naming the server, when an earlier test left one dead or deaf: checked here on
a pair of dead processes, without touching the session's servers."""

from __future__ import annotations

import socket
import subprocess
import time

from shared_pair import Pair, pair_problem

from relaygen_sgl.core.config import Settings


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_server_is_named_at_once(tmp_path):
    pair = Pair(Settings(home=tmp_path), "http://127.0.0.1:9", "http://127.0.0.1:9", (dead_pid(), dead_pid()))
    t0 = time.monotonic()
    problem = pair_problem(pair)
    assert problem is not None and "large server" in problem and "is dead" in problem
    assert time.monotonic() - t0 < 2


def test_a_live_process_that_does_not_answer_is_named_within_the_bound(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        url = f"http://127.0.0.1:{closed_port()}"
        t0 = time.monotonic()
        problem = pair_problem(Pair(Settings(home=tmp_path), url, url, (sleeper.pid, sleeper.pid)), timeout_s=2)
        assert problem is not None and "does not answer" in problem and url in problem
        assert time.monotonic() - t0 < 5
    finally:
        sleeper.kill()
        sleeper.wait()

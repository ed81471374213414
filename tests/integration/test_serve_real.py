"""`relaygen serve` on the real CPU pair: clients that leave stop their generation on both
SGLang servers, the others get their own greedy answers, and no thread is left behind."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

pytestmark = pytest.mark.integration

TOPICS = ["apples", "rivers", "prime numbers", "the moon", "chess", "volcanoes", "violins", "glaciers"]
MAX_TOKENS = 32
IDLE_WITHIN_S = 10.0


def relaygen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relaygen_sgl.cli", *args]


@pytest.fixture(scope="module")
def server(cpu_pair, tmp_path_factory):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp("serve") / "serve.log"  # a file: a full pipe would block the server
    proc = subprocess.Popen(relaygen_cmd("serve", "--large", cpu_pair.large, "--small", cpu_pair.small,
                                         "--port", str(port), "--health-interval", "0"),
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url, proc
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = log.read_text()
    assert "Traceback" not in err, err[-3000:]


POOL = "relaygen-prefet"  # the backend's prefix-prefetch executor (bounded; its idle workers stay)


def threads(pid: int, pooled: bool = False) -> int:
    """The process's threads; without `pooled`, those of the prefetch pool left out."""
    total = int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
    if pooled:
        return total
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return total - sum(1 for n in names if n.startswith(POOL))


def busy(url: str) -> int:
    """Running plus waiting requests on one SGLang server (0.5.23's GET /v1/loads)."""
    loads = httpx.get(f"{url}/v1/loads", params={"include": "core"}, timeout=10).json()["loads"]
    return sum(int(x.get("num_running_reqs", 0)) + int(x.get("num_waiting_reqs", 0)) for x in loads)


def wait_idle(pair, since: float, limit: float = 30.0) -> float:
    """Seconds from `since` until both servers run nothing (the limit if never)."""
    while time.monotonic() - since < limit:
        if busy(pair.large) == 0 and busy(pair.small) == 0:
            return time.monotonic() - since
        time.sleep(0.1)
    return limit


def wait_threads(pid: int, want: int, since: float, limit: float = 30.0) -> tuple[float, int]:
    while time.monotonic() - since < limit:
        n = threads(pid)
        if n <= want:
            return time.monotonic() - since, n
        time.sleep(0.1)
    return limit, threads(pid)


def stream(client: httpx.Client, url: str, prompt: str, max_tokens: int, leave_after: int | None = None):
    """(text, time left): the streamed reasoning + answer, or None and the time the client
    closed the connection after `leave_after` data events."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    text, n = "", 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            assert "error" not in event and "relay_event" not in event, event
            n += 1
            for c in event["choices"]:
                text += (c["delta"].get("reasoning_content") or "") + (c["delta"].get("content") or "")
            if leave_after is not None and n >= leave_after:
                break
    return (None, time.monotonic()) if leave_after is not None else (text, time.monotonic())


def test_64_streams_a_quarter_leave_early_the_rest_get_their_greedy_answers(server, cpu_pair):
    url, proc = server
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=128)) as client:
        prompts = [f"Write one sentence about {t}." for t in TOPICS]
        t0 = time.monotonic()
        expected = [stream(client, url, p, MAX_TOKENS)[0] for p in prompts]  # greedy, one at a time
        print(f"\n{len(prompts)} greedy answers one at a time in {time.monotonic() - t0:.1f} s", flush=True)
        assert all(expected) and len(set(expected)) >= len(TOPICS) - 1
        assert wait_idle(cpu_pair, time.monotonic()) < IDLE_WITHIN_S
        base, base_all = threads(proc.pid), threads(proc.pid, pooled=True)

        def one(i: int):
            prompt = prompts[i % len(prompts)]
            if i % 4 == 0:  # a quarter leave after the first content chunk or two, with a long budget
                return i, *stream(client, url, prompt, 1000, leave_after=2 + (i // 4) % 2)
            return i, *stream(client, url, prompt, MAX_TOKENS)

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(one, range(64)))
        done = time.monotonic()
        peak = threads(proc.pid, pooled=True)
    left = [t for i, text, t in results if text is None]
    completed = [(i, text) for i, text, _ in results if text is not None]
    assert len(left) == 16 and len(completed) == 48
    wrong = [(i, text) for i, text in completed if text != expected[i % len(prompts)]]
    assert not wrong, f"{len(wrong)} answers differ from their greedy answer, e.g. {wrong[0]}"
    last_leave = max(left)
    idle_s = wait_idle(cpu_pair, done)
    threads_s, after = wait_threads(proc.pid, base, done)
    print(f"\n64 streams in {done - t0:.1f} s; last leave {done - last_leave:.1f} s before the last answer; "
          f"both servers idle {idle_s:.2f} s after the last answer ({done - last_leave + idle_s:.2f} s after the "
          f"last leave); threads (prefetch pool left out) {base} before, {after} after {threads_s:.2f} s; "
          f"with the pool {base_all} before, {peak} at the end of the burst, {threads(proc.pid, pooled=True)} now")
    assert idle_s < IDLE_WITHIN_S
    assert after <= base, f"{after} threads, {base} before"


def test_a_long_stream_whose_client_leaves_after_two_chunks_frees_both_servers(server, cpu_pair):
    url, proc = server
    base = threads(proc.pid)
    with httpx.Client(timeout=600) as client:
        _, left_at = stream(client, url, "Tell me a very long story about a dragon.", 2000, leave_after=3)
    idle_s = wait_idle(cpu_pair, left_at)
    threads_s, after = wait_threads(proc.pid, base, left_at)
    print(f"\nmax_tokens 2000, left after two chunks: both servers idle {idle_s:.2f} s later; threads {base} -> "
          f"{after} in {threads_s:.2f} s")
    assert idle_s < IDLE_WITHIN_S and after <= base


# ---------------------------------------------------------------- clients that leave or stall; /metrics
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def guarded(cpu_pair, tmp_path_factory):
    """A second `relaygen serve`: one relay at a time, no queue (the next gets 429), and a
    short --body-timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    proc = subprocess.Popen(relaygen_cmd("serve", "--large", cpu_pair.large, "--small", cpu_pair.small,
                                         "--port", str(port), "--health-interval", "0", "--max-concurrency", "1",
                                         "--max-queue", "0", "--body-timeout", str(BODY_TIMEOUT_S)),
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url, port, log
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = log.read_text()
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]


def access(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "relaygen.serve.access" in line]


PARTIAL = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: 300\r\n\r\n{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me")


def test_30_clients_that_leave_mid_body_are_info_lines_and_no_traceback(guarded):
    url, port, log = guarded
    before = len(access(log))

    def leave(_: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(PARTIAL)
            time.sleep(0.2)  # the server is reading the body when the client goes

    with ThreadPoolExecutor(max_workers=30) as pool:
        list(pool.map(leave, range(30)))
    deadline = time.monotonic() + 20
    while len(access(log)) < before + 30 and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = access(log)[before:]
    text = log.read_text()
    print(f"\n30 clients left mid-body: {len(lines)} access lines, e.g. {lines[0] if lines else None!r}")
    assert len(lines) == 30 and all(" INFO " in line and " 499 " in line and "client left mid-body" in line
                                    for line in lines), lines[:3]
    assert "Traceback" not in text and "internal error" not in text and " ERROR " not in text
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200  # nothing was left holding the one slot


def test_a_client_that_stalls_mid_body_gets_408_within_the_bound(guarded):
    _, port, log = guarded
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)
        t0 = time.monotonic()
        sock.sendall(PARTIAL)
        answer = b""
        while chunk := sock.recv(65536):  # to the end: the server closes the connection
            answer += chunk
        took = time.monotonic() - t0
    status_line = answer.split(b"\r\n", 1)[0].decode()
    print(f"\nstalled mid-body: {status_line} after {took:.2f} s "
          f"(--body-timeout {BODY_TIMEOUT_S:g}), connection closed by the server")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in answer
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 2
    assert any(" 408 " in line for line in access(log))


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200
    out: dict = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_five_real_requests_equal_what_the_responses_reported(guarded):
    url, _, log = guarded
    chat = f"{url}/v1/chat/completions"
    before, lines_before = scrape(url), len(access(log))
    usages, statuses = [], []

    def plain(topic: str) -> None:
        r = httpx.post(chat, timeout=300, json={"messages": [{"role": "user", "content": f"Write about {topic}."}],
                                                "max_tokens": 32, "temperature": 0})
        statuses.append(r.status_code)
        usages.append(r.json()["usage"])

    plain("apples")
    plain("rivers")
    with httpx.Client(timeout=300) as client:
        body = {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}], "max_tokens": 64,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", chat, json=body) as resp:
            statuses.append(resp.status_code)
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            during = scrape(url)
            busy = httpx.post(chat, timeout=60, json={"messages": [{"role": "user", "content": "Hi."}],
                                                      "max_tokens": 8})
            statuses.append(busy.status_code)
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]" and orjson.loads(line[6:]).get("usage"):
                    usages.append(orjson.loads(line[6:])["usage"])
    plain("chess")
    assert statuses == [200, 200, 200, 429, 200] and len(usages) == 4
    assert value(during, "relaygen_relays_running") == 1
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    large = sum(u["relay"]["large_tokens"] for u in usages)
    small = sum(u["relay"]["small_tokens"] for u in usages)
    switches = sum(u["relay"]["switches"] for u in usages)
    print(f"\n5 requests: tokens large {large}, small {small}, switches {switches}; /metrics moved by "
          f"{moved('relaygen_tokens_total', role='large'):g}, {moved('relaygen_tokens_total', role='small'):g}, "
          f"{moved('relaygen_switches_total'):g}; handoffs {moved('relaygen_handoff_seconds_count'):g} taking "
          f"{moved('relaygen_handoff_seconds_sum'):.3f} s in all")
    assert moved("relaygen_requests_total", route=route, status="200") == 4
    assert moved("relaygen_requests_total", route=route, status="429") == 1
    assert moved("relaygen_rejections_total", status="429") == 1
    assert moved("relaygen_tokens_total", role="large") == large and large > 0
    assert moved("relaygen_tokens_total", role="small") == small
    assert moved("relaygen_switches_total") == switches
    assert moved("relaygen_handoff_seconds_count") == switches
    assert moved("relaygen_relay_seconds_count", method="relay") == 4
    assert moved("relaygen_relays_total", outcome="completed") == 4
    assert value(after, "relaygen_relays_running") == 0 and value(after, "relaygen_relays_queued") == 0
    new = access(log)[lines_before:]
    chats = [line for line in new if "/v1/chat/completions" in line]
    assert len(chats) == 5 and sum(" 429 " in line for line in chats) == 1
    assert all("switches=" in line and "large_share=" in line and "tokens=" in line
               for line in chats if " 200 " in line), chats

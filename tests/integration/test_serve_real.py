"""`relaygen serve` on the real CPU pair. Every serve test is in this module, so each of its
two processes starts once per session:

- `server` (--api-key, every client sends it; --health-interval 0, so that only the tests'
  own requests reach SGLang): the OpenAI client; 64 concurrent greedy streams, twice, a
  quarter of them leaving early; one long stream whose client leaves.
- `guarded` (one relay at a time, no queue, a short --body-timeout): clients that leave or
  stall mid-body, and /metrics with a 429. It cannot be `server`: there the 64 streams must
  all be admitted (16 run, 48 wait), here the second concurrent request gets 429.

Each process writes its stderr to a file (a pipe nobody reads would block it once full);
at teardown it holds no traceback and no "internal error"."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import orjson
import pytest

pytestmark = pytest.mark.integration

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOPICS = ["apples", "rivers", "prime numbers", "the moon", "chess", "volcanoes", "violins", "glaciers"]
PROMPTS = [f"Write one sentence about {t}." for t in TOPICS]
MAX_TOKENS = 8  # the point is whose answer, not its length; each of the 8 answers still crosses a handoff
STREAMS = 64
ROUNDS = 2  # memory (VmRSS) must stay stable from the first to the second
IDLE_WITHIN_S = 10.0


def relaygen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relaygen_sgl.cli", *args]


@dataclass(frozen=True)
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path  # the process's stderr


def start_serve(cpu_pair, tmp_path_factory, name: str, *flags: str) -> Served:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp(name) / "serve.log"  # a file: a full pipe would block the server
    with log.open("w") as err:
        proc = subprocess.Popen(relaygen_cmd("serve", "--large", cpu_pair.large, "--small", cpu_pair.small,
                                             "--port", str(port), *flags),
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"relaygen serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:  # open without the key
                return Served(url, port, proc, log)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"relaygen serve not healthy within 120 s: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_serve(served: Served) -> None:
    served.proc.send_signal(signal.SIGINT)
    try:
        served.proc.wait(timeout=60)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()
    err = served.log.read_text()
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]


@pytest.fixture(scope="module")
def server(cpu_pair, tmp_path_factory):
    served = start_serve(cpu_pair, tmp_path_factory, "serve", "--api-key", KEY, "--health-interval", "0")
    yield served
    stop_serve(served)


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


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])


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


@dataclass(frozen=True)
class Streamed:
    text: str | None  # the streamed reasoning + answer; None when the client left
    at: float  # when the answer ended or the client closed the connection
    roles: frozenset[str]  # the relay_role of its deltas: both when the answer was handed off


def stream(client: httpx.Client, url: str, prompt: str, max_tokens: int, leave_after: int | None = None) -> Streamed:
    """One streamed greedy chat completion; with `leave_after`, the client closes the
    connection after that many data events."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    text, n, roles = "", 0, set()
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
                if c["delta"].get("relay_role"):
                    roles.add(c["delta"]["relay_role"])
            if leave_after is not None and n >= leave_after:
                break
    return Streamed(None if leave_after is not None else text, time.monotonic(), frozenset(roles))


def test_openai_client_plain_and_streamed_with_the_api_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["relaygen"]
    r = client.chat.completions.create(model="relaygen", messages=[{"role": "user", "content": "What is 2+2?"}],
                                       max_tokens=16, seed=0)
    relay = r.usage.model_extra["relay"]
    assert r.usage.completion_tokens == relay["large_tokens"] + relay["small_tokens"] > 0
    text = ""
    for chunk in client.chat.completions.create(model="relaygen", messages=[{"role": "user", "content": "Hi!"}],
                                                max_tokens=8, stream=True):
        for c in chunk.choices:
            text += (c.delta.content or "") + ((c.delta.model_extra or {}).get("reasoning_content") or "")
    assert text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_64_streams_twice_a_quarter_leave_early_the_rest_get_their_own_greedy_answers(server, cpu_pair):
    """Each round: 64 concurrent greedy streams, 8 per topic; a quarter ask for a long story
    (max_tokens 1000) and leave after a chunk or two. The other 48 (6 per prompt) get their
    own prompt's answer (>= 90% exactly what it got alone, none ever another prompt's:
    batching may flip a float tie), both SGLang servers are idle within IDLE_WITHIN_S of the
    last answer (so the leavers' generations stopped), no thread is left behind, and VmRSS
    stays stable from round 1 to round 2."""
    pid = server.proc.pid
    with httpx.Client(timeout=600, headers=AUTH, limits=httpx.Limits(max_connections=2 * STREAMS)) as client:
        t0 = time.monotonic()
        alone = [stream(client, server.url, p, MAX_TOKENS) for p in PROMPTS]  # greedy, one at a time
        expected = [s.text for s in alone]
        print(f"\n{len(PROMPTS)} greedy answers one at a time in {time.monotonic() - t0:.1f} s, "
              f"{sum(len(s.roles) > 1 for s in alone)} handed off between the servers", flush=True)
        assert all(expected) and len(set(expected)) == len(PROMPTS)
        # the premise: the answers cross a handoff, where one stream's text could meet another's
        assert sum(len(s.roles) > 1 for s in alone) >= len(PROMPTS) // 2, [sorted(s.roles) for s in alone]
        assert wait_idle(cpu_pair, time.monotonic()) < IDLE_WITHIN_S
        base, base_all = threads(pid), threads(pid, pooled=True)

        def one(i: int) -> tuple[int, Streamed]:
            row, col = divmod(i, len(PROMPTS))
            if (row + col) % 4 == 0:  # a quarter (2 per prompt) leave after a chunk or two of a long story:
                # it would still run when the rest are done, had its generation not stopped
                return i, stream(client, server.url, f"Tell me a very long story about {TOPICS[col]}.", 1000,
                                 leave_after=2 + row % 2)
            return i, stream(client, server.url, PROMPTS[col], MAX_TOKENS)

        rss = []
        for round_ in range(1, ROUNDS + 1):
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=STREAMS) as pool:
                results = list(pool.map(one, range(STREAMS)))
            done = time.monotonic()
            peak = threads(pid, pooled=True)
            left = [s.at for _, s in results if s.text is None]
            completed = [(i, s.text) for i, s in results if s.text is not None]
            assert len(left) == STREAMS // 4 and len(completed) == STREAMS - STREAMS // 4
            exact = 0
            for i, text in completed:
                mine = expected[i % len(PROMPTS)]
                others = set(expected) - {mine}
                assert text == mine or text not in others, f"round {round_}: request {i} got another prompt's " \
                    f"answer: {text!r}"
                exact += text == mine
            assert exact >= 0.9 * len(completed), f"round {round_}: only {exact}/{len(completed)} matched " \
                "their greedy answer"
            idle_s = wait_idle(cpu_pair, done)
            threads_s, after = wait_threads(pid, base, done)
            rss.append(rss_kib(pid))
            print(f"round {round_}: {STREAMS} streams in {done - t0:.1f} s, {exact}/{len(completed)} exactly their "
                  f"greedy answer; last leave {done - max(left):.1f} s before the last answer; both servers idle "
                  f"{idle_s:.2f} s after the last answer; threads (prefetch pool left out) {base} before, {after} "
                  f"after {threads_s:.2f} s; with the pool {base_all} before, {peak} at the end of the burst, "
                  f"{threads(pid, pooled=True)} now; VmRSS {rss[-1] / 1024:.0f} MiB", flush=True)
            assert idle_s < IDLE_WITHIN_S, f"round {round_}: the servers still ran {idle_s:.1f} s after the end"
            assert after <= base, f"round {round_}: {after} threads, {base} before"
    assert rss[1] < rss[0] * 1.5, rss


def test_a_long_stream_whose_client_leaves_after_two_chunks_frees_both_servers(server, cpu_pair):
    pid = server.proc.pid
    base = threads(pid)
    with httpx.Client(timeout=600, headers=AUTH) as client:
        left_at = stream(client, server.url, "Tell me a very long story about a dragon.", 2000, leave_after=3).at
    idle_s = wait_idle(cpu_pair, left_at)
    threads_s, after = wait_threads(pid, base, left_at)
    print(f"\nmax_tokens 2000, left after two chunks: both servers idle {idle_s:.2f} s later; threads {base} -> "
          f"{after} in {threads_s:.2f} s")
    assert idle_s < IDLE_WITHIN_S and after <= base


# ---------------------------------------------------------------- clients that leave or stall; /metrics
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def guarded(cpu_pair, tmp_path_factory):
    """A second `relaygen serve`: one relay at a time, no queue (the next gets 429), and a
    short --body-timeout."""
    served = start_serve(cpu_pair, tmp_path_factory, "guarded", "--health-interval", "0", "--max-concurrency", "1",
                         "--max-queue", "0", "--body-timeout", str(BODY_TIMEOUT_S))
    yield served
    stop_serve(served)


def access(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "relaygen.serve.access" in line]


PARTIAL = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: 300\r\n\r\n{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me")


def test_30_clients_that_leave_mid_body_are_info_lines_and_no_traceback(guarded):
    url, port, log = guarded.url, guarded.port, guarded.log
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
    port, log = guarded.port, guarded.log
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
    url, log = guarded.url, guarded.log
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
    assert moved("relaygen_requests_total", route=route, code="200") == 4
    assert moved("relaygen_requests_total", route=route, code="429") == 1
    assert moved("relaygen_rejections_total", code="429") == 1
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

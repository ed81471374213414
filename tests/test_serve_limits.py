"""What one client can cost `relaygen serve` and every other client: stop strings,
connections that never finish their headers, streams nobody reads. The app runs in real
uvicorn, configured as `serve` configures it (serve/server.py), on real sockets; the relay
behind it is a double that speaks a scripted text as fast as its client takes it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import orjson
import pytest
from doubles import running

from relaygen_sgl.core.errors import STOPPED, Cancelled, EngineUnreachable
from relaygen_sgl.core.result import RelayResult, RelayStats, Segment
from relaygen_sgl.serve import protocol
from relaygen_sgl.serve.admission import MAX_PENDING
from relaygen_sgl.serve.app import ServeSettings, create_app
from relaygen_sgl.serve.server import uvicorn_config

LARGE_URL, SMALL_URL = "http://10.0.0.7:30000", "http://sglang-small.internal:30001"


class Engine:
    def __init__(self, url: str) -> None:
        self.url = url

    def health(self, timeout_s: float) -> bool:
        return True


class ScriptedRelay:
    """A relay double: run() hands `text` to on_delta in `step`-character deltas as the
    large model (or, `endless`, deltas until stopped), then returns its RelayResult; once
    `cancel` is set it raises Cancelled, as the real relay does. `fail` is raised instead."""

    def __init__(self, text: str = "ok</think>\n\nThe answer is 5.", step: int = 64) -> None:
        self.engines = {"large": Engine(LARGE_URL), "small": Engine(SMALL_URL)}
        self.urls = {role: e.url for role, e in self.engines.items()}
        self.small_down = None
        self.family = SimpleNamespace(think_end="</think>")
        self.tokenizer = SimpleNamespace(encode=lambda text: text.split())
        self.text, self.step = text, step
        self.endless = False
        self.fail: BaseException | None = None
        self.delivered = 0  # deltas on_delta took

    def run(self, question, settings=None, on_delta=None, cancel=None) -> RelayResult:
        if self.fail is not None:
            raise self.fail
        i = 0
        while self.endless or i < len(self.text):
            if cancel.is_set():
                raise Cancelled(STOPPED)
            on_delta("large", "blue green red " * 4 if self.endless else self.text[i:i + self.step])
            self.delivered += 1
            i += self.step
        n = len(self.text.split())
        seg = Segment(role="large", text=self.text, token_ids=list(range(n)), completion_tokens=n, prompt_tokens=3,
                      cached_tokens=0, latency_s=0.1, finish="eos")
        stats = RelayStats(large_tokens=n, small_tokens=0, switches=0, large_share=1.0, e2e_s=0.1, ttft_s=0.01,
                           finish="eos")
        return RelayResult(method="relay", prompt="q", prompt_ids=[1, 2, 3], segments=[seg], stats=stats)


@contextlib.contextmanager
def serving(relay: ScriptedRelay, sndbuf: int | None = None, **settings):
    """(app, port): the app in uvicorn as `serve` runs it, on an ephemeral port."""
    s = ServeSettings(health_interval_s=0, **settings)
    app = create_app(relay, s)
    with running(app, uvicorn_config(app, "127.0.0.1", 0, s), sndbuf=sndbuf) as client:
        yield app, client.base_url.port


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def body(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 200, **extra}


class HealthWatch:
    """GET /health over and over on its own connection, keeping the slowest answer."""

    def __init__(self, port: int) -> None:
        self.port, self.slowest, self.answers = port, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                assert client.get("/health").status_code == 200
                self.slowest = max(self.slowest, time.monotonic() - t0)
                self.answers += 1
                time.sleep(0.01)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


# ---------------------------------------------------------------- stop strings
@pytest.mark.parametrize("cap", ["product", "lifted"])
def test_four_streams_with_four_200k_stop_strings_never_stall_health(cap, monkeypatch):
    """With the product's cap the stop strings are refused (400); with the cap lifted they are
    served, and the held-back tail and the stop search stay a window: either way /health
    answers in under 0.5 s throughout. (The whole-text shaper, its held-back tail checked
    against every prefix of every stop string, took seconds per delta here.)"""
    if cap == "lifted":
        monkeypatch.setattr(protocol, "MAX_STOP_CHARS", 10**6)
    answer = "The stream goes on and on, " * 4000  # ~110,000 characters after think_end
    relay = ScriptedRelay("ok</think>\n\n" + answer, step=2000)
    stops = [c * 200_000 for c in "#@~^"]
    results: list[tuple[int, str]] = []

    def stream(port: int) -> None:
        give_up = time.monotonic() + 30
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, \
                client.stream("POST", "/v1/chat/completions", json=body(stream=True, stop=stops)) as r:
            if r.status_code != 200:
                results.append((r.status_code, r.read().decode()))
                return
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: {") and '"choices":[{' in line:
                    text += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if time.monotonic() > give_up:
                    break
            results.append((r.status_code, text))

    with serving(relay) as (_, port), HealthWatch(port) as watch:
        time.sleep(0.1)
        threads = [threading.Thread(target=stream, args=(port,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert watch.answers > 0 and watch.slowest < 0.5, watch.slowest
    assert len(results) == 4, results
    for status, text in results:
        if cap == "product":
            assert status == 400, (status, text[:200])
            err = orjson.loads(text)["error"]
            assert err["param"] == "stop" and "at most 256 characters" in err["message"], text
        else:
            assert status == 200 and text == answer


# ---------------------------------------------------------------- headers that never finish
HALF = b"GET /health HTTP/1.1\r\nHost: relaygen\r\nX-Half: "


def test_64_connections_with_half_a_header_are_closed_while_others_are_served():
    assert ServeSettings().header_timeout_s <= 60
    relay = ScriptedRelay()
    with serving(relay, header_timeout_s=1.0) as (_, port):
        socks = []
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(HALF)
            socks.append(sock)
        trickle = socket.create_connection(("127.0.0.1", port))  # a byte at a time keeps no connection open
        idle = socket.create_connection(("127.0.0.1", port))  # nothing at all
        t0 = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/health").status_code == 200  # others are served meanwhile
            r = client.post("/v1/chat/completions", json=body())
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "The answer is 5."
            for byte in HALF:
                with contextlib.suppress(OSError):
                    trickle.send(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - t0 > 3:
                    break
            closed_at = []
            for sock in [*socks, trickle, idle]:
                sock.settimeout(max(0.1, 60 - (time.monotonic() - t0)))
                try:
                    got = sock.recv(4096)
                except ConnectionResetError:
                    got = b""
                assert got == b"", got[:200]  # closed without an answer
                closed_at.append(time.monotonic() - t0)
                sock.close()
            assert client.get("/health").status_code == 200
        assert max(closed_at) < 60 and max(closed_at) < 10, max(closed_at)


def test_a_keep_alive_connection_between_requests_is_not_taken_for_a_slow_header():
    with serving(ScriptedRelay(), header_timeout_s=0.5) as (_, port), \
            socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: relaygen\r\n\r\n")
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            time.sleep(1.0)  # idle past the header timeout: uvicorn's keep-alive (30 s) governs here


# ---------------------------------------------------------------- a client that stops reading
def test_a_streaming_client_that_stops_reading_is_cut_off_and_its_relay_stopped():
    """The relay speaks without end; the client reads nothing. Its deltas wait in a queue of
    MAX_PENDING at most (the relay's thread waits), and after the send deadline the
    connection is cut off, which stops the relay at once, like a client that left."""
    relay = ScriptedRelay()
    relay.endless = True
    with serving(relay, sndbuf=8192, send_timeout_s=2.0) as (app, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        payload = orjson.dumps(body(stream=True, max_tokens=30000))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: relaygen\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        t0 = time.monotonic()
        assert wait_for(lambda: relay.delivered > 0, 10)
        # before the deadline the relay waits on the full queue: what fits the socket buffers,
        # uvicorn's 64 KiB write buffer and the job's queue, a few hundred (unbounded, it was
        # 1.39 million in 20 s); the two readings 0.5 s apart are equal
        time.sleep(0.8)
        plateau = relay.delivered
        time.sleep(0.5)
        assert relay.delivered == plateau < 4 * (MAX_PENDING + 2000), (plateau, relay.delivered)
        stopped = wait_for(lambda: app.state.gate.running == 0, 20)
        took = time.monotonic() - t0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/health").status_code == 200
        sock.close()
    assert stopped and took < 10, (stopped, took, relay.delivered)
    # cut off, the relay stopped at once: it wrote no more than another queue's worth after the plateau
    assert relay.delivered <= plateau + MAX_PENDING + 8, (plateau, relay.delivered)


# ---------------------------------------------------------------- the connection limit
def test_past_the_connection_limit_a_request_gets_503():
    with serving(ScriptedRelay(), max_concurrency=1, max_queue=1, max_connections=4) as (_, port):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            r = client.get("/health")
            # in OpenAI's shape, as every other error serve answers (uvicorn's own is plain text)
            assert r.status_code == 503 and r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert err["code"] == "too_many_connections" and "4 connections" in err["message"]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/health").status_code == 200
    assert ServeSettings().connection_limit == 16 + 64 + 128


# ---------------------------------------------------------------- errors name no internal address
def test_a_failed_relay_names_no_internal_address():
    relay = ScriptedRelay()
    relay.fail = EngineUnreachable(f"{LARGE_URL}: POST /generate: ConnectError: connecting to {LARGE_URL}/generate "
                                   f"and {SMALL_URL} (10.0.0.8:30001) failed", url=LARGE_URL)
    with serving(relay) as (_, port), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        r = client.post("/v1/chat/completions", json=body())
        with client.stream("POST", "/v1/chat/completions", json=body(stream=True)) as s:
            events = [line for line in s.iter_lines() if '"error"' in line]
    assert r.status_code == 502 and r.json()["error"]["code"] == "engine_error"
    for text in (r.text, *events):
        assert "10.0.0" not in text and "internal" not in text and "30000" not in text, text
    assert "the large server" in r.json()["error"]["message"] and events

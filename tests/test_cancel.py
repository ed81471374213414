"""A request ends when its caller goes, wherever it is: waiting for its headers, queued with
its headers sent, or streaming (client/cancel.py). Real sockets against a stalling server
that speaks SGLang's wire format as far as it gets."""

from __future__ import annotations

import socket
import threading
import time

import orjson
import pytest

from relaygen_sgl.client.cancel import Stop, Watchdog
from relaygen_sgl.client.http import ClientConfig, EngineClient
from relaygen_sgl.core.errors import Cancelled

CHUNK = orjson.dumps({"text": "a", "output_ids": [5], "meta_info": {"completion_tokens": 1, "finish_reason": None}})


class StallingServer:
    """Answers POST /generate as `mode` says, then holds the connection open without a word:
    "silent" (not even the headers: a stopped server), "queued" (the stream's headers, as
    SGLang sends them before the request reaches the scheduler), "streaming" (one token).
    Records every request line and body (the /abort_request calls among them)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[tuple[str, bytes]] = []
        self.closed = threading.Event()  # a held /generate connection saw its client go
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = int(next((h.split(b":")[1] for h in lines if h.lower().startswith(b"content-length")), b"0"))
            while len(body) < length:
                body += conn.recv(65536)
            line = head.split(b"\r\n")[0].decode()
            self.seen.append((line, body))
            if line.startswith("POST /abort_request"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                return
            if self.mode != "silent":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
            if self.mode == "streaming":
                payload = b"data: " + CHUNK + b"\n\n"
                conn.sendall(b"%x\r\n%s\r\n" % (len(payload), payload))
            conn.settimeout(30)
            try:
                while conn.recv(65536):  # until the client closes or shuts down its side
                    pass
            except OSError:
                pass
            self.closed.set()

    def aborted(self) -> list[str]:
        return [orjson.loads(body)["rid"] for line, body in self.seen if line.startswith("POST /abort_request")]

    def rids(self) -> list[str]:
        return [orjson.loads(body)["rid"] for line, body in self.seen if line.startswith("POST /generate")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["queued", "streaming"])
def held(request):
    server = StallingServer(request.param)
    yield server
    server.close()


def _generate_in_thread(client: EngineClient, stop: Stop) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def work() -> None:
        t0 = time.monotonic()
        try:
            client.generate([1, 2, 3], {"max_new_tokens": 100}, on_tokens=lambda ids, last: None, stop=stop)
        except BaseException as e:
            out["error"] = e
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, out


def test_a_cancel_ends_a_held_request_at_once_and_aborts_it_by_id(held):
    client = EngineClient(held.url, ClientConfig(read_timeout_s=60, retries=2, backoff_s=2))
    stop = Stop(threading.Event())
    t, out = _generate_in_thread(client, stop)
    time.sleep(0.5)  # the request sits on the server: headers sent or a token streamed, then nothing
    stop.event.set()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(out["error"], Cancelled) and out["took"] < 1.5, out
    deadline = time.monotonic() + 5
    while not held.aborted() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.aborted() == held.rids() and len(held.rids()) == 1  # that request, not retried
    assert held.closed.wait(5)  # and its connection is gone (SGLang aborts a disconnected request)
    client.close()


def test_no_read_waits_past_the_deadline_even_before_the_headers():
    server = StallingServer("silent")
    client = EngineClient(server.url, ClientConfig(read_timeout_s=3600, retries=2, backoff_s=2))
    stop = Stop(threading.Event(), deadline=time.monotonic() + 1.0)
    for stream in (True, False):  # a turn's stream and a prefill-only call alike
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            client.generate([1], {"max_new_tokens": 0}, stop=stop,
                            on_tokens=(lambda ids, last: None) if stream else None)
        assert time.monotonic() - t0 < 2.5
    client.close()
    server.close()


def test_a_request_already_cancelled_is_not_sent():
    server = StallingServer("queued")
    client = EngineClient(server.url)
    stop = Stop(threading.Event())
    stop.event.set()
    with pytest.raises(Cancelled):
        client.generate([1], {"max_new_tokens": 1}, stop=stop)
    assert server.seen == []
    client.close()
    server.close()


def test_the_watchdog_fires_once_and_forgets_finished_requests():
    dog = Watchdog(poll_s=0.01)
    fired: list[int] = []
    event = threading.Event()
    with dog.watch(Stop(event), lambda: fired.append(1)):
        event.set()
        time.sleep(0.2)
    assert fired == [1]
    with dog.watch(Stop(threading.Event()), lambda: fired.append(2)):
        pass
    time.sleep(0.05)
    assert dog._watched == {} and fired == [1]

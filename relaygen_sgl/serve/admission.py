"""What runs behind `relaygen serve`'s requests: the admission gate (running relays and a
bounded wait queue), one relay job in its own thread (cancellable, its deltas queued for
the client up to a bound), and the cached health state."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from relaygen_sgl.core.config import ROLES
from relaygen_sgl.core.errors import EngineFailed, EngineUnreachable

MAX_PENDING = 256  # deltas a job may have queued for its client; past that its relay waits (or drops them once stopped)
PUT_POLL_S = 0.25  # how often a waiting relay checks whether it was stopped


# ---------------------------------------------------------------- admission
class Busy(Exception):
    """Every slot runs and the wait queue is full."""


class Gate:
    """At most `limit` relays run at once; up to `queue` more wait, first come first served.
    Thread-safe: a relay's worker thread gives its slot back when it really ends, so a
    client that went away frees nothing before its generation has stopped."""

    def __init__(self, limit: int, queue: int) -> None:
        self.limit, self.queue = limit, queue
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._lock = threading.Lock()
        self._avg_s: float | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def enter(self) -> asyncio.Future | None:
        """None: a slot is taken now. A future: wait for it (a slot is handed over when it
        resolves). Raises Busy past both limits."""
        with self._lock:
            if self.running < self.limit and not self._waiters:
                self.running += 1
                return None
            if len(self._waiters) >= self.queue:
                raise Busy
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            return fut

    def leave_queue(self, fut: asyncio.Future) -> None:
        """A waiter gives up (deadline, disconnect); a slot handed to it meanwhile goes on."""
        with self._lock:
            if fut in self._waiters:
                self._waiters.remove(fut)
                return
        self.release()

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                fut = self._waiters.popleft()
                try:
                    fut.get_loop().call_soon_threadsafe(_resolve, fut)
                    return  # the slot goes to that waiter
                except RuntimeError:  # its event loop is gone: so is the waiter
                    continue
            self.running -= 1

    def record(self, seconds: float) -> None:
        self._avg_s = seconds if self._avg_s is None else 0.8 * self._avg_s + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent run time."""
        per = self._avg_s if self._avg_s is not None else 1.0
        return max(1, min(60, math.ceil(per * (self.waiting + 1) / max(self.limit, 1))))


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# ---------------------------------------------------------------- one relay
class Job:
    """One Relay.run in its own thread. Its deltas and its end reach the event loop as
    ("delta", role, text), ("done", result) or ("error", exception) items, read with
    `get()`; `stop(reason)` sets the cancel event the relay checks between tokens (it then
    closes its stream to SGLang, which aborts the request there). At most MAX_PENDING
    deltas wait unread: past that the relay's thread waits for its client (a slow reader
    slows its own relay, never the server's memory), and once stopped it drops them."""

    def __init__(self, relay: Any, question: list[dict[str, str]], settings: Any,
                 on_end: Callable[[Job], None]) -> None:
        self.relay, self.question, self.settings = relay, question, settings
        self.on_end = on_end
        self.cancel = threading.Event()
        self.reason: str | None = None  # why it was stopped: stop | disconnect | deadline
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.events: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(MAX_PENDING)
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.started_at = time.monotonic()
        threading.Thread(target=self._work, name="relaygen-serve-job", daemon=True).start()

    def stop(self, reason: str) -> None:
        if self.finished or self.cancel.is_set():
            return
        self.reason = reason
        self.cancel.set()

    async def get(self) -> tuple[Any, ...]:
        item = await self.events.get()
        if item[0] == "delta":
            self._room.release()
        return item

    def _delta(self, role: str, text: str) -> None:
        while not self.cancel.is_set() and not self._loop.is_closed():  # stopped: nobody needs the rest
            if self._room.acquire(timeout=PUT_POLL_S):
                self._put("delta", role, text)
                return

    def _put(self, *item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _work(self) -> None:
        item: tuple[Any, ...]
        try:
            result = self.relay.run(self.question, settings=self.settings, on_delta=self._delta,
                                    cancel=self.cancel)
            self.result, item = result, ("done", result)
        except BaseException as e:  # handed to the request, answered there
            self.error, item = e, ("error", e)
        self.finished = True
        try:  # the slot and the counters first: once the answer is out, they say so already
            self.on_end(self)
        finally:
            self._put(*item)


# ---------------------------------------------------------------- health
class Health:
    """Whether each SGLang server worked, from the last request outcome or a background
    one-token check every `interval_s` seconds without requests (0: no background check).
    /health reads it: no generation per call, no URL, no path."""

    def __init__(self, engines: dict[str, Any], interval_s: float) -> None:
        self.engines, self.interval = engines, interval_s
        self.known: dict[str, bool | None] = {role: None for role in engines}
        self.last = 0.0  # time.monotonic() of the last outcome
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="relaygen-serve-health", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self.last >= self.interval or not self.last:
                self.check()
            self._stop.wait(self.interval)

    def check(self) -> None:
        seen: dict[int, bool] = {}
        for role, engine in self.engines.items():
            if id(engine) not in seen:
                seen[id(engine)] = bool(engine.health(10.0))
            self.known[role] = seen[id(engine)]
        self.last = time.monotonic()

    def outcome(self, result: Any = None, error: BaseException | None = None) -> None:
        """What a finished request says about the servers (a cancelled one says nothing)."""
        if result is not None:
            self.last = time.monotonic()
            for role in {s.role for s in result.segments if s.role in ROLES}:
                self.known[role] = True
            if result.degraded:
                self.known[result.degraded.get("role", "small")] = False
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, (EngineUnreachable, EngineFailed)):
            cause = cause.__cause__
        if cause is not None:
            for role, engine in self.engines.items():
                if engine.url == getattr(cause, "url", None):
                    self.known[role] = False
            self.last = time.monotonic()

    def report(self) -> tuple[int, dict[str, Any]]:
        down = any(v is False for v in self.known.values())
        servers = {r: "unknown" if v is None else ("ok" if v else "failing") for r, v in self.known.items()}
        return (503 if down else 200), {"status": "degraded" if down else "ok", "servers": servers}

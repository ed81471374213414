"""What runs behind `relaygen serve`'s requests: the admission gate (running relays and a
bounded wait queue), one relay job in its own thread (cancellable), the text shaper that
splits reasoning from the answer and applies stop strings, and the cached health state."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from relaygen_sgl.core.config import ROLES
from relaygen_sgl.core.errors import EngineFailed, EngineUnreachable
from relaygen_sgl.core.result import REROUTED

REASONING, CONTENT = "reasoning_content", "content"


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
    ("delta", role, text), ("done", result) or ("error", exception) items on `events`;
    `stop(reason)` sets the cancel event the relay checks between tokens (it then closes
    its stream to SGLang, which aborts the request there)."""

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
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.started_at = time.monotonic()
        threading.Thread(target=self._work, name="relaygen-serve-job", daemon=True).start()

    def stop(self, reason: str) -> None:
        if self.finished or self.cancel.is_set():
            return
        self.reason = reason
        self.cancel.set()

    def _put(self, *item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _work(self) -> None:
        item: tuple[Any, ...]
        try:
            result = self.relay.run(self.question, settings=self.settings,
                                    on_delta=lambda r, d: self._put("delta", r, d), cancel=self.cancel)
            self.result, item = result, ("done", result)
        except BaseException as e:  # handed to the request, answered there
            self.error, item = e, ("error", e)
        self.finished = True
        try:  # the slot and the counters first: once the answer is out, they say so already
            self.on_end(self)
        finally:
            self._put(*item)


# ---------------------------------------------------------------- text
def stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """Where `text` is cut: at the start of the stop string that is complete first (the
    one a generator meets first), the longer one on a tie; None without a match."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return best[1] if best else None


def _held(text: str, needles: Sequence[str]) -> int:
    """The longest suffix of `text` that is a proper prefix of a needle (held back)."""
    best = 0
    for n in needles:
        for k in range(min(len(n) - 1, len(text)), best, -1):
            if text.endswith(n[:k]):
                best = k
                break
    return best


class TextShaper:
    """Streamed text to (field, delta) pairs: reasoning_content before the family's
    think_end, content after it, cut at the first stop string. A tail that may still
    become think_end or a stop string is held back until it is decided."""

    def __init__(self, think_end: str, stops: Sequence[str] = ()) -> None:
        self.end, self.stops = think_end, tuple(stops)
        self.text = ""
        self.sent = {REASONING: 0, CONTENT: 0}
        self.stopped = False

    def fields(self, final: bool = False) -> tuple[dict[str, str], bool]:
        text = self.text
        at = text.find(self.end)
        if at < 0:
            keep = len(text) if final else len(text) - _held(text, [self.end])
            return {REASONING: text[:keep], CONTENT: ""}, False
        content = text[at + len(self.end):].lstrip()
        cut = stop_cut(content, self.stops)
        if cut is not None:
            return {REASONING: text[:at], CONTENT: content[:cut]}, True
        if not final:
            content = content[:len(content) - _held(content, self.stops)]
        return {REASONING: text[:at], CONTENT: content}, False

    def _emit(self, final: bool) -> list[tuple[str, str]]:
        parts, self.stopped = self.fields(final)
        out = []
        for name, part in parts.items():
            if len(part) > self.sent[name]:
                out.append((name, part[self.sent[name]:]))
                self.sent[name] = len(part)
        return out

    def feed(self, role: str, delta: str) -> list[tuple[str, str]]:
        """One listener item; ("rerouted", text) goes to rewind()."""
        if self.stopped:
            return []
        if role == REROUTED:
            raise ValueError("use rewind() for a rerouted item")
        self.text += delta
        return self._emit(final=False)

    def flush(self) -> list[tuple[str, str]]:
        return [] if self.stopped else self._emit(final=True)

    def rewind(self, void: str) -> list[tuple[str, str]]:
        """The last len(void) characters fed are void (the small server failed mid-turn).
        Returns, per field, the part of them the client was already sent."""
        if self.stopped or not void or not self.text.endswith(void):
            return []
        full, _ = self.fields(final=True)
        shown = {name: part[:self.sent[name]] for name, part in full.items()}
        self.text = self.text[:-len(void)]
        now, _ = self.fields(final=True)
        out = []
        for name in (REASONING, CONTENT):
            keep = 0
            while keep < min(len(shown[name]), len(now[name])) and shown[name][keep] == now[name][keep]:
                keep += 1
            if keep < len(shown[name]):
                out.append((name, shown[name][keep:]))
                self.sent[name] = keep
        return out


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

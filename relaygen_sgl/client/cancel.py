"""Requests that end when their caller goes.

A relay turn is a blocking read on a stream from SGLang. Its caller's cancel (a client
that went away, a deadline, a closed generator) used to be seen only when the next chunk
arrived, so a request queued or prefilling in SGLang, or sent to a stalled server, went
on until its first token or the read timeout. Here one watchdog thread per process looks
at the cancels of every request in flight and, when one is set, ends that request at
once: it shuts down the request's socket (the blocked read returns, and SGLang aborts a
request whose client disconnected) and asks the server to abort it by id
(`/abort_request`), which reaches a request still waiting in the scheduler's queue too.

The watchdog polls (every `POLL_S`) instead of hooking the events: a caller's cancel is a
plain `threading.Event`, which offers no callback. It runs only while requests are watched.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

POLL_S = 0.02  # how late a cancel may be seen: far below a decode step on any server


@dataclass(frozen=True)
class Stop:
    """What ends a request early: its caller's cancel event, and the run's deadline (a
    `time.monotonic()` value), past which no read waits."""

    event: threading.Event
    deadline: float | None = None

    def is_set(self) -> bool:
        return self.event.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def left(self) -> float | None:
        """Seconds to the deadline (0 when past it); None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class _Watched:
    __slots__ = ("stop", "fire", "sock", "fired")

    def __init__(self, stop: Stop, fire: Callable[[], None]) -> None:
        self.stop, self.fire, self.sock, self.fired = stop, fire, None, False


class Watch:
    """One watched request: `attach(sock)` once its socket is known (a stream's, after
    the response headers), so that a cancel also unblocks a read on it."""

    def __init__(self, entry: _Watched) -> None:
        self._entry = entry

    def attach(self, sock: socket.socket | None) -> None:
        self._entry.sock = sock
        if self._entry.fired:  # cancelled between the request's start and its headers
            _shutdown(sock)


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:  # shutdown, not close: a close does not wake a recv blocked in another thread
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """The process's one watcher of in-flight requests' cancels."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        self.poll_s = poll_s
        self._cv = threading.Condition()
        self._watched: dict[int, _Watched] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, stop: Stop, fire: Callable[[], None]) -> Iterator[Watch]:
        """While the block runs, a set `stop` shuts down the attached socket and calls
        `fire` (once, on a thread of its own: it may block on the network)."""
        entry = _Watched(stop, fire)
        key = next(self._ids)
        with self._cv:
            self._watched[key] = entry
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="relaygen-cancel", daemon=True)
                self._thread.start()
            self._cv.notify()
        try:
            yield Watch(entry)
        finally:
            with self._cv:
                self._watched.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._watched:
                    self._cv.wait()
                due = [e for e in self._watched.values() if not e.fired and e.stop.is_set()]
                for e in due:
                    e.fired = True
            for e in due:
                _shutdown(e.sock)
                threading.Thread(target=_quietly, args=(e.fire,), name="relaygen-abort", daemon=True).start()
            time.sleep(self.poll_s)


def _quietly(fire: Callable[[], None]) -> None:
    try:
        fire()
    except Exception:  # an abort is best effort: the closed connection aborts the request too
        pass


_lock = threading.Lock()
_watchdog: Watchdog | None = None


def watchdog() -> Watchdog:
    """The process's watchdog, made on first use (nothing runs at import)."""
    global _watchdog
    with _lock:
        if _watchdog is None:
            _watchdog = Watchdog()
        return _watchdog

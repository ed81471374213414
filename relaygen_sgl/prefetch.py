"""Handoff prefetch: while one role writes, the other server is sent the growing trajectory
as prefill-only requests, so at the handoff its radix cache already holds nearly all of
the prefix, and the small server's first prefill of the prompt overlaps the large model's
first turn.

Prefill-only (max_new_tokens 0) requests never change a token: they only put KV into the
receiving server's cache. One request per trajectory is in flight at a time; offers that
arrive meanwhile coalesce into the latest prefix, so the lag is about one prefill.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine import EngineClient
from .errors import RelayGenError


class Prefetcher:
    """Keeps one server warm with one trajectory's prefix."""

    def __init__(self, pool: ThreadPoolExecutor, engine: EngineClient, extra: dict[str, Any] | None,
                 base: Sequence[int]) -> None:
        self.pool, self.engine, self.extra, self.base = pool, engine, extra or None, base
        self._lock = threading.Lock()
        self._pending: list[int] | None = None
        self._busy = False
        self._sent = 0  # length of the longest prefix sent
        self.closed = False
        self.requests = 0

    def offer(self, turn_ids: Sequence[int]) -> None:
        """The turn's tokens so far (the prefix before the turn is `base`)."""
        with self._lock:
            if self.closed or len(self.base) + len(turn_ids) <= self._sent:
                return
            self._pending = list(turn_ids)
            if self._busy:
                return
            self._busy = True
        self.pool.submit(self._drain)

    def close(self) -> None:
        """The turn is over: nothing more is sent (a request in flight finishes on its own)."""
        with self._lock:
            self.closed = True
            self._pending = None

    def _drain(self) -> None:
        while True:
            with self._lock:
                turn, self._pending = self._pending, None
                if turn is None or self.closed:
                    self._busy = False
                    return
                ids = [*self.base, *turn]
                self._sent = len(ids)
            try:
                self.engine.generate(ids, {"max_new_tokens": 0}, extra=self.extra)
                self.requests += 1
            except RelayGenError:
                # A prefetch is only a hint: a failure here costs a colder handoff, and the
                # turn itself reports a server that is really gone.
                with self._lock:
                    self._busy = False
                return

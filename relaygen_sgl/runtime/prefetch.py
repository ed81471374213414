"""Handoff prefetch: while one role writes, the other server is sent the growing trajectory
as prefill-only requests, so at the handoff its radix cache already holds nearly all of
the prefix, and the small server's first prefill of the prompt overlaps the large model's
first turn.

Prefill-only (max_new_tokens 0) requests never change a token: they only put KV into the
receiving server's cache. One request per trajectory is in flight at a time, sent when a
token arrives; offers that arrive while it runs are dropped, not queued. A queued offer
went out the moment the last request ended, mid-way between two tokens, so the receiving
server was busy at nearly every instant, the handoff's included: on the CPU pair 9 of 10
handoffs waited 0.04-0.08 s behind a prefetch. Sent only as tokens arrive, a prefetch
started one token before the turn ends is the only one still running at the handoff. The
request's last chunk is never offered (`run_turn`): the handoff request follows it within a
millisecond, and a prefetch sent then ran ahead of it on the receiving server, doubling the
handoff's time at every token's spacing (0.085 -> 0.058 s median, per-token prefetch).
For the same reason nothing is sent at a token that the next one may turn into a cue.
A preset can space them out (`prefetch_every`): on the CPU pair a prefill pass costs the
receiver what a decode step costs the writer, and a prefetch at every token cost a whole
relay 4-5% of its speed; at every 2nd the handoffs were as fast and the relay lost about 1%
(README, "CPU compute patches").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.core.errors import RelayGenError


class Prefetcher:
    """Keeps one server warm with one trajectory's prefix."""

    def __init__(self, pool: ThreadPoolExecutor, engine: EngineClient, extra: dict[str, Any] | None,
                 base: Sequence[int], every: int = 1, prefix: bool = True) -> None:
        """`prefix`: send `base` now, so that (on the first turn) the small server's prefill of
        the prompt overlaps the large model's turn. Then every `every`th token of the turn."""
        self.pool, self.engine, self.extra, self.base = pool, engine, extra or None, base
        self.every = every
        self._lock = threading.Lock()
        self._busy = False
        self._sent = 0  # length of the longest prefix sent
        self.closed = False
        self.requests = 0
        if prefix:
            self.offer([])

    def offer(self, turn_ids: Sequence[int], cue_next: Callable[[], bool] = lambda: False) -> None:
        """The turn's tokens so far (the prefix before the turn is `base`): sent at every Nth
        token unless a prefetch is still running, the turn is over or the next token may
        complete a cue (`cue_next()`, asked last: it decodes). Then the handoff may come one
        token later, and it recomputes the cue's last token anyway (the +1): a prefetch now
        would only keep the receiving server busy when it comes."""
        if len(turn_ids) % self.every:
            return
        with self._lock:
            if self.closed or self._busy or len(self.base) + len(turn_ids) <= self._sent or cue_next():
                return
            self._busy = True
            ids = [*self.base, *turn_ids]
            self._sent = len(ids)
        self.pool.submit(self._send, ids)

    def close(self) -> None:
        """The turn is over: nothing more is sent (a request in flight finishes on its own)."""
        with self._lock:
            self.closed = True

    def _send(self, ids: list[int]) -> None:
        try:
            if not self.closed:
                self.engine.generate(ids, {"max_new_tokens": 0}, extra=self.extra)
                self.requests += 1
        except RelayGenError:
            pass  # only a hint: it costs a colder handoff; the turn reports a server that is gone
        finally:
            with self._lock:
                self._busy = False

"""Keep the pools: a trajectory starts only while the trajectories in flight fit every KV pool
it will use.

A relay trajectory lives in both servers' radix caches: the server writing it holds it
locked, the idle one holds its copy unlocked, where SGLang evicts it (LRU) as soon as another
request needs the room. Past a pool's size the next handoff then re-prefills the whole
trajectory (up to 275 tokens where the floor is 1, measured under a 2048-token pool), and
SGLang retracts running requests. So the runs of one process (batch, eval, serve, bench)
wait here, in arrival order, until the trajectories in flight and the new one fit each of
its servers' pools with `HEADROOM` to spare; a trajectory counts its prompt, the text that
closes thinking and its whole budget, the most it can become. One trajectory alone is always
admitted (`RelayBackend.fit` already refused one that cannot fit at all).

Other clients of the same servers are not counted: they are not this process's to plan.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, deque
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.core.errors import STOPPED, Cancelled

# The share of a pool that trajectories in flight may claim: the rest covers what SGLang
# itself keeps (a page per request, chunked prefill's next chunk, the retract margin).
HEADROOM = 0.9
WAIT_POLL_S = 0.1  # how often a waiting run looks at its cancel


class PoolGate:
    """Admission by KV tokens, per pool (a server, or one DP rank of it), first come first served."""

    def __init__(self, headroom: float = HEADROOM) -> None:
        self.headroom = headroom
        self._cv = threading.Condition()
        self._held: Counter[Hashable] = Counter()  # pool -> tokens claimed by trajectories in flight
        self._running: Counter[Hashable] = Counter()  # pool -> trajectories in flight
        self._queue: deque[int] = deque()  # tickets of the runs waiting, oldest first
        self._tickets = itertools.count()
        self.waited = 0  # runs that had to wait, since the start
        self.running = 0  # trajectories admitted and not over

    def snapshot(self) -> dict[str, Any]:
        with self._cv:
            return {"waiting": len(self._queue), "waited": self.waited,
                    "running": self.running, "tokens_held": sum(self._held.values())}

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fits(self, needs: Mapping[Hashable, tuple[int, int]]) -> bool:
        return all(self._running[url] == 0 or self._held[url] + tokens <= capacity * self.headroom
                   for url, (tokens, capacity) in needs.items())

    @contextmanager
    def hold(self, needs: Mapping[Hashable, tuple[int, int]], stop: Stop | None = None) -> Iterator[None]:
        """Run the block once `needs` (pool -> (tokens, its size)) fits beside what is in
        flight; a set `stop` while waiting raises Cancelled."""
        if not needs:
            yield
            return
        ticket = next(self._tickets)
        with self._cv:
            self._queue.append(ticket)
            if self._queue[0] != ticket or not self._fits(needs):
                self.waited += 1
            try:
                while self._queue[0] != ticket or not self._fits(needs):
                    if stop is not None and stop.is_set():
                        raise Cancelled(STOPPED)
                    self._cv.wait(WAIT_POLL_S)
            finally:
                self._queue.remove(ticket)
                self._cv.notify_all()
            for url, (tokens, _) in needs.items():
                self._held[url] += tokens
                self._running[url] += 1
            self.running += 1
        try:
            yield
        finally:
            with self._cv:
                for url, (tokens, _) in needs.items():
                    self._held[url] -= tokens
                    self._running[url] -= 1
                self.running -= 1
                self._cv.notify_all()

"""Keep the pools: a trajectory starts only while the trajectories in flight fit every KV pool
it will use.

A relay trajectory lives in both servers' radix caches: the server writing it holds it
locked, the idle one holds its copy unlocked, where SGLang evicts it (LRU) as soon as another
request needs the room. Past a pool's size the next handoff then re-prefills the whole
trajectory (up to 275 tokens where the floor is 1, measured under a 2048-token pool), and
SGLang retracts running requests. So the runs of one process (batch, eval, serve, bench)
wait here, in arrival order, until the trajectories in flight and the new one fit each of
its servers' pools with `HEADROOM` to spare. One trajectory alone is always admitted
(`RelayBackend.fit` already refused one that cannot fit at all).

What a trajectory claims is its prompt, once per pool however many trajectories share it
(the radix cache holds it once), and what it is expected to write: the tokens it holds past the
prompt, or more, the mean of what the trajectories that ended here wrote among those that
wrote at least as much (the empirical expectation given its length so far). Claiming the whole
budget from the start leaves the pools under-used, since most trajectories end before it: on
2048-token pools it cost 38% of the relay's tokens/s and evicted nothing either way
(docs/results.md, the pressure part). Until `MIN_SEEN` trajectories have ended, and for one
longer than any that ended, the claim is the whole budget. Every warm turn checks the
estimate: one that re-prefilled beyond the floor found its server's copy evicted (the signal
SGLang's retraction is for the writer) and raises a penalty that moves every claim toward the
whole budget; each warm turn that found its copy whole lowers it again.

Other clients of the same servers are not counted: they are not this process's to plan.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.core.errors import STOPPED, Cancelled

# The share of a pool that trajectories in flight may claim: the rest covers what SGLang
# itself keeps (a page per request, chunked prefill's next chunk, the retract margin).
HEADROOM = 0.9
SEEN = 64  # trajectories whose ends the estimate remembers, the latest
MIN_SEEN = 4  # ends before the estimate is trusted
# The penalty an evicted copy adds (a share of what the estimate leaves of the budget), and
# what each whole warm turn takes off: one eviction holds admission near whole budgets for
# about ten handoffs.
RAISE = 0.5
DECAY = 0.05
WAIT_POLL_S = 0.1  # how often a waiting run looks at its cancel and at the claims in flight


@dataclass(frozen=True)
class Claim:
    """One trajectory's hold on the pools it uses: `pools` maps each (a server, or one DP rank
    of it) to its size in tokens; `prompt` (its ids' key and length) is held once per pool by
    every trajectory that shares it; `whole` is the most the trajectory can become (prompt,
    closing text and budget); `now` reads the tokens it holds, as it grows."""

    pools: Mapping[Hashable, int]
    prompt: tuple[Hashable, int]
    whole: int
    now: Callable[[], int]

    @property
    def budget(self) -> int:
        """What the trajectory may write past its prompt."""
        return max(1, self.whole - self.prompt[1])

    def written(self) -> int:
        return min(self.budget, max(0, self.now() - self.prompt[1]))


class PoolGate:
    """Admission by KV tokens, per pool, first come first served."""

    def __init__(self, headroom: float = HEADROOM) -> None:
        self.headroom = headroom
        self.penalty = 0.0  # in [0, 1]: how far evictions push claims toward whole budgets
        self._seen: deque[float] = deque(maxlen=SEEN)  # share of its budget each ended trajectory wrote
        self._cv = threading.Condition()
        self._in_flight: dict[int, Claim] = {}  # ticket -> claim of a trajectory admitted and not over
        self._queue: deque[int] = deque()  # tickets of the runs waiting, oldest first
        self._tickets = itertools.count()
        self.waited = 0  # runs that had to wait, since the start
        self.evicted = 0  # warm turns that found their copy evicted, since the start

    def snapshot(self) -> dict[str, Any]:
        with self._cv:
            pools = {pool for c in self._in_flight.values() for pool in c.pools}
            return {"waiting": len(self._queue), "waited": self.waited, "running": len(self._in_flight),
                    "tokens_held": sum(self._claimed(pool) for pool in pools), "evicted": self.evicted,
                    "penalty": round(self.penalty, 3), "ended": len(self._seen)}

    @property
    def running(self) -> int:
        return len(self._in_flight)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def expected(self, claim: Claim) -> int:
        """The tokens the trajectory is expected to write, all told (see the module's docstring)."""
        written = claim.written()
        share = written / claim.budget
        longer = [x for x in self._seen if x >= share]
        if len(self._seen) < MIN_SEEN or not longer:
            return claim.budget
        guess = max(written, math.ceil(claim.budget * sum(longer) / len(longer)))
        return min(claim.budget, guess + math.ceil(self.penalty * (claim.budget - guess)))

    def _claimed(self, pool: Hashable, new: Claim | None = None) -> int:
        claims = [c for c in self._in_flight.values() if pool in c.pools] + ([new] if new else [])
        prompts = {c.prompt[0]: c.prompt[1] for c in claims}
        return sum(prompts.values()) + sum(self.expected(c) for c in claims)

    def observe(self, evicted: bool) -> None:
        """A warm turn's verdict: its server still held the trajectory's copy, or evicted it."""
        with self._cv:
            if evicted:
                self.evicted += 1
                self.penalty = min(1.0, self.penalty + RAISE)
            else:
                self.penalty = max(0.0, self.penalty - DECAY)
                self._cv.notify_all()

    def _fits(self, new: Claim) -> bool:
        return all(not any(pool in c.pools for c in self._in_flight.values())
                   or self._claimed(pool, new) <= size * self.headroom for pool, size in new.pools.items())

    @contextmanager
    def hold(self, claim: Claim, stop: Stop | None = None) -> Iterator[None]:
        """Run the block once `claim` fits beside the trajectories in flight; a set `stop`
        while waiting raises Cancelled. A block that ends without raising teaches the estimate
        what its trajectory wrote."""
        if not claim.pools:
            yield
            return
        ticket = next(self._tickets)
        with self._cv:
            self._queue.append(ticket)
            if self._queue[0] != ticket or not self._fits(claim):
                self.waited += 1
            try:
                # claims in flight grow, and the estimate moves, without a notify: the wait
                # re-reads them every WAIT_POLL_S
                while self._queue[0] != ticket or not self._fits(claim):
                    if stop is not None and stop.is_set():
                        raise Cancelled(STOPPED)
                    self._cv.wait(WAIT_POLL_S)
            finally:
                self._queue.remove(ticket)
                self._cv.notify_all()
            self._in_flight[ticket] = claim
        ended = False
        try:
            yield
            ended = True
        finally:
            with self._cv:
                del self._in_flight[ticket]
                if ended:
                    self._seen.append(claim.written() / claim.budget)
                self._cv.notify_all()

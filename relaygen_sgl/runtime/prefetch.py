"""Handoff prefetch: while one role writes, the other server is sent the growing trajectory
as prefill-only requests, so at the handoff its radix cache already holds nearly all of
the prefix, and the small server's first prefill of the prompt overlaps the large model's
first turn.

Prefill-only (max_new_tokens 0) requests never change a token: they only put KV into the
receiving server's cache. One request per trajectory is in flight at a time, sent when a
token arrives; offers that arrive while it runs are dropped, not queued: a queued offer goes
out the moment the last request ends, mid-way between two tokens, and keeps the receiving
server busy at nearly every instant, the handoff's included. Sent only as tokens arrive, a
prefetch started one token before the turn ends is the only one still running at the
handoff. The request's last chunk is never offered (`run_turn`): the handoff request follows
it within a millisecond, and a prefetch sent then would run ahead of it on the receiving
server. For the same reason nothing is sent at a token that the next one may turn into a
cue. A preset can space them out (`prefetch_every`): where a prefill pass costs the receiver
what a decode step costs the writer (the CPU presets), a prefetch at every token costs the
relay more than it saves. docs/results.md ("Measurements behind design choices") has the
numbers behind each of these.

Modes (`--prefetch auto|on|off`): `on` sends at the preset's spacing whatever the load;
`auto` decides at every offer from what this process knows then (PrefetchRule): how many
model turns of other trajectories run on the receiving server now (on both servers where
they share a device: the CPU presets, `share_device` presets), against the preset's
threshold, a lower one where the receiving server decodes speculatively. SGLang runs a
waiting prefill before the next decode step (managers/scheduler.py), so a prefetch to a
busy server pauses every request decoding there; to an idle one it costs nobody a step.
Auto has its own spacing (`prefetch_auto_every`; 0: only the prefix at a turn's start). A
prefetch finds a free worker or is dropped (counted in Prefetching.counts), never queued,
and is never retried: a worker backing off from a dead server is one fewer for every other
trajectory, and the turn that needs that server reports it.
The servers' own queues (SGLang's /v1/loads) are not asked: that call waits on the
scheduler's event loop, per handoff a cost of its own, and other clients' load is not seen.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.core.errors import ConfigError, RelayGenError
from relaygen_sgl.core.run_settings import DEFAULT_PREFETCH, PREFETCH_MODES

DEFAULT_WORKERS = 64  # prefetches in flight at once, all trajectories together (one per trajectory at most)

Server = tuple[str, int | None]  # (URL, DP rank the trajectory is pinned to): one queue of requests


@dataclass(frozen=True)
class PrefetchRule:
    """A preset's prefetch data (presets.toml says how each value was chosen)."""

    every: int = 1  # tokens between prefetches (on; auto too unless auto_every says otherwise)
    auto_every: int | None = None  # auto's spacing; 0: only the prefix at a turn's start
    max_load: int = 0  # auto sends while at most this many other turns run on the counted server(s); -1: never
    max_load_speculative: int = -1  # the same where the receiving server decodes speculatively
    shared_device: bool = False  # both servers on one device: turns on both count

    @classmethod
    def of(cls, preset: Any) -> PrefetchRule:
        if preset is None:
            return cls()
        return cls(every=preset.prefetch_every, auto_every=preset.prefetch_auto_every,
                   max_load=preset.prefetch_max_load, max_load_speculative=preset.prefetch_max_load_speculative,
                   shared_device=preset.device == "cpu" or bool(getattr(preset, "share_device", False)))

    def spacing(self, mode: str) -> int:
        return self.every if mode == "on" or self.auto_every is None else self.auto_every


class ServerLoad:
    """Model turns running now per server, over every trajectory of one backend."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n: Counter[Server] = Counter()

    @contextmanager
    def turn(self, server: Server) -> Iterator[None]:
        with self._lock:
            self._n[server] += 1
        try:
            yield
        finally:
            with self._lock:
                self._n[server] -= 1

    def __getitem__(self, server: Server) -> int:
        return self._n[server]


class Prefetching:
    """The backend's prefetch side: the rule, the load it reads, the workers, the counts."""

    def __init__(self, rule: PrefetchRule | None = None, default: str = DEFAULT_PREFETCH,
                 speculative: Iterable[str] = (), workers: int = DEFAULT_WORKERS) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"prefetch workers must be a positive integer, got {workers!r}")
        if default not in PREFETCH_MODES:
            raise ConfigError(f"prefetch must be one of {', '.join(PREFETCH_MODES)}, got {default!r}")
        self.rule = rule or PrefetchRule()
        self.default = default  # the mode of a run that sets none (RunSettings.prefetch None)
        self.speculative = frozenset(speculative)  # URLs of servers that decode speculatively
        self.load = ServerLoad()
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relaygen-prefetch")
        self._free = threading.BoundedSemaphore(workers)
        # sent: requests that completed; declined: offers auto turned down for load;
        # no_worker: offers dropped because every worker was busy; failed: requests that failed;
        # in_flight_at_turn_end: turns that ended while their prefetch still ran
        self._counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def count(self, what: str) -> None:
        with self._count_lock:
            self._counts[what] += 1

    def snapshot(self) -> Counter[str]:
        """The counts now (workers may be adding to them)."""
        with self._count_lock:
            return Counter(self._counts)

    def start(self, mode: str, engine: EngineClient, extra: dict[str, Any] | None, base: Sequence[int], *,
              prefix: bool, receiver: Server, sender: Server) -> Prefetcher | None:
        """A Prefetcher for one turn (None where nothing would be sent). `receiver`: the server
        it warms; `sender`: the one the turn runs on (its load already counts the turn)."""
        if mode == "off":
            return None
        every = self.rule.spacing(mode)
        if every == 0 and not prefix:
            return None
        gate = None if mode == "on" else (lambda: self.allows(receiver, sender))
        return Prefetcher(self.submit, engine, extra, base, every, prefix, gate, self.count)

    def allows(self, receiver: Server, sender: Server) -> bool:
        """Auto's decision: the other turns running where a prefetch would pause them, against
        the preset's threshold (the lower one for a speculative receiver)."""
        load = self.load[receiver]
        if self.rule.shared_device:
            load += max(0, self.load[sender] - 1)  # the turn asking runs on the sender
        limit = self.rule.max_load_speculative if receiver[0] in self.speculative else self.rule.max_load
        if load <= limit:
            return True
        self.count("declined")
        return False

    def submit(self, fn: Callable[[], None]) -> bool:
        """Run `fn` on a free worker; False (and counted) when none is free: never queued."""
        if not self._free.acquire(blocking=False):
            self.count("no_worker")
            return False

        def run() -> None:
            try:
                fn()
            finally:
                self._free.release()

        self._pool.submit(run)
        return True


class Prefetcher:
    """Keeps one server warm with one trajectory's prefix during one turn."""

    def __init__(self, submit: Callable[[Callable[[], None]], bool], engine: EngineClient,
                 extra: dict[str, Any] | None, base: Sequence[int], every: int = 1, prefix: bool = True,
                 gate: Callable[[], bool] | None = None, count: Callable[[str], None] | None = None) -> None:
        """`prefix`: send `base` now, so that (on the first turn) the small server's prefill of
        the prompt overlaps the large model's turn. Then every `every`th token of the turn (0:
        none). `gate` (auto): asked before each send. `submit` runs a send on a worker, or
        refuses (False)."""
        self.submit, self.engine, self.extra, self.base = submit, engine, extra or None, base
        self.every, self.gate = every, gate
        self.count = count or (lambda what: None)
        self._lock = threading.Lock()
        self._busy = False  # a send is submitted and not over
        self._running = False  # ... and its request has gone to the server
        self._sent = 0  # length of the longest prefix sent
        self.closed = False
        if prefix:
            self._offer([])

    def offer(self, turn_ids: Sequence[int], cue_next: Callable[[], bool] = lambda: False) -> None:
        """The turn's tokens so far (the prefix before the turn is `base`): sent at every Nth
        token unless a prefetch is still running, the turn is over, auto declines, or the next
        token may complete a cue (`cue_next()`, asked last: it decodes). Then the handoff may
        come one token later, and it recomputes the cue's last token anyway (the +1): a
        prefetch now would only keep the receiving server busy when it comes."""
        if not self.every or len(turn_ids) % self.every:
            return
        self._offer(turn_ids, cue_next)

    def _offer(self, turn_ids: Sequence[int], cue_next: Callable[[], bool] = lambda: False) -> None:
        with self._lock:
            if self.closed or self._busy or len(self.base) + len(turn_ids) <= self._sent:
                return
            if (self.gate is not None and not self.gate()) or cue_next():
                return
            self._busy = True
            ids = [*self.base, *turn_ids]
            before, self._sent = self._sent, len(ids)
        if not self.submit(lambda: self._send(ids)):
            with self._lock:
                self._busy, self._sent = False, before

    def close(self) -> None:
        """The turn is over: nothing more is sent (a request in flight finishes on its own, and
        is counted: the handoff that follows may wait behind it on the receiving server)."""
        with self._lock:
            self.closed = True
            if self._running:
                self.count("in_flight_at_turn_end")

    def _send(self, ids: list[int]) -> None:
        with self._lock:
            if self.closed:
                self._busy = False
                return
            self._running = True
        try:
            self.engine.generate(ids, {"max_new_tokens": 0}, extra=self.extra, retries=0)
            self.count("sent")
        except RelayGenError:  # only a hint: it costs a colder handoff; the turn reports a server that is gone
            self.count("failed")
        finally:
            with self._lock:
                self._busy = self._running = False

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
relay more than it saves. The spacing is kept by crossings, not by multiples: a stream chunk
may carry several tokens (EAGLE's accepted drafts; SGLang's stream_interval; chunks merged for
a client that reads late), so the first offer at or past each multiple of the spacing is the
one that may send. docs/results.md ("Measurements behind design choices") has the numbers
behind each of these.

At most MAX_IN_FLIGHT_PER_SERVER prefetches, of all trajectories together, are in flight to
one receiving server (URL and DP rank); an offer past that is dropped and counted, never
queued.

Modes (`--prefetch auto|on|off`): `on` sends at the preset's spacing whatever the load;
`auto` decides at every offer that may send (PrefetchRule): how many requests run on the
receiving server now (on both servers where they share a device: the CPU presets,
`share_device` presets), against the preset's threshold, a lower one where the receiving
server decodes speculatively. SGLang runs a waiting prefill before the next decode step
(managers/scheduler.py), so a prefetch to a busy server pauses every request decoding there;
to an idle one it costs nobody a step. The count is this process's model turns there, fresh,
plus other clients' requests as the server last reported them (ReportedLoad: SGLang's
/v1/loads, read in the background at most once a LOAD_TTL_S per server; a server without it
counts this process's turns only). Auto has its own spacing (`prefetch_auto_every`; 0: only
the prefix at a turn's start). A prefetch finds a free worker or is dropped (counted in
Prefetching.counts), never queued, and is never retried: a worker backing off from a dead
server is one fewer for every other trajectory, and the turn that needs that server reports it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.core.config import preset_default
from relaygen_sgl.core.errors import ConfigError, EngineRejected, RelayGenError
from relaygen_sgl.core.run_settings import DEFAULT_PREFETCH, PREFETCH_MODES

DEFAULT_WORKERS = 64  # prefetches in flight at once, all trajectories together (one per trajectory at most)
# Prefetches in flight to one receiving server (URL, DP rank), all trajectories together. SGLang
# takes every waiting prefill into the next extend pass (up to its chunked-prefill size), so the
# prefetches in flight to a server are one pause for every request decoding there; at the GPU
# presets' spacing (64) each brings ~64 uncached tokens, and 4 of them (~256 tokens) keep that
# pass as cheap as a decode step (bf16 passes stay memory-bound up to a few hundred tokens, see
# presets.toml). Each also carries the whole trajectory (up to ~36k ids) through the server's
# HTTP process. More than that in flight to one server lengthens every pause there and saves
# each handoff no more than one pass.
MAX_IN_FLIGHT_PER_SERVER = 4
# How long a server's reported load stands before it is asked again. SGLang republishes it at
# every prefill pass, when idle, and every 15th decode step (--load-snapshot-publish-interval),
# a fraction of a second on a GPU, so a reading a second old is about as fresh as asking at every offer,
# and one GET a second per server is nothing next to the prefetches it rules on.
LOAD_TTL_S = 1.0
LOADS_PATH = "/v1/loads?include=core"  # sglang/srt/entrypoints/v1_loads.py

Server = tuple[str, int | None]  # (URL, DP rank the trajectory is pinned to): one queue of requests


@dataclass(frozen=True)
class PrefetchRule:
    """A preset's prefetch data (presets.toml says how each value was chosen)."""

    # Defaults are the Preset fields' own (config.preset_default): a rule with no preset is the
    # default preset's.
    every: int = preset_default("prefetch_every")  # tokens between prefetches (on; auto too unless auto_every says)
    auto_every: int | None = preset_default("prefetch_auto_every")  # auto's spacing; 0: the turn-start prefix only
    # auto sends while at most this many other turns run on the counted server(s); -1: never
    max_load: int = preset_default("prefetch_max_load")
    max_load_speculative: int = preset_default("prefetch_max_load_speculative")  # where the receiver speculates
    shared_device: bool = False  # both servers on one device: turns on both count
    # Tokens before a turn's budget end at which the certain handoff that follows it is prefetched
    # (TurnSpec.hands_over_at_budget): the receiving server prefills the trajectory while the turn's
    # last tokens are written, and the handoff re-prefills about these many.
    closing_lead: int = preset_default("prefetch_closing_lead")

    @classmethod
    def of(cls, preset: Any) -> PrefetchRule:
        if preset is None:
            return cls()
        return cls(every=preset.prefetch_every, auto_every=preset.prefetch_auto_every,
                   max_load=preset.prefetch_max_load, max_load_speculative=preset.prefetch_max_load_speculative,
                   closing_lead=preset.prefetch_closing_lead,
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

    def on_url(self, url: str) -> int:
        """Turns on every DP rank of one server."""
        with self._lock:
            return sum(n for (u, _), n in self._n.items() if u == url)


def _os_thread_name(name: str) -> None:
    """Name the calling thread for the OS too (`ps -L`, /proc/PID/task/*/comm; 15 bytes): Python
    before 3.14 names its threads only for itself, so a process's prefetch workers, idle ones
    included, could not be told from its other threads from outside."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME (Linux)
    except (OSError, AttributeError, TypeError):
        pass


class ReportedLoad:
    """Other clients' requests per server, from what SGLang reports (/v1/loads: each DP rank's
    running and waiting requests, which the HTTP process reads from the scheduler's
    shared-memory snapshot (managers/tokenizer_control_mixin.py get_loads): the call does not
    wait on the scheduler). Read in the background, at most once a `ttl_s` per server
    and only when asked after that: the offer that asks never waits for it, and reads the last
    reading (none yet: 0, this process's own count alone). What this process runs there at the
    time of the reading (`ours`) is taken off: its own turns are counted fresh elsewhere. A
    server that lacks the endpoint (404: an older SGLang, a router; 400; another format) is not
    asked again; one that does not answer leaves no reading until it does."""

    def __init__(self, ours: Callable[[Server], int], ttl_s: float = LOAD_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ours, self.ttl_s, self.clock = ours, ttl_s, clock
        self._lock = threading.Lock()
        self._engines: dict[str, EngineClient] = {}
        self._others: dict[str, dict[int | None, int]] = {}  # URL -> DP rank (None: all) -> requests
        self._asked_at: dict[str, float] = {}  # URL -> when the last reading was asked for
        self._asking: set[str] = set()
        self.unreported: set[str] = set()  # URLs without the endpoint: never asked again

    def watch(self, engine: EngineClient) -> None:
        with self._lock:
            self._engines.setdefault(engine.url, engine)

    def others(self, server: Server) -> int:
        """Other clients' requests on `server` at the last reading; asks for a new one (in the
        background) when it is older than the TTL."""
        url, rank = server
        with self._lock:
            engine = self._engines.get(url)
            if engine is None or url in self.unreported:
                return 0
            fresh = self.clock() - self._asked_at.get(url, float("-inf")) < self.ttl_s
            if not fresh and url not in self._asking:
                self._asking.add(url)
                self._asked_at[url] = self.clock()
                # a thread of its own: a server that hangs holds no prefetch worker, and no exit
                threading.Thread(target=self._read, args=(engine,), name="relaygen-load", daemon=True).start()
            return self._others.get(url, {}).get(rank, 0)

    def _read(self, engine: EngineClient) -> None:
        url = engine.url
        others: dict[int | None, int] | None = None
        unreported = False
        try:
            reply = engine.get_json(LOADS_PATH)
        except EngineRejected as e:  # no such endpoint, or not the query it knows
            unreported = e.status in (400, 404)
        except Exception:  # no answer now (or a closed client): only a hint, no reading
            pass
        else:
            try:
                others = self._others_in(reply, url)
            except (TypeError, ValueError, KeyError, AttributeError):  # not SGLang's format
                unreported = True
        with self._lock:
            self._asking.discard(url)
            if unreported:
                self.unreported.add(url)
            if others is None:
                self._others.pop(url, None)
            else:
                self._others[url] = others

    def _others_in(self, reply: dict[str, Any], url: str) -> dict[int | None, int] | None:
        """{DP rank: requests there not of this process, None: on all ranks} from a /v1/loads
        reply; None where it holds no snapshot yet (a scheduler that has not published)."""
        loads = reply["loads"]
        if not loads:
            return None
        per_rank: dict[int | None, int] = {}
        total = 0
        for load in loads:
            n, rank = load["num_running_reqs"] + load["num_waiting_reqs"], load["dp_rank"]
            if any(isinstance(x, bool) or not isinstance(x, int) for x in (n, rank)):
                raise TypeError(f"not SGLang's load format: {load!r}")
            per_rank[rank] = max(0, n - self.ours((url, rank)))
            total += n
        per_rank[None] = max(0, total - self.ours((url, None)))
        return per_rank


class Prefetching:
    """The backend's prefetch side: the rule, the load it reads, the workers, the counts."""

    def __init__(self, rule: PrefetchRule | None = None, default: str = DEFAULT_PREFETCH,
                 speculative: Iterable[str] = (), workers: int = DEFAULT_WORKERS, *,
                 per_server: int = MAX_IN_FLIGHT_PER_SERVER, load_ttl_s: float = LOAD_TTL_S) -> None:
        for name, n in (("workers", workers), ("in flight per server", per_server)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"prefetch {name} must be a positive integer, got {n!r}")
        if default not in PREFETCH_MODES:
            raise ConfigError(f"prefetch must be one of {', '.join(PREFETCH_MODES)}, got {default!r}")
        self.rule = rule or PrefetchRule()
        self.default = default  # the mode of a run that sets none (RunSettings.prefetch None)
        self.speculative = frozenset(speculative)  # URLs of servers that decode speculatively
        self.load = ServerLoad()
        self.workers = workers
        self.per_server = per_server
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relaygen-prefetch",
                                        initializer=_os_thread_name, initargs=("relaygen-prefetch",))
        self._free = threading.BoundedSemaphore(workers)
        self._in_flight: Counter[Server] = Counter()  # submitted and not over, per receiving server
        self._flight_lock = threading.Lock()
        self.reported = ReportedLoad(self._ours, load_ttl_s)
        # sent: requests that completed; declined: offers auto turned down for load;
        # no_worker: offers dropped because every worker was busy; server_full: offers dropped
        # because per_server prefetches were in flight to their server; failed: requests that
        # failed; in_flight_at_turn_end: turns that ended while their prefetch still ran
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
              prefix: bool, receiver: Server, sender: Server, stop: Stop | None = None,
              closing_at: int | None = None) -> Prefetcher | None:
        """A Prefetcher for one turn (None where nothing would be sent). `receiver`: the server
        it warms (`engine`); `sender`: the one the turn runs on (its load already counts the turn);
        `stop`: the run's, which ends a prefetch in flight with the run. `closing_at`: the turn's
        length at which its handoff is certain to come the rule's closing_lead tokens later (Prefetcher)."""
        if mode == "off":
            return None
        every = self.rule.spacing(mode)
        if every == 0 and not prefix and closing_at is None:
            return None
        if mode == "auto":
            self.reported.watch(engine)
        gate = (lambda: self.allows(receiver, sender)) if mode == "auto" else None
        return Prefetcher(lambda fn: self.submit(fn, receiver), engine, extra, base, every, prefix, gate, self.count,
                          stop, closing_at)

    def load_on(self, server: Server) -> int:
        """Requests running on `server` now: this process's turns, and other clients' as the
        server last reported them."""
        return self.load[server] + self.reported.others(server)

    def allows(self, receiver: Server, sender: Server) -> bool:
        """Auto's decision: the other requests running where a prefetch would pause them,
        against the preset's threshold (the lower one for a speculative receiver)."""
        load = self.load_on(receiver)
        if self.rule.shared_device:
            load += max(0, self.load_on(sender) - 1)  # the turn asking runs on the sender
        limit = self.rule.max_load_speculative if receiver[0] in self.speculative else self.rule.max_load
        if load <= limit:
            return True
        self.count("declined")
        return False

    def _ours(self, server: Server) -> int:
        """This process's requests on `server` now: its turns and its prefetches (a reading
        counts them too). For a server without its DP rank (None), those on every rank."""
        url, rank = server
        with self._flight_lock:
            flying = sum(n for (u, r), n in self._in_flight.items() if u == url and (rank is None or r == rank))
        return flying + (self.load.on_url(url) if rank is None else self.load[server])

    def submit(self, fn: Callable[[], None], server: Server | None = None) -> bool:
        """Run `fn` on a free worker; False (and counted) when none is free, or when `server`
        (the receiver) already has `per_server` prefetches in flight: never queued."""
        if server is not None:
            with self._flight_lock:
                if self._in_flight[server] >= self.per_server:
                    full = True
                else:
                    full = False
                    self._in_flight[server] += 1
            if full:
                self.count("server_full")
                return False
        if not self._free.acquire(blocking=False):
            self._land(server)
            self.count("no_worker")
            return False

        def run() -> None:
            try:
                fn()
            finally:
                self._free.release()
                self._land(server)

        self._pool.submit(run)
        return True

    def _land(self, server: Server | None) -> None:
        if server is None:
            return
        with self._flight_lock:
            self._in_flight[server] -= 1
            if not self._in_flight[server]:
                del self._in_flight[server]


class Prefetcher:
    """Keeps one server warm with one trajectory's prefix during one turn."""

    def __init__(self, submit: Callable[[Callable[[], None]], bool], engine: EngineClient,
                 extra: dict[str, Any] | None, base: Sequence[int], every: int = 1, prefix: bool = True,
                 gate: Callable[[], bool] | None = None, count: Callable[[str], None] | None = None,
                 stop: Stop | None = None, closing_at: int | None = None) -> None:
        """`prefix`: send `base` now, so that (on the first turn) the small server's prefill of
        the prompt overlaps the large model's turn. Then at each multiple of `every` tokens of
        the turn (0: none). `gate` (auto): asked before each send. `submit` runs a send on a
        worker, or refuses (False). `stop`: the run's (a send in flight ends with the run).
        `closing_at`: the turn's length from which one send goes out ungated: the handoff that
        follows the turn's budget is certain, so its prefill is work the receiving server must do
        anyway, done here while it may be idle (counted as "closing")."""
        self.submit, self.engine, self.extra, self.base = submit, engine, extra or None, base
        self.stop = stop
        self.every, self.gate = every, gate
        self.count = count or (lambda what: None)
        self._lock = threading.Lock()
        self._busy = False  # a send is submitted and not over
        self._running = False  # ... and its request has gone to the server
        self._sent = 0  # length of the longest prefix sent
        self._due = every  # the turn's length at which the next offer may send
        self.closing_at = closing_at
        self.closed = False
        if prefix:
            self._offer([])

    def offer(self, turn_ids: Sequence[int], cue_next: Callable[[], bool] = lambda: False) -> None:
        """The turn's tokens so far (the prefix before the turn is `base`). The first offer at
        or past each multiple of `every` (a chunk may bring several tokens) may send, once:
        unless a prefetch is still running, the turn is over, auto declines, no worker or
        room at the server is free, or the next token may complete a cue (`cue_next()`, asked
        last: it decodes). Then the handoff may come one token later, and it recomputes the
        cue's last token anyway (the +1): a prefetch now would only keep the receiving server
        busy when it comes. Whichever way it goes, the next chance is the next multiple. From
        `closing_at` on, each offer tries the closing send until one goes out."""
        if self.closing_at is not None and len(turn_ids) >= self.closing_at:
            if self._offer(turn_ids, closing=True):
                self.closing_at = None
                self.count("closing")
            return
        if not self.every or len(turn_ids) < self._due:
            return
        self._due = (len(turn_ids) // self.every + 1) * self.every
        self._offer(turn_ids, cue_next)

    def _offer(self, turn_ids: Sequence[int], cue_next: Callable[[], bool] = lambda: False,
               closing: bool = False) -> bool:
        """Submit a send of the prefix through `turn_ids`; whether it went out."""
        with self._lock:
            if self.closed or self._busy or len(self.base) + len(turn_ids) <= self._sent:
                return False
            if not closing and ((self.gate is not None and not self.gate()) or cue_next()):
                return False
            self._busy = True
            ids = [*self.base, *turn_ids]
            before, self._sent = self._sent, len(ids)
        if not self.submit(lambda: self._send(ids)):
            with self._lock:
                self._busy, self._sent = False, before
            return False
        return True

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
            self.engine.generate(ids, {"max_new_tokens": 0}, extra=self.extra, retries=0, stop=self.stop)
            self.count("sent")
        except RelayGenError:  # only a hint: it costs a colder handoff; the turn reports a server that is gone
            self.count("failed")
        finally:
            with self._lock:
                self._busy = self._running = False

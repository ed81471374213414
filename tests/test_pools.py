"""Keep the pools (runtime/pools.py): trajectories start while those in flight fit every KV
pool they use, in arrival order; the rest wait, counted, and a cancel ends a wait."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from doubles import QUESTION, SMALL
from test_relay_double import THINK, setup

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.core.errors import Cancelled
from relaygen_sgl.runtime.pools import DECAY, RAISE, Claim, PoolGate


def _claim(whole: int, now: int | list[int] = 0, pools=("large", "small"), size: int = 100,
           prompt: tuple = (None, 0)) -> Claim:
    cell = now if isinstance(now, list) else [now]
    key = prompt[0] if prompt[0] is not None else object()  # a prompt of its own unless given
    return Claim({p: size for p in pools}, (key, prompt[1]), whole, lambda: cell[0])


def _ended(gate: PoolGate, *shares: float, budget: int = 100) -> None:
    for share in shares:  # trajectories that ran and ended having written `share` of their budget
        with gate.hold(_claim(budget, round(share * budget), size=10**6)):
            pass


def test_before_any_trajectory_ended_each_claims_its_whole_size():
    gate = PoolGate(headroom=1.0)
    lock = threading.Lock()
    held, peak, order = [0], [0], []

    def run(i: int) -> None:
        with gate.hold(_claim(30, 30)):  # each writes its whole budget
            with lock:
                held[0] += 30
                peak[0] = max(peak[0], held[0])
                order.append(i)
            time.sleep(0.05)
            with lock:
                held[0] -= 30

    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(0.005)  # arrival order
    for t in threads:
        t.join(10)
    assert peak[0] == 90  # three of 30 fit a pool of 100, a fourth does not
    assert order == list(range(8))  # first come, first served
    assert gate.waited >= 5 and gate.snapshot()["running"] == 0


def test_a_claim_expects_what_the_trajectories_that_ended_wrote_given_its_length_so_far():
    gate = PoolGate()
    _ended(gate, 0.2, 0.4)
    assert gate.expected(_claim(100, 10)) == 100  # too few ended to trust
    _ended(gate, 0.6, 0.8)
    assert gate.expected(_claim(110, 0, prompt=("p", 10))) == 50  # the mean of all four
    assert gate.expected(_claim(110, 55, prompt=("p", 10))) == 70  # at 45 written: the mean of 0.6 and 0.8
    assert gate.expected(_claim(110, 100, prompt=("p", 10))) == 100  # longer than any that ended: the whole
    gate.penalty = 0.5
    assert gate.expected(_claim(110, 0, prompt=("p", 10))) == 75  # halfway from 50 to the whole


def test_a_shared_prompt_is_claimed_once_per_pool():
    gate = PoolGate(headroom=1.0)
    _ended(gate, 0.1, 0.1, 0.1, 0.1)  # each writes 10 of 100
    with gate.hold(_claim(160, 60, prompt=("q", 60))):
        assert gate._fits(_claim(160, 60, prompt=("q", 60)))  # checked before holding: a hold would wait
        with gate.hold(_claim(160, 60, prompt=("q", 60))):
            # 60 + 2 x 10 held; a third on the same prompt claims 10 more, one on its own prompt 70
            assert gate._fits(_claim(160, 60, prompt=("q", 60)))
            assert not gate._fits(_claim(160, 60, prompt=("r", 60)))


def test_claims_are_re_read_as_trajectories_grow():
    gate = PoolGate(headroom=1.0)
    _ended(gate, 0.1, 0.1, 0.1, 0.1)
    sizes = [[10], [10], [10]]
    with gate.hold(_claim(100, sizes[0])), gate.hold(_claim(100, sizes[1])), gate.hold(_claim(100, sizes[2])):
        with gate.hold(_claim(100, 10)):  # 40 of 100: admitted at once where whole budgets (400) are not
            pass
        assert gate.waited == 0
        for s in sizes:
            s[0] = 30  # grown past what any that ended wrote: each claims its whole 100 now
        admitted = threading.Event()

        def late() -> None:
            with gate.hold(_claim(100, 10)):
                admitted.set()

        t = threading.Thread(target=late)
        t.start()
        assert not admitted.wait(0.4) and gate.waiting == 1
        for s in sizes:
            s[0] = 10  # (a real one only shrinks by ending; any change is re-read)
        assert admitted.wait(2.0)
        t.join(2)
    assert gate.waited == 1


def test_an_eviction_raises_the_penalty_and_whole_warm_turns_lower_it():
    gate = PoolGate()
    gate.observe(evicted=True)
    assert gate.penalty == RAISE and gate.evicted == 1
    gate.observe(evicted=True)
    gate.observe(evicted=True)
    assert gate.penalty == 1.0 and gate.snapshot()["evicted"] == 3
    for _ in range(100):
        gate.observe(evicted=False)
    assert gate.penalty == 0.0


def test_one_trajectory_alone_always_starts_and_a_cancel_ends_a_wait():
    gate = PoolGate()
    with gate.hold(_claim(500, 500, pools=("large",))):  # bigger than the pool: alone, it runs (fit refuses it
        stop = Stop(threading.Event())  # earlier)
        threading.Timer(0.2, stop.event.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            with gate.hold(_claim(10, pools=("large",)), stop):
                pass
        assert time.monotonic() - t0 < 1.0
        assert gate.waiting == 0
    assert gate.snapshot()["ended"] == 1  # the cancelled wait taught the estimate nothing


def _small_pools(fake, relay, kv_tokens: int) -> None:
    for h in fake.hosts.values():
        h.kv_tokens = kv_tokens
        h.chunk_delay_s = 0.002
    for engine in relay.backend.engines.values():
        engine.__dict__.pop("limits", None)  # read again: the pools were set after the relay was made


def _concurrently(relay, n: int, **settings) -> tuple[list, int]:
    """n relays at once; their results and the most the gate let run at once."""
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], relay.backend.pools.snapshot()["running"])
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    results = []
    threads = [threading.Thread(target=lambda: results.append(relay.run(QUESTION, **settings))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    w.join()
    return results, peak[0]


def test_concurrent_relays_on_small_pools_wait_their_turn(fake):
    relay, p_ids, _ = setup(fake, THINK, family="qwen3")
    _small_pools(fake, relay, 400)
    whole = relay.backend.whole_size(relay.plan("relay", max_tokens=100), len(p_ids))
    assert 1 <= int(400 * 0.9) // whole < 8  # whole sizes: a few at once
    results, peak = _concurrently(relay, 8, max_tokens=100)
    assert len(results) == 8 and all(r.answer for r in results)
    gate = relay.backend.pools
    # the 8 share one prompt and write about THINK's length: once the first ended, more run at once than
    # whole sizes fit, never all 8 at first
    assert int(400 * 0.9) // whole < peak < 8 and gate.waited >= 1
    assert gate.evicted == 0 and gate.penalty == 0.0 and gate.snapshot()["ended"] == 8


def test_an_evicted_copy_raises_the_penalty(fake):
    relay, p_ids, _ = setup(fake, THINK, family="qwen3")

    class Forgets(list):  # the small server keeps nothing: every warm turn there re-prefills it all
        def append(self, item) -> None:
            pass

    fake.hosts[httpx.URL(SMALL).netloc.decode()].cache = Forgets()
    res = relay.run(QUESTION, max_tokens=100)
    assert [s.role for s in res.segments].count("small") >= 2  # a warm turn on the small server
    gate = relay.backend.pools
    assert gate.evicted >= 1 and gate.penalty >= RAISE - DECAY * 4


def test_a_turn_in_progress_counts_as_it_streams(fake):
    # single-large writes the whole run in one turn: its claim must grow with the stream, not
    # stay at the prompt until the turn ends
    relay, p_ids, _ = setup(fake, THINK, family="qwen3")
    _small_pools(fake, relay, 4000)
    for h in fake.hosts.values():
        h.chunk_delay_s = 0.02
    gate = relay.backend.pools
    seen: list[int] = []  # the tokens the trajectory's claim reads it holds
    t = threading.Thread(target=lambda: relay.run(QUESTION, method="single-large", max_tokens=100))
    t.start()
    while t.is_alive():
        with gate._cv:
            seen.extend(c.now() for c in gate._in_flight.values())
        time.sleep(0.01)
    # token by token, not turn by turn (a turn's end alone would give 2 or 3 sizes)
    assert seen and min(seen) <= len(p_ids) + 8 and len(set(seen)) >= 10

"""Keep the pools (runtime/pools.py): trajectories start while those in flight fit every KV
pool they use, in arrival order; the rest wait, counted, and a cancel ends a wait."""

from __future__ import annotations

import threading
import time

import pytest
from doubles import QUESTION
from test_relay_double import THINK, setup

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.core.errors import Cancelled
from relaygen_sgl.runtime.pools import PoolGate


def test_trajectories_in_flight_never_claim_more_than_the_pool():
    gate = PoolGate(headroom=1.0)
    lock = threading.Lock()
    held, peak, order = [0], [0], []

    def run(i: int) -> None:
        with gate.hold({"large": (30, 100), "small": (30, 100)}):
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


def test_one_trajectory_alone_always_starts_and_a_cancel_ends_a_wait():
    gate = PoolGate()
    with gate.hold({"large": (500, 100)}):  # bigger than the pool: alone, it runs (fit refuses it earlier)
        stop = Stop(threading.Event())
        threading.Timer(0.2, stop.event.set).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            with gate.hold({"large": (10, 100)}, stop):
                pass
        assert time.monotonic() - t0 < 1.0
        assert gate.waiting == 0


def test_concurrent_relays_on_small_pools_wait_their_turn(fake):
    relay, p_ids, _ = setup(fake, THINK, family="qwen3")
    for h in fake.hosts.values():
        h.kv_tokens = 400
        h.chunk_delay_s = 0.002
    for engine in relay.backend.engines.values():
        engine.__dict__.pop("limits", None)  # read again: the pools were set after the relay was made
    size = len(p_ids) + 100 + 12  # prompt + budget + a closing text's tokens, about
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], relay.backend.pools.snapshot()["running"])
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    results = []
    threads = [threading.Thread(target=lambda: results.append(relay.run(QUESTION, max_tokens=100)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    w.join()
    assert len(results) == 8 and all(r.answer for r in results)
    per_pool = int(400 * 0.9) // size
    assert 1 <= per_pool < 8
    assert 1 <= peak[0] <= per_pool
    assert relay.backend.pools.waited >= 8 - per_pool

"""The handoff prefetch's timing rules, on a stand-in engine that records each request."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from relaygen_sgl.core.errors import EngineUnreachable
from relaygen_sgl.runtime.prefetch import Prefetcher


class Engine:
    def __init__(self) -> None:
        self.sent: list[list[int]] = []
        self.release = threading.Event()
        self.fail = False

    def generate(self, ids, sampling, extra=None):
        assert sampling == {"max_new_tokens": 0}
        self.sent.append(list(ids))
        self.release.wait(5)
        if self.fail:
            raise EngineUnreachable("gone", url="http://small.test:2")


def settle(pool: ThreadPoolExecutor) -> None:
    pool.submit(lambda: None).result(5)


def test_offers_while_one_runs_are_dropped_not_queued():
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    pf = Prefetcher(pool, eng, None, [1, 2], prefix=False)
    pf.offer([3])
    pf.offer([3, 4])  # arrives while [1, 2, 3] runs
    pf.offer([3, 4, 5])
    eng.release.set()
    settle(pool)
    # nothing went out when the first ended: a queued offer would start mid-way between tokens
    assert eng.sent == [[1, 2, 3]]
    pf.offer([3, 4, 5, 6])  # the next token after it ended
    settle(pool)
    assert eng.sent == [[1, 2, 3], [1, 2, 3, 4, 5, 6]] and pf.requests == 2
    pf.offer([3, 4])  # a shorter prefix than one already sent is not sent again
    settle(pool)
    assert len(eng.sent) == 2


def test_nothing_is_sent_after_close_and_a_failure_is_only_a_colder_handoff():
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    eng.fail = True
    eng.release.set()
    pf = Prefetcher(pool, eng, None, [1], prefix=False)
    pf.offer([2])
    settle(pool)
    pf.offer([2, 3])  # the failed one freed the slot
    settle(pool)
    assert eng.sent == [[1, 2], [1, 2, 3]] and pf.requests == 0
    pf.close()
    pf.offer([2, 3, 4])
    settle(pool)
    assert len(eng.sent) == 2


def test_the_prefix_at_once_then_every_nth_token():
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    eng.release.set()
    pf = Prefetcher(pool, eng, None, [1, 2], every=3)
    settle(pool)
    assert eng.sent == [[1, 2]]  # the prefix, before any token of the turn
    for n in range(1, 8):
        pf.offer(list(range(10, 10 + n)))
        settle(pool)
    assert eng.sent == [[1, 2], [1, 2, 10, 11, 12], [1, 2, 10, 11, 12, 13, 14, 15]]


def test_nothing_is_sent_where_the_next_token_may_complete_a_cue():
    # the handoff may come one token later and recomputes the cue's token anyway: the
    # receiving server should be idle then, not prefilling it
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    eng.release.set()
    pf = Prefetcher(pool, eng, None, [1], every=2, prefix=False)
    pf.offer([2, 3], cue_next=lambda: True)  # "... Therefore"
    settle(pool)
    pf.offer([2, 3, 4], cue_next=lambda: pytest.fail("asked off the spacing"))  # not an Nth token: not asked
    settle(pool)
    pf.offer([2, 3, 4, 5])
    settle(pool)
    assert eng.sent == [[1, 2, 3, 4, 5]]

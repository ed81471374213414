"""The handoff prefetch: its timing rules on a stand-in engine that records each request;
auto's load rule, the workers, and which runs prefetch at all on the SGLang doubles."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from doubles import LARGE, QUESTION, SMALL

from relaygen_sgl.core.errors import ConfigError, EngineUnreachable
from relaygen_sgl.core.run_settings import RunSettings
from relaygen_sgl.runtime.prefetch import LOADS_PATH, Prefetcher, Prefetching, PrefetchRule, ReportedLoad


class Engine:
    def __init__(self) -> None:
        self.sent: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()  # a request reached the server
        self.fail = False

    def generate(self, ids, sampling, extra=None, retries=None, stop=None):
        assert sampling == {"max_new_tokens": 0} and retries == 0
        self.sent.append(list(ids))
        self.entered.set()
        self.release.wait(5)
        if self.fail:
            raise EngineUnreachable("gone", url="http://small.test:2")


def settle(pool: ThreadPoolExecutor) -> None:
    pool.submit(lambda: None).result(5)


def until(done, timeout_s: float = 5.0) -> bool:
    """Wait (bounded) for background work: `done()` true, or False at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_offers_while_one_runs_are_dropped_not_queued():
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    pf = Prefetcher(pool.submit, eng, None, [1, 2], prefix=False)
    pf.offer([3])
    pf.offer([3, 4])  # arrives while [1, 2, 3] runs
    pf.offer([3, 4, 5])
    eng.release.set()
    settle(pool)
    # nothing went out when the first ended: a queued offer would start mid-way between tokens
    assert eng.sent == [[1, 2, 3]]
    pf.offer([3, 4, 5, 6])  # the next token after it ended
    settle(pool)
    assert eng.sent == [[1, 2, 3], [1, 2, 3, 4, 5, 6]]
    pf.offer([3, 4])  # a shorter prefix than one already sent is not sent again
    settle(pool)
    assert len(eng.sent) == 2


def test_nothing_is_sent_after_close_and_a_failure_is_only_a_colder_handoff():
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    eng.fail = True
    eng.release.set()
    pf = Prefetcher(pool.submit, eng, None, [1], prefix=False)
    pf.offer([2])
    settle(pool)
    pf.offer([2, 3])  # the failed one freed the slot
    settle(pool)
    assert eng.sent == [[1, 2], [1, 2, 3]]
    pf.close()
    pf.offer([2, 3, 4])
    settle(pool)
    assert len(eng.sent) == 2


def test_a_turn_that_ends_while_its_prefetch_runs_is_counted():
    counted: list[str] = []
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    pf = Prefetcher(pool.submit, eng, None, [1], prefix=False, count=counted.append)
    pf.offer([2])
    assert eng.entered.wait(5)
    pf.close()  # its request still runs on the server at the turn's end: the handoff may wait behind it
    eng.release.set()
    settle(pool)
    assert counted == ["in_flight_at_turn_end", "sent"]
    done = Prefetcher(pool.submit, eng, None, [1], prefix=False, count=counted.append)
    done.offer([5])
    settle(pool)
    done.close()  # its prefetch ended before the turn did
    gate = threading.Event()
    queued = Prefetcher(lambda fn: pool.submit(lambda: (gate.wait(5), fn())) is not None, eng, None, [1],
                        prefix=False, count=counted.append)
    queued.offer([6])
    queued.close()  # submitted, but the turn ended before it reached the server: it is never sent
    gate.set()
    settle(pool)
    assert counted == ["in_flight_at_turn_end", "sent", "sent"] and eng.sent[-1] == [1, 5]


def test_a_prefetch_to_a_dead_server_frees_its_worker_at_once_no_backoff():
    """A hint is not retried: the client's retries back off 2 + 4 + 8 s here, and a worker held
    through them is one fewer for every other trajectory."""
    import socket

    from relaygen_sgl.client.http import ClientConfig, EngineClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connection refused
    prefetching = Prefetching(PrefetchRule(), default="on", workers=1)
    with EngineClient(f"http://127.0.0.1:{port}", ClientConfig(retries=3, backoff_s=2.0)) as engine:
        t0 = time.monotonic()
        pf = prefetching.start("on", engine, None, [1, 2], prefix=True, receiver=("x", None), sender=("y", None))
        assert pf is not None
        deadline = time.monotonic() + 5
        while prefetching.snapshot()["failed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefetching.snapshot()["failed"] == 1 and time.monotonic() - t0 < 1.5
        pf.offer([3])  # the one worker is free again
        while prefetching.snapshot()["failed"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefetching.snapshot() == {"failed": 2}


def test_the_prefix_at_once_then_every_nth_token():
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    eng.release.set()
    pf = Prefetcher(pool.submit, eng, None, [1, 2], every=3)
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
    pf = Prefetcher(pool.submit, eng, None, [1], every=2, prefix=False)
    pf.offer([2, 3], cue_next=lambda: True)  # "... Therefore"
    settle(pool)
    pf.offer([2, 3, 4], cue_next=lambda: pytest.fail("asked off the spacing"))  # not an Nth token: not asked
    settle(pool)
    pf.offer([2, 3, 4, 5])
    settle(pool)
    assert eng.sent == [[1, 2, 3, 4, 5]]


def test_chunks_of_several_tokens_send_at_each_crossing_of_the_spacing():
    """EAGLE's accepted drafts, SGLang's stream_interval, chunks merged for a lagging client:
    a multiple of the spacing is seldom a chunk's end; the first offer past it sends."""
    eng, pool = Engine(), ThreadPoolExecutor(max_workers=1)
    eng.release.set()
    pf = Prefetcher(pool.submit, eng, None, [1], every=64, prefix=False)
    for n in range(3, 400, 3):
        pf.offer(list(range(n)))
        settle(pool)
    assert [len(ids) - 1 for ids in eng.sent] == [66, 129, 192, 258, 321, 384]


def test_with_three_token_stream_chunks_a_prefetch_goes_out_at_every_crossing_of_64(fake, tiny_tokenizer):
    """A turn streamed from the SGLang double in chunks of 3 tokens (stream_interval 3: the
    turn's lengths run 1, 4, 7, ...), spacing 64: one prefetch to the other server per multiple
    of 64 the turn passes, each carrying the turn as it stood at the first chunk past it."""
    from relaygen_sgl.client.http import ClientConfig, EngineClient
    from relaygen_sgl.client.tokenizer import load_tokenizer
    from relaygen_sgl.runtime.policy import TurnSpec
    from relaygen_sgl.runtime.turn import run_turn

    prompt = "Count with me."
    p_ids = fake.tok.encode(prompt)
    c_ids = (fake.tok.encode(" one two three four five six seven eight nine ten." * 40))[:420] + [fake.eos_id]
    large, small = fake.add_host(LARGE, p_ids + c_ids), fake.add_host(SMALL, p_ids + c_ids)
    large.chunk_tokens, large.chunk_delay_s = 3, 0.004  # a decode step: each prefetch ends before the next
    offered: list[int] = []
    config = ClientConfig(retries=0, backoff_s=0.0)
    prefetching = Prefetching(PrefetchRule(every=64))
    with EngineClient(LARGE, config, fake.transport) as writer, EngineClient(SMALL, config, fake.transport) as other:
        pf = prefetching.start("on", other, None, p_ids, prefix=False, receiver=(SMALL, None), sender=(LARGE, None))
        assert pf is not None

        def on_ids(ids, cue_next):
            offered.append(len(ids))
            pf.offer(ids, cue_next)

        seg = run_turn(writer, load_tokenizer(tiny_tokenizer), p_ids, prompt, TurnSpec(role="large", max_tokens=500),
                       on_ids=on_ids)
        until(lambda: prefetching.snapshot()["sent"] >= 6)  # the last may still run (timed out: fewer)
        pf.close()
    assert seg.finish == "eos" and offered[:3] == [1, 4, 7]
    crossings = [next(n for n in offered if n >= m) for m in range(64, offered[-1] + 1, 64)]
    assert crossings == [64, 130, 193, 256, 322, 385]
    assert [len(r["input_ids"]) - len(p_ids) for r in prefetches(small)] == crossings
    assert prefetching.snapshot()["sent"] == 6


def test_at_most_per_server_prefetches_are_in_flight_to_one_server_the_rest_dropped_and_counted():
    eng = Engine()
    pf = Prefetching(PrefetchRule(every=1), workers=8, per_server=2)
    small, large = ("http://small:2", None), ("http://large:1", None)
    on_small = [pf.start("on", eng, None, [k], prefix=True, receiver=small, sender=large) for k in (1, 2, 3)]
    assert eng.entered.wait(5)
    assert pf.snapshot() == {"server_full": 1}  # the third trajectory's prefix: two were in flight there
    # another server, or another DP rank of the same one, is a queue of its own
    pf.start("on", eng, None, [7], prefix=True, receiver=large, sender=small)
    pf.start("on", eng, None, [8], prefix=True, receiver=("http://small:2", 1), sender=large)
    assert pf.snapshot()["server_full"] == 1
    eng.release.set()
    assert until(lambda: pf.snapshot()["sent"] == 4)
    on_small[2].offer([4])  # room again: the dropped one's next offer goes out
    assert until(lambda: pf.snapshot()["sent"] == 5)
    assert sorted(map(tuple, eng.sent)) == [(1,), (2,), (3, 4), (7,), (8,)]
    assert pf.snapshot() == {"sent": 5, "server_full": 1}
    with pytest.raises(ConfigError, match="in flight per server must be a positive integer"):
        Prefetching(per_server=0)


# ---------------------------------------------------------------- auto's decision and the workers
def test_auto_declines_where_other_turns_run_on_the_receiver_and_on_speculative_servers():
    pf = Prefetching(PrefetchRule(every=1, max_load=1, max_load_speculative=0), speculative=["http://spec:1"])
    small, large, spec = ("http://small:2", None), ("http://large:1", None), ("http://spec:1", None)
    assert pf.allows(small, large)
    with pf.load.turn(small):
        assert pf.allows(small, large)  # one other turn there: at the threshold
        with pf.load.turn(small):
            assert not pf.allows(small, large)
        with pf.load.turn(large), pf.load.turn(large):
            assert pf.allows(small, large)  # the sender's load does not count on separate devices
    assert pf.allows(spec, small)
    with pf.load.turn(spec):
        assert not pf.allows(spec, small)  # a lower threshold for a speculative receiver
    assert pf.snapshot()["declined"] == 2
    # a DP rank is its own queue
    with pf.load.turn(("http://small:2", 0)), pf.load.turn(("http://small:2", 0)):
        assert pf.allows(("http://small:2", 1), large) and not pf.allows(("http://small:2", 0), large)


def test_on_a_shared_device_the_senders_other_turns_count_too():
    pf = Prefetching(PrefetchRule(every=1, max_load=0, shared_device=True))
    small, large = ("http://small:2", None), ("http://large:1", None)
    with pf.load.turn(large):  # the asking turn itself
        assert pf.allows(small, large)
        with pf.load.turn(large):  # another trajectory's turn on the sender's half of the device
            assert not pf.allows(small, large)
    assert not Prefetching(PrefetchRule(max_load=-1)).allows(small, large)  # -1: never


def test_the_spacing_per_mode_and_the_preset_data():
    from relaygen_sgl.core.config import Preset, load_preset

    rule = PrefetchRule(every=2, auto_every=0)
    assert rule.spacing("on") == 2 and rule.spacing("auto") == 0 and PrefetchRule(every=3).spacing("auto") == 3
    cpu = PrefetchRule.of(load_preset("cpu-tiny"))
    assert cpu == PrefetchRule(every=2, auto_every=0, max_load=0, max_load_speculative=-1, shared_device=True)
    gpu = PrefetchRule.of(load_preset("qwen3-32b-1.7b"))
    assert gpu == PrefetchRule(every=64, auto_every=None, max_load=0, max_load_speculative=-1, shared_device=False)
    # a rule without a preset holds the Preset fields' defaults: one default for each key
    preset_defaults = {f.name: f.default for f in dataclasses.fields(Preset) if f.name.startswith("prefetch_")}
    keys = ("every", "auto_every", "max_load", "max_load_speculative", "closing_lead")
    assert {f"prefetch_{k}": getattr(PrefetchRule(), k) for k in keys} == preset_defaults
    assert [getattr(PrefetchRule(), k) for k in keys] == [1, None, 0, -1, 16]
    assert PrefetchRule.of(None) == PrefetchRule()
    # the mode is its string throughout: a bool or another word is refused where settings are made
    for bad in ("sometimes", True, False):
        with pytest.raises(ConfigError, match="prefetch must be one of auto, on, off"):
            RunSettings(prefetch=bad)


# ---------------------------------------------------------------- other clients' load (SGLang's /v1/loads)
def loads_asked(host) -> int:
    return sum(1 for method, path in host.calls if (method, path) == ("GET", "/v1/loads"))


def test_auto_counts_other_clients_requests_as_the_server_reports_them(fake):
    from relaygen_sgl.client.http import ClientConfig, EngineClient

    host = fake.add_host(SMALL, [])
    host.loads = [{"num_running_reqs": 2, "num_waiting_reqs": 1}]  # another client's three requests
    pf = Prefetching(PrefetchRule(every=1, max_load=2), load_ttl_s=0.0)  # ttl 0: read again at each offer
    small, large = (SMALL, None), ("http://large.test:1", None)
    with EngineClient(SMALL, ClientConfig(retries=0, backoff_s=0.0), fake.transport) as engine:
        pf.start("on", engine, None, [1], prefix=False, receiver=small, sender=large)
        assert loads_asked(host) == 0  # on does not ask: it sends whatever the load
        pf.start("auto", engine, None, [1], prefix=False, receiver=small, sender=large)
        # no reading yet: this process's count alone (none), and a reading asked for meanwhile
        assert pf.allows(small, large)
        assert until(lambda: pf.allows(small, large) is False)  # 3 others > 2
        assert loads_asked(host) >= 1
        # what the server reports of this process's own turns is not counted twice
        host.loads = [{"num_running_reqs": 2, "num_waiting_reqs": 0}]
        with pf.load.turn(small), pf.load.turn(small):
            assert until(lambda: pf.reported.others(small) == 0)
            assert pf.load_on(small) == 2 and pf.allows(small, large)
        # one DP rank's requests do not count on another rank
        host.loads = [{"num_running_reqs": 0, "num_waiting_reqs": 0}, {"num_running_reqs": 5, "num_waiting_reqs": 0}]
        assert until(lambda: pf.reported.others((SMALL, 1)) == 5)
        assert pf.allows((SMALL, 0), large) and not pf.allows((SMALL, 1), large)
        assert pf.reported.others(small) == 5  # unpinned: every rank's
    assert pf.snapshot()["declined"] >= 2


def test_a_server_without_the_load_endpoint_is_asked_once_and_counts_this_process_only(fake):
    from relaygen_sgl.client.http import ClientConfig, EngineClient

    host = fake.add_host(SMALL, [])  # loads None: 404, as SGLang's router answers
    pf = Prefetching(PrefetchRule(every=1, max_load=0), load_ttl_s=0.0)
    small, large = (SMALL, None), ("http://large.test:1", None)
    with EngineClient(SMALL, ClientConfig(retries=0, backoff_s=0.0), fake.transport) as engine:
        pf.start("auto", engine, None, [1], prefix=True, receiver=small, sender=large)  # asks at once
        assert until(lambda: SMALL in pf.reported.unreported)
        for _ in range(5):
            assert pf.allows(small, large)
        with pf.load.turn(small):
            assert not pf.allows(small, large)  # the fallback: this process's turns
    assert loads_asked(host) == 1


class LoadsEngine:
    """A server's /v1/loads as a stub: each GET waits for `release`, then answers `reply` (or
    raises it)."""

    url = "http://small.test:2"

    def __init__(self, reply) -> None:
        self.reply, self.asked, self.release = reply, 0, threading.Event()

    def get_json(self, path):
        assert path == LOADS_PATH
        self.asked += 1
        self.release.wait(5)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def test_the_reported_load_is_read_in_the_background_at_most_once_a_ttl():
    now = [100.0]
    engine = LoadsEngine({"loads": [{"dp_rank": 0, "num_running_reqs": 4, "num_waiting_reqs": 0}]})
    reported = ReportedLoad(lambda server: 1, ttl_s=1.0, clock=lambda: now[0])  # this process: 1 there
    reported.watch(engine)
    server = (engine.url, None)
    t0 = time.monotonic()
    assert [reported.others(server) for _ in range(50)] == [0] * 50  # the offer never waits for the read
    assert time.monotonic() - t0 < 0.5 and until(lambda: engine.asked == 1)
    engine.release.set()
    assert until(lambda: reported.others(server) == 3)
    now[0] += 0.9
    assert reported.others(server) == 3 and engine.asked == 1  # within the TTL: not asked again
    now[0] += 0.2
    engine.reply = EngineUnreachable("gone", url=engine.url)
    reported.others(server)
    assert until(lambda: engine.asked == 2)
    assert until(lambda: reported.others(server) == 0)  # no answer: no reading, and asked again later
    assert engine.url not in reported.unreported
    now[0] += 1.1
    engine.reply = {"version": "something else"}  # not SGLang's format: not asked again
    reported.others(server)
    assert until(lambda: engine.url in reported.unreported) and engine.asked == 3
    now[0] += 5
    assert reported.others(server) == 0 and engine.asked == 3


def test_a_prefetch_finds_a_free_worker_or_is_dropped_and_counted_never_queued():
    eng = Engine()
    pf = Prefetching(PrefetchRule(every=1), workers=1)
    first = pf.start("on", eng, None, [1], prefix=True, receiver=("s", None), sender=("l", None))
    second = pf.start("on", eng, None, [9], prefix=True, receiver=("s", None), sender=("l", None))
    assert pf.snapshot()["no_worker"] == 1
    eng.release.set()
    pf.submit(lambda: None)  # waits for nothing: the worker is free again once the first ends
    for _ in range(100):
        if pf.snapshot()["sent"] == 1:
            break
        threading.Event().wait(0.02)
    second.offer([10])  # the dropped one left no trace: its next offer goes out
    for _ in range(100):
        if pf.snapshot()["sent"] == 2:
            break
        threading.Event().wait(0.02)
    assert eng.sent == [[1], [9, 10]] and first is not None and second is not None


# ---------------------------------------------------------------- on the SGLang doubles
THINK = ("First we add 2 and 3 to get 5. Therefore the sum is 5. Then we check it again. "
         "Thus, the answer is 5.</think>\n\nThe answer is 5.")


def relay_on(fake, prefetch, rule=None):
    from relaygen_sgl.api import Relay
    from relaygen_sgl.client.http import ClientConfig
    from relaygen_sgl.core.cues import CueProfile

    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    profile = CueProfile(name="t", models={}, cues=("Therefore", "now", "Thus,")).validate()
    relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, profile=profile, family="qwen3",
                  client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport, prefetch=prefetch)
    if rule is not None:
        relay.backend.prefetching.rule = rule
    prompt = relay.plan("relay").render(QUESTION)
    tape = relay.tokenizer.encode(prompt) + relay.tokenizer.encode(THINK * 6) + [fake.eos_id]
    for host in fake.hosts.values():
        host.tape = list(tape)
    return relay


def prefetches(host):
    return [r for r in host.requests if r["sampling_params"]["max_new_tokens"] == 0]


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_single_model_runs_send_no_prefetch(fake, mode):
    # the backend used to warm the other server for single-large too, which never uses it
    relay = relay_on(fake, "on", PrefetchRule(every=1))
    for h in fake.hosts.values():
        h.chunk_delay_s = 0.005
    for method in ("single-large", "single-small"):
        res = relay.run(QUESTION, method, max_tokens=60, prefetch=mode)
        assert res.stats.large_tokens + res.stats.small_tokens > 0
    assert [len(prefetches(h)) for h in fake.hosts.values()] == [0, 0]
    assert relay.backend.prefetching.snapshot()["sent"] == 0
    relay.run(QUESTION, "relay", max_tokens=60, prefetch=mode)  # the relay itself still does (but off)
    assert (sum(len(prefetches(h)) for h in fake.hosts.values()) > 0) == (mode != "off")


def test_auto_sends_nothing_to_a_server_running_more_turns_than_the_threshold(fake):
    """N trajectories' turns in flight on the small server, N above the rule's threshold: a
    relay's large turns send it no prefetch; with the threshold at N they do."""
    n = 3
    for threshold, expect_prefetch in ((n - 1, False), (n, True)):
        relay = relay_on(fake, "auto", PrefetchRule(every=1, max_load=threshold))
        small, large = fake.hosts["small.test:2"], fake.hosts["large.test:1"]
        small.chunk_delay_s, large.chunk_delay_s = 0.02, 0.002
        busy = ThreadPoolExecutor(max_workers=n)
        try:
            runs = [busy.submit(relay.run, QUESTION, "single-small", max_tokens=120) for _ in range(n)]
            for _ in range(500):
                if len(small.requests) >= n:  # the N turns are streaming on the small server
                    break
                threading.Event().wait(0.01)
            seen = len(small.requests)
            res = relay.run(QUESTION, "relay", max_tokens=40)
            during = small.requests[seen:]  # everything the relay sent the small server meanwhile
            assert not any(r.done() for r in runs), "the busy turns ended before the relay: make them longer"
        finally:
            busy.shutdown(wait=True)
        assert res.segments[0].role == "large" and res.segments[0].completion_tokens >= 5
        sent = [r for r in during if r["sampling_params"]["max_new_tokens"] == 0]
        # the closing send before the budget's certain handoff goes out whatever the load (below)
        closing = relay.backend.prefetching.snapshot()["closing"]
        assert bool(len(sent) - closing) == expect_prefetch, (threshold, len(sent), closing)
        if not expect_prefetch:
            assert relay.backend.prefetching.snapshot()["declined"] > 0
        relay.close()
        fake.hosts.clear()


def test_auto_at_batch_1_prefetches_as_on_does(fake):
    """Alone on the servers, auto sends what on sends (the GPU presets' case: one spacing)."""
    sent = {}
    for mode in ("on", "auto"):
        relay = relay_on(fake, mode, PrefetchRule(every=1, max_load=0))
        for h in fake.hosts.values():
            h.chunk_delay_s = 0.02  # a decode step: each prefetch ends before the next token
        res = relay.run(QUESTION, max_tokens=80)
        assert "small" in [s.role for s in res.segments]
        sent[mode] = {name: [len(r["input_ids"]) for r in prefetches(h)] for name, h in fake.hosts.items()}
        assert relay.backend.prefetching.snapshot()["declined"] == 0
        relay.close()
        fake.hosts.clear()
    # which tokens a prefetch covers depends on timing (an offer while one runs is dropped), so
    # the modes are compared by where they send and that auto declined nothing, not token by token
    assert sent["on"]["small.test:2"] and sent["auto"]["small.test:2"]
    assert {h for h, s in sent["auto"].items() if s} == {h for h, s in sent["on"].items() if s}


def test_the_cpu_presets_auto_sends_the_prompt_only(fake):
    relay = relay_on(fake, "auto")  # the preset's rule, the default mode (auto)
    assert relay.backend.prefetching.default == "auto" and relay.backend.prefetching.rule.auto_every == 0
    for h in fake.hosts.values():
        h.chunk_delay_s = 0.005
    res = relay.run(QUESTION, max_tokens=80)
    assert "small" in [s.role for s in res.segments]
    sent = [r["input_ids"] for r in prefetches(fake.hosts["small.test:2"])]
    # the prompt, and beyond it only the closing send before thinking's budget hands over (if it did)
    assert sent[0] == res.prompt_ids and len(sent) - 1 == relay.backend.prefetching.snapshot()["closing"] <= 1
    assert prefetches(fake.hosts["large.test:1"]) == []


def test_the_answer_turn_warms_nothing_no_turn_follows_it(fake):
    # thinking ends in an EOS: the program inserts "</think>" and the small model answers; the
    # large server, which lacks that text, is never asked again, so nothing is sent to it then
    relay = relay_on(fake, "on", PrefetchRule(every=1))
    prompt = relay.tokenizer.encode(relay.plan("relay").render(QUESTION))
    think = relay.tokenizer.encode("We add. Therefore the sum is 5. Now, check it. So 5")
    tape = prompt + think + [fake.eos_id] + relay.tokenizer.encode("\n</think>\n\nThe answer is 5.") + [fake.eos_id]
    for h in fake.hosts.values():
        h.tape = list(tape)
        h.chunk_delay_s = 0.005
    res = relay.run(QUESTION, max_tokens=200)
    assert [s.role for s in res.segments][-2:] == ["inserted", "small"]
    answer_at = len(res.prompt_ids) + sum(len(s.token_ids) for s in res.segments[:-1])
    large = fake.hosts["large.test:1"]
    assert not [r for r in prefetches(large) if len(r["input_ids"]) >= answer_at]
    assert prefetches(large)  # the hand-backs before it were warmed


def test_a_speculative_server_is_known_from_its_server_info(fake):
    relay = relay_on(fake, "auto")
    assert relay.backend.prefetching.speculative == frozenset()
    relay.close()
    fake.hosts.clear()
    fake.add_host(LARGE, []).speculative = {"speculative_algorithm": "EAGLE3", "speculative_eagle_topk": 1,
                                            "speculative_num_steps": 3, "speculative_num_draft_tokens": 4}
    fake.add_host(SMALL, [])
    from relaygen_sgl.api import Relay
    from relaygen_sgl.client.http import ClientConfig

    with Relay(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3", transport=fake.transport,
               client=ClientConfig(retries=0, backoff_s=0.0)) as r:
        assert r.backend.prefetching.speculative == frozenset({LARGE})


def _no_cues(fake, prefetch: str, closing_lead: int = 16):
    """A relay whose large turn never meets a cue (none in its profile), on auto's CPU rule: no
    spacing, no prefetch while the receiver runs anything (the CPU presets' prefetch_max_load 0)."""
    relay = relay_on(fake, prefetch, PrefetchRule(every=2, auto_every=0, max_load=0, closing_lead=closing_lead))
    prompt = relay.tokenizer.encode(relay.plan("relay").render(QUESTION))
    for host in fake.hosts.values():  # thinking that goes on past any budget here, without a cue
        host.tape = prompt + relay.tokenizer.encode("and then we add some more numbers " * 40) + [fake.eos_id]
        host.chunk_delay_s = 0.01  # the turn's last tokens take long enough for the send to go out
    return relay


@pytest.mark.parametrize("mode, lead", [("auto", 16), ("auto", 10), ("off", 16)])
def test_a_turn_whose_budget_end_hands_over_prefetches_once_before_it(fake, mode, lead):
    # thinking that runs to its budget is closed and the small model answers: that handoff is
    # certain, so the large turn warms the small server once, the preset's closing lead of tokens
    # before its end, whatever auto would say; the answer turn then re-prefills only the tail (and
    # the closing text)
    relay = _no_cues(fake, mode, lead)
    plan = relay.plan("relay", max_tokens=64)
    res = relay.run(QUESTION, "relay", max_tokens=64, prefetch=mode)
    think, answer = res.segments[0], res.segments[-1]
    assert think.role == "large" and think.finish == "length" and answer.role == "small"
    small = fake.hosts["small.test:2"]
    sent = [len(r["input_ids"]) for r in small.requests if r["sampling_params"]["max_new_tokens"] == 0]
    closing = relay.backend.prefetching.snapshot()["closing"]
    if mode == "off":
        assert sent == [] and closing == 0 and answer.reprefilled > lead + 10
        return
    turn = plan.think_budget  # the large turn's max_tokens: thinking's budget
    assert closing == 1
    # the prompt first (auto's prefix send, declined only under load), then the trajectory at the closing point
    assert sent[-1] == len(res.prompt_ids) + turn - lead
    assert answer.reprefilled <= lead + 8  # the tail, the closing text and the +1


def test_prefetch_workers_carry_their_name_for_the_os():
    # a process's idle prefetch workers stay; named for the OS, they can be told from its other
    # threads from outside (/proc/PID/task/*/comm, ps -L), as the serve leak check does
    import pathlib

    prefetching = Prefetching(PrefetchRule(), workers=1)
    names: list[str] = []
    done = threading.Event()

    def probe() -> None:
        names.append(pathlib.Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())
        done.set()

    assert prefetching.submit(probe)
    assert done.wait(5)
    assert names == ["relaygen-prefet"]

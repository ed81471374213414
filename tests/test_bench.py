"""The benchmark's arithmetic on the wire-format double (the numbers themselves come from real servers)."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import orjson
import pytest
from doubles import LARGE, SMALL

from relaygen_sgl.api import Relay
from relaygen_sgl.bench.replay import idle_floor
from relaygen_sgl.bench.report import markdown
from relaygen_sgl.bench.runner import (
    PRESSURE_MAX_LEVEL,
    BenchConfig,
    handoff_samples,
    handoff_summary,
    pressure_level,
    replay_choice,
    replayable,
    run_bench,
    run_floor,
    run_load,
    run_pressure,
    run_speed,
    spread,
    warm_handoffs,
    warm_summary,
)
from relaygen_sgl.client.http import ClientConfig, EngineClient
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.runtime.prefetch import PrefetchRule

THINK = "We add. Therefore the sum is 5. Now, check it: 2 + 3 = 5. Thus, it is 5.</think>\n\nThe answer is 5."
Q = "What is 2 + 3?"


def set_tape(fake, relay: Relay, think: str = THINK, chunk_delay_s: float = 0.0) -> None:
    """Both doubles write Q's prompt, then `think`, then EOS (whatever question they get)."""
    tape = relay.tokenizer.encode(relay.plan().render(Q)) + relay.tokenizer.encode(think) + [fake.eos_id]
    for h in fake.hosts.values():
        h.tape = tape
        h.chunk_delay_s = chunk_delay_s


def bench_relay(fake, think: str = THINK, chunk_delay_s: float = 0.0, pools: tuple[int, int] | None = None,
                **kw) -> Relay:
    """A relay on the two doubles, their tape set (set_tape); `pools`: the large and small
    servers' KV pools (--max-total-tokens), read once when the relay starts."""
    for i, url in enumerate((LARGE, SMALL)):
        fake.add_host(url, []).kv_tokens = pools[i] if pools else None
    relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3",
                  client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport, **kw)
    set_tape(fake, relay, think, chunk_delay_s)
    return relay


def record_runs(relay: Relay) -> list[tuple[str, str | None]]:
    """(method, prefetch) of every relay.run from now on, in order."""
    order: list[tuple[str, str | None]] = []
    run = relay.run
    relay.run = lambda q, settings: (  # type: ignore[method-assign]
        order.append((settings.method, settings.prefetch)) or run(q, settings=settings))
    return order


def test_speed_part_reports_every_method_and_the_cost_model(fake):
    relay = bench_relay(fake)
    cfg = BenchConfig(preset="cpu-tiny", questions=1, reps=2, max_tokens=200)
    out = run_speed(relay, [Q], cfg, log=lambda m: None)
    runs = out.pop("_runs")
    assert {m: len(v) for m, v in runs.items()} == {"relay": 2, "single-large": 2, "single-small": 2}
    sp = out["speedup"]
    share = sp["relay_large_share"]
    relay_runs = runs["relay"]
    assert share == round(sum(r.stats.large_tokens for r in relay_runs)
                          / sum(r.stats.large_tokens + r.stats.small_tokens for r in relay_runs), 4)
    assert 0 < share < 1 and sp["predicted"] is not None
    bd = sp["breakdown"]
    assert bd["small"]["turns"] >= 2 and bd["large"]["tokens"] + bd["small"]["tokens"] == \
        sum(r.stats.large_tokens + r.stats.small_tokens for r in relay_runs)
    assert out["overhead"]["relay_e2e_over_server_time"]["n"] == 2


def test_spread_and_markdown():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    s = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    speed = {m: {k: s for k in ("latency_s", "completion_tokens", "s_per_token", "large_share", "switches")}
             for m in ("relay", "single-large", "single-small")}
    one = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}

    def spread_of(value):
        return {"median": value, "min": value, "max": value, "n": 1}

    result = {"preset": "p", "elapsed_s": 1, "machine": {"cpu": "c", "cores": 2, "memory_gib": 1, "versions": {}},
              "samples": BenchConfig(preset="p", questions=1, reps=1).samples(),
              "elapsed_by_part_s": {"speed": 1.0, "live_handoffs": 2.0},
              "handoff": {"replay": {f: {"handoffs": 1, "mean_reprefilled_tokens": 2.0, "mean_handoff_latency_s": 0.1,
                                         "reprefilled_tokens": spread_of(2.0), "handoff_latency_s": spread_of(0.1),
                                         "reprefill_ratio_vs_tokens": 1.0, "latency_ratio_vs_tokens": 1.0,
                                         "relays": 1}
                                     for f in ("tokens", "text", "chat")},
                          "prefetch": {"handoffs": 3, "mean_reprefilled_tokens": 1.3, "mean_handoff_latency_s": 0.06,
                                       "reprefilled_tokens": {"median": 1.0, "min": 1.0, "max": 2.0, "n": 3},
                                       "handoff_latency_s": {"median": 0.055, "min": 0.05, "max": 0.075, "n": 3},
                                       "after_inserted_text": {"handoffs": 1, "mean_reprefilled_tokens": 8.0,
                                                               "mean_handoff_latency_s": 0.1,
                                                               "reprefilled_tokens": spread_of(8.0),
                                                               "handoff_latency_s": spread_of(0.1)},
                                       "prefetch_requests": 4, "prefetch_in_flight_at_turn_end": 1},
                          "floor": {"small": {"new_tokens": 2, "stream_step_s": 0.05,
                                              "first_token_s": {"0": {"median": 0.06, "min": 0.05, "max": 0.07, "n": 3},
                                                                "0.3": {"median": 0.08, "min": 0.07, "max": 0.09,
                                                                        "n": 3}},
                                              "reprefilled_tokens": {"median": 2, "min": 2, "max": 2, "n": 6},
                                              "over_decode_step": {"0": 1.2, "0.3": 1.6}}},
                          # the keys of a result from before the spreads
                          "tokens": {"handoffs": 3, "mean_reprefilled_tokens": 14.0, "mean_handoff_latency_s": 0.2,
                                     "median_handoff_latency_s": 0.19},
                          "decode_step_s": 0.05},
              "overhead": {"relay_e2e_over_server_time": s, "target": 1.05}, "speed": speed,
              "speedup": {"measured_per_token": 1.0, "measured_latency": 1.0, "predicted": 1.0,
                          "relay_large_share": 1.0, "t_small_over_t_large": 1.0},
              "load": {"1": {"relay": {"tokens_per_s": 1, "p50_latency_s": 1, "p95_latency_s": 1,
                                       "tokens_per_s_by_round": [0.9, 1.1], "trajectories": 4, "rounds": 2,
                                       "latency_s": one},
                             "single-large": {"tokens_per_s": 2, "p50_latency_s": 1, "p95_latency_s": 1},
                             "relay_over_single_large": 0.5}}}
    md = markdown(result)
    assert "Handoffs in live relays" in md and "target <= 1.05" in md and "Throughput under load" in md
    # n, mean re-prefilled with its spread, latency median (min-max), mean, mean over the decode step
    assert "| token-exact + prefetch | at a cue | 3 | 1.3, 1.0 (1.0-2.0) | 0.055 (0.05-0.075) | 0.06 | 1.2 |" in md
    assert "| token-exact + prefetch | after inserted text | 1 | 8.0, 8.0 (8.0-8.0) | 0.1 (0.1-0.1) | 0.1 | 2.0 |" in md
    # a result from before the spreads were recorded: its median, the spread unknown
    assert "| token-exact, no prefetch | at a cue | 3 | 14.0, n/a | 0.19 (median only) | 0.2 | 4.0 |" in md
    assert "| token-exact, no prefetch | after inserted text | None | n/a | n/a | n/a | n/a |" in md
    assert "4 prefetch requests; 1 turns ended while their prefetch still ran" in md and "| 0.5 |" in md
    assert "| 1 | relay |  | 4 (2) | 1 (0.9, 1.1) | 1 | 1 |" in md  # n, pooled tokens/s, then each round's
    assert "| server | after 0 s idle | after 0.3 s idle | re-prefilled tokens |" in md
    assert "| small | 0.06 (0.05-0.07), n=3: 1.2 steps | 0.08 (0.07-0.09), n=3: 1.6 steps | 2 (2-2), n=6 |" in md
    assert "| tokens | 1 | 2.0, 2.0 (2.0-2.0) | 0.1, 0.1 (0.1-0.1) | 1 / 1 |" in md
    assert "Each cell: median (min-max) over the method's n runs (1 question x 1 rep, the" in md
    assert "| single-small | 1 | 1.0 (1.0-1.0) |" in md
    assert ("Samples (full run): speed and overhead 1 question x 1 rep = 1 run per method, 512 tokens; live "
            "handoffs 12 questions x 2 variants; floor 8 trials per idle gap and server") in md
    assert "load 4 levels (1, 2, 4, 16) x 2 rounds x 3 cases, 256 tokens." in md
    assert "Time per part (s): speed 1.0, live handoffs 2.0." in md
    assert "(1 relay, 1 single-large, 1 single-small runs)" in md
    # a result from before the counts were recorded: no header line, no n column to fill
    old = {k: v for k, v in result.items() if k not in ("samples", "elapsed_by_part_s")}
    assert "Samples (" not in markdown(old) and "Time per part" not in markdown(old)


def test_handoffs_are_the_turns_after_the_other_roles_turn(fake):
    relay = bench_relay(fake, prefetch="off")
    results = []
    # the model closes thinking itself; then it ends thinking with an EOS, and the program
    # inserts "</think>" before the small model's answer turn
    for think in (THINK, "We add. Therefore the sum is 5. Now, check it. So 5"):
        set_tape(fake, relay, think)
        results.append(relay.run(Q, max_tokens=200))
    at_cues, after_text = handoff_samples(results), handoff_samples(results, after_text=True)
    changes = inserted = 0
    for res in results:
        seq = [s.role for s in res.segments]
        model = [r for r in seq if r in ("large", "small")]
        changes += sum(1 for a, b in zip(model, model[1:]) if a != b)
        inserted += sum(1 for a, b, c in zip(seq, seq[1:], seq[2:]) if b == "inserted" and a != c)
    assert len(at_cues) + len(after_text) == changes and len(after_text) == inserted == 1 and len(at_cues) >= 3
    assert after_text[0].role == "small" and after_text[0] is results[1].segments[-1]
    assert all(s.handoff_s is not None and s.handoff_s >= 0 for s in at_cues + after_text)
    summary = handoff_summary(at_cues)
    assert summary["handoffs"] == len(at_cues)
    assert summary["mean_reprefilled_tokens"] == round(sum(s.reprefilled for s in at_cues) / len(at_cues), 2)


def test_load_levels_run_every_question_in_waves_and_interleave(fake):
    relay = bench_relay(fake, prefetch="off")
    qs = [Q, "What is 3 + 2?", "What is 1 + 4?"]
    order = record_runs(relay)
    questions: list[tuple[str, str]] = []
    inner = relay.run
    relay.run = lambda q, settings: (  # type: ignore[method-assign]
        questions.append((settings.method, q)) or inner(q, settings=settings))
    cfg = BenchConfig(preset="cpu-tiny", questions=3, load_levels=(1, 2, 4), load_max_tokens=60, load_prefetch=(),
                      load_rounds=1)
    out = run_load(relay, qs, cfg, log=lambda m: None)
    # level 1: each question once, one after another; 2: two waves of 2; 4: one wave of 4
    assert [out[k]["relay"]["trajectories"] for k in ("1", "2", "4")] == [3, 4, 4]
    assert all(out[k]["relay"]["trajectories"] == out[k]["single-large"]["trajectories"] for k in out)
    # wave by wave, the two cases on the same questions back to back, the order reversed every
    # wave: level 1's three waves of one, level 2's two of two, level 4's one of four
    assert [m for m, _ in order] == ["relay", "single-large", "single-large", "relay", "relay", "single-large",
                                     *["single-large"] * 2, *["relay"] * 4, *["single-large"] * 2,
                                     *["relay"] * 4, *["single-large"] * 4]
    asked = [q for _, q in questions]
    assert asked[:6] == [qs[0], qs[0], qs[1], qs[1], qs[2], qs[2]]
    assert sorted(asked[6:8]) == sorted(asked[8:10]) == sorted([qs[0], qs[1]])
    for k in out:
        by = out[k]
        assert by["relay"]["tokens"] > 0 and by["relay_over_single_large"] == round(
            by["relay"]["tokens_per_s"] / by["single-large"]["tokens_per_s"], 3)


def test_the_load_part_runs_the_relay_once_per_prefetch_mode_interleaved(fake):
    relay = bench_relay(fake, chunk_delay_s=0.002)
    relay.backend.prefetching.rule = PrefetchRule(every=1, max_load=0)  # auto as on a GPU preset
    qs = [Q, "What is 3 + 2?"]
    order = record_runs(relay)
    flushes: list[int] = []  # how many trajectories had run at each flush
    for e in {id(e): e for e in relay.engines.values()}.values():
        real_flush = e.flush_cache
        e.flush_cache = lambda timeout_s=None, f=real_flush: (flushes.append(len(order)), f(timeout_s))[1]
    cfg = BenchConfig(preset="cpu-tiny", questions=2, load_levels=(1, 2), load_max_tokens=60,
                      load_prefetch=("auto", "on", "off"), load_rounds=1)
    out = run_load(relay, qs, cfg, log=lambda m: None)
    # both servers, before each run: level 1's two waves of one trajectory x 4 cases, then level
    # 2's one wave of two x 4 cases
    assert flushes == [n for n in [*range(8), 8, 10, 12, 14] for _ in range(2)]
    # wave by wave: relay auto, on, off, single-large on the first wave, reversed on the next; level 2's
    # one wave goes on from there (reversed again)
    a, on, off, c = ("relay", "auto"), ("relay", "on"), ("relay", "off"), ("single-large", None)
    assert order[:8] == [a, on, off, c, c, off, on, a]
    assert order[8::2] == [c, off, on, a]
    for by in out.values():
        assert by["relay"]["prefetch"] == "auto" and by["relay (prefetch off)"]["prefetch_requests"] == 0
        assert by["single-large"]["prefetch_requests"] == 0
        assert by["relay (prefetch on)"]["prefetch_requests"] > 0
        assert by["relay_auto_over_off"] == round(
            by["relay"]["tokens_per_s"] / by["relay (prefetch off)"]["tokens_per_s"], 3)
        assert by["relay (prefetch on)"]["over_single_large"] == round(
            by["relay (prefetch on)"]["tokens_per_s"] / by["single-large"]["tokens_per_s"], 3)
    assert out["1"]["relay"]["prefetch_requests"] > 0  # alone on the servers, auto prefetches
    md = markdown(report_with(out))
    assert "| 2 | relay (prefetch off) | off |" in md and "| 1 | relay | auto |" in md
    assert (f"with prefetch auto over the same relays with prefetch off, interleaved in this run (concurrent): "
            f"{out['1']['relay_auto_over_off']}; paired ") in md
    pair = out["2"]["relay_auto_over_off_paired"]
    assert (f"{out['2']['relay_auto_over_off']}; paired {pair['median']:.3f} ({pair['min']:.3f}-{pair['max']:.3f}), "
            f"n {pair['n']} (2).") in md


def report_with(load):
    s = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    speed = {m: {k: s for k in ("latency_s", "completion_tokens", "s_per_token", "large_share", "switches")}
             for m in ("relay", "single-large", "single-small")}
    h = {"handoffs": 1, "mean_reprefilled_tokens": 2.0, "mean_handoff_latency_s": 0.1,
         "reprefill_ratio_vs_tokens": 1.0, "latency_ratio_vs_tokens": 1.0}
    return {"preset": "p", "elapsed_s": 1, "machine": {"cpu": "c", "cores": 2, "memory_gib": 1, "versions": {}},
            "handoff": {"replay": {f: h for f in ("tokens", "text", "chat")}, "decode_step_s": 0.05},
            "overhead": {"relay_e2e_over_server_time": s, "target": 1.05}, "speed": speed,
            "speedup": {"measured_per_token": 1.0, "measured_latency": 1.0, "predicted": 1.0,
                        "relay_large_share": 1.0, "t_small_over_t_large": 1.0}, "load": load}


def test_the_floor_caches_a_prefix_then_adds_two_tokens_after_each_gap_interleaved(fake):
    host = fake.add_host(SMALL, list(range(10, 120)))  # what it writes after each prefix: the tape's next tokens
    eng = EngineClient(SMALL, ClientConfig(retries=0, backoff_s=0), transport=fake.transport)
    seq = list(range(10, 70))
    slept: list[float] = []
    floor = idle_floor(eng, [(seq, 5)], trials=2, gaps=(0.0, 0.1, 0.3), sleep=slept.append,
                       extra={"routed_dp_rank": 1})
    assert all(r["routed_dp_rank"] == 1 for r in host.requests)  # both requests of a sample on one DP rank
    assert slept == [0.0, 0.1, 0.3, 0.3, 0.1, 0.0]  # every gap in each trial, the order reversed every trial
    cuts = [13, 21, 29, 37, 45, 53]  # FLOOR_SPACING apart: no sample finds its new tokens cached
    assert [(r["input_ids"], r["sampling_params"]["max_new_tokens"], bool(r.get("stream"))) for r in host.requests] \
        == [x for p in cuts for x in ((seq[: p - 2], 0, False), (seq[:p], 6, True))]
    assert {g: len(v) for g, v in floor["first_token_s"].items()} == {"0": 2, "0.1": 2, "0.3": 2}
    assert floor["new_tokens"] == 2 and floor["stream_step_s"] is not None
    # as the server reports it: each request re-prefilled its 2 new tokens, none found cached
    # (the double writes the tape's next tokens, so a sample's output is the next cut's prefix)
    assert floor["reprefilled_tokens"] == [2] * 6
    host.requests.clear()
    short = idle_floor(eng, [(seq[:40], 5)], trials=2, gaps=(0.0, 0.1, 0.3), sleep=slept.append)
    # 4 cuts: one whole trial, every gap once, not the first gap twice
    assert {g: len(v) for g, v in short["first_token_s"].items()} == {"0": 1, "0.1": 1, "0.3": 1}
    assert len(host.requests) == 6


def test_the_floor_part_measures_each_server_once_and_reports_over_the_decode_step(fake):
    relay = bench_relay(fake, think=THINK * 3, prefetch="off")
    res = relay.run(Q, max_tokens=200)
    out = run_floor(relay, [res], decode_step=0.05, trials=1)
    assert set(out) == {"large", "small"}
    for fl in out.values():
        for gap, d in fl["first_token_s"].items():
            assert d["n"] == 1 and fl["over_decode_step"][gap] == round(d["median"] / 0.05, 3)
        assert fl["reprefilled_tokens"]["n"] == 3
    gens = [r for r in fake.hosts[SMALL.split("//")[1]].requests if r["sampling_params"].get("max_new_tokens") == 6]
    assert len(gens) == 3 and all(g["input_ids"][: len(res.prompt_ids)] == res.prompt_ids for g in gens)
    one = Relay(preset="cpu-tiny", large=LARGE, small=LARGE, family="qwen3",
                client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport, prefetch="off")
    assert set(run_floor(one, [res], decode_step=0.05, trials=1)) == {"large"}  # one server: measured once


def test_the_load_part_pools_its_rounds_in_reversed_order(fake):
    # runs long enough that wall_s's rounding is far below the tolerance
    relay = bench_relay(fake, chunk_delay_s=0.002)
    qs = [Q, "What is 3 + 2?"]
    order = record_runs(relay)
    cfg = BenchConfig(preset="cpu-tiny", questions=2, load_levels=(1, 2), load_max_tokens=60,
                      load_prefetch=("auto", "off"))
    assert cfg.load_rounds == 2
    out = run_load(relay, qs, cfg, log=lambda m: None)
    a, b, c = ("relay", "auto"), ("relay", "off"), ("single-large", None)
    # level 1: two waves of one per round, A B C then C B A, wave after wave; level 2: one wave of
    # two per round, starting reversed
    assert order[:12] == [a, b, c, c, b, a, a, b, c, c, b, a]
    assert order[12::2] == [c, b, a, a, b, c]
    assert [out[k]["relay"]["waves"] for k in ("1", "2")] == [4, 2]
    # level 2: one wave per round, so the paired ratios are the rounds' own: their median, the mean of two
    two = out["2"]
    ratios = [r / s for r, s in zip(two["relay"]["tokens_per_s_by_round"],
                                    two["single-large"]["tokens_per_s_by_round"])]
    pair = two["relay_over_single_large_paired"]
    assert pair["n"] == 2 and abs(pair["median"] - sum(ratios) / 2) < 0.01
    assert abs(pair["min"] - min(ratios)) < 0.01 and abs(pair["max"] - max(ratios)) < 0.01
    offs = [r / o for r, o in zip(two["relay"]["tokens_per_s_by_round"],
                                  two["relay (prefetch off)"]["tokens_per_s_by_round"])]
    auto_off = two["relay_auto_over_off_paired"]
    assert auto_off["n"] == 2 and abs(auto_off["median"] - sum(offs) / 2) < 0.01
    assert out["1"]["relay_over_single_large_paired"]["n"] == 4 == out["1"]["relay_auto_over_off_paired"]["n"]
    assert out["1"]["relay (prefetch off)"]["over_single_large_paired"]["n"] == 4
    for by in out.values():
        for name in ("relay", "relay (prefetch off)", "single-large"):
            d = by[name]
            assert d["rounds"] == 2 and len(d["tokens_per_s_by_round"]) == 2 and d["trajectories"] == 4
            # pooled: all tokens over all wall time, so between the rounds' own rates
            assert abs(d["tokens_per_s"] - d["tokens"] / d["wall_s"]) <= 0.02 * d["tokens_per_s"]
            assert min(d["tokens_per_s_by_round"]) - 0.01 <= d["tokens_per_s"] <= max(d["tokens_per_s_by_round"]) + 0.01
        assert by["relay_auto_over_off"] == round(
            by["relay"]["tokens_per_s"] / by["relay (prefetch off)"]["tokens_per_s"], 3)


def test_a_bench_config_refuses_counts_below_one():
    with pytest.raises(ConfigError, match="load_rounds"):
        BenchConfig(preset="cpu-tiny", load_rounds=0)


def test_a_whole_bench_on_the_doubles_prints_every_figure_with_its_n(fake, tmp_path, monkeypatch):
    """run_bench end to end with a small config: every part runs, bench.json keeps its keys and
    adds the sample counts, and bench.md prints each figure's spread and n. (The double serves
    no chat completions: the replay runs the two /generate formats, chat reads n/a.)"""
    monkeypatch.setattr("relaygen_sgl.bench.replay.FORMATS", ("tokens", "text"))
    # the doubles' tape follows Q's prompt: every question of the run is Q
    monkeypatch.setattr("relaygen_sgl.bench.runner.load_problems", lambda name: [SimpleNamespace(question=Q)] * 20)
    relay = bench_relay(fake, think=THINK * 3, prefetch="off")
    cfg = dataclasses.replace(BenchConfig.quick("cpu-tiny"), max_tokens=200, load_levels=(1, 2), load_max_tokens=40,
                              handoff_questions=2, floor_trials=1, load_prefetch=("auto", "off"), load_rounds=2)
    result = run_bench(cfg, relay, tmp_path, log=lambda m: None)
    saved = orjson.loads((tmp_path / "bench.json").read_bytes())
    assert set(saved) >= {"preset", "config", "machine", "machine_summary", "urls", "profile", "elapsed_s",
                          "handoff", "overhead", "speedup", "speed", "load", "samples", "elapsed_by_part_s",
                          "pressure"}
    assert list(saved["elapsed_by_part_s"]) == ["speed", "live_handoffs", "floor", "replay", "load", "pressure"]
    assert saved["pressure"]["skipped"] == "not asked for (--pressure 0)"  # quick: none unless asked for
    assert "Not run: not asked for (--pressure 0)." in (tmp_path / "bench.md").read_text()
    assert saved["samples"]["speed_runs_per_method"] == 4 and saved["samples"]["kind"] == "quick"
    ho = saved["handoff"]
    for name in ("prefetch", "tokens"):  # the old keys beside the new spreads
        h = ho[name]
        assert {"handoffs", "mean_reprefilled_tokens", "mean_handoff_latency_s", "median_handoff_latency_s",
                "after_inserted_text", "prefetch_requests", "prefetch_in_flight_at_turn_end"} <= set(h)
        assert h["handoff_latency_s"]["n"] == h["handoffs"] > 0 and h["relays"] == 2
    for fmt in ("tokens", "text", "chat"):
        assert ho["replay"][fmt]["handoff_latency_s"]["n"] == ho["replay"][fmt]["handoffs"]
    for fl in ho["floor"].values():
        assert all(d["n"] == 1 for d in fl["first_token_s"].values())
    md = (tmp_path / "bench.md").read_text()
    assert md == markdown(result)
    assert "Samples (quick run): speed and overhead 2 questions x 2 reps = 4 runs per method" in md
    assert "live handoffs 2 questions x 2 variants; floor 1 trial per idle gap" in md
    assert "load 2 levels (1, 2) x 2 rounds x 3 cases, 40 tokens." in md
    assert "No pressure part (--pressure 0)." in md
    assert "Time per part (s): speed " in md and ", load " in md and ", pressure " in md
    assert "Each cell: median (min-max) over the method's n runs (2 questions x 2 reps" in md
    assert "| relay | 4 | " in md and "(4 relay, 4 single-large, 4 single-small runs)" in md
    h = ho["prefetch"]
    lat, tok = h["handoff_latency_s"], h["reprefilled_tokens"]
    assert (f"| token-exact + prefetch | at a cue | {h['handoffs']} | {h['mean_reprefilled_tokens']}, "
            f"{tok['median']} ({tok['min']}-{tok['max']}) | "
            f"{lat['median']} ({lat['min']}-{lat['max']}) | {h['mean_handoff_latency_s']} |") in md
    assert "Relays, one per question: 2 token-exact + prefetch (2 switched) and 2 token-exact, no prefetch" in md
    r = ho["replay"]["tokens"]
    lat = r["handoff_latency_s"]
    assert r["handoffs"] > 0 and (f"| tokens | {r['handoffs']} | {r['mean_reprefilled_tokens']}, " in md)
    assert f"{r['mean_handoff_latency_s']}, {lat['median']} ({lat['min']}-{lat['max']}) | 1 / 1 |" in md
    assert "Replayed: 1 relay, for each question" in md  # one question: one relay
    assert "| chat | 0 | n/a | n/a | n/a |" in md
    load = saved["load"]["2"]["single-large"]
    assert f"| 2 | single-large | off | {load['trajectories']} (2) | " in md
    two = saved["load"]["2"]
    pair = two["relay_over_single_large_paired"]
    assert (f" | {two['relay_over_single_large']}; paired {pair['median']:.3f} ({pair['min']:.3f}-{pair['max']:.3f}), "
            f"n 2 |") in md


def test_quick_runs_every_part_on_fewer_samples_and_the_full_run_keeps_its_own():
    full, quick = BenchConfig(preset="p"), BenchConfig.quick("p")
    assert (full.kind, full.questions, full.reps, full.max_tokens, full.load_levels, full.load_max_tokens,
            full.handoff_questions, full.load_rounds, full.floor_trials, full.load_prefetch) == \
        ("full", 3, 2, 512, (1, 2, 4, 16), 256, 12, 2, 8, ("auto", "off"))
    assert (quick.kind, quick.questions, quick.reps, quick.max_tokens, quick.load_levels, quick.load_max_tokens,
            quick.handoff_questions, quick.load_rounds, quick.floor_trials, quick.load_prefetch) == \
        ("quick", 2, 2, 128, (1, 2, 4, 16), 96, 6, 2, 4, ("auto",))
    # every part keeps at least two samples to spread over
    assert quick.questions * quick.reps >= 2 and quick.handoff_questions >= 2 and quick.floor_trials >= 2
    assert quick.questions >= 2 and len(quick.load_levels) >= 2  # level 1: two trajectories at least
    assert quick.samples()["speed_runs_per_method"] == 4 and quick.samples()["load_cases"] == 2
    # the pressure part: picked from the pools, 300 tokens, 2 rounds; quick runs none unless asked for
    assert (full.pressure, full.pressure_max_tokens, full.pressure_rounds) == (None, 300, 2)
    assert (quick.pressure, quick.pressure_max_tokens, quick.pressure_rounds) == (0, 300, 2)
    assert full.samples()["pressure"] == "picked" and quick.samples()["pressure"] == 0
    with pytest.raises(ConfigError, match="floor_trials"):
        BenchConfig(preset="p", floor_trials=0)
    with pytest.raises(ConfigError, match="load_levels"):
        BenchConfig(preset="p", load_levels=(1, 0))


def test_the_replay_takes_each_questions_relay_with_the_most_switches_that_gives_a_handoff(fake):
    relay = bench_relay(fake, prefetch="off")
    set_tape(fake, relay, "The sum is 5.</think>\n\nThe answer is 5.")  # no cue: one switch, to the answer
    once = relay.run(Q, max_tokens=200)
    set_tape(fake, relay, THINK * 3)
    often = relay.run(Q, max_tokens=200)
    roles = [[s.role for s in r.segments if s.role in ("large", "small")] for r in (once, often)]
    assert len(roles[0]) == len(set(roles[0])) and len(roles[1]) > len(set(roles[1]))
    assert not replayable(once) and replayable(often) and often.stats.switches > once.stats.switches
    # the speed part's relay first, a live one of the same question after: the one with more switches
    assert replay_choice([(Q, once), (Q, often), (Q, once)]) == {Q: often}
    # a question whose every relay gives no handoff is left out, not replayed for nothing
    assert replay_choice([(Q, once), ("other", once)]) == {}


def test_a_second_bench_on_the_same_folder_is_refused_and_the_report_is_replaced_whole(fake, tmp_path, monkeypatch):
    """A bench holds its folder for the whole run: a second one (here started while the first
    measures) is refused before it asks a server anything; the report files are replaced
    atomically, no temporary or lock left behind."""
    from relaygen_sgl.core.errors import RelayGenError

    monkeypatch.setattr("relaygen_sgl.bench.replay.FORMATS", ("tokens",))
    monkeypatch.setattr("relaygen_sgl.bench.runner.load_problems", lambda name: [SimpleNamespace(question=Q)] * 20)
    relay = bench_relay(fake, prefetch="off")
    cfg = dataclasses.replace(BenchConfig.quick("cpu-tiny"), questions=1, reps=1, max_tokens=60, load_levels=(1,),
                              load_max_tokens=20, handoff_questions=1, floor_trials=1, load_prefetch=("off",))
    (tmp_path / "bench.md").write_text("an older report\n")
    refused: list[str] = []
    run = relay.run

    def run_and_start_another(q, settings):
        if not refused:
            with pytest.raises(RelayGenError) as info:
                run_bench(cfg, SimpleNamespace(), tmp_path, log=lambda m: None)  # no server to ask
            refused.append(str(info.value))
        return run(q, settings=settings)

    relay.run = run_and_start_another  # type: ignore[method-assign]
    result = run_bench(cfg, relay, tmp_path, log=lambda m: None)
    assert refused and refused[0].startswith(f"another relaygen bench is writing {tmp_path} (pid {os.getpid()}, ")
    assert (tmp_path / "bench.md").read_text() == markdown(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "bench.png"]


def test_warm_handoffs_count_what_a_turn_reprefilled_beyond_the_floor(fake):
    """A warm handoff re-prefills the other role's new tokens + 1 (prefetch off): on the double,
    whose cache keeps everything, every one sits at the floor; a large server that keeps nothing
    re-prefills, at each warm handoff to it, all it had held."""
    relay = bench_relay(fake, think=THINK * 3, prefetch="off")
    kept = relay.run(Q, max_tokens=200)
    warm = warm_handoffs([kept])
    roles = [s.role for s in kept.segments if s.role in ("large", "small")]
    # every change of role but each role's first turn
    assert len(warm) == sum(a != b for a, b in zip(roles, roles[1:])) - (len(set(roles)) - 1) >= 2
    assert all(h["beyond_floor"] == 0 and 0 <= h["reprefilled"] - h["new"] <= 1 for h in warm)
    assert {h["role"] for h in warm} == {"large", "small"}

    class Forgets(list):
        def append(self, ids):  # the radix cache evicts every entry at once
            pass

    fake.hosts["large.test:1"].cache = Forgets()
    lost = relay.run(Q, max_tokens=200)
    for h in warm_handoffs([lost]):
        # the double recomputes the last prompt token even of a whole cached prompt: held - 1 is the most
        assert h["beyond_floor"] == (h["at"] - h["new"] - 1 if h["role"] == "large" else 0)
    assert any(h["beyond_floor"] > 0 for h in warm_handoffs([lost]))
    # a single-large run: no handoff; its answer turn after the inserted text is a later turn of its role
    set_tape(fake, relay, "We add. So 5")  # no "</think>": the program inserts it
    fake.hosts["large.test:1"].cache = []
    alone = relay.run(Q, "single-large", max_tokens=200)
    assert [s.role for s in alone.segments] == ["large", "inserted", "large"]
    assert warm_handoffs([alone]) == []
    (answer,) = warm_handoffs([alone], handoffs_only=False)
    inserted = len(alone.segments[1].token_ids)
    assert answer["new"] == inserted and answer["reprefilled"] == inserted + 1 and answer["beyond_floor"] == 0


def test_warm_summary_gives_median_p90_max_and_the_share_above_the_floor():
    hs = [{"role": "large", "at": 100 + i, "new": 10, "reprefilled": 11 + b, "beyond_floor": b}
          for i, b in enumerate([0] * 17 + [5, 40, 275])]
    w = warm_summary(hs)
    assert w["handoffs"] == 20 and w["above_floor"] == 3 and w["share_above_floor"] == 0.15
    b = w["beyond_floor_tokens"]
    # p90: the nearest rank, the 18th of 20
    assert (b["median"], b["p90"], b["max"], b["min"], b["n"]) == (0.0, 5.0, 275.0, 0.0, 20)
    assert w["reprefilled_tokens"]["max"] == 286.0 and w["reprefilled_tokens"]["median"] == 11.0
    assert [h["beyond_floor"] for h in w["worst"]] == [275, 40, 5, 0, 0]
    assert warm_summary([])["share_above_floor"] is None and warm_summary([])["worst"] == []
    assert warm_summary(hs[:17])["worst"] == []  # nothing above the floor: no worst to show


def test_the_pressure_level_is_given_or_picked_over_the_smaller_pool():
    assert pressure_level(0, 2048, [400]) == (0, "not asked for (--pressure 0)")
    assert pressure_level(16, None, [400]) == (16, None)  # given: run whatever the pools
    assert pressure_level(None, 2048, [400]) == (11, None)  # 11 x 400 >= 2 x 2048 > 10 x 400
    # the questions asked in turn: 400 + 1000 + 400 + 1000 + 400 + 1000 = 4200 >= 4096 > 3200
    assert pressure_level(None, 2048, [400, 1000]) == (6, None)
    assert pressure_level(None, 100, [400]) == (2, None)  # at least two, to share a pool
    assert pressure_level(None, 2048, [512]) == (8, None)  # exactly twice the pool is enough
    level, why = pressure_level(None, 16384, [400])
    assert level == 82 > PRESSURE_MAX_LEVEL and "--kv-tokens" in why and "--pressure N" in why
    assert "do not say their KV pools" in pressure_level(None, None, [400])[1]
    with pytest.raises(ConfigError, match="pressure must be a concurrency >= 0"):
        BenchConfig(preset="p", pressure=-1)
    with pytest.raises(ConfigError, match="pressure_max_tokens"):
        BenchConfig(preset="p", pressure_max_tokens=0)


def test_the_pressure_part_runs_both_methods_at_a_level_over_the_pool_interleaved(fake):
    """Pools of 1024 tokens: the level picked holds twice the smaller one; relay and single-large
    run it in A B, B A order; the pool gate holds runs back (waited) and never lets more run than
    fit; nothing fails; the report prints each case and the warm handoffs' statistics."""
    relay = bench_relay(fake, think=THINK * 2, chunk_delay_s=0.002, pools=(1024, 900), prefetch="off")
    order = record_runs(relay)
    cfg = BenchConfig(preset="cpu-tiny", questions=1, pressure_max_tokens=150, pressure_rounds=2)
    out = run_pressure(relay, [Q], cfg, log=lambda m: None)
    size = len(relay.tokenizer.encode(relay.plan().render(Q))) + \
        len(relay.tokenizer.encode(relay.plan().closing_text)) + 150
    assert out["pools"] == {"large": {"kv_tokens": 1024, "max_input": 1018},
                            "small": {"kv_tokens": 900, "max_input": 894}}
    assert out["smaller_pool"] == 900 and out["trajectory_tokens"] == [size] and out["picked"]
    level = out["level"]
    assert level == -(-1800 // size) and level * size >= 1800 > (level - 1) * size and "skipped" not in out
    assert out["in_flight_tokens"] == level * size and out["in_flight_over_pool"] == round(level * size / 900, 2)
    methods = [m for m, _ in order]
    assert methods == ["relay"] * level + ["single-large"] * level * 2 + ["relay"] * level  # A B, B A
    # the gate claims the shared prompt once and what each trajectory is expected to write, learned from
    # those that ended (runtime/pools.py): more run at once than whole sizes fit; the first wait for those
    whole = {"relay": int(0.9 * 900) // size, "single-large": int(0.9 * 1024) // size}
    for name in ("relay", "single-large"):
        d = out[name]
        assert d["trajectories"] == 2 * level and d["rounds"] == 2 and len(d["tokens_per_s_by_round"]) == 2
        assert d["failed"] == 0 and d["failures"] == [] and d["degraded"] == 0 and d["at_limit"] == 0
        assert d["latency_s"]["n"] == 2 * level and d["tokens"] > 0
        # the relay's trajectories claim both pools (the smaller bounds them), single-large's the large one
        assert whole[name] < d["most_in_flight"] <= level
    assert out["relay"]["waited"] >= 1  # the first round, before any trajectory ended
    # each case counts its own waits: together, every wait of the gate
    assert out["relay"]["waited"] + out["single-large"]["waited"] == relay.backend.pools.snapshot()["waited"]
    assert out["relay_over_single_large"] == round(out["relay"]["tokens_per_s"] / out["single-large"]["tokens_per_s"],
                                                   3)
    w = out["warm_handoffs"]
    assert w["handoffs"] >= 2 * level and w["above_floor"] == 0 and w["share_above_floor"] == 0.0  # no eviction
    assert w["beyond_floor_tokens"]["max"] == 0 and w["reprefilled_tokens"]["n"] == w["handoffs"]
    result = {"preset": "p", "elapsed_s": 1, "machine": {"cpu": "c", "versions": {}},
              "handoff": {"replay": {f: {"handoffs": 0} for f in ("tokens", "text", "chat")}},
              "overhead": {"relay_e2e_over_server_time": spread([1.0]), "target": 1.05},
              "speed": {m: {k: spread([1.0]) for k in ("latency_s", "completion_tokens", "s_per_token", "large_share",
                                                       "switches")} for m in ("relay", "single-large", "single-small")},
              "speedup": {"measured_per_token": 1, "measured_latency": 1, "predicted": 1, "relay_large_share": 1,
                          "t_small_over_t_large": 1}, "load": {}, "pressure": out}
    md = markdown(result)
    assert "## Under pressure (pools smaller than the trajectories in flight)" in md
    assert (f"KV pools (tokens): large 1024, small 900. {level} concurrent trajectories (picked), each question's in "
            f"turn, of {size} tokens at their whole size (prompt, closing text and a 150-token budget): "
            f"{level * size} tokens, {out['in_flight_over_pool']}x the smaller pool.") in md
    r = out["relay"]
    assert (f"| relay | {2 * level} (2) | {r['tokens_per_s']} ({r['tokens_per_s_by_round'][0]}, "
            f"{r['tokens_per_s_by_round'][1]}) |") in md
    t = r["warm_turns"]
    assert (f"| 0 | 0 | 0 | {r['waited']} | {r['most_in_flight']} | 0 of {t['handoffs']} (max 0.0) | "
            f"{out['relay_over_single_large']} |") in md
    # every later turn: the relay's handoffs and more; single-large's answer turn after the inserted text
    assert t["handoffs"] >= w["handoffs"] and out["single-large"]["warm_turns"]["handoffs"] == 2 * level
    assert out["single-large"]["warm_turns"]["above_floor"] == 0
    rp = w["reprefilled_tokens"]
    assert f"| {w['handoffs']} | 0.0, 0.0, 0.0 | 0 (0.0%) | {rp['median']}, {rp['p90']}, {rp['max']} |" in md


def test_a_pressure_run_that_fails_is_counted_not_raised(fake):
    relay = bench_relay(fake, pools=(1024, 1024), prefetch="off")
    fake.hosts["large.test:1"].fail_on = {1, 2}  # the first two /generate requests on the large server
    fake.hosts["large.test:1"].fail_status = 400  # refused: no retry
    cfg = BenchConfig(preset="cpu-tiny", questions=1, pressure=3, pressure_max_tokens=60, pressure_rounds=1)
    out = run_pressure(relay, [Q], cfg, log=lambda m: None)
    assert out["level"] == 3 and not out["picked"]
    failed = out["relay"]["failed"] + out["single-large"]["failed"]
    assert failed == 2 and out["relay"]["trajectories"] == 3
    assert len(out["relay"]["failures"]) == out["relay"]["failed"]
    assert out["relay"]["latency_s"]["n"] + out["single-large"]["latency_s"]["n"] == 6 - failed


def test_a_load_run_that_fails_is_counted_and_shown_not_raised(fake):
    relay = bench_relay(fake, prefetch="off")
    fake.hosts["large.test:1"].fail_on = {1}  # the first /generate request on the large server
    fake.hosts["large.test:1"].fail_status = 400  # refused: no retry
    cfg = BenchConfig(preset="cpu-tiny", questions=2, load_levels=(2,), load_max_tokens=60, load_prefetch=(),
                      load_rounds=1)
    out = run_load(relay, [Q, "What is 3 + 2?"], cfg, log=lambda m: None)
    relay_run = out["2"]["relay"]  # the wave's order starts with the relay
    assert relay_run["failed"] == 1 and len(relay_run["failures"]) == 1 and out["2"]["single-large"]["failed"] == 0
    assert relay_run["latency_s"]["n"] == 1 and out["2"]["single-large"]["latency_s"]["n"] == 2
    md = markdown(report_with(out))
    rows = [line for line in md.splitlines() if line.startswith("| 2 |")]
    assert "| 2 (1), 1 failed |" in rows[0] and "failed" not in rows[-1]
    assert f"First failures (concurrent 2, relay): {relay_run['failures'][0]}" in md
    # the one wave had a failed relay run: its ratio would measure the failure, so no paired ratio
    pair = out["2"]["relay_over_single_large_paired"]
    assert pair["n"] == 0 and pair["skipped"] == 1
    assert "; paired: none (1 wave with a failed run left out)" in rows[0]


def test_the_bench_flags_reach_the_config_and_a_bad_level_is_one_line(monkeypatch, tmp_path, capsys):
    """--pressure (0 included), --pressure-max-tokens and --pressure-rounds end up in the
    BenchConfig run_bench gets; a negative level is refused by the config, one line, exit 2."""
    from contextlib import nullcontext

    from relaygen_sgl.cli.main import main

    seen = []
    stand_in = SimpleNamespace(preset=SimpleNamespace(name="cpu-tiny"))
    monkeypatch.setattr("relaygen_sgl.cli.commands.open_relay", lambda args: nullcontext(stand_in))

    def fake_run_bench(cfg, relay, out, log):
        seen.append(cfg)
        (out / "bench.md").write_text("report\n")
        return {"elapsed_s": 1}

    monkeypatch.setattr("relaygen_sgl.bench.runner.run_bench", fake_run_bench)
    base = ["bench", "--preset", "cpu-tiny", "--out", str(tmp_path)]
    assert main([*base, "--quick", "--pressure", "16", "--pressure-max-tokens", "200", "--pressure-rounds", "1"]) == 0
    assert (seen[-1].kind, seen[-1].pressure, seen[-1].pressure_max_tokens, seen[-1].pressure_rounds) == \
        ("quick", 16, 200, 1)
    assert main([*base, "--pressure", "0"]) == 0 and seen[-1].pressure == 0 and seen[-1].kind == "full"
    assert main(base) == 0 and seen[-1].pressure is None  # picked from the pools
    capsys.readouterr()
    assert main([*base, "--pressure", "-2"]) != 0 and len(seen) == 3
    err = capsys.readouterr().err
    assert "pressure must be a concurrency >= 0" in err and "Traceback" not in err and len(err.splitlines()) == 1

"""`relaygen bench`: handoff cost, relay overhead, speedup and throughput, each case beside
its baseline in the same run, on real SGLang servers. A benchmark reports; it asserts nothing.

Runs are interleaved (relay, single-large, single-small, relay, ...) and summarized as
median with min and max.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from relaygen_sgl.api import Relay
from relaygen_sgl.bench import machine
from relaygen_sgl.bench.replay import FLOOR_TRIALS, FORMATS, handoffs_only, idle_floor, replay
from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.core import files
from relaygen_sgl.core.config import METHODS
from relaygen_sgl.core.datasets import load_problems
from relaygen_sgl.core.errors import ConfigError, RelayGenError
from relaygen_sgl.core.result import RelayResult, Segment, warm_turns
from relaygen_sgl.core.run_settings import DEFAULT_PREFETCH, RunSettings


@dataclass(frozen=True)
class BenchConfig:
    preset: str
    questions: int = 3
    reps: int = 2
    max_tokens: int = 512
    load_levels: tuple[int, ...] = (1, 2, 4, 16)
    load_max_tokens: int = 256
    dataset: str = "aime25"
    # Live handoffs, once per question: most relays on a short budget switch once or never, so
    # the speed questions alone give a handful of handoffs, whose mean one collision moves.
    handoff_questions: int = 12
    # The load part's relay once per prefetch mode, interleaved with single-large; the first
    # is "relay" in the report, each further one is compared with it (auto against off: does
    # the load-aware prefetch cost anything under load?). (): the backend's default mode only.
    load_prefetch: tuple[str, ...] = (DEFAULT_PREFETCH, "off")
    # Rounds of the load part per level: from one round each, two cases that do the same work
    # (auto and off at 16 concurrent, where auto sends next to no prefetch) read further apart
    # than the effects the part looks for; pooled over rounds in A B, B A order, drift and
    # noise weigh less.
    load_rounds: int = 2
    # The floor's requests per idle gap and server (bench.replay.idle_floor).
    floor_trials: int = FLOOR_TRIALS
    # The pressure part: relay and single-large at `pressure` concurrent trajectories whose
    # whole size exceeds the smaller KV pool (None: picked from the pools, pressure_level; 0: not run),
    # each trajectory's budget `pressure_max_tokens`, in `pressure_rounds` rounds (A B, B A).
    pressure: int | None = None
    pressure_max_tokens: int = 300
    pressure_rounds: int = 2
    # "full" (the published numbers) or "quick" (the same parts on fewer samples): named in the report
    kind: str = "full"
    # every run's settings but what each part sets itself (method, budget, seed, prefetch mode):
    # the protocol, for one ("reference": the reference implementation's)
    settings: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        for name in ("questions", "reps", "max_tokens", "load_max_tokens", "handoff_questions", "load_rounds",
                     "floor_trials", "pressure_max_tokens", "pressure_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"bench {name} must be a positive integer, got {value!r}")
        if self.pressure is not None and (not isinstance(self.pressure, int) or self.pressure < 0):
            raise ConfigError(f"bench pressure must be a concurrency >= 0 (0: no pressure part) or None (picked "
                              f"from the pools), got {self.pressure!r}")
        if not self.load_levels or any(not isinstance(v, int) or v < 1 for v in self.load_levels):
            raise ConfigError(f"bench load_levels must be positive integers, got {self.load_levels!r}")

    @property
    def protocol(self) -> str:
        return self.settings.protocol

    def run(self, method: str, max_tokens: int, seed: int, prefetch: str | None = None) -> RunSettings:
        """One run's settings: the bench's, with the part's own."""
        return self.settings.but(method=method, max_tokens=max_tokens, seed=seed,
                                 **({"prefetch": prefetch} if prefetch else {}))

    @classmethod
    def quick(cls, preset: str) -> BenchConfig:
        """Every part of the full run on fewer samples, each figure still a spread with its n (about
        10 min on cpu-tiny, 2 cores: docs/usage/bench.md): 2 questions x 2 reps at 128 tokens for
        speed and overhead; 6 questions x 2 variants of live handoffs at 128 tokens (shorter
        relays hand off at a cue too rarely); 4 floor trials per gap; load at the full run's
        levels (1, 2, 4, 16 concurrent), 96 tokens, the relay (prefetch auto) and single-large in
        2 rounds (at 2, 4 and 16 one wave per round: from one pair of runs the ratio moves with the
        machine's drift; the comparison with prefetch off is the full run's). No pressure part
        unless asked for: on 2048-token pools it alone takes 12 min at 16 concurrent
        (docs/usage/bench.md), and on larger pools the level it would pick is past PRESSURE_MAX_LEVEL."""
        return cls(preset=preset, questions=2, reps=2, max_tokens=128, load_levels=(1, 2, 4, 16),
                   load_max_tokens=96, dataset="amc23", handoff_questions=6, load_rounds=2, floor_trials=4,
                   load_prefetch=(DEFAULT_PREFETCH,), pressure=0, kind="quick")

    def samples(self) -> dict[str, Any]:
        """How many samples each part rests on, as configured (the report's header; each figure
        carries its own measured n beside it)."""
        return {"kind": self.kind, "questions": self.questions, "reps": self.reps,
                "speed_runs_per_method": self.questions * self.reps, "max_tokens": self.max_tokens,
                "handoff_questions": self.handoff_questions, "handoff_variants": 2,
                "floor_trials_per_gap": self.floor_trials, "load_levels": list(self.load_levels),
                "load_rounds": self.load_rounds, "load_max_tokens": self.load_max_tokens,
                "load_cases": len(self.load_prefetch or (None,)) + 1,
                "pressure": "picked" if self.pressure is None else self.pressure,
                "pressure_max_tokens": self.pressure_max_tokens, "pressure_rounds": self.pressure_rounds}


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))], 4) if s else 0.0


def run_speed(relay: Relay, questions: list[str], cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[RelayResult]] = {m: [] for m in METHODS}
    asked: list[tuple[str, RelayResult]] = []  # each relay run with its question (the format replay's)
    for rep in range(cfg.reps):
        for qi, q in enumerate(questions):
            for method in METHODS:  # interleaved: A B C A B C
                res = relay.run(q, settings=cfg.run(method, cfg.max_tokens, rep))
                runs[method].append(res)
                if method == "relay" and res.degraded is None:
                    asked.append((q, res))
                log(f"speed rep {rep} q{qi} {method}: {res.stats.e2e_s:.2f}s "
                    f"{res.stats.large_tokens + res.stats.small_tokens} tok")
    # a run the large model finished alone (the small server failed) is not a relay: counted
    # apart, left out of every speed figure
    degraded = {m: sum(r.degraded is not None for r in rs) for m, rs in runs.items()}
    runs = {m: [r for r in rs if r.degraded is None] for m, rs in runs.items()}
    out: dict[str, Any] = {"degraded_runs": degraded}
    for method, results in runs.items():
        toks = [r.stats.large_tokens + r.stats.small_tokens for r in results]
        out[method] = {
            "latency_s": spread([r.stats.e2e_s for r in results]),
            "completion_tokens": spread([float(t) for t in toks]),
            "s_per_token": spread([r.stats.e2e_s / t for r, t in zip(results, toks) if t]),
            "large_share": spread([r.stats.large_share for r in results]),
            "switches": spread([float(r.stats.switches) for r in results]),
        }
    # Speedup and the cost model on aggregates (all runs' time over all their tokens): a
    # relay's large share is bimodal across runs (some never switch), so medians mislead.
    def per_token(results: list[RelayResult]) -> float | None:
        tokens = sum(r.stats.large_tokens + r.stats.small_tokens for r in results)
        return sum(r.stats.e2e_s for r in results) / tokens if tokens else None

    t_l, t_s, t_r = per_token(runs["single-large"]), per_token(runs["single-small"]), per_token(runs["relay"])
    large = sum(r.stats.large_tokens for r in runs["relay"])
    total = sum(r.stats.large_tokens + r.stats.small_tokens for r in runs["relay"])
    share = round(large / total, 4) if total else 1.0
    ratio = t_s / t_l if t_l and t_s else None
    predicted = 1 / (share + (1 - share) * ratio) if ratio else None
    measured = t_l / t_r if t_l and t_r else None
    out["speedup"] = {
        "measured_per_token": round(measured, 4) if measured else None,
        "measured_latency": round(out["single-large"]["latency_s"]["median"] / out["relay"]["latency_s"]["median"], 4)
        if out["relay"]["latency_s"]["median"] else None,
        "predicted": round(predicted, 4) if predicted else None,
        "t_small_over_t_large": round(ratio, 4) if ratio else None,
        "relay_large_share": share,
    }
    # Where the relay's time goes: each role's server time per token inside the relay (short
    # turns pay a handoff prefill and a request each) against the same role running alone.
    breakdown: dict[str, Any] = {}
    for role, alone in (("large", t_l), ("small", t_s)):
        segs = [s for r in runs["relay"] for s in r.segments if s.role == role]
        toks = sum(s.completion_tokens for s in segs)
        server = sum(s.server_latency_s for s in segs)
        breakdown[role] = {"turns": len(segs), "tokens": toks, "server_s": round(server, 3),
                           "s_per_token_in_relay": round(server / toks, 5) if toks else None,
                           "s_per_token_alone": round(alone, 5) if alone else None,
                           "mean_tokens_per_turn": round(toks / len(segs), 1) if segs else None,
                           "mean_reprefilled_per_turn": round(sum(s.reprefilled for s in segs) / len(segs), 1)
                           if segs else None}
    rl, rs = breakdown["large"]["s_per_token_in_relay"], breakdown["small"]["s_per_token_in_relay"]
    if t_l and rl and rs and total:
        # the cost model again, with each role's per-token time as measured inside the relay
        out["speedup"]["predicted_with_in_relay_rates"] = round(t_l / (share * rl + (1 - share) * rs), 4)
    out["speedup"]["breakdown"] = breakdown
    # relay overhead at batch 1: end-to-end over the servers' own time for its segments
    overhead = [r.stats.e2e_s / sum(s.server_latency_s for s in r.segments if s.role in ("large", "small"))
                for r in runs["relay"] if any(s.server_latency_s for s in r.segments)]
    out["overhead"] = {"relay_e2e_over_server_time": spread(overhead), "target": 1.05}
    out["_runs"], out["_asked"] = runs, asked
    return out


def handoff_samples(results: list[RelayResult], after_text: bool = False) -> list[Segment]:
    """Every turn that follows the other role's turn at a cue: the switch and the hand-back
    (the small server's first turn included; the trajectory's first turn is not one). With
    `after_text`, instead the turns that follow the other role's after text the program
    inserted (the forced "</think>"): no cue ends the turn before them, and no prefetch can
    send text the program has not written yet, so they re-prefill that text."""
    out = []
    for res in results:
        prev, inserted = None, False
        for seg in res.segments:
            if seg.role not in ("large", "small"):
                inserted = True
                continue
            if prev is not None and seg.role != prev and inserted == after_text:
                out.append(seg)
            prev, inserted = seg.role, False
    return out


def handoff_summary(segs: list[Segment]) -> dict[str, Any]:
    """Means (the keys older readers know) and each measure's spread with its n."""
    lat = [s.handoff_s for s in segs if s.handoff_s is not None]
    return {"handoffs": len(segs),
            "mean_reprefilled_tokens": round(statistics.fmean(s.reprefilled for s in segs), 2) if segs else None,
            "mean_handoff_latency_s": round(statistics.fmean(lat), 4) if lat else None,
            "median_handoff_latency_s": round(statistics.median(lat), 4) if lat else None,
            "handoff_latency_s": spread(lat), "reprefilled_tokens": spread([float(s.reprefilled) for s in segs])}


def server_roles(relay: Relay) -> dict[str, EngineClient]:
    """Each server once, under the first role it serves (both roles may be one)."""
    return relay.backend.servers


def servers_of(relay: Relay) -> list[EngineClient]:
    return list(server_roles(relay).values())


def run_live_handoffs(relay: Relay, questions: list[str], cfg: BenchConfig,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """The same relays with the handoff prefetch on and off (plain token-exact handoffs),
    interleaved (the order alternating), each from cold caches: what each handoff
    re-prefills and how long the receiving role takes from the cue to its first token."""
    runs: dict[str, list[RelayResult]] = {"prefetch": [], "tokens": []}
    switched: dict[str, int] = {name: 0 for name in runs}
    counts: dict[str, Counter[str]] = {name: Counter() for name in runs}
    asked: list[tuple[str, RelayResult]] = []
    engines = servers_of(relay)
    variants = (("prefetch", "on"), ("tokens", "off"))
    for qi, q in enumerate(questions):
        for name, on in variants if qi % 2 == 0 else variants[::-1]:
            for e in engines:
                e.flush_cache(timeout_s=30)
            before = relay.backend.prefetching.snapshot()
            res = relay.run(q, settings=cfg.run("relay", cfg.max_tokens, 0, on))
            counts[name] += relay.backend.prefetching.snapshot() - before
            runs[name].append(res)
            asked += [(q, res)] if res.degraded is None else []
            switched[name] += res.stats.switches > 0
            log(f"handoff q{qi} {name}: {res.stats.e2e_s:.2f}s, {res.stats.switches} switches")
    out: dict[str, Any] = {
        name: {**handoff_summary(handoff_samples(rs)), "relays": len(rs), "relays_that_switched": switched[name],
               "after_inserted_text": handoff_summary(handoff_samples(rs, after_text=True)),
               "prefetch_requests": counts[name]["sent"],
               # turns that ended (at a handoff, mostly) while their prefetch still ran
               "prefetch_in_flight_at_turn_end": counts[name]["in_flight_at_turn_end"]}
        for name, rs in runs.items()}
    out["_asked"] = asked  # each relay with its question, for the format replay
    return out


def replayable(res: RelayResult) -> bool:
    """Whether replaying `res` gives a handoff: a role's second turn (each role's first
    prefills cold and is left out)."""
    roles = [s.role for s in res.segments if s.role in ("large", "small")]
    return len(roles) > len(set(roles))


def replay_choice(asked: list[tuple[str, RelayResult]]) -> dict[str, RelayResult]:
    """For each question, of its relays whose replay gives a handoff, the one with the most
    switches (the first of a tie); a question with none is left out."""
    best: dict[str, RelayResult] = {}
    for q, res in asked:
        if replayable(res) and (q not in best or res.stats.switches > best[q].stats.switches):
            best[q] = res
    return best


def run_floor(relay: Relay, results: list[RelayResult], decode_step: float | None,
              trials: int = FLOOR_TRIALS) -> dict[str, Any]:
    """Each server's floor for a handoff (bench.replay.idle_floor), cut from these relays'
    trajectories (the longest of each prompt: two of one prompt share their first tokens), each
    server from a flushed cache; `over_decode_step`: each gap's median first token over the
    large model's decode step, the denominator of the live handoffs' ratio."""
    longest: dict[tuple[int, ...], RelayResult] = {}
    for r in results:
        key = tuple(r.prompt_ids)
        if key not in longest or len(r.token_ids) > len(longest[key].token_ids):
            longest[key] = r
    sequences = [([*r.prompt_ids, *r.token_ids], len(r.prompt_ids))
                 for r in sorted(longest.values(), key=lambda r: -len(r.token_ids))]
    out: dict[str, Any] = {}
    for role, eng in server_roles(relay).items():
        eng.flush_cache(timeout_s=30)  # only this server's cache holds what the floor measures
        # behind SGLang's DP router the two requests of a sample must meet on one rank
        extra = relay.backend.pin(role) or None
        floor = idle_floor(eng, sequences, trials=trials, extra=extra)
        first = {gap: spread(v) for gap, v in floor["first_token_s"].items()}
        out[role] = {**floor, "first_token_s": first, "reprefilled_tokens": spread(floor["reprefilled_tokens"]),
                     "over_decode_step": {gap: round(f["median"] / decode_step, 3) if decode_step and f["n"] else None
                                          for gap, f in first.items()}}
    return out


def decode_step_s(results: list[RelayResult]) -> float | None:
    """One decode step of the large model alone at batch 1: (turn time - first token) per
    further token, median over single-large turns."""
    steps = [(s.latency_s - s.ttft_s) / (s.completion_tokens - 1) for r in results for s in r.segments
             if s.role == "large" and s.completion_tokens > 1 and s.requests == 1]
    return round(statistics.median(steps), 4) if steps else None


def run_handoff(relay: Relay, results: list[RelayResult], questions: list[str]) -> dict[str, Any]:
    samples = []
    for res, q in zip(results, questions):
        samples += handoffs_only(replay(res, q, relay.engines, relay.tokenizer, relay.family.think_prefix))
    out: dict[str, Any] = {}
    for fmt in FORMATS:
        mine = [s for s in samples if s.format == fmt]
        out[fmt] = {"handoffs": len(mine),
                    "mean_reprefilled_tokens":
                        round(statistics.fmean(s.reprefilled for s in mine), 2) if mine else None,
                    "mean_handoff_latency_s": round(statistics.fmean(s.ttft_s for s in mine), 4) if mine else None,
                    "reprefilled_tokens": spread([float(s.reprefilled) for s in mine]),
                    "handoff_latency_s": spread([s.ttft_s for s in mine]), "relays": len(results)}
    base = out["tokens"]
    for fmt in ("text", "chat"):
        o = out[fmt]
        o["reprefill_ratio_vs_tokens"] = (round(o["mean_reprefilled_tokens"] / base["mean_reprefilled_tokens"], 3)
                                          if base["mean_reprefilled_tokens"] and o["handoffs"] else None)
        o["latency_ratio_vs_tokens"] = (round(o["mean_handoff_latency_s"] / base["mean_handoff_latency_s"], 3)
                                        if base["mean_handoff_latency_s"] and o["handoffs"] else None)
    out["samples"] = [asdict(s) | {"reprefilled": s.reprefilled} for s in samples]
    return out


def load_variant(mode: str) -> str:
    """The load table's name of the relay with a further prefetch mode."""
    return f"relay (prefetch {mode})"


def run_load(relay: Relay, questions: list[str], cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """tokens/s at each concurrency: every question at least once per round, in waves of `level`
    trajectories (so level 1 is not one sample), the relay (once per prefetch mode of
    cfg.load_prefetch) and single-large interleaved WAVE BY WAVE (each case runs the same wave's
    questions in turn, the order reversed from one wave to the next, counted across the level's
    rounds: A B C, C B A, ...), in `cfg.load_rounds` rounds per level; each wave starts from
    flushed caches and lasts as long as its slowest trajectory (load figures from before this
    wave-by-wave order, when `level` workers took trajectories as they freed, are not comparable).
    A case's tokens/s is pooled over its waves (all tokens over all wall time;
    `tokens_per_s_by_round` per round), and each ratio to single-large comes twice: pooled,
    and paired (`..._paired`: median, min, max, n of the
    ratios of the same wave's runs, which ran back to back). This machine's speed drifts by 10%
    and more within minutes (docs/results.md); interleaving wave by wave puts both cases under
    the same drift, and the paired median does not follow one wave that ran slow.
    The first mode's relay is "relay"; each further one is load_variant(mode), with its
    tokens/s over single-large, and the first's over it (`relay_<first>_over_<mode>`).
    Every run starts from flushed caches: the live handoffs before end on flushed ones, so
    otherwise the first run of level 1 alone would prefill its prompts cold and read slower
    than the next runs of the same relays."""
    modes = tuple(cfg.load_prefetch) or (None,)
    runs = [("relay", modes[0], "relay"), *(("relay", m, load_variant(m)) for m in modes[1:]),
            ("single-large", None, "single-large")]
    out: dict[str, Any] = {}
    for k, level in enumerate(cfg.load_levels):
        count = -(-max(level, len(questions)) // level) * level
        qs = [questions[i % len(questions)] for i in range(count)]
        waves = [list(enumerate(qs))[w:w + level] for w in range(0, count, level)]
        # done[name][round][wave]: one run of `level` trajectories
        done: dict[str, list[list[dict[str, Any]]]] = {name: [[] for _ in range(cfg.load_rounds)]
                                                       for _, _, name in runs}
        for rnd in range(cfg.load_rounds):
            for w, wave in enumerate(waves):
                g = k + rnd * len(waves) + w
                for method, mode, name in runs if g % 2 == 0 else runs[::-1]:
                    d = _wave(relay, [(q, cfg.run(method, cfg.load_max_tokens, i, mode)) for i, q in wave])
                    done[name][rnd].append(d)
                    failed = f", {len(d['failed'])} failed" if d["failed"] else ""
                    log(f"load {level} {name} (round {rnd + 1}, wave {w + 1}/{len(waves)}): "
                        f"{d['tokens'] / d['wall']:.1f} tok/s{failed}")
        by: dict[str, Any] = {}
        for method, mode, name in runs:
            rounds = done[name]
            flat = [d for r in rounds for d in r]
            tokens, wall = sum(d["tokens"] for d in flat), sum(d["wall"] for d in flat)
            lat = [r.stats.e2e_s for d in flat for r in d["results"]]
            failed = [f for d in flat for f in d["failed"]]
            by_round = [sum(d["tokens"] for d in r) / sum(d["wall"] for d in r) for r in rounds]
            by[name] = {"trajectories": count * len(rounds), "rounds": len(rounds), "waves": len(flat),
                        "wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
                        "tokens_per_s_by_round": [round(x, 2) for x in by_round],
                        "p50_latency_s": _pct(lat, 0.5), "p95_latency_s": _pct(lat, 0.95),
                        "latency_s": spread(lat), "tokens_per_s_spread": spread(by_round),
                        "prefetch": (mode or relay.backend.prefetching.default) if method == "relay" else "off",
                        "prefetch_requests": sum(d["sent"] for d in flat),
                        "failed": len(failed), "failures": failed[:5]}

        def paired(a: str, b: str) -> dict[str, float]:
            """The ratios of a's and b's tokens/s on the same wave of the same round, over the waves
            where no run of either failed (a failed run adds wall time and no tokens: its wave's
            ratio would measure the failure); `skipped`: the waves left out."""
            pairs = [(x, y) for ra, rb in zip(done[a], done[b]) for x, y in zip(ra, rb)]
            kept = [(x, y) for x, y in pairs if not x["failed"] and not y["failed"] and y["tokens"]]
            return {**spread([x["tokens"] / x["wall"] / (y["tokens"] / y["wall"]) for x, y in kept]),
                    "skipped": len(pairs) - len(kept)}

        base = by["single-large"]["tokens_per_s"]
        by["relay_over_single_large"] = round(by["relay"]["tokens_per_s"] / base, 3) if base else None
        by["relay_over_single_large_paired"] = paired("relay", "single-large")
        for m in modes[1:]:
            other = by[load_variant(m)]
            other["over_single_large"] = round(other["tokens_per_s"] / base, 3) if base else None
            other["over_single_large_paired"] = paired(load_variant(m), "single-large")
            by[f"relay_{modes[0]}_over_{m}"] = (round(by["relay"]["tokens_per_s"] / other["tokens_per_s"], 3)
                                                if other["tokens_per_s"] else None)
            by[f"relay_{modes[0]}_over_{m}_paired"] = paired("relay", load_variant(m))
        out[str(level)] = by
    return out


def _wave(relay: Relay, runs: list[tuple[str, RunSettings]], watch: bool = False) -> dict[str, Any]:
    """Runs of the load and pressure parts: all at once, from flushed caches. Returns the results,
    the failures (RelayGenError, one line each: counted, not raised, so one run lost does not lose
    the part), wall time, tokens, the prefetch requests sent meanwhile, the runs the pool gate held
    back and the evicted copies it heard of; with `watch` (the pressure part), also the most
    trajectories it let run at once, sampled every 50 ms (a thread the load part does without:
    on 2 cores it would take time from the runs it measures)."""
    results: list[RelayResult] = []
    failed: list[str] = []
    lock = threading.Lock()

    def one(question: str, settings: RunSettings) -> None:
        try:
            r = relay.run(question, settings=settings)
        except RelayGenError as e:
            with lock:
                failed.append(f"{type(e).__name__}: {e}")
            return
        with lock:
            results.append(r)

    for e in servers_of(relay):
        e.flush_cache(timeout_s=30)
    gate, prefetching = relay.backend.pools, relay.backend.prefetching
    before, sent, peak, over = gate.snapshot(), prefetching.snapshot()["sent"], [0], threading.Event()

    def sample() -> None:
        while not over.wait(0.05):
            peak[0] = max(peak[0], gate.snapshot()["running"])

    watcher = threading.Thread(target=sample, daemon=True) if watch else None
    if watcher:
        watcher.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=len(runs)) as workers:
            list(workers.map(lambda a: one(*a), runs))
    finally:  # an error that is not the engine's ends the part, and the sampling with it
        over.set()
        if watcher:
            watcher.join()
    wall = time.perf_counter() - t0
    after = gate.snapshot()
    return {"results": results, "failed": failed, "wall": wall,
            "tokens": sum(r.stats.large_tokens + r.stats.small_tokens for r in results),
            "sent": prefetching.snapshot()["sent"] - sent,
            "waited": after["waited"] - before["waited"], "peak": peak[0],
            "evicted": after["evicted"] - before["evicted"]}


# The picked pressure level: trajectories at their whole size hold this many times the smaller
# pool (about half of them wait for the pool at the start), and the most it picks: on larger
# pools the part would run for long (a note says to start the pair with a smaller --kv-tokens).
PRESSURE_OVER = 2.0
PRESSURE_MAX_LEVEL = 32


def tail(values: list[float]) -> dict[str, float]:
    """spread() with the 90th percentile."""
    return {**spread(values), "p90": _pct(values, 0.9)}


def warm_handoffs(results: list[RelayResult], handoffs_only: bool = True) -> list[dict[str, Any]]:
    """The warm turns (core/result.py warm_turns) of every result."""
    return [t for res in results for t in warm_turns(len(res.prompt_ids), res.segments, handoffs_only)]


def warm_summary(handoffs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per warm handoff: re-prefilled tokens and those beyond the floor (median, p90, min, max,
    n), the share above the floor, and the worst five."""
    beyond = [h["beyond_floor"] for h in handoffs]
    over = sum(b > 0 for b in beyond)
    return {"handoffs": len(handoffs), "reprefilled_tokens": tail([float(h["reprefilled"]) for h in handoffs]),
            "beyond_floor_tokens": tail([float(b) for b in beyond]), "above_floor": over,
            "share_above_floor": round(over / len(handoffs), 4) if handoffs else None,
            "worst": sorted(handoffs, key=lambda h: -h["beyond_floor"])[:5] if over else []}


def pool_sizes(relay: Relay) -> dict[str, dict[str, int | None]]:
    """Each server's KV pool and longest input (/server_info, client/http.py Limits), by role."""
    return {role: {"kv_tokens": eng.limits.kv_tokens, "max_input": eng.limits.max_input}
            for role, eng in server_roles(relay).items()}


def in_flight(sizes: list[int], level: int) -> int:
    """Tokens `level` trajectories hold at their whole size, the i-th asking question i % len(sizes)."""
    return sum(sizes[i % len(sizes)] for i in range(level))


def pressure_level(given: int | None, pool: int | None, sizes: list[int]) -> tuple[int, str | None]:
    """The part's concurrency and why it is not run (None: it runs): `given`, else the fewest
    trajectories that at their whole size (`sizes`: per question, asked in turn) hold
    PRESSURE_OVER times the smaller pool."""
    if given == 0:
        return 0, "not asked for (--pressure 0)"
    if given is not None:
        return given, None
    if pool is None:
        return 0, "the servers do not say their KV pools (/server_info: a router in front?); give --pressure N"
    level = 2
    while in_flight(sizes, level) < PRESSURE_OVER * pool:
        level += 1
    if level > PRESSURE_MAX_LEVEL:
        return level, (f"pools of {pool} tokens take {level} concurrent trajectories of up to {max(sizes)} tokens, "
                       f"more than the {PRESSURE_MAX_LEVEL} the bench picks; start the pair with a smaller "
                       f"--kv-tokens (e.g. 2048) or give --pressure N")
    return level, None


def run_pressure(relay: Relay, questions: list[str], cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Relay and single-large at a concurrency whose trajectories, at their whole size (prompt,
    closing text and budget), exceed the smaller KV pool: the pool gate (runtime/pools.py) makes
    the runs wait their turn, and each server's radix cache evicts to make room. Per case: the
    tokens/s (pooled over `cfg.pressure_rounds` rounds, A B then B A, each run from flushed
    caches), the runs that failed (raised), ended degraded or at a server's limit, the runs that
    waited for the pool and the most trajectories in flight; then per warm handoff of the relays
    what it re-prefilled beyond the floor (warm_summary)."""
    pools = pool_sizes(relay)
    known = [p["kv_tokens"] for p in pools.values() if p["kv_tokens"] is not None]
    pool = min(known) if known else None
    probe = relay.plan(settings=cfg.run("relay", cfg.pressure_max_tokens, 0))
    closing = len(relay.tokenizer.encode(probe.closing_text))
    sizes = [len(relay.tokenizer.encode(probe.render(q))) + closing + cfg.pressure_max_tokens for q in questions]
    level, skipped = pressure_level(cfg.pressure, pool, sizes)
    whole = in_flight(sizes, level)
    out: dict[str, Any] = {"pools": pools, "smaller_pool": pool, "trajectory_tokens": sizes, "level": level,
                           "picked": cfg.pressure is None, "max_tokens": cfg.pressure_max_tokens,
                           "in_flight_tokens": whole,
                           "in_flight_over_pool": round(whole / pool, 2) if pool and level else None}
    if skipped:
        log(f"pressure: skipped, {skipped}")
        return {**out, "skipped": skipped}
    qs = [questions[i % len(questions)] for i in range(level)]
    cases = ("relay", "single-large")
    done: dict[str, list[dict[str, Any]]] = {method: [] for method in cases}
    for rnd in range(cfg.pressure_rounds):
        for method in cases if rnd % 2 == 0 else cases[::-1]:
            d = _wave(relay, [(q, cfg.run(method, cfg.pressure_max_tokens, i)) for i, q in enumerate(qs)], watch=True)
            done[method].append(d)
            log(f"pressure {level} {method}: {d['tokens'] / d['wall']:.1f} tok/s, {len(d['failed'])} failed, "
                f"{d['waited']} waited, at most {d['peak']} in flight")
    for method in cases:
        rounds = done[method]
        results = [r for d in rounds for r in d["results"]]
        tokens, wall = sum(d["tokens"] for d in rounds), sum(d["wall"] for d in rounds)
        failed = [f for d in rounds for f in d["failed"]]
        out[method] = {"trajectories": level * len(rounds), "rounds": len(rounds), "wall_s": round(wall, 3),
                       "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
                       "tokens_per_s_by_round": [round(d["tokens"] / d["wall"], 2) for d in rounds],
                       "tokens_per_s_spread": spread([d["tokens"] / d["wall"] for d in rounds]),
                       "latency_s": spread([r.stats.e2e_s for r in results]),
                       "failed": len(failed), "failures": failed[:5],
                       "degraded": sum(r.degraded is not None for r in results),
                       "at_limit": sum(any(s.finish == "limit" for s in r.segments) for r in results),
                       "waited": sum(d["waited"] for d in rounds), "most_in_flight": max(d["peak"] for d in rounds),
                       # warm turns the gate heard were evicted (runtime/pools.py), its own count of the above
                       "gate_heard_evicted": sum(d["evicted"] for d in rounds),
                       # every later turn of a role, handoff or not: single-large's answer turn after the
                       # inserted text finds its thinking evicted too
                       "warm_turns": warm_summary(warm_handoffs(results, handoffs_only=False))}
        if method == "relay":
            out["warm_handoffs"] = warm_summary(warm_handoffs([r for r in results if r.degraded is None]))
    base = out["single-large"]["tokens_per_s"]
    out["relay_over_single_large"] = round(out["relay"]["tokens_per_s"] / base, 3) if base else None
    return out


def run_bench(cfg: BenchConfig, relay: Relay, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every part, then the report in `out_dir`, held for the whole run (OUT/bench.lock): a
    second bench on it is refused before it measures anything (two would skew each other)."""
    with files.held(out_dir / "bench.lock", out_dir, "bench"):
        return _run_bench(cfg, relay, out_dir, log)


def _run_bench(cfg: BenchConfig, relay: Relay, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    problems = load_problems(cfg.dataset)[: cfg.questions]
    questions = [p.question for p in problems]
    t0 = time.perf_counter()
    parts: dict[str, float] = {}  # each part's wall time, in the order run
    mark = [t0]

    def lap(part: str) -> None:
        now = time.perf_counter()
        parts[part], mark[0] = round(now - mark[0], 1), now
        log(f"bench: {part} done in {parts[part]} s ({round(now - t0)} s in all)")

    speed = run_speed(relay, questions, cfg, log)
    lap("speed")
    all_runs, asked = speed.pop("_runs"), speed.pop("_asked")
    runs = all_runs["relay"]
    handoff = run_live_handoffs(relay, [p.question for p in load_problems(cfg.dataset)[: cfg.handoff_questions]],
                                cfg, log)
    asked += handoff.pop("_asked")
    lap("live_handoffs")
    handoff["decode_step_s"] = decode_step_s(all_runs["single-large"])
    handoff["floor"] = run_floor(relay, runs, handoff["decode_step_s"], trials=cfg.floor_trials)
    lap("floor")
    # the format replay needs handoffs: one relay per question of the speed and live parts, the
    # one with the most switches (at a short budget most relays switch once: nothing to replay)
    best = replay_choice(asked)
    handoff["replay"] = run_handoff(relay, list(best.values()), list(best))
    lap("replay")
    load = run_load(relay, questions, cfg, log)
    lap("load")
    pressure = run_pressure(relay, questions, cfg, log)
    lap("pressure")
    result = {
        "preset": cfg.preset, "config": asdict(cfg), "machine": machine.describe(), "machine_summary": machine.short(),
        "urls": relay.urls, "profile": relay.profile.name, "elapsed_s": round(time.perf_counter() - t0, 1),
        "elapsed_by_part_s": parts, "samples": cfg.samples(),
        "handoff": handoff, "overhead": speed.pop("overhead"), "speedup": speed.pop("speedup"), "speed": speed,
        "load": load, "pressure": pressure,
    }
    write_report(result, out_dir)
    return result


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    """bench.json, bench.md and bench.png, each replaced atomically (files.replacing)."""
    from relaygen_sgl.bench.report import markdown, plot

    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_atomic(out_dir / "bench.json", orjson.dumps(result, option=orjson.OPT_INDENT_2))
    files.write_atomic(out_dir / "bench.md", markdown(result).encode())
    with files.replacing(out_dir / "bench.png") as tmp:
        plot(result, tmp)

"""`relaygen bench`: handoff cost, relay overhead, speedup and throughput, each case beside
its baseline in the same run, on real SGLang servers. A benchmark reports; it asserts nothing.

Runs are interleaved (relay, single-large, single-small, relay, ...) and summarized as
median with min and max.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from . import machine
from .api import Relay
from .datasets import load_problems
from .handoff import FORMATS, handoffs_only, replay
from .result import RelayResult

METHODS = ("relay", "single-large", "single-small")


@dataclass(frozen=True)
class BenchConfig:
    preset: str
    questions: int = 3
    reps: int = 2
    max_tokens: int = 512
    load_levels: tuple[int, ...] = (1, 4, 16)
    load_max_tokens: int = 256
    dataset: str = "aime25"

    @classmethod
    def quick(cls, preset: str) -> BenchConfig:
        return cls(preset=preset, questions=3, reps=2, max_tokens=160, load_levels=(1, 4, 16), load_max_tokens=48,
                   dataset="amc23")


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
    for rep in range(cfg.reps):
        for qi, q in enumerate(questions):
            for method in METHODS:  # interleaved: A B C A B C
                res = relay.run(q, method, max_tokens=cfg.max_tokens, seed=rep)
                runs[method].append(res)
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
    out["_runs"] = runs
    return out


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
                    "mean_handoff_latency_s": round(statistics.fmean(s.ttft_s for s in mine), 4) if mine else None}
    base = out["tokens"]
    for fmt in ("text", "chat"):
        o = out[fmt]
        o["reprefill_ratio_vs_tokens"] = (round(o["mean_reprefilled_tokens"] / base["mean_reprefilled_tokens"], 3)
                                          if base["mean_reprefilled_tokens"] else None)
        o["latency_ratio_vs_tokens"] = (round(o["mean_handoff_latency_s"] / base["mean_handoff_latency_s"], 3)
                                        if base["mean_handoff_latency_s"] else None)
    out["samples"] = [asdict(s) | {"reprefilled": s.reprefilled} for s in samples]
    return out


def run_load(relay: Relay, questions: list[str], cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in cfg.load_levels:
        out[str(level)] = {}
        for method in ("relay", "single-large"):  # interleaved per level
            qs = [questions[i % len(questions)] for i in range(level)]
            lat: list[float] = []
            tokens = 0
            lock = threading.Lock()

            def one(i: int, q: str) -> None:
                nonlocal tokens
                r = relay.run(q, method, max_tokens=cfg.load_max_tokens, seed=i)
                with lock:
                    lat.append(r.stats.e2e_s)
                    tokens += r.stats.large_tokens + r.stats.small_tokens

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=level) as pool:
                list(pool.map(lambda a: one(*a), enumerate(qs)))
            wall = time.perf_counter() - t0
            out[str(level)][method] = {"trajectories": level, "wall_s": round(wall, 3), "tokens": tokens,
                                       "tokens_per_s": round(tokens / wall, 2), "p50_latency_s": _pct(lat, 0.5),
                                       "p95_latency_s": _pct(lat, 0.95)}
            log(f"load {level} {method}: {tokens / wall:.1f} tok/s")
    return out


def run_bench(cfg: BenchConfig, relay: Relay, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    problems = load_problems(cfg.dataset)[: cfg.questions]
    questions = [p.question for p in problems]
    t0 = time.perf_counter()
    speed = run_speed(relay, questions, cfg, log)
    # the replay needs handoffs: the relay runs with the most switches, one per question
    runs = speed.pop("_runs")["relay"]
    best: dict[str, RelayResult] = {}
    for res, q in zip(runs, [q for _ in range(cfg.reps) for q in questions]):
        if q not in best or res.stats.switches > best[q].stats.switches:
            best[q] = res
    handoff = run_handoff(relay, list(best.values()), list(best))
    load = run_load(relay, questions, cfg, log)
    result = {
        "preset": cfg.preset, "config": asdict(cfg), "machine": machine.describe(), "machine_summary": machine.short(),
        "urls": relay.urls, "profile": relay.profile.name, "elapsed_s": round(time.perf_counter() - t0, 1),
        "handoff": handoff, "overhead": speed.pop("overhead"), "speedup": speed.pop("speedup"), "speed": speed,
        "load": load,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out_dir / "bench.md").write_text(markdown(result))
    plot(result, out_dir / "bench.png")
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# relaygen bench: {r['preset']}", "",
             f"Machine: {r.get('machine_summary') or m['cpu']}; "
             f"sglang {m['versions'].get('sglang')}, torch {m['versions'].get('torch')}. "
             f"Medians (min-max) over interleaved runs; {r['elapsed_s']} s in all.", "",
             "## Handoff cost (per handoff, replayed trajectories)", "",
             "| format | handoffs | re-prefilled tokens | handoff latency (s) | vs tokens (prefill / latency) |",
             "|---|---|---|---|---|"]
    for fmt in FORMATS:
        h = r["handoff"][fmt]
        ratio = ("1 / 1" if fmt == "tokens" else
                 f"{h.get('reprefill_ratio_vs_tokens')}x / {h.get('latency_ratio_vs_tokens')}x")
        lines.append(f"| {fmt} | {h['handoffs']} | {h['mean_reprefilled_tokens']} | {h['mean_handoff_latency_s']} | "
                     f"{ratio} |")
    o = r["overhead"]["relay_e2e_over_server_time"]
    lines += ["", "## Relay overhead at batch 1", "",
              f"relay end-to-end / sum of its segments' server time: **{o['median']}** "
              f"({o['min']}-{o['max']}, n={o['n']}); target <= {r['overhead']['target']}", "",
              "## Speed at batch 1", "",
              "| method | latency (s) | completion tokens | s/token | large share | switches |",
              "|---|---|---|---|---|---|"]

    def f(d: dict[str, float]) -> str:
        return f"{d['median']} ({d['min']}-{d['max']})"

    for method in METHODS:
        s = r["speed"][method]
        lines.append(f"| {method} | {f(s['latency_s'])} | {f(s['completion_tokens'])} | {f(s['s_per_token'])} | "
                     f"{f(s['large_share'])} | {f(s['switches'])} |")
    sp = r["speedup"]
    lines += ["", f"Relay vs single-large, all runs' time over all their tokens: measured speedup "
                  f"**{sp['measured_per_token']}x** (median latency ratio {sp['measured_latency']}x); cost model "
                  f"1/(share_L + share_S * t_S/t_L) = **{sp['predicted']}x** with share_L={sp['relay_large_share']} "
                  f"(relay tokens written by the large model), t_S/t_L={sp['t_small_over_t_large']} measured in this "
                  "run.", ""]
    bd = sp.get("breakdown") or {}
    if bd:
        lines += ["Where the relay's time goes (server time per token inside the relay vs the role alone):", "",
                  "| role | turns | tokens/turn | re-prefilled/turn | s/token in relay | s/token alone |",
                  "|---|---|---|---|---|---|"]
        for role, b in bd.items():
            lines.append(f"| {role} | {b['turns']} | {b['mean_tokens_per_turn']} | {b['mean_reprefilled_per_turn']} | "
                         f"{b['s_per_token_in_relay']} | {b['s_per_token_alone']} |")
        lines += ["", f"Cost model with the in-relay rates: {sp.get('predicted_with_in_relay_rates')}x.", ""]
    lines += [
              "## Throughput under load", "",
              "| concurrent | method | tokens/s | p50 latency (s) | p95 latency (s) |", "|---|---|---|---|---|"]
    for level, by in r["load"].items():
        for method, d in by.items():
            lines.append(f"| {level} | {method} | {d['tokens_per_s']} | {d['p50_latency_s']} | {d['p95_latency_s']} |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    vals = [r["handoff"][f]["mean_reprefilled_tokens"] or 0 for f in FORMATS]
    a.bar(FORMATS, vals, color=["#1f77b4", "#ff7f0e", "#d62728"])
    a.set_ylabel("tokens re-prefilled per handoff (mean)")
    a.set_title("handoff cost")
    for i, v in enumerate(vals):
        a.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom")
    levels = sorted(r["load"], key=int)
    for method, color in (("relay", "#1f77b4"), ("single-large", "#7f7f7f")):
        b.plot([int(x) for x in levels], [r["load"][x][method]["tokens_per_s"] for x in levels], "o-",
               color=color, label=method)
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent trajectories")
    b.set_ylabel("total tokens/s")
    b.set_title("throughput under load")
    b.legend()
    fig.suptitle(f"{r['preset']} on {r.get('machine_summary') or r['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

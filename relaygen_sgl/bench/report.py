"""The bench report: bench.md (tables) and bench.png (handoff cost, throughput under load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relaygen_sgl.bench.replay import FORMATS
from relaygen_sgl.core.config import METHODS


def markdown(r: dict[str, Any]) -> str:
    """bench.md: one section after the other, each from its own part of the result."""
    lines = _header(r)
    ho = r["handoff"]
    lines += _live_handoffs(ho)
    lines += _handoff_floor(ho.get("floor") or {})
    lines += _handoff_formats(ho)
    lines += _overhead(r["overhead"])
    lines += _speed(r["speed"], r.get("samples") or {})
    lines += _speedup(r["speedup"], r["speed"])
    lines += _throughput(r["load"])
    lines += _pressure(r.get("pressure"))
    return "\n".join(lines) + "\n"


def _header(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    lines = [f"# relaygen bench: {r['preset']}", "",
             f"Machine: {r.get('machine_summary') or m['cpu']}; "
             f"sglang {m['versions'].get('sglang')}, torch {m['versions'].get('torch')}. "
             f"Medians (min-max) over interleaved runs, each with the n it rests on; {r['elapsed_s']} s in all.", ""]
    return lines + _samples(r.get("samples") or {}, r.get("elapsed_by_part_s") or {})


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _samples(n: dict[str, Any], parts: dict[str, float]) -> list[str]:
    """The run's sample counts, part by part, and each part's wall time (results from before
    they were recorded have neither)."""
    lines = []
    if n:
        levels = n["load_levels"]
        lines.append(
            f"Samples ({n['kind']} run): speed and overhead {_count(n['questions'], 'question')} x "
            f"{_count(n['reps'], 'rep')} = {_count(n['speed_runs_per_method'], 'run')} per method, "
            f"{n['max_tokens']} tokens; live handoffs {_count(n['handoff_questions'], 'question')} x "
            f"{n['handoff_variants']} variants; floor {_count(n['floor_trials_per_gap'], 'trial')} per idle gap and "
            f"server; replay: per question, the relay with the most switches; load "
            f"{_count(len(levels), 'level')} ({', '.join(map(str, levels))}) x {_count(n['load_rounds'], 'round')} "
            f"x {n['load_cases']} cases, {n['load_max_tokens']} tokens.")
    if n and "pressure" in n:
        level = n["pressure"]
        what = "a concurrency picked from the pools" if level == "picked" else f"{level} concurrent"
        lines.append("No pressure part (--pressure 0)." if level == 0 else
                     f"Pressure: {what} x {_count(n['pressure_rounds'], 'round')} x 2 cases, "
                     f"{n['pressure_max_tokens']} tokens.")
    if parts:
        lines.append("Time per part (s): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in parts.items()) + ".")
    return [*lines, ""] if lines else []


def _spread_text(d: dict[str, float] | None) -> str:
    """median (min-max), or n/a without samples."""
    return f"{d['median']} ({d['min']}-{d['max']})" if d and d.get("n") else "n/a"


def _mean_spread(mean: float | None, d: dict[str, float] | None) -> str:
    """mean, median (min-max); n/a without samples."""
    return "n/a" if mean is None else f"{mean}, {_spread_text(d)}"


def _live_handoffs(ho: dict[str, Any]) -> list[str]:
    """Handoffs at a cue and after inserted text, with and without prefetch, each against
    the large model's decode step; then how often a turn ended with its prefetch still running."""
    step = ho.get("decode_step_s")
    lines = ["## Handoffs in live relays (batch 1, cold caches, interleaved)", "",
             f"One decode step of the large model alone: {step} s. Handoff latency: from the end of one role's "
             "turn to the other role's first token. At a cue: the switch and the hand-back. After inserted "
             "text: the answer turn after a forced \"</think>\", which no prefetch can send ahead. n: the "
             "handoffs each row rests on.", "",
             "| handoff | where | n | re-prefilled tokens: mean, median (min-max) | handoff latency (s): "
             "median (min-max) | mean | mean / decode step |",
             "|---|---|---|---|---|---|---|"]
    relays = []
    for name, label in (("prefetch", "token-exact + prefetch"), ("tokens", "token-exact, no prefetch")):
        whole = ho.get(name) or {}
        for where, h in (("at a cue", whole), ("after inserted text", whole.get("after_inserted_text") or {})):
            lat = h.get("mean_handoff_latency_s")
            # a result from before the spreads: its median alone
            spread = (_spread_text(h["handoff_latency_s"]) if "handoff_latency_s" in h else
                      f"{h['median_handoff_latency_s']} (median only)" if h.get("median_handoff_latency_s") is not None
                      else "n/a")
            lines.append(f"| {label} | {where} | {h.get('handoffs')} | "
                         f"{_mean_spread(h.get('mean_reprefilled_tokens'), h.get('reprefilled_tokens'))} | "
                         f"{spread} | {'n/a' if lat is None else lat} | "
                         f"{round(lat / step, 2) if lat and step else 'n/a'} |")
        if "relays" in whole:
            relays.append(f"{whole['relays']} {label} ({whole.get('relays_that_switched')} switched)")
    if relays:
        lines += ["", f"Relays, one per question: {' and '.join(relays)}."]
    pf = ho.get("prefetch") or {}
    if "prefetch_in_flight_at_turn_end" in pf:
        lines += ["", f"With prefetch: {pf.get('prefetch_requests')} prefetch requests; "
                      f"{pf['prefetch_in_flight_at_turn_end']} turns ended while their prefetch still ran "
                      "(the handoff after such a turn may wait behind it)."]
    return lines


def _handoff_floor(floor: dict[str, Any]) -> list[str]:
    """The cheapest handoff per server after each idle gap; nothing when the run measured none."""
    if not floor:
        return []
    some = next(iter(floor.values()))
    gaps = list(some["first_token_s"])
    lines = ["", "The floor: the cheapest handoff each server can take, a request adding "
                 f"{some['new_tokens']} tokens to a prefix it has just cached, sent after "
                 "the server idled for a while; first token (s, median (min-max), n requests) and its median over "
                 "the decode step above; then the tokens those requests re-prefilled as the server reports them "
                 f"({some['new_tokens']} when the floor is what it says). "
                 "A live handoff's receiver has idled since its last prefetch or turn.", "",
             "| server | " + " | ".join(f"after {g} s idle" for g in gaps) + " | re-prefilled tokens |",
             "|---|" + "---|" * (len(gaps) + 1)]
    for role, fl in floor.items():
        cells = []
        for g in gaps:
            d, ratio = fl["first_token_s"][g], fl["over_decode_step"].get(g)
            cells.append(f"{_spread_text(d)}, n={d['n']}: {ratio if ratio is not None else 'n/a'} steps"
                         if d["n"] else "n/a")
        refilled = fl.get("reprefilled_tokens")
        cells.append(f"{_spread_text(refilled)}, n={refilled['n']}" if isinstance(refilled, dict) else "n/a")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return lines


def _handoff_formats(ho: dict[str, Any]) -> list[str]:
    lines = ["", "## Handoff format (per handoff, replayed trajectories)", ""]
    if not any(ho["replay"][fmt]["handoffs"] for fmt in FORMATS):
        # each role's first turn is a cold prefill, not a handoff: a relay needs two switches
        lines.append("No handoff to replay: no relay of the speed and live-handoff parts gave a role a second turn "
                     "(each role's first turn prefills cold and is left out); a longer --max-tokens gives more "
                     "switches.")
        return lines
    relays = ho["replay"]["tokens"].get("relays")
    lines += [(f"Replayed: {relays} relay{'' if relays == 1 else 's'}, for each question of the speed and live-handoff "
               "parts its relay with the most switches where that gave a role a second turn" if relays else
               "Replayed: the relays of the speed part") +
              ", in each format from flushed caches; n: the handoffs each row rests on (every turn after "
              "each role's first).", "",
              "| format | n | re-prefilled tokens: mean, median (min-max) | handoff latency (s): mean, "
              "median (min-max) | vs tokens (mean prefill / mean latency) |",
              "|---|---|---|---|---|"]
    for fmt in FORMATS:
        h = ho["replay"][fmt]
        ratio = ("1 / 1" if fmt == "tokens" else "n/a" if not h["handoffs"] else
                 f"{h.get('reprefill_ratio_vs_tokens')}x / {h.get('latency_ratio_vs_tokens')}x")
        lines.append(f"| {fmt} | {h['handoffs']} | "
                     f"{_mean_spread(h['mean_reprefilled_tokens'], h.get('reprefilled_tokens'))} | "
                     f"{_mean_spread(h['mean_handoff_latency_s'], h.get('handoff_latency_s'))} | {ratio} |")
    return lines


def _overhead(overhead: dict[str, Any]) -> list[str]:
    o = overhead["relay_e2e_over_server_time"]
    return ["", "## Relay overhead at batch 1", "",
            f"relay end-to-end / sum of its segments' server time: **{o['median']}** "
            f"({o['min']}-{o['max']}, n={o['n']}); target <= {overhead['target']}", ""]


def _speed(speed: dict[str, Any], n: dict[str, Any]) -> list[str]:
    how = (f" ({_count(n['questions'], 'question')} x {_count(n['reps'], 'rep')}, the methods interleaved)"
           if n else "")
    degraded = {m: c for m, c in (speed.get("degraded_runs") or {}).items() if c}
    lines = ["## Speed at batch 1", "",
             f"Each cell: median (min-max) over the method's n runs{how}"
             + (f"; runs the large model finished alone, left out: {degraded}" if degraded else "") + ".", "",
             "| method | n | latency (s) | completion tokens | s/token | large share | switches |",
             "|---|---|---|---|---|---|---|"]
    f = _spread_text
    for method in METHODS:
        s = speed[method]
        lines.append(f"| {method} | {s['latency_s'].get('n', '')} | {f(s['latency_s'])} | "
                     f"{f(s['completion_tokens'])} | {f(s['s_per_token'])} | {f(s['large_share'])} | "
                     f"{f(s['switches'])} |")
    return lines


def _speedup(sp: dict[str, Any], speed: dict[str, Any]) -> list[str]:
    """The measured speedup against the cost model, then (when measured) where the relay's time goes."""
    runs = ", ".join(f"{speed[m]['latency_s'].get('n')} {m}" for m in METHODS)
    lines = ["", f"Relay vs single-large, all runs' time over all their tokens ({runs} runs): measured speedup "
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
    return lines


def _throughput(load: dict[str, Any]) -> list[str]:
    """One row per level and method (the relay under each prefetch mode, then single-large); after
    the table, each prefetch-mode ratio gathered over the levels into one sentence."""
    lines = ["## Throughput under load", "",
             "The cases run wave by wave in turn (a wave: the level's trajectories at once), the order reversed "
             "each wave. tokens/s pooled over each case's waves (all tokens over all wall time; each round's in "
             "brackets); p50 and p95 latency over every trajectory; n: trajectories (rounds) behind both, and "
             "the runs that failed (raised; their tokens are not counted, their wall time is; the paired ratios "
             "leave out the waves where a run of either case failed). "
             "relay / single-large: pooled; paired: the ratio of the same wave's two runs, which ran back to "
             "back, median (min-max) over the waves.", "",
             "| concurrent | method | prefetch | n | tokens/s | p50 latency (s) | p95 latency (s) | "
             "prefetch requests | relay / single-large |",
             "|---|---|---|---|---|---|---|---|---|"]
    compared: dict[str, list[str]] = {}  # "relay_auto_over_off" -> "0.99 (1)", ...
    failures: list[str] = []
    for level, by in load.items():
        lines += _throughput_rows(level, by)
        for key, value in by.items():
            if (key.startswith("relay_") and "_over_" in key and not key.startswith("relay_over_single_large")
                    and not key.endswith("_paired")):
                compared.setdefault(key, []).append(f"{value}{_paired(by.get(key + '_paired'))} ({level})")
            if isinstance(value, dict) and value.get("failures"):
                failures += ["", f"First failures (concurrent {level}, {key}): " + "; ".join(value["failures"])]
    lines += failures
    for key, values in compared.items():
        first, other = key[len("relay_"):].split("_over_")
        lines += ["", f"Relay tokens/s with prefetch {first} over the same relays with prefetch {other}, "
                      f"interleaved in this run (concurrent): {', '.join(values)}."]
    return lines


def _throughput_rows(level: str, by: dict[str, Any]) -> list[str]:
    names = ["relay", *(k for k, v in by.items() if k.startswith("relay (") and isinstance(v, dict)),
             "single-large"]
    rows = []
    for name in names:
        d = by[name]
        pooled, pair = ((by.get("relay_over_single_large"), by.get("relay_over_single_large_paired"))
                        if name == "relay" else (d.get("over_single_large"), d.get("over_single_large_paired")))
        ratio = "" if name == "single-large" else f"{pooled}{_paired(pair)}"
        rounds = d.get("tokens_per_s_by_round") or []
        tps = f"{d['tokens_per_s']} ({', '.join(map(str, rounds))})" if len(rounds) > 1 else d["tokens_per_s"]
        n = f"{d['trajectories']} ({d.get('rounds', 1)})" if "trajectories" in d else ""
        n += f", {d['failed']} failed" if d.get("failed") else ""
        rows.append(f"| {level} | {name} | {d.get('prefetch', '')} | {n} | {tps} | {d['p50_latency_s']} | "
                    f"{d['p95_latency_s']} | {d.get('prefetch_requests', '')} | {ratio} |")
    return rows


def _paired(pair: dict[str, float] | None) -> str:
    """The paired ratios of a load row (median (min-max), n waves), after its pooled ratio; the
    waves left out for a failed run, where there were any."""
    skipped = f" ({_count(pair['skipped'], 'wave')} with a failed run left out)" if pair and pair.get("skipped") else ""
    if not pair or not pair.get("n"):
        return f"; paired: none{skipped}" if skipped else ""
    return f"; paired {pair['median']:.3f} ({pair['min']:.3f}-{pair['max']:.3f}), n {pair['n']}{skipped}"


def _pressure(p: dict[str, Any] | None) -> list[str]:
    """The pressure part: the pools, the level, each case's tokens/s, failures and waits, then the
    warm handoffs' re-prefill beyond the floor; one line when it did not run."""
    if not p:
        return []
    pools = ", ".join(f"{role} {d['kv_tokens']}" for role, d in p["pools"].items())
    lines = ["", "## Under pressure (pools smaller than the trajectories in flight)", "",
             f"KV pools (tokens): {pools}. {p['level']} concurrent trajectories"
             f"{' (picked)' if p.get('picked') else ''}, each question's in turn, of "
             f"{', '.join(map(str, p['trajectory_tokens']))} tokens at their whole size (prompt, closing text and a "
             f"{p['max_tokens']}-token budget): {p['in_flight_tokens']} tokens, {p['in_flight_over_pool']}x the "
             "smaller pool."]
    if p.get("skipped"):
        return [*lines, "", f"Not run: {p['skipped']}."]
    lines += ["", "tokens/s pooled over the rounds (each round's in brackets; the order reversed each round), every "
                  "run from flushed caches; failed: runs that raised; waited: runs the pool gate held back; in "
                  "flight: the most trajectories the gate let run at once; later turns above the floor: a role's "
                  "turns after its first (handoffs, and the answer after inserted text) that re-prefilled more "
                  "than the tokens written since + 1, of all such turns, and the most tokens beyond.", "",
              "| method | n | tokens/s | latency (s): median (min-max) | failed | degraded | at limit | waited | "
              "in flight | later turns above the floor | relay / single-large |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("relay", "single-large"):
        d = p[name]
        rounds = d["tokens_per_s_by_round"]
        tps = f"{d['tokens_per_s']} ({', '.join(map(str, rounds))})" if len(rounds) > 1 else d["tokens_per_s"]
        ratio = p["relay_over_single_large"] if name == "relay" else ""
        t = d.get("warm_turns")
        turns = f"{t['above_floor']} of {t['handoffs']} (max {t['beyond_floor_tokens']['max']})" if t else "n/a"
        lines.append(f"| {name} | {d['trajectories']} ({d['rounds']}) | {tps} | {_spread_text(d['latency_s'])} | "
                     f"{d['failed']} | {d['degraded']} | {d['at_limit']} | {d['waited']} | {d['most_in_flight']} | "
                     f"{turns} | {ratio} |")
    for name in ("relay", "single-large"):
        if p[name]["failures"]:
            lines += ["", f"First failures ({name}): " + "; ".join(p[name]["failures"])]
    w = p["warm_handoffs"]
    b, r = w["beyond_floor_tokens"], w["reprefilled_tokens"]
    lines += ["", "Warm handoffs of the relays (a role's turn after the other's, where it had a turn before): "
                  "re-prefilled beyond the floor, the other role's new tokens + 1 (more: the receiving server had "
                  "evicted part of the trajectory).", "",
              "| n | beyond the floor: median, p90, max | above the floor | re-prefilled: median, p90, max |",
              "|---|---|---|---|"]
    share = ("n/a" if w["share_above_floor"] is None else
             f"{w['above_floor']} ({round(100 * w['share_above_floor'], 1)}%)")
    lines.append(f"| {w['handoffs']} | {b['median']}, {b['p90']}, {b['max']} | {share} | "
                 f"{r['median']}, {r['p90']}, {r['max']} |")
    return lines


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    ho = r["handoff"]
    names = ["prefetch", *FORMATS]
    vals = [(ho.get("prefetch") or {}).get("mean_reprefilled_tokens") or 0,
            *[ho["replay"][f]["mean_reprefilled_tokens"] or 0 for f in FORMATS]]
    a.bar(["tokens+prefetch\n(at cues)", *FORMATS], vals, color=["#2ca02c", "#1f77b4", "#ff7f0e", "#d62728"])
    a.set_ylabel("tokens re-prefilled per handoff (mean)")
    a.set_title("handoff cost")
    for i, v in enumerate(vals[: len(names)]):
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

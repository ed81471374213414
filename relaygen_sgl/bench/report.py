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
    lines += _speed(r["speed"])
    lines += _speedup(r["speedup"])
    lines += _throughput(r["load"])
    return "\n".join(lines) + "\n"


def _header(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    return [f"# relaygen bench: {r['preset']}", "",
            f"Machine: {r.get('machine_summary') or m['cpu']}; "
            f"sglang {m['versions'].get('sglang')}, torch {m['versions'].get('torch')}. "
            f"Medians (min-max) over interleaved runs; {r['elapsed_s']} s in all.", ""]


def _live_handoffs(ho: dict[str, Any]) -> list[str]:
    """Handoffs at a cue and after inserted text, with and without prefetch, each against
    the large model's decode step; then how often a turn ended with its prefetch still running."""
    step = ho.get("decode_step_s")
    lines = ["## Handoffs in live relays (batch 1, cold caches, interleaved)", "",
             f"One decode step of the large model alone: {step} s. Handoff latency: from the end of one role's "
             "turn to the other role's first token. At a cue: the switch and the hand-back. After inserted "
             "text: the answer turn after a forced \"</think>\", which no prefetch can send ahead.", "",
             "| handoff | where | handoffs | re-prefilled tokens (mean) | handoff latency (s, mean) | "
             "latency / decode step |",
             "|---|---|---|---|---|---|"]
    for name, label in (("prefetch", "token-exact + prefetch"), ("tokens", "token-exact, no prefetch")):
        for where, h in (("at a cue", ho.get(name) or {}),
                         ("after inserted text", (ho.get(name) or {}).get("after_inserted_text") or {})):
            lat = h.get("mean_handoff_latency_s")
            lines.append(f"| {label} | {where} | {h.get('handoffs')} | {h.get('mean_reprefilled_tokens')} | {lat} | "
                         f"{round(lat / step, 2) if lat and step else 'n/a'} |")
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
                 "the server idled for a while; first token (s, median (min-max)) and over the decode step above. "
                 "A live handoff's receiver has idled since its last prefetch or turn.", "",
             "| server | " + " | ".join(f"after {g} s idle" for g in gaps) + " |",
             "|---|" + "---|" * len(gaps)]
    for role, fl in floor.items():
        cells = []
        for g in gaps:
            d, ratio = fl["first_token_s"][g], fl["over_decode_step"].get(g)
            cells.append(f"{d['median']} ({d['min']}-{d['max']}): {ratio if ratio is not None else 'n/a'} steps"
                         if d["n"] else "n/a")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return lines


def _handoff_formats(ho: dict[str, Any]) -> list[str]:
    lines = ["", "## Handoff format (per handoff, replayed trajectories)", ""]
    if not any(ho["replay"][fmt]["handoffs"] for fmt in FORMATS):
        # each role's first turn is a cold prefill, not a handoff: a relay needs two switches
        lines.append("No handoff to replay: no relay of the speed part switched twice (each role's first turn "
                     "prefills cold and is left out); a longer --max-tokens gives more switches.")
        return lines
    lines += ["| format | handoffs | re-prefilled tokens | handoff latency (s) | vs tokens (prefill / latency) |",
              "|---|---|---|---|---|"]
    for fmt in FORMATS:
        h = ho["replay"][fmt]
        ratio = ("1 / 1" if fmt == "tokens" else
                 f"{h.get('reprefill_ratio_vs_tokens')}x / {h.get('latency_ratio_vs_tokens')}x")
        lines.append(f"| {fmt} | {h['handoffs']} | {h['mean_reprefilled_tokens']} | "
                     f"{h['mean_handoff_latency_s']} | {ratio} |")
    return lines


def _overhead(overhead: dict[str, Any]) -> list[str]:
    o = overhead["relay_e2e_over_server_time"]
    return ["", "## Relay overhead at batch 1", "",
            f"relay end-to-end / sum of its segments' server time: **{o['median']}** "
            f"({o['min']}-{o['max']}, n={o['n']}); target <= {overhead['target']}", ""]


def _spread_text(d: dict[str, float]) -> str:
    return f"{d['median']} ({d['min']}-{d['max']})"


def _speed(speed: dict[str, Any]) -> list[str]:
    lines = ["## Speed at batch 1", "",
             "| method | latency (s) | completion tokens | s/token | large share | switches |",
             "|---|---|---|---|---|---|"]
    f = _spread_text
    for method in METHODS:
        s = speed[method]
        lines.append(f"| {method} | {f(s['latency_s'])} | {f(s['completion_tokens'])} | {f(s['s_per_token'])} | "
                     f"{f(s['large_share'])} | {f(s['switches'])} |")
    return lines


def _speedup(sp: dict[str, Any]) -> list[str]:
    """The measured speedup against the cost model, then (when measured) where the relay's time goes."""
    lines = ["", f"Relay vs single-large, all runs' time over all their tokens: measured speedup "
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
             "tokens/s pooled over the rounds of each case (all tokens over all wall time; each round's in "
             "brackets), the rounds' order reversed each time.", "",
             "| concurrent | method | prefetch | tokens/s | p50 latency (s) | p95 latency (s) | prefetch requests | "
             "relay / single-large |",
             "|---|---|---|---|---|---|---|---|"]
    compared: dict[str, list[str]] = {}  # "relay_auto_over_off" -> "0.99 (1)", ...
    for level, by in load.items():
        lines += _throughput_rows(level, by)
        for key, value in by.items():
            if key.startswith("relay_") and "_over_" in key and key != "relay_over_single_large":
                compared.setdefault(key, []).append(f"{value} ({level})")
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
        ratio = (by.get("relay_over_single_large") if name == "relay" else
                 "" if name == "single-large" else d.get("over_single_large"))
        rounds = d.get("tokens_per_s_by_round") or []
        tps = f"{d['tokens_per_s']} ({', '.join(map(str, rounds))})" if len(rounds) > 1 else d["tokens_per_s"]
        rows.append(f"| {level} | {name} | {d.get('prefetch', '')} | {tps} | {d['p50_latency_s']} | "
                    f"{d['p95_latency_s']} | {d.get('prefetch_requests', '')} | {ratio} |")
    return rows


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

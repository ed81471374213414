"""Pick the CPU presets' thread policy by measurement (issue 15).

One cpu-tiny pair per candidate policy (each on its own ports and home; each pair holds two
CPU servers' memory, which bounds how many run at once), all started before any load runs; then
`bench.run_load` (relay and single-large interleaved per level) on every pair in turn,
for several rounds, the order of pairs rotated each round.
An idle pair sleeps (--sleep-on-idle), so the pairs do not disturb each other.

    .venv/bin/python scripts/cpu_threads.py --out runs/threads.json [--policies defaults preset ...]

Writes JSON: for each policy, level and method the tokens/s of every round, the median,
min and max, and the ratio of the relay's median to single-large's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import orjson

from relaygen_sgl.api import Relay
from relaygen_sgl.bench import machine
from relaygen_sgl.bench.runner import BenchConfig, run_load, spread
from relaygen_sgl.core.config import Preset, Settings, load_preset, load_settings
from relaygen_sgl.core.datasets import load_problems
from relaygen_sgl.core.errors import RelayGenError
from relaygen_sgl.servers import stack


def _thread_var(name: str) -> bool:
    return name.startswith(("OMP_", "GOMP_"))


ONE_PASSIVE = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
SPIN10K = {"GOMP_SPINCOUNT": "10000"}

# env per role, in place of the preset's own thread settings (OMP_*, GOMP_*): "defaults" runs
# with none (OpenMP's defaults), "preset" with what presets.toml sets now (read at start)
POLICIES: dict[str, dict[str, dict[str, str]]] = {
    "defaults": {"large": {}, "small": {}},
    "preset": {},
    "passive": {r: {"OMP_WAIT_POLICY": "PASSIVE"} for r in ("large", "small")},
    "spin10k": {r: SPIN10K for r in ("large", "small")},
    "spin1k": {r: {"GOMP_SPINCOUNT": "1000"} for r in ("large", "small")},
    "one-core-each": {"large": {"OMP_NUM_THREADS": "1", "GOMP_CPU_AFFINITY": "0"},
                      "small": {"OMP_NUM_THREADS": "1", "GOMP_CPU_AFFINITY": "1"}},
    "one-thread-each": {r: {"OMP_NUM_THREADS": "1"} for r in ("large", "small")},
    "small-one-passive": {"large": {}, "small": ONE_PASSIVE},
    "small-one-passive-large-spin10k": {"large": SPIN10K, "small": ONE_PASSIVE},
}
# the same threads with SGLang's mixed prefill/decode batches on both roles
MIXED = ("small-one-passive", "small-one-passive-large-spin10k")
POLICIES |= {f"{n}-mixed": POLICIES[n] for n in MIXED}
EXTRA_ARGS: dict[str, tuple[str, ...]] = {f"{n}-mixed": ("--enable-mixed-chunk",) for n in MIXED}


def policy_env(name: str, role: str, preset: Preset) -> dict[str, str]:
    if name == "preset":
        return {n: v for n, v in preset.roles[role].env.items() if _thread_var(n)}
    return POLICIES[name][role]


def start(name: str, k: int, base: Settings, root: Path) -> dict[str, str]:
    preset = load_preset("cpu-tiny")
    roles = {r: dataclasses.replace(s, port=s.port + 400 + 2 * k,
                                    env={n: v for n, v in s.env.items() if not _thread_var(n)}
                                    | policy_env(name, r, preset),
                                    args=(*s.args, *EXTRA_ARGS.get(name, ())))
             for r, s in preset.roles.items()}
    settings = Settings(home=root / name, models_override=base.models_dir)
    st = stack.up(dataclasses.replace(preset, roles=roles), settings)
    return {"large": st["large"]["url"], "small": st["small"]["url"], "home": str(settings.home)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=["defaults", "preset", "spin10k"],
                    choices=sorted(POLICIES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    base = load_settings()
    cfg = BenchConfig(preset="cpu-tiny", load_levels=tuple(a.levels), load_max_tokens=a.max_tokens)
    questions = [p.question for p in load_problems("amc23")[:3]]
    root = Path(tempfile.mkdtemp(prefix="relaygen-threads-"))
    pairs: dict[str, dict[str, str]] = {}
    runs: dict[str, list[dict]] = {n: [] for n in a.policies}
    try:
        for k, name in enumerate(a.policies):
            try:
                pairs[name] = start(name, k, base, root)
            except RelayGenError as e:  # a policy the server cannot start under is a result too
                print(f"{name}: did not start: {e}".splitlines()[0], flush=True)
                del runs[name]
                continue
            print(f"{name}: up {pairs[name]['large']} {pairs[name]['small']}", flush=True)
        live = [n for n in a.policies if n in pairs]
        if not live:
            print("no policy started a pair: nothing to measure", file=sys.stderr)
            return 1
        for rnd in range(a.rounds):
            order = live[rnd % len(live):] + live[:rnd % len(live)]
            for name in order:
                with Relay(preset="cpu-tiny", large=pairs[name]["large"], small=pairs[name]["small"]) as r:
                    if rnd == 0:
                        r.run(questions[0], "relay", max_tokens=16, seed=0)  # warm both servers
                    log = lambda m, n=name: print(f"r{rnd} {n} {m}", flush=True)  # noqa: E731
                    runs[name].append(run_load(r, questions, cfg, log))
            write(a.out, a, runs)
    finally:
        for p in pairs.values():
            stack.down(Settings(home=Path(p["home"]), models_override=base.models_dir))
    return 0


def write(out: Path, a: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    summary: dict[str, dict] = {}
    for name, rs in runs.items():
        per: dict[str, dict] = {}
        for lvl in map(str, a.levels):
            row: dict[str, dict | float] = {}
            for m in ("relay", "single-large"):
                v = [r[lvl][m]["tokens_per_s"] for r in rs]
                row[m] = spread(v) | {"runs": v}
            row["relay_over_single_large"] = round(row["relay"]["median"] / row["single-large"]["median"], 3)
            per[lvl] = row
        summary[name] = {"env": {r: policy_env(name, r, load_preset("cpu-tiny")) for r in ("large", "small")},
                         "args": EXTRA_ARGS.get(name, ()), "load": per}
    doc = {"machine": machine.short(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rounds": len(next(iter(runs.values()))), "max_tokens": a.max_tokens, "policies": summary, "raw": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    sys.exit(main())

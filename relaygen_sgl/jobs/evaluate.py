"""`relaygen eval`: run methods over a benchmark with k samples, grade, and report.

Each method's runs go to DIR/<method>.jsonl through the batch runner (resumable with the
same settings, jobs.output), the grades to DIR/graded-<method>.jsonl, and the report covers
every method found in DIR, so running relay and single-large one after the other yields the
speedup. One eval at a time writes DIR (`claim_folder`: DIR/eval.lock); every file is
replaced atomically.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from relaygen_sgl.core import files
from relaygen_sgl.core.config import METHODS, data_path
from relaygen_sgl.core.datasets import Problem
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.records import read_records, rewrite
from relaygen_sgl.core.reference import DEFAULT_PROTOCOL, REFERENCE, gpqa_prompt, math_prompt, reference_protocol
from relaygen_sgl.jobs import output
from relaygen_sgl.jobs.batch import BatchSummary, Prompt, run_batch


def build_prompts(problems: list[Problem], k: int, protocol: str = DEFAULT_PROTOCOL,
                  seed: int | None = None) -> list[Prompt]:
    """k samples per problem, unseeded (as the reference samples) unless `seed` is given:
    then sample j runs with seed + j. Under the reference protocol each carries the
    reference's user message (`user_message`), sent as it is (utils/utils.py:75-105)."""
    prompts = [Prompt(id=f"{p.id}#{j}", question=p.question, line=0,
                      extra={"problem_id": p.id, "sample": j, "seed": None if seed is None else seed + j,
                             "gold": p.gold, "kind": p.kind})
               for p in problems for j in range(k)]
    if protocol == REFERENCE:
        by_id = {p.id: p for p in problems}
        for prompt in prompts:
            prompt.extra["user_message"] = reference_message(by_id[prompt.extra["problem_id"]])
    return prompts


def reference_message(problem: Problem) -> str:
    if problem.kind == "math":
        return math_prompt(problem.problem)
    if problem.gold != "A" or len(problem.options) != 4:
        raise ConfigError("--protocol reference asks GPQA in the reference's format, the correct answer at A: "
                          "use --dataset gpqa-ref:PATH")
    return gpqa_prompt(problem.problem, dict(zip("ABCD", problem.options)))


def protocol_header(protocol: str, *, k: int, max_tokens: int, concurrency: int, seeded: bool) -> dict[str, Any]:
    """What the report says of the protocol: its name, and under the reference where this run
    left the reference's eval protocol (repeats, budget, one request at a time, no seed)."""
    out: dict[str, Any] = {"protocol": protocol, "concurrency": concurrency, "seeded": seeded}
    if protocol == REFERENCE:
        ref = reference_protocol()
        want = {"k": ref["repeats"], "max_tokens": ref["budget"], "concurrency": ref["concurrency"], "seeded": False}
        have = {"k": k, "max_tokens": max_tokens, "concurrency": concurrency, "seeded": seeded}
        out["deviations"] = {key: {"ours": have[key], "reference": want[key]}
                             for key in want if have[key] != want[key]}
    return out


def published_for(preset: str, family: str | None, dataset: str) -> dict[str, Any] | None:
    """The paper's numbers for this preset's model pair and data set (data/published.toml):
    {"label", "same_pair", "pass_at_1": {method: %}, "speed": {method: {...}}, "source",
    "accelerator"}. A preset the paper did not run is shown beside the pair of its family, or
    else the Qwen3 pair, marked as another pair (its difference is not a comparison)."""
    import tomllib

    data = tomllib.loads(data_path("published.toml").read_text(encoding="utf-8"))
    key = "gpqa" if dataset.startswith(("gpqa:", "gpqa-ref:")) else dataset
    pairs = data["pairs"]
    name = next((n for n, p in pairs.items() if preset in p.get("presets", ())), None)
    same = name is not None
    if name is None:
        name = next((n for n, p in pairs.items() if p.get("family") == family), "qwen3-32b-1.7b")
    pair = pairs[name]
    table = pair.get("pass_at_1", {}).get(key)
    if table is None:
        return None
    return {"label": pair["label"], "same_pair": same, "pass_at_1": dict(table),
            "speed": dict(pair.get("speed", {}).get(key, {})), "source": data["source"],
            "accelerator": data["accelerator"], "protocol": data["protocol"]}


def claim_folder(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold DIR for one eval (a context manager): a second eval on it is refused at once."""
    return output.claim_folder(out_dir, "eval")


def method_path(out_dir: Path, method: str, label: str | None = None) -> Path:
    """DIR/<label>.jsonl: the label defaults to the method; other labels keep runs of the same
    method on other servers apart, e.g. "relay+eagle3"."""
    return out_dir / f"{label or method}.jsonl"


def run_method(method: str, prompts: list[Prompt], out_dir: Path, run_one: Callable[[Prompt], dict[str, Any]],
               concurrency: int, progress: bool = True, label: str | None = None,
               header: dict[str, Any] | None = None, fresh: bool = False) -> BatchSummary:
    """One method's samples into method_path(); `header` and `fresh` as batch.run_batch's."""
    return run_batch(prompts, method_path(out_dir, method, label), run_one, concurrency=concurrency,
                     progress=progress, header=header, fresh=fresh, job="eval")


def run_labels(out_dir: Path) -> list[str]:
    """The runs found in DIR: the three methods first, then other labels by name (a hidden
    file, such as a temporary one, is none)."""
    found = {p.stem for p in out_dir.glob("*.jsonl") if not p.name.startswith((".", "graded-"))}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def grade_method(out_dir: Path, method: str, workers: int = 2) -> list[dict[str, Any]]:
    from relaygen_sgl.core.grading import grade_many

    records = read_records(out_dir / f"{method}.jsonl")
    items = [(r.get("text") or "", str(r["gold"]), r.get("kind", "math")) for r in records]
    grades = grade_many(items, workers=workers)
    graded = []
    for rec, g in zip(records, grades):
        stats = rec.get("stats") or {}
        ok = rec.get("status") == "ok"
        graded.append({
            "id": rec["id"], "problem_id": rec["problem_id"], "sample": rec["sample"], "status": rec.get("status"),
            "correct": bool(ok and g["correct"]), "extracted": g.get("extracted"), "gold": rec["gold"],
            "reason": g.get("reason") if ok else f"run error: {rec.get('error')}",
            "completion_tokens": int(stats.get("large_tokens", 0)) + int(stats.get("small_tokens", 0)),
            "large_tokens": int(stats.get("large_tokens", 0)), "switches": int(stats.get("switches", 0)),
            "e2e_s": float(stats.get("e2e_s", 0.0)),
            "degraded": rec.get("degraded") is not None,  # the large model finished it alone
        })
    rewrite(out_dir / f"graded-{method}.jsonl", sorted(graded, key=lambda g: (g["problem_id"], g["sample"])))
    return graded


def summarize(graded: list[dict[str, Any]], include_degraded: bool = False) -> dict[str, Any]:
    """pass@1 and speed over the samples; a degraded sample (the small server failed and the
    large model finished alone) is counted apart and, by default, left out: it is not a relay."""
    degraded = sum(1 for g in graded if g.get("degraded"))
    if not include_degraded:
        graded = [g for g in graded if not g.get("degraded")]
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for g in graded:
        by_problem[g["problem_id"]].append(g["correct"])
    tokens = sum(g["completion_tokens"] for g in graded)
    return {
        "problems": len(by_problem),
        "samples": len(graded),
        "degraded": degraded,
        "degraded_included": include_degraded,
        "errors": sum(1 for g in graded if g["status"] != "ok"),
        "pass_at_1": round(100 * statistics.fmean(statistics.fmean(v) for v in by_problem.values()), 2)
        if by_problem else 0.0,
        "mean_completion_tokens": round(statistics.fmean(g["completion_tokens"] for g in graded), 1) if graded else 0,
        "mean_latency_s": round(statistics.fmean(g["e2e_s"] for g in graded), 3) if graded else 0.0,
        "large_share": round(sum(g["large_tokens"] for g in graded) / tokens, 4) if tokens else 0.0,
        "switches_per_1k_tokens": round(1000 * sum(g["switches"] for g in graded) / tokens, 2) if tokens else 0.0,
    }


def report(out_dir: Path, header: dict[str, Any], workers: int = 2, include_degraded: bool = False) -> dict[str, Any]:
    rows = {m: summarize(grade_method(out_dir, m, workers), include_degraded) for m in run_labels(out_dir)}
    base = rows.get("single-large")
    for row in rows.values():
        row["speedup_vs_single_large"] = (round(base["mean_latency_s"] / row["mean_latency_s"], 3)
                                          if base and row["mean_latency_s"] else None)
    published = header.get("published")
    if published:
        for method, row in rows.items():
            pub = published["pass_at_1"].get(method)
            row["published_pass_at_1"] = pub
            row["pass_at_1_minus_published"] = round(row["pass_at_1"] - pub, 2) if pub is not None else None
            speed = published["speed"].get(method) or {}
            row["published_speedup"] = speed.get("speedup")
            row["published_large_share"] = speed.get("large_share")
    result = {**header, "methods": rows}
    files.write_atomic(out_dir / "report.json", orjson.dumps(result, option=orjson.OPT_INDENT_2))
    files.write_atomic(out_dir / "report.md", _markdown(result).encode())
    _plot(rows, out_dir / "accuracy_vs_latency.png", header.get("dataset", ""))
    return result


def _seeds(result: dict[str, Any]) -> str:
    """How the samples were seeded: unseeded (the default, as the reference), or seeds S..S+k-1
    (--seed S: each seeded, sampled request then carries the seeded sampler, docs/usage/prefetch-and-seeds.md)."""
    if not result.get("seeded"):
        return "unseeded"
    base, k = result.get("seed") or 0, result.get("k") or 1
    return f"seeded (seeds {base}..{base + k - 1})"


def _markdown(result: dict[str, Any]) -> str:
    head = (f"# Evaluation: {result.get('dataset')} on {result.get('preset')}\n\n"
            f"k={result.get('k')}, limit={result.get('limit')}, budget={result.get('max_tokens')}, "
            f"machine: {result.get('machine')}\n\n")
    if result.get("protocol"):
        head += (f"protocol: {result['protocol']} (docs/fidelity.md); {result.get('concurrency')} request(s) at a "
                 f"time; {_seeds(result)}\n\n")
        for key, d in (result.get("deviations") or {}).items():
            head += f"- not the reference's eval protocol: {key} {d['ours']} (reference: {d['reference']})\n"
        if result.get("deviations"):
            head += "\n"
    cols = ["method", "pass@1 (%)", "mean tokens", "mean latency (s)", "large share", "switches/1k tok",
            "speedup vs single-large", "samples", "degraded", "errors"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m, r in result["methods"].items():
        sp = f"{r['speedup_vs_single_large']:.2f}x" if r["speedup_vs_single_large"] else "n/a"
        lines.append(f"| {m} | {r['pass_at_1']:.2f} | {r['mean_completion_tokens']:.0f} | {r['mean_latency_s']:.2f} | "
                     f"{r['large_share']:.1%} | {r['switches_per_1k_tokens']:.1f} | {sp} | {r['samples']} | "
                     f"{r.get('degraded', 0)}{'' if r.get('degraded_included') else ' (left out)'} | {r['errors']} |")
    return head + "\n".join(lines) + "\n" + _published_markdown(result)


def _published_markdown(result: dict[str, Any]) -> str:
    """The paper's numbers beside ours, labelled as published, with the difference."""
    pub = result.get("published")
    if not pub:
        return (f"\nPublished (arXiv 2602.06454): no numbers for {result.get('dataset')} in Tables 2 and 3.\n")
    pair = pub["label"] if pub["same_pair"] else (
        f"{pub['label']}: ANOTHER model pair than {result.get('preset')}, shown for scale; the difference is not a "
        "comparison")
    out = [f"\n## Beside the published numbers ({pub['source']})\n",
           f"published: {pair}; {pub['accelerator']}; the reference implementation's protocol. "
           f"Ours: {result.get('preset')} on {result.get('machine')}, protocol {result.get('protocol', '?')}.\n",
           "| method | pass@1 ours (%) | pass@1 published (%) | ours - published | speedup ours | "
           "speedup published | large share ours | large share published |",
           "|---|---|---|---|---|---|---|---|"]

    def num(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for m, r in result["methods"].items():
        diff = r.get("pass_at_1_minus_published")
        out.append(f"| {m} | {r['pass_at_1']:.2f} | {num(r.get('published_pass_at_1'), '.2f')} | "
                   f"{num(diff, '+.2f')}{'' if pub['same_pair'] or diff is None else ' (other pair)'} | "
                   f"{num(r.get('speedup_vs_single_large'), '.2f')} | {num(r.get('published_speedup'), '.2f')} | "
                   f"{r['large_share']:.1%} | {num(r.get('published_large_share'), '.1%')} |")
    if pub["speed"]:
        out.append("\nPublished speed (Table 3): batch 1, the first 5 AIME25 problems x 5 runs, against large only.")
    return "\n".join(out) + "\n"


def _plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for m, r in rows.items():
        ax.scatter(r["mean_latency_s"], r["pass_at_1"], s=60, label=m)
        ax.annotate(m, (r["mean_latency_s"], r["pass_at_1"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("mean latency per sample (s)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(f"accuracy vs latency: {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.replacing(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)

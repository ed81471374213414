"""batch and eval on the real CPU pair (serve: test_serve_real.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import orjson
import pytest

pytestmark = pytest.mark.integration


def relaygen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relaygen_sgl.cli", *args]


def test_batch_killed_half_way_then_rerun_gives_each_id_once(cpu_pair, tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    ids = [f"q{i}" for i in range(6)]
    src.write_text("".join(json.dumps({"id": i, "question": f"What is {n} + {n}? Answer briefly."}) + "\n"
                           for n, i in enumerate(ids)))
    args = ["batch", "relay", str(src), "-o", str(out), "--large", cpu_pair.large, "--small", cpu_pair.small,
            "--max-tokens", "24", "--concurrency", "2", "--no-progress", "--seed", "0"]
    proc = subprocess.Popen(relaygen_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    first = [orjson.loads(line) for line in out.read_bytes().splitlines()]  # every line whole
    print(f"\nkilled with {len(first)} of {len(ids)} records written")
    assert 1 <= len(first) <= len(ids)
    done = subprocess.run(relaygen_cmd(*args), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(ids)
    assert all(r["status"] == "ok" and r["segments"] for r in recs)


def test_batch_of_eight_with_a_malformed_line_and_a_failing_prompt(cpu_pair, tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    lines = []
    for i in range(8):
        # p5 is longer than SmolLM2's 8192-token context: the server refuses it
        q = "word " * 9000 if i == 5 else f"What is {i} times 3?"
        lines.append(json.dumps({"id": f"p{i}", "question": q}))
    lines.insert(3, '{"id": "broken", "question": ')
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(relaygen_cmd("batch", "relay", str(src), "-o", str(out), "--large", cpu_pair.large,
                                       "--small", cpu_pair.small, "--max-tokens", "8", "--no-progress"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2  # a bad input line was reported (and the rest ran)
    assert "prompts.jsonl:4: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(recs) == 8
    assert sorted(r["id"] for r in recs if r["status"] == "ok") == [f"p{i}" for i in range(8) if i != 5]
    err = [r for r in recs if r["status"] == "error"]
    # refused before any request: the prompt alone passes the context
    assert [r["id"] for r in err] == ["p5"] and "the prompt alone does not fit" in err[0]["error"]


def test_eval_report_matches_its_per_problem_records(cpu_pair, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(relaygen_cmd("eval", "--dataset", "aime25", "--limit", "2", "--k", "1", "--method", "relay",
                                       "--method", "single-large", "--max-tokens", "24", "--out", str(out),
                                       "--large", cpu_pair.large, "--small", cpu_pair.small, "--no-progress"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    for method in ("relay", "single-large"):
        graded = [json.loads(line) for line in (out / f"graded-{method}.jsonl").read_text().splitlines()]
        runs = [json.loads(line) for line in (out / f"{method}.jsonl").read_text().splitlines()]
        row = report["methods"][method]
        assert row["samples"] == len(graded) == len(runs) == 2
        assert row["pass_at_1"] == round(100 * sum(g["correct"] for g in graded) / 2, 2)
        tokens = [r["stats"]["large_tokens"] + r["stats"]["small_tokens"] for r in runs]
        assert row["mean_completion_tokens"] == round(sum(tokens) / 2, 1)
        assert row["mean_latency_s"] == round(sum(r["stats"]["e2e_s"] for r in runs) / 2, 3)
        assert row["large_share"] == round(sum(r["stats"]["large_tokens"] for r in runs) / sum(tokens), 4)
    assert report["methods"]["single-large"]["large_share"] == 1.0
    assert report["methods"]["relay"]["speedup_vs_single_large"] is not None
    assert (out / "report.md").read_text().count("|") > 10 and (out / "accuracy_vs_latency.png").stat().st_size > 0

"""The eval report under each protocol: the reference's user messages, what the report says of
the protocol, and the paper's published numbers beside ours with the difference."""

from __future__ import annotations

import orjson
import pytest

from relaygen_sgl.core.datasets import Problem, gpqa, load_problems
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.reference import math_prompt
from relaygen_sgl.jobs.evaluate import build_prompts, protocol_header, published_for, report


def test_reference_prompts_carry_the_references_user_message():
    problems = load_problems("aime25")[:2]
    ours = build_prompts(problems, 2)
    assert all("user_message" not in p.extra for p in ours)
    ref = build_prompts(problems, 2, "reference")
    assert ref[0].extra["user_message"] == math_prompt(problems[0].problem)
    assert "\x08oxed{}" in ref[0].extra["user_message"] and problems[0].problem in ref[0].extra["user_message"]


def test_reference_gpqa_is_the_references_wording_with_the_answer_at_a(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_bytes(orjson.dumps({"Question": "Which?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
                                "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"}) + b"\n")
    msg = build_prompts(gpqa(f, reference=True), 1, "reference")[0].extra["user_message"]
    assert "Question: Which?." in msg and "        A: right\n        B: w1\n" in msg
    assert "\\boxed{X}" in msg  # escaped in the reference: a real backslash here
    shuffled = Problem("g1", "Which?", "B", "choice", "Which?", ("w1", "right", "w2", "w3"))  # a gpqa: problem
    with pytest.raises(ConfigError, match="gpqa-ref"):
        build_prompts([shuffled], 1, "reference")


def test_the_report_names_where_a_run_left_the_references_eval_protocol():
    assert protocol_header("reference", k=4, max_tokens=32768, concurrency=1, seeded=False)["deviations"] == {}
    dev = protocol_header("reference", k=1, max_tokens=128, concurrency=1, seeded=False)["deviations"]
    assert dev == {"k": {"ours": 1, "reference": 4}, "max_tokens": {"ours": 128, "reference": 32768}}
    assert "deviations" not in protocol_header("relaygen-sgl", k=4, max_tokens=32768, concurrency=4, seeded=True)


def test_published_numbers_for_the_same_pair_and_another():
    same = published_for("qwen3-32b-1.7b", "qwen3", "aime25")
    assert same["same_pair"] and same["pass_at_1"]["relay"] == 68.33 and same["speed"]["relay"]["speedup"] == 1.29
    assert published_for("qwen3-32b-1.7b-1gpu", "qwen3", "gpqa-ref:/x.csv")["pass_at_1"]["single-large"] == 64.58
    assert published_for("qwen3-32b-1.7b-1gpu-80gb", "qwen3", "math500")["same_pair"]
    other = published_for("cpu-tiny", "smollm2", "math500")
    assert not other["same_pair"] and other["label"].startswith("Qwen3-32B")
    assert published_for("cpu-tiny", "smollm2", "amc23") is None  # not in Tables 2 and 3


def _records(path, correct_text, n=2):
    lines = []
    for j in range(n):
        lines.append(orjson.dumps({"id": f"p1#{j}", "problem_id": "p1", "sample": j, "gold": "5", "kind": "math",
                                   "status": "ok", "text": correct_text,
                                   "stats": {"large_tokens": 30, "small_tokens": 70, "switches": 4, "e2e_s": 2.0}}))
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_the_report_sets_the_papers_columns_beside_ours(tmp_path):
    _records(tmp_path / "relay.jsonl", "x</think>\n\n\\boxed{5}")
    header = {"dataset": "aime25", "preset": "qwen3-32b-1.7b", "k": 2, "limit": 1, "max_tokens": 128,
              "machine": "NVIDIA H100 80GB", **protocol_header("reference", k=2, max_tokens=128, concurrency=1,
                                                               seeded=False),
              "published": published_for("qwen3-32b-1.7b", "qwen3", "aime25")}
    result = report(tmp_path, header, workers=1)
    row = result["methods"]["relay"]
    assert row["pass_at_1"] == 100.0 and row["published_pass_at_1"] == 68.33
    assert row["pass_at_1_minus_published"] == 31.67 and row["published_speedup"] == 1.29
    md = (tmp_path / "report.md").read_text()
    assert "protocol: reference" in md and "1 request(s) at a time; unseeded" in md
    assert "not the reference's eval protocol: max_tokens 128 (reference: 32768)" in md
    assert "pass@1 published (%)" in md and "| relay | 100.00 | 68.33 | +31.67 |" in md
    assert "NVIDIA A100 80GB" in md and "NVIDIA H100 80GB" in md  # both accelerators named


def test_another_pair_is_marked_not_a_comparison(tmp_path):
    _records(tmp_path / "relay.jsonl", "x</think>\n\n\\boxed{4}")
    header = {"dataset": "aime25", "preset": "cpu-tiny", "k": 2, "limit": 1, "max_tokens": 128, "machine": "CPU",
              **protocol_header("relaygen-sgl", k=2, max_tokens=128, concurrency=4, seeded=True),
              "published": published_for("cpu-tiny", "smollm2", "aime25")}
    report(tmp_path, header, workers=1)
    md = (tmp_path / "report.md").read_text()
    assert "ANOTHER model pair than cpu-tiny" in md and "(other pair)" in md

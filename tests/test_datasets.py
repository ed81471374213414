from __future__ import annotations

import csv

import orjson
import pytest

from relaygen_sgl.core.datasets import BUNDLED, load_problems
from relaygen_sgl.core.errors import ConfigError


def test_bundled_sets_load_with_their_sizes():
    sizes = {name: len(load_problems(name)) for name in BUNDLED}
    assert sizes == {"aime25": 30, "aime24": 30, "amc23": 40, "math500": 500}
    p = load_problems("aime25")[0]
    assert p.id == "aime25-I-1" and p.gold == "70" and "\\boxed{}" in p.question and p.kind == "math"


def _gpqa(path, rows=3):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Record ID", "Question", "Correct Answer", "Incorrect Answer 1",
                                          "Incorrect Answer 2", "Incorrect Answer 3"])
        w.writeheader()
        for i in range(rows):
            w.writerow({"Record ID": f"r{i}", "Question": f"Which is right {i}?", "Correct Answer": f"right{i}",
                        "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"})


def test_gpqa_choices_are_shuffled_with_a_seed_and_the_gold_is_a_letter(tmp_path):
    path = tmp_path / "gpqa.csv"
    _gpqa(path, rows=8)
    a, b, c = (load_problems(f"gpqa:{path}"), load_problems(f"gpqa:{path}"),
               load_problems(f"gpqa:{path}", seed=1))
    assert [p.question for p in a] == [p.question for p in b]  # deterministic
    assert [p.gold for p in a] != [p.gold for p in c] or [p.question for p in a] != [p.question for p in c]
    for p in a:
        assert p.kind == "choice" and p.gold in "ABCD"
        assert f"{p.gold}) right" in p.question  # the gold letter labels the correct answer
    assert len({p.gold for p in a}) > 1  # not always the same position


def test_gpqa_in_the_reference_format_keeps_the_correct_answer_at_a(tmp_path):
    path = tmp_path / "gpqa.csv"
    _gpqa(path, rows=8)
    ref = load_problems(f"gpqa-ref:{path}")
    assert [p.gold for p in ref] == ["A"] * 8
    for i, p in enumerate(ref):
        assert p.question.startswith("Please solve this multiple choice question")
        assert f"A) right{i}" in p.question and p.kind == "choice"
    shuffled = load_problems(f"gpqa:{path}")
    assert [p.id for p in shuffled] == [p.id for p in ref] and {p.gold for p in shuffled} != {"A"}


def test_bad_data_sets_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data set"):
        load_problems("aime99")
    with pytest.raises(ConfigError, match="not redistributed"):
        load_problems(f"gpqa:{tmp_path / 'missing.csv'}")
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Answer\nq,a\n")
    with pytest.raises(ConfigError, match="Correct Answer"):
        load_problems(f"gpqa:{bad}")
    empty = tmp_path / "empty.csv"
    _gpqa(empty, rows=0)
    with pytest.raises(ConfigError, match="empty"):
        load_problems(f"gpqa:{empty}")


def test_gpqa_as_jsonl_reads_like_the_csv_and_refuses_bad_lines(tmp_path):
    _gpqa(tmp_path / "gpqa.csv", rows=4)
    with (tmp_path / "gpqa.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    good = tmp_path / "gpqa.jsonl"
    good.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows) + b"\n")  # a blank line is fine
    assert load_problems(f"gpqa:{good}") == load_problems(f"gpqa:{tmp_path / 'gpqa.csv'}")

    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(orjson.dumps(rows[0]) + b"\n[1]\n" + orjson.dumps(rows[1])[:20])
    with pytest.raises(ConfigError, match=r"cannot read GPQA file .*torn.jsonl: line 2: .*\(and 1 more\)"):
        load_problems(f"gpqa:{torn}")

"""Benchmark problems: the bundled AIME 2024/2025, AMC 2023, MATH-500, and a user's GPQA file."""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from relaygen_sgl.core.config import data_path
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.records import read_records

BUNDLED = ("aime25", "aime24", "amc23", "math500")
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("\n\nPlease reason step by step, and put the letter of your answer (A, B, C or D) "
                      "within \\boxed{}.")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the prompt sent to the model, instruction included
    gold: str
    kind: str  # "math" | "choice"
    problem: str = ""  # the problem alone, for prompts in another format (--protocol reference)
    options: tuple[str, ...] = ()  # a choice problem's options, the correct one first (the reference's A)


def _bundled(name: str) -> list[Problem]:
    return [Problem(str(rec["id"]), rec["problem"] + MATH_INSTRUCTION, str(rec["answer"]), "math", rec["problem"])
            for rec in read_records(data_path("bench", f"{name}.jsonl"))]


def _gpqa_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"GPQA file not found: {path} (GPQA-Diamond is not redistributed; pass your own copy)")
    if path.suffix != ".csv":
        bad: list[str] = []
        rows = read_records(path, warn=bad.append)
        # A question file is read whole or refused: a skipped line would quietly change the benchmark.
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ConfigError(f"cannot read GPQA file {path}: {bad[0]}{more}")
        return rows
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read GPQA file {path}: {e}") from e


# The reference implementation's GPQA format, as recorded in the method notes: a prompt that
# opens "Please solve this multiple choice question" and the correct answer always at A (its
# scores are comparable only with that). The sentences after the opening are ours.
REFERENCE_GPQA_INSTRUCTION = ("Please solve this multiple choice question. Reason step by step, and put the "
                              "letter of your answer (A, B, C or D) within \\boxed{}.")


def gpqa(path: Path, seed: int = 0, reference: bool = False) -> list[Problem]:
    """GPQA in the official CSV layout (Question, Correct Answer, Incorrect Answer 1-3),
    as CSV or JSONL. Choices are shuffled per question with `seed` and the gold is a letter;
    with `reference`, the reference's format (correct answer always A)."""
    out = []
    for i, row in enumerate(_gpqa_rows(path), 1):
        try:
            question = row["Question"].strip()
            correct = row["Correct Answer"].strip()
            wrong = [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
        except (KeyError, AttributeError):
            raise ConfigError(f"{path}:{i}: needs Question, Correct Answer, Incorrect Answer 1-3") from None
        pid = str(row.get("Record ID") or row.get("id") or f"gpqa-{i}")
        choices = [correct, *wrong]
        if not reference:
            digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
            random.Random(digest).shuffle(choices)
        letters = "ABCD"
        body = "\n".join(f"{letters[k]}) {c}" for k, c in enumerate(choices))
        prompt = (f"{REFERENCE_GPQA_INSTRUCTION}\n\n{question}\n\n{body}" if reference
                  else f"{question}\n\n{body}{CHOICE_INSTRUCTION}")
        out.append(Problem(pid, prompt, letters[choices.index(correct)], "choice", question, (correct, *wrong)))
    return out


def load_problems(spec: str, seed: int = 0) -> list[Problem]:
    """`aime25`, `aime24`, `amc23`, `math500`, `gpqa:PATH` (choices shuffled) or `gpqa-ref:PATH`
    (the reference's format: correct answer always A)."""
    if spec in BUNDLED:
        problems = _bundled(spec)
    elif spec.startswith(("gpqa:", "gpqa-ref:")):
        kind, _, path = spec.partition(":")
        problems = gpqa(Path(path).expanduser(), seed, reference=kind == "gpqa-ref")
    else:
        raise ConfigError(f"unknown data set {spec!r}; choose one of {', '.join(BUNDLED)}, gpqa:PATH or "
                          "gpqa-ref:PATH")
    if not problems:
        raise ConfigError(f"data set {spec} is empty")
    return problems

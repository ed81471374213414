"""Where a last-box-plus-equality grader (the reference's rule) and ours (math-verify) disagree.

The reference (score/score_relaygen.py) grades the text between the first and the second
"</think>" (utils/utils.py parse_reasoning_and_answer), takes the content of the last "boxed"
there, normalizes it and compares it with a numeric / symbolic equality (Qwen2.5-Math's
extract_answer, strip_string and math_equal in utils_score/). `last_box_equal` below is our own
re-implementation of those rules (the last box, else "the answer is" / "final answer is" /
"Answer:"; \\dfrac/\\tfrac, \\left/\\right, degrees, percent, a trailing \\text unit, x=, spaces,
\\frac12, a/b, number words; numbers equal within 1e-4 relative, the gold also as a percentage;
else sympy), not its code; its list of MathQA unit words is left out. Where it and math-verify
disagree, docs/fidelity.md says which one is right.

Inputs: every gold answer of the bundled data sets (relaygen_sgl/data/bench, the same files as
/work/shared/data) graded against itself and against its \\dfrac / $...$ spellings, and a set of
written answer strings (fractions, radicals, \\dfrac, units, multiple boxes, a box outside the
answer). Prints a markdown table of the disagreements and the counts.

    .venv/bin/python scripts/grader_check.py [--out docs/grader-check.md]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import orjson

from relaygen_sgl.core.config import data_path
from relaygen_sgl.core.grading import grade

DATASETS = ("aime24", "aime25", "amc23", "math500")


def _answer_section(text: str) -> str:
    parts = text.split("</think>")
    return parts[1].strip() if len(parts) > 1 else ""


PHRASES = ("he answer is", "final answer is", "ANSWER:", "Answer:")  # its fallbacks when there is no box, in order
WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def _last_box(answer: str) -> str:
    if "boxed" not in answer:
        phrase = next((p for p in PHRASES if p in answer), None)
        return answer.split(phrase)[-1].strip() if phrase else ""
    tail = answer.split("boxed")[-1]
    if not tail.startswith("{"):
        return tail.split("$")[0].strip()
    depth, out = 0, []
    for ch in tail:
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            break
        out.append(ch)
    return "".join(out)[1:]


def _normalize(s: str) -> str:
    """The main rules of the reference's strip_string (utils_score/parser.py), restated: its list
    of MathQA unit words is left out."""
    s = s.strip().replace("\n", "").rstrip(".").replace("\\!", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    unit = re.sub(r"\\text\{.*?\}$", "", s).strip()  # a trailing \text{...} is a unit when something is left
    s = unit if unit else s
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = WORDS.get(s.strip().lower(), s)  # its word2number, for small numbers
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for key in ("x=", "y=", "z="):
        s = s.replace(key, "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def _sympy(s: str):  # noqa: ANN202
    from latex2sympy2_extended import latex2sympy

    return latex2sympy(s)


def last_box_equal(text: str, gold: str) -> bool:
    pred, want = _normalize(_last_box(_answer_section(text))), _normalize(gold)
    if not pred:
        return False
    if pred == want:
        return True
    a, b = _number(pred), _number(want)
    if a is not None and b is not None:  # its math_equal also takes the gold as a percentage
        return any(math.isclose(a, g, rel_tol=1e-4) for g in (b / 100, b, b * 100))
    try:
        import sympy

        diff = sympy.simplify(_sympy(pred) - _sympy(want))
        return bool(diff == 0)
    except Exception:  # noqa: BLE001 - unparsable: not equal, as the reference's grader falls back
        return False


def verify(text: str, gold: str) -> bool:
    return bool(grade(text, gold, "math")["correct"])


def wrap(answer: str, before: str = "Let me think.") -> str:
    return f"{before}</think>\n\nThe final answer is $\\boxed{{{answer}}}$."


WRITTEN: list[tuple[str, str, str]] = [  # (what it checks, model text, gold)
    ("fraction vs decimal", wrap("0.5"), "\\frac{1}{2}"),
    ("fraction vs a/b", wrap("1/2"), "\\frac{1}{2}"),
    ("inexact decimal", wrap("0.3333"), "\\frac{1}{3}"),
    ("\\dfrac", wrap("\\dfrac{14}{3}"), "\\frac{14}{3}"),
    ("\\tfrac", wrap("\\tfrac{3}{4}"), "\\frac34"),
    ("radical forms", wrap("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}"),
    ("radical vs decimal", wrap("1.41421"), "\\sqrt{2}"),
    ("sqrt without braces", wrap("2\\sqrt3"), "2\\sqrt{3}"),
    ("unit in \\text", wrap("5 \\text{ cm}"), "5"),
    ("unit words", wrap("5 \\text{ apples}"), "5"),
    ("degrees", wrap("30^\\circ"), "30"),
    ("percent", wrap("25\\%"), "25"),
    ("percent as fraction", wrap("0.25"), "25\\%"),
    ("x = value", wrap("x = 7"), "7"),
    ("pi vs decimal", wrap("3.14159"), "\\pi"),
    ("interval", wrap("(-\\infty, 2]"), "(-\\infty,2]"),
    ("ordered pair", wrap("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("multiple boxes, last right", "t</think>\n\n\\boxed{4} then \\boxed{5}", "5"),
    ("multiple boxes, last wrong", "t</think>\n\n\\boxed{5} then \\boxed{4}", "5"),
    ("two answers in one box", wrap("3, 5"), "3,5"),
    ("box only in the thinking", "So \\boxed{5}.</think>\n\nThe answer is five.", "5"),
    ("box only in the thinking, none after", "So \\boxed{5}.</think>\n\n", "5"),
    ("no </think> at all", "The answer is \\boxed{5}.", "5"),
    ("second </think>, box after it", "a</think>\n\nwait</think>\n\n\\boxed{5}", "5"),
    ("box before a second </think>", "a</think>\n\n\\boxed{5}</think>\n\nmore", "5"),
    ("phrase, no box", "t</think>\n\nThe final answer is 5.", "5"),
    ("thousands separator", wrap("1,000"), "1000"),
    ("leading zeros (AIME)", wrap("025"), "25"),
    ("text answer", wrap("\\text{Monday}"), "\\text{Monday}"),
    ("choice letter", wrap("A"), "A"),
]


def gold_cases() -> list[tuple[str, str, str]]:
    cases = []
    for name in DATASETS:
        for rec in (orjson.loads(line) for line in data_path("bench", f"{name}.jsonl").read_bytes().splitlines()):
            gold = str(rec["answer"])
            cases.append((f"{name} {rec['id']}: gold itself", wrap(gold), gold))
            if "\\frac" in gold:
                cases.append((f"{name} {rec['id']}: \\dfrac spelling", wrap(gold.replace("\\frac", "\\dfrac")), gold))
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args(argv)
    lines = ["| case | gold | model's answer section | last box + equality | math-verify |", "|---|---|---|---|---|"]
    counts: dict[str, list[int]] = {}
    for group, cases in (("bundled gold answers", gold_cases()), ("written answer strings", WRITTEN)):
        n = dis = ref_right = ours_right = 0
        for what, text, gold in cases:
            ref, ours = last_box_equal(text, gold), verify(text, gold)
            n += 1
            ref_right += ref
            ours_right += ours
            if ref != ours:
                dis += 1
                section = text.split("</think>", 1)[-1].strip().replace("\n", " ")[:60]
                name = what.replace("</think>", "`</think>`")
                lines.append(f"| {name} | `{gold}` | `{section}` | {'right' if ref else 'wrong'} | "
                             f"{'right' if ours else 'wrong'} |")
        counts[group] = [n, dis, ref_right, ours_right]
    summary = "; ".join(f"{g}: {d} of {n} disagree (right: last box {r}, math-verify {o})"
                        for g, (n, d, r, o) in counts.items())
    md = summary + "\n\n" + "\n".join(lines) + "\n"
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Answer grading for reasoning benchmarks (AIME / AMC / MATH-500 and GPQA multiple choice).

Only the text after the LAST `think_end` is the answer section; an output with no `think_end`
(the model never finished thinking) is wrong. Inside the answer section extraction is anchored:
the last complete `\\boxed{...}` / `\\boxed X` / `\\fbox{...}`, else the last explicit
"final answer is X" / "Final Answer: X" / "the (correct) answer is X" / line-initial "Answer: X"
phrase (rest of that line; the next non-empty line when the phrase ends its line). There is no
last-number fallback, and a number that appears only in the reasoning never counts. If the last `\\boxed{`
is never closed (output cut off inside it) there is no answer.

Math answers are compared with math_verify (v0.9): the gold is parsed from `\\boxed{gold}`, the
prediction from `\\boxed{extracted}`, both with LaTeX extraction at boxed priority 0, then
`verify(gold, pred)`. What that means in practice (pinned by tests/test_grading.py):

* fractions vs decimals: exact decimals are equal (`\\frac{1}{2}` == `0.5`, `10` == `10.0`);
  an inexact decimal counts when it agrees after rounding both sides to 6 decimals
  (`\\frac{1}{3}` == `0.333333`, but not `0.333` or `0.33333`). `\\pi` vs `3.14159` is wrong.
* degrees: the degree sign is dropped, never converted: `30^\\circ` == `30`, but `30^\\circ` is
  not `\\frac{\\pi}{6}`. math_verify cannot parse `30°` or `30\\degree`, so both are rewritten to
  `30^\\circ` first.
* percent: `9\\%` equals both `9` and `0.09` (math_verify's integer/percent rule).
* text: `\\text{Monday}` == `Monday` (case-insensitive); `\\dfrac`/`\\tfrac` == `\\frac`;
  intervals compare by bounds and openness.

math_verify bounds each parse/verify with `signal.alarm`, which only works in a process's main
thread; off the main thread `grade` runs without that timeout. `grade_many` grades in worker
processes, where each task runs on the worker's main thread. It uses forkserver and sets the
(process-global) forkserver preload to this module and math_verify, so sympy is imported once in
the server rather than in every worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["extract_final", "grade", "grade_many", "normalize_gold", "choice_letter"]

logger = logging.getLogger(__name__)
MATH_TIMEOUT_S = 5  # math_verify's per-call alarm, in the main thread only
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_PHRASE_RE = re.compile(
    r"(?im)(?:final\s+answer|(?:the|correct)\s+answer|^[ \t*_#>]*answer)"  # the anchor
    r"[ \t*_]*(?:is\b[ \t*_]*:?|:)[ \t*_]*(?P<rest>[^\n]*)"  # "is", "is:" or ":", then the rest of the line
)
_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_CHOICE_RE = re.compile(
    r"(?i)^(?:(?:option|choice|answer)\s*:?\s*)?(?:\((?P<a>[A-D])\)|(?P<b>[A-D])(?:\)|[.:]|$))"
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")


def _balanced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == '{', or None if never closed."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _last_boxed(answer: str) -> tuple[bool, str | None]:
    """(found a box, its content). A last box that is never closed gives (True, None)."""
    matches = list(_BOX_RE.finditer(answer))
    if not matches:
        return False, None
    end = matches[-1].end()
    rest = answer[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        got = _balanced(answer, end + (len(rest) - len(stripped)))
        return True, (got[0].strip() if got else None)
    if rest[:1].isspace() and stripped:  # "\boxed 5": one token
        token = re.match(r"[^\s$]+", stripped)
        return True, (token.group(0) if token else None)
    return True, None


def _clean_phrase(rest: str) -> str:
    s = rest.strip()
    for _ in range(3):
        before = s
        s = s.strip().strip("*_`").strip()
        s = s.removesuffix(".").rstrip()
        s = _unwrap_math(s)
        if s == before:
            break
    return s


def _unwrap_math(s: str) -> str:
    s = s.strip()
    for left, right in _MATH_WRAPPERS:
        inner = s[len(left) : len(s) - len(right)]
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right) and right not in inner:
            return inner.strip()
    return s


def extract_final(text: str, think_end: str = "</think>") -> str | None:
    """The raw final answer from the text after the last `think_end`, or None."""
    if not think_end or think_end not in text:
        return None
    answer = text.rsplit(think_end, 1)[1]
    found, boxed = _last_boxed(answer)
    if found:
        return boxed or None
    phrases = list(_PHRASE_RE.finditer(answer))
    if not phrases:
        return None
    last = phrases[-1]
    rest = last.group("rest")
    if not rest.strip(" \t*_`"):  # "Final Answer:\n\n$5$": the next non-empty line
        lines = [ln for ln in answer[last.end() :].splitlines() if ln.strip(" \t*_`")]
        rest = lines[0] if lines else ""
    cleaned = _clean_phrase(rest)
    return cleaned or None


def normalize_gold(answer: str) -> str:
    """Strip math delimiters / a \\boxed wrapper; zero-padded integers lose their zeros ("025" -> "25")."""
    s = _unwrap_math(answer.strip())
    found, boxed = _last_boxed(s)
    if found and boxed is not None and s.startswith(("\\boxed", "\\fbox")) and s.endswith("}"):
        s = boxed
    m = re.fullmatch(r"([+-]?)0+(\d+)", s)
    if m:
        s = ("-" if m.group(1) == "-" and m.group(2).strip("0") else "") + m.group(2)
    return s


def _degrees(s: str) -> str:
    return re.sub(r"\s*(?:°|\\degree(?![A-Za-z])|\^\{?\\circ\}?)", r"^\\circ", s)


def choice_letter(s: str | None) -> str | None:
    """'C', '(C)', 'C)', '\\text{C}', '**C**', 'C. 42 meV', 'Option C' -> 'C'; else None."""
    if s is None:
        return None
    t = _unwrap_math(s)
    t = _TEXT_CMD_RE.sub(r"\1", t)
    t = t.strip().strip("*_`").strip()
    t = _TEXT_CMD_RE.sub(r"\1", _unwrap_math(t)).strip()
    m = _CHOICE_RE.match(t)
    if not m:
        return None
    return (m.group("a") or m.group("b")).upper()


def _math_equal(gold: str, extracted: str, timeout: int | None) -> tuple[bool, str]:
    from math_verify import LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(boxed_match_priority=0)]
    g_src = _degrees(normalize_gold(gold))
    p_src = _degrees(_unwrap_math(extracted))
    gold_parsed = parse(f"\\boxed{{{g_src}}}", extraction_config=configs, parsing_timeout=timeout)
    if not gold_parsed:
        gold_parsed = parse(f"${g_src}$", extraction_config=configs, parsing_timeout=timeout)
    if not gold_parsed:
        return False, f"gold unparseable: {gold!r}"
    pred_parsed = parse(f"\\boxed{{{p_src}}}", extraction_config=configs, parsing_timeout=timeout)
    if not pred_parsed:
        return False, "answer unparseable"
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    # no str() of the sympy objects: math_verify warns that printing them can hang
    return ok, ("match" if ok else f"mismatch: {extracted!r} vs gold {gold!r}")


def grade(text: str, gold: str, kind: str = "math", think_end: str = "</think>") -> dict[str, Any]:
    """{"correct": bool, "extracted": str | None, "reason": str}. Never raises for bad input."""
    extracted: str | None = None
    try:
        if think_end not in text:
            return {"correct": False, "extracted": None, "reason": f"no {think_end}"}
        extracted = extract_final(text, think_end)
        if extracted is None:
            return {"correct": False, "extracted": None, "reason": "no anchored answer"}
        if kind == "choice":
            want = choice_letter(gold)
            got = choice_letter(extracted)
            if want is None:
                return {"correct": False, "extracted": extracted, "reason": f"gold not a letter: {gold!r}"}
            if got is None:
                return {"correct": False, "extracted": extracted, "reason": "answer not a letter"}
            ok = got == want
            return {"correct": ok, "extracted": extracted, "reason": "match" if ok else f"mismatch: {got} vs {want}"}
        if kind != "math":
            raise ValueError(f"unknown kind {kind!r}")
        timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        ok, reason = _math_equal(gold, extracted, timeout)
        return {"correct": ok, "extracted": extracted, "reason": reason}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # math_verify's TimeoutException is a BaseException
        return _error(e, extracted)


def _error(e: BaseException, extracted: str | None = None) -> dict[str, Any]:
    return {"correct": False, "extracted": extracted, "reason": f"grader error: {type(e).__name__}: {e}"}


def _grade_item(item: tuple[str, str, str]) -> dict[str, Any]:
    try:
        text, gold, kind = item
    except (TypeError, ValueError) as e:
        return _error(e)
    return grade(text, gold, kind)


def _warm() -> None:
    import math_verify  # noqa: F401 - import sympy/latex2sympy once per worker


def grade_many(
    items: list[tuple[str, str, str]], workers: int = 2, *, start_method: str | None = None
) -> list[dict[str, Any]]:
    """Grade (text, gold, kind) items, results in input order.

    Worker processes, because math_verify's alarms need a main thread; in-process when we are on
    the main thread and there is one item or one worker. start_method defaults to forkserver
    (spawn where there is none): fork would copy a parent that may hold threads and locks.
    """
    if not items:
        return []
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and (len(items) == 1 or workers <= 1):
        return [_grade_item(it) for it in items]
    if start_method is None:
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":  # the server imports sympy once; each worker is a fork of it
        ctx.set_forkserver_preload(["__main__", __name__, "math_verify"])
    results: list[dict[str, Any] | None] = [None] * len(items)
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(items))), mp_context=ctx,
                                 initializer=_warm) as pool:
            futures = [pool.submit(_grade_item, it) for it in items]
            for i, fut in enumerate(futures):
                try:
                    results[i] = fut.result()
                except Exception as e:  # a worker died (BrokenProcessPool) or the item would not pickle
                    results[i] = _error(e)
    except Exception as e:  # the pool itself could not start: grade here (no alarms off the main thread)
        logger.warning("grading pool unavailable (%s: %s); grading in-process", type(e).__name__, e)
    return [r if r is not None else _grade_item(it) for r, it in zip(results, items, strict=True)]


def vote_key(text: str, think_end: str = "</think>") -> str | None:
    """The answer of one sample, normalized for voting (delimiters, \\boxed, leading zeros)."""
    extracted = extract_final(text, think_end)
    return normalize_gold(_unwrap_math(extracted)) if extracted else None


def majority(keys: list[str | None], timeout: int | None = 5) -> tuple[str | None, dict[str, int]]:
    """Majority vote over normalized answers; answers math_verify finds equal share a vote
    (the first spelling seen stands for the group). Ties go to the answer seen first."""
    groups: dict[str, int] = {}
    for key in keys:
        if key is None:
            continue
        same = next((g for g in groups if g == key or _safe_equal(g, key, timeout)), None)
        groups[same or key] = groups.get(same or key, 0) + 1
    if not groups:
        return None, {}
    return max(groups, key=lambda g: groups[g]), groups


def _safe_equal(a: str, b: str, timeout: int | None) -> bool:
    try:
        return _math_equal(a, b, timeout)[0]
    except Exception:  # math_verify raises on inputs it cannot parse; not equal then
        return False

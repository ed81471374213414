"""The benchmark answer grader: anchored extraction after </think>, math_verify equivalence, GPQA letters.

Behaviour pinned here (math_verify 0.9.0 underneath):
- fraction vs decimal: exact decimals are equal (1/2 == 0.5); an inexact one counts when it agrees to
  6 decimals (1/3 == 0.333333, not 0.333); pi is not 3.14159.
- degrees: the sign is dropped, not converted (30^\\circ == 30, 30^\\circ != pi/6); 30° and 30\\degree too.
- percent: math_verify makes 9\\% equal to both 9 and 0.09.
"""

from __future__ import annotations

import threading

import pytest

from relaygen_sgl.core.grading import choice_letter, extract_final, grade, grade_many, normalize_gold

REASONING = "Let me work it out. Maybe 7? Or 12. Let me check: 3 + 4 = 7."


def out(answer: str) -> str:
    return f"{REASONING}\n</think>\n\n{answer}"


MATH_CASES = [
    # fractions vs decimals
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{10.0}", "10", True),
    (r"\boxed{0.333333}", r"\frac{1}{3}", True),
    (r"\boxed{0.333}", r"\frac{1}{3}", False),
    (r"\boxed{0.33333}", r"\frac{1}{3}", False),
    (r"\boxed{3.14159}", r"\pi", False),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    # \dfrac / \tfrac / \frac12
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{\frac34}", r"\dfrac{3}{4}", True),
    (r"\boxed{\dfrac{3}{5}}", r"\frac{3}{4}", False),
    # square roots
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", True),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    (r"\boxed{3\sqrt{2}}", r"2\sqrt{3}", False),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),
    # intervals
    (r"\boxed{(0, 1]}", "(0,1]", True),
    (r"\boxed{(0,1)}", "[0,1]", False),
    (r"\boxed{[0,1]}", "(0,1)", False),
    (r"\boxed{(0,1)}", "(0,1]", False),
    (r"\boxed{(-\infty, 2)}", r"(-\infty,2)", True),
    # degrees: dropped, never converted
    (r"\boxed{30^\circ}", "30", True),
    (r"\boxed{30}", r"30^\circ", True),
    (r"\boxed{30^{\circ}}", r"30^\circ", True),
    (r"\boxed{30°}", "30", True),
    (r"\boxed{30\degree}", "30", True),
    (r"\boxed{\frac{\pi}{6}}", r"30^\circ", False),
    (r"\boxed{45^\circ}", "30", False),
    # text answers
    (r"\boxed{\text{Monday}}", "Monday", True),
    (r"\boxed{Monday}", r"\text{Monday}", True),
    (r"\boxed{\text{Tuesday}}", r"\text{Monday}", False),
    # zero-padded AIME integers
    (r"\boxed{25}", "025", True),
    (r"\boxed{025}", "25", True),
    (r"\boxed{250}", "025", False),
    # percent (math_verify's rule)
    (r"\boxed{9\%}", "9", True),
    (r"\boxed{9\%}", "0.09", True),
    # units and equations
    (r"\boxed{5 \text{ cm}}", "5", True),
    (r"\boxed{x = 3}", "3", True),
    # other anchors and forms
    (r"\fbox{25}", "25", True),
    (r"so \boxed 25 is it", "25", True),
    (r"The final answer is $\frac{1}{2}$.", "0.5", True),
    ("**Final Answer:** 25", "25", True),
    ("Final Answer: $25$", "25", True),
    ("Therefore the answer is 25.", "25", True),
]


@pytest.mark.parametrize("answer,gold,expected", MATH_CASES)
def test_math_pairs(answer, gold, expected):
    r = grade(out(answer), gold, "math")
    assert r["correct"] is expected, r


@pytest.mark.parametrize("answer,expected", [
    (r"So \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{3} no wait, \boxed{25}", "25"),
    (r"\boxed {7}", "7"),
    ("The final answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("**Final Answer:** **25**.", "25"),
    ("The final answer is: \\(x+1\\)", "x+1"),
    ("Final Answer:\n\n$\\dfrac{3}{4}$\n", r"\dfrac{3}{4}"),
    ("The final answer is $1$ and $2$.", "$1$ and $2$"),  # not one math span: left as is
    ("## Answer: 17\n\nThat is all.", "17"),
])
def test_extract_final_raw(answer, expected):
    assert extract_final(out(answer)) == expected


def test_multiple_boxed_the_last_counts():
    text = out(r"First \boxed{3}, but correcting: \boxed{25}")
    assert grade(text, "25")["correct"] is True
    assert grade(text, "3")["correct"] is False


def test_boxed_beats_phrase():
    text = out("The answer is 3 I think.\n\n$\\boxed{25}$")
    assert grade(text, "25")["correct"] is True


def test_only_after_the_last_think_end():
    text = r"a </think> \boxed{25} more thinking </think> \boxed{3}"
    assert grade(text, "3")["correct"] is True
    assert grade(text, "25")["correct"] is False


def test_no_think_end_is_wrong_even_if_boxed_right():
    r = grade(r"We get \boxed{25}.", "25")
    assert r == {"correct": False, "extracted": None, "reason": "no </think>"}
    assert extract_final(r"We get \boxed{25}.") is None


def test_custom_think_end():
    assert grade(r"x [/THINK] \boxed{25}", "25", think_end="[/THINK]")["correct"] is True
    assert grade(r"x </think> \boxed{25}", "25", think_end="[/THINK]")["correct"] is False


def test_number_only_in_reasoning_is_wrong():
    r = grade("The answer is 25. Let me double check... </think>\n\nI am not sure.", "25")
    assert r["correct"] is False and r["extracted"] is None


def test_truncated_output_is_wrong():
    r = grade(out("So we have x = 25 and then we subst"), "25")
    assert r["correct"] is False and r["extracted"] is None


def test_last_number_only_is_wrong():
    r = grade(out("Putting it together we get 25"), "25")
    assert r == {"correct": False, "extracted": None, "reason": "no anchored answer"}


def test_unclosed_last_box_is_no_answer():
    # cut off inside the last box: an earlier box does not stand in for it
    assert extract_final(out(r"\boxed{25}. Hmm, actually \boxed{2")) is None
    assert grade(out(r"\boxed{25}. Hmm, actually \boxed{2"), "25")["correct"] is False


def test_empty_box_is_no_answer():
    assert grade(out(r"\boxed{}"), "25")["correct"] is False


def test_normalize_gold():
    assert normalize_gold("025") == "25"
    assert normalize_gold("000") == "0"
    assert normalize_gold("-007") == "-7"
    assert normalize_gold(r"$\boxed{7}$") == "7"
    assert normalize_gold(r" \frac{1}{2} ") == r"\frac{1}{2}"
    assert normalize_gold("100") == "100"


CHOICE_CASES = [
    (r"\boxed{C}", "C", True),
    (r"$\boxed{\text{C}}$", "C", True),
    ("The answer is (C).", "C", True),
    ("The final answer is C", "C", True),
    ("Final Answer: C) 42 meV", "C", True),
    ("Answer: **C**", "C", True),
    ("The correct answer is C: the second one.", "C", True),
    (r"\boxed{c}", "C", True),
    (r"\boxed{C}", "(c)", True),
    (r"\boxed{(B)}", "C", False),
    (r"\boxed{D}", "C", False),
    ("The answer is A larger mass.", "A", False),  # a word, not a letter
    ("I would go with C.", "C", False),  # no anchor
]


@pytest.mark.parametrize("answer,gold,expected", CHOICE_CASES)
def test_choice_letters(answer, gold, expected):
    r = grade(out(answer), gold, "choice")
    assert r["correct"] is expected, r


def test_choice_needs_think_end():
    assert grade(r"\boxed{C}", "C", "choice")["correct"] is False


@pytest.mark.parametrize("s,letter", [
    ("C", "C"), ("(C)", "C"), ("C)", "C"), ("c", "C"), (r"\text{C}", "C"), ("**C**", "C"),
    ("C. 42 meV", "C"), ("Option C", "C"), ("E", None), ("CD", None), ("A larger", None), (None, None),
])
def test_choice_letter(s, letter):
    assert choice_letter(s) == letter


def test_unknown_kind_is_a_grader_error_not_a_crash():
    r = grade(out(r"\boxed{3}"), "3", "essay")
    assert r["correct"] is False and r["reason"].startswith("grader error:")


def test_grade_off_the_main_thread():
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=grade(out(r"\boxed{\dfrac{1}{2}}"), "0.5")))
    t.start()
    t.join()
    assert box["r"]["correct"] is True


POOL_ITEMS = [
    (out(r"\boxed{\frac{1}{2}}"), "0.5", "math"),
    (out(r"\boxed{(0,1)}"), "[0,1]", "math"),
    (out("The answer is (C)."), "C", "choice"),
    (r"no think \boxed{25}", "25", "math"),
    (out(r"\boxed{2\sqrt{3}}"), r"\sqrt{12}", "math"),
    (out(r"\boxed{30^\circ}"), "30", "math"),
]


def test_grade_many_pool_matches_grade():
    expected = [grade(*it) for it in POOL_ITEMS]
    got = grade_many(POOL_ITEMS, workers=2)
    assert got == expected
    assert [r["correct"] for r in got] == [True, False, True, False, True, True]


def test_grade_many_in_process_and_bad_items():
    assert grade_many([]) == []
    got = grade_many([POOL_ITEMS[0], ("only two", "fields")], workers=1)  # type: ignore[list-item]
    assert got[0]["correct"] is True
    assert got[1]["correct"] is False and got[1]["reason"].startswith("grader error:")


def test_grade_many_from_a_thread_uses_the_pool():
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=grade_many(POOL_ITEMS[:1], workers=1)))
    t.start()
    t.join()
    assert box["r"] == [grade(*POOL_ITEMS[0])]

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaygen_sgl.core.cues import cue_next, cue_pattern, cue_patterns, find_cue, word_occurrences
from relaygen_sgl.core.errors import ConfigError


@pytest.mark.parametrize("text,cue", [
    ("I know it", "now"), ("Otherwise, no", "Other"), ("Anyway it", "Any"), ("Some day", "So "),
    ("therefore x", "Therefore"), ("Thus.", "Thus,"), ("reverify it", "verify"), ("Nowhere else", "Now"),
])
def test_no_cue_inside_a_word_or_with_other_case(text, cue):
    assert find_cue(text, [cue_pattern(cue)]) is None


@pytest.mark.parametrize("text,cue,cut", [
    ("we now see", "now", "we now"), ("Other ways", "Other", "Other"), ("Any way", "Any", "Any"),
    ("So the", "So ", "So"), ("Thus, x", "Thus,", "Thus,"), ("x. Therefore,", "Therefore", "x. Therefore"),
    ("let me double-check.", "double-check", "let me double-check"),
])
def test_cue_as_a_word_fires_and_the_cut_is_after_the_cue(text, cue, cut):
    hit = find_cue(text, [cue_pattern(cue)])
    assert hit is not None and text[: hit.end] == cut


def test_left_boundary_is_checked_against_the_text_before_the_output():
    pats = [cue_pattern("now")]
    # the server saw only "now " (its output), the context before it was "k"
    assert find_cue("I k" + "now it", pats, after=3) is None
    assert find_cue("I " + "now it", pats, after=2) is not None


def test_a_letter_ending_cue_needs_the_next_character():
    assert find_cue("Therefore", [cue_pattern("Therefore")]) is None
    assert word_occurrences("so Therefore", "Therefore") == [(3, 12)]


@pytest.mark.parametrize("text,soon", [
    ("We add. Therefore", True),  # " " or "," completes it
    ("We add. Now", True),  # "," completes "Now,"
    ("Thus", True),
    ("And So", True),  # "So " with its space
    ("We add. The", False),  # a word that only begins like a cue
    ("Nowhere", False),
    ("and so", False),  # other case
    ("x Now,", False),  # complete already: the server has seen it
    ("Therefore, x", False),
])
def test_cue_next_says_whether_one_more_character_could_complete_a_cue(text, soon):
    patterns = cue_patterns(["Therefore", "Now,", "Thus,", "So "])
    assert cue_next(text, patterns) is soon


def test_patterns_fit_sglangs_stop_window_limits():
    # no look-around: SGLang sizes its decode window from the pattern and treats
    # look-around as unbounded
    for p in cue_patterns(["Therefore", "So ", "Thus,", "double-check"]):
        assert "(?" not in p and len(p.encode()) <= 256
        re.compile(p)


def test_invalid_cues_are_refused():
    for bad in ["", " ", " So"]:
        with pytest.raises(ConfigError):
            cue_pattern(bad)
    with pytest.raises(ConfigError, match="at most 32"):
        cue_patterns([f"w{i}" for i in range(33)])


WORDS = ["now", "know", "Now", "Other", "Otherwise", "Any", "Anyway", "So", "Some", "Thus", "Thus,", "the",
         "snow", "nowhere", ".", ",", " ", "\n", "Therefore", "Hence"]


@given(st.lists(st.sampled_from(WORDS), max_size=40), st.sets(st.sampled_from(["now", "Other", "Any", "So ", "Thus,",
                                                                              "Therefore", "Hence"]), min_size=1))
def test_property_no_cue_fires_inside_a_word(tokens, cues):
    text = "".join(tokens)
    hit = find_cue(text, [cue_pattern(c) for c in cues])
    if hit is not None:
        core = text[hit.start:hit.end]
        assert core.rstrip() in {c.rstrip() for c in cues}
        before = text[hit.start - 1] if hit.start else " "
        assert not (before.isalnum() or before == "_")
        if core[-1].isalpha():  # a letter-ending cue fires only once a non-word character follows
            after = text[hit.end] if hit.end < len(text) else None
            assert after is not None and not (after.isalnum() or after == "_")

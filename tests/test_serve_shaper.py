"""The streamed-text shaper of `relaygen serve` (serve/shaper.py): the same split as a
whole-text recomputation, at a cost per delta that does not grow with the text."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygen_sgl.serve.shaper import CONTENT, REASONING, TextShaper, held_prefix, stop_cut

END = "</think>"


class WholeText:
    """The first build's shaper, kept as the reference: each delta recomputes the split of
    the whole text (obviously right, quadratic)."""

    def __init__(self, think_end: str, stops: Sequence[str] = ()) -> None:
        self.end, self.stops = think_end, tuple(stops)
        self.text = ""
        self.sent = {REASONING: 0, CONTENT: 0}
        self.stopped = False

    @staticmethod
    def _held(text: str, needles: Sequence[str]) -> int:
        best = 0
        for n in needles:
            for k in range(min(len(n) - 1, len(text)), best, -1):
                if text.endswith(n[:k]):
                    best = k
                    break
        return best

    def fields(self, final: bool = False) -> tuple[dict[str, str], bool]:
        text = self.text
        at = text.find(self.end)
        if at < 0:
            keep = len(text) if final else len(text) - self._held(text, [self.end])
            return {REASONING: text[:keep], CONTENT: ""}, False
        content = text[at + len(self.end):].lstrip()
        cut = stop_cut(content, self.stops)
        if cut is not None:
            return {REASONING: text[:at], CONTENT: content[:cut]}, True
        if not final:
            content = content[:len(content) - self._held(content, self.stops)]
        return {REASONING: text[:at], CONTENT: content}, False

    def _emit(self, final: bool) -> list[tuple[str, str]]:
        parts, self.stopped = self.fields(final)
        out = []
        for name, part in parts.items():
            if len(part) > self.sent[name]:
                out.append((name, part[self.sent[name]:]))
                self.sent[name] = len(part)
        return out

    def feed(self, role: str, delta: str) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        self.text += delta
        return self._emit(final=False)

    def flush(self) -> list[tuple[str, str]]:
        return [] if self.stopped else self._emit(final=True)

    def rewind(self, void: str) -> list[tuple[str, str]]:
        if self.stopped or not void or not self.text.endswith(void):
            return []
        full, _ = self.fields(final=True)
        shown = {name: part[:self.sent[name]] for name, part in full.items()}
        self.text = self.text[:-len(void)]
        now, _ = self.fields(final=True)
        out = []
        for name in (REASONING, CONTENT):
            keep = 0
            while keep < min(len(shown[name]), len(now[name])) and shown[name][keep] == now[name][keep]:
                keep += 1
            if keep < len(shown[name]):
                out.append((name, shown[name][keep:]))
                self.sent[name] = keep
        return out


PIECES = st.sampled_from(["a", "b", "ab", "aab", " ", "\n", "<", "</", "</th", "ink>", END, "S", "ST", "OP", "STOP"])
TEXT = st.lists(PIECES, max_size=12).map("".join)
OPS = st.lists(st.one_of(st.tuples(st.just("feed"), TEXT), st.tuples(st.just("rewind"), st.integers(1, 6))),
               max_size=25)
STOPS = st.lists(st.text("abST OP<\n", min_size=1, max_size=6), max_size=4)


@settings(max_examples=600, deadline=None, database=None)
@given(ops=OPS, stops=STOPS)
def test_the_shaper_splits_as_the_whole_text_recomputation_does(ops, stops):
    fast, ref = TextShaper(END, stops), WholeText(END, stops)
    for op, arg in ops:
        if op == "feed":
            assert fast.feed("large", arg) == ref.feed("large", arg)
        else:
            void = ref.text[-arg:] if len(ref.text) >= arg else ""
            assert fast.rewind(void) == ref.rewind(void)
        assert (fast.sent, fast.stopped, fast.text) == (ref.sent, ref.stopped, ref.text)
        assert fast.fields() == ref.fields() and fast.fields(final=True) == ref.fields(final=True)
    assert fast.flush() == ref.flush()


def test_held_prefix_tries_only_the_tail():
    assert held_prefix("xxabc", 0, "abcd") == 3
    assert held_prefix("xxabc", 3, "abcd") == 0  # text[3:] is "bc": only its suffixes count
    assert held_prefix("xxabc", 3, "bcd") == 2
    assert held_prefix("aaaa", 0, "aab") == 2
    assert held_prefix("abcd", 0, "abcd") == 0  # a proper prefix only
    assert held_prefix("", 0, "a") == 0


def test_a_long_stream_costs_the_same_per_delta_at_its_end_as_at_its_start():
    """A 1.2-million-character reasoning and answer with four stop strings near the 256
    cap, in 4-character deltas: the whole-text shaper rescans (and copies) everything so
    far on each delta, which takes minutes here; the windowed one keeps only the tail."""
    stops = ["a" * 255 + "b", "ab" * 128, "<" * 200 + "!", "the end." * 32]
    think = "one two three four a aa aaa " * 20_000
    answer = "<<<< aaaa abab " * 40_000
    text = think + END + "\n\n" + answer
    shaper = TextShaper(END, stops)
    widest = 0
    t0 = time.perf_counter()
    for i in range(0, len(text), 4):
        shaper.feed("large", text[i:i + 4])
        widest = max(widest, len(shaper._buf))
    took = time.perf_counter() - t0
    parts, stopped = shaper.fields(final=True)
    assert not stopped and parts == {REASONING: think, CONTENT: answer}
    assert widest <= 256 + 4  # the longest stop string and one delta: what any step looks at
    assert took < 20, took

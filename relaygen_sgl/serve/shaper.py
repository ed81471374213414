"""Streamed relay text to OpenAI's fields: `reasoning_content` before the family's
think_end, `content` after it, cut at the first stop string, with the tail that may still
become think_end or a stop string held back until it is decided.

Each delta costs work in proportion to the delta and the held tail, never to the text so
far: a needle that ends in new text began at most `held` characters back (the longest
suffix that is a proper prefix of it), so only that tail and the delta are searched, and
only they are kept as a string; the whole text is joined only when asked for. A stop
string is at most MAX_STOP_CHARS long (serve/protocol.py), which bounds the tail.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relaygen_sgl.core.result import REROUTED

REASONING, CONTENT = "reasoning_content", "content"
_NON_SPACE = re.compile(r"\S")  # where the answer begins (content is left-stripped, as str.lstrip does)


def stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """Where `text` is cut: at the start of the stop string that is complete first (the
    one a generator meets first), the longer one on a tie; None without a match."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return best[1] if best else None


def held_prefix(text: str, start: int, needle: str) -> int:
    """The length of the longest suffix of text[start:] that is a proper prefix of
    `needle`. Only places where needle's first character occurs in the last
    len(needle) - 1 characters are tried."""
    i = text.find(needle[0], max(start, len(text) - len(needle) + 1))
    while i >= 0:
        if needle.startswith(text[i:]):
            return len(text) - i
        i = text.find(needle[0], i + 1)
    return 0


class Needles:
    """Needles looked for in a growing text that each step sees only from `seen - held`
    on: the first match (the one complete first, the longer on a tie, as stop_cut) and,
    until there is one, how much of the end may still begin one."""

    def __init__(self, needles: Sequence[str], seen: int = 0) -> None:
        self.needles = tuple(needles)
        self.held = [0] * len(self.needles)  # per needle: the text's suffix that is a prefix of it
        self.seen = seen  # the text before this was looked at

    @property
    def hold(self) -> int:
        return max(self.held, default=0)

    @property
    def start(self) -> int:
        """The first position the next step may look at."""
        return self.seen - self.hold

    def step(self, buf: str, off: int) -> int | None:
        """`buf` is the text from position `off` to its end (off <= start). The match's
        start, or None."""
        best: tuple[int, int] | None = None
        for n, h in zip(self.needles, self.held, strict=True):
            i = buf.find(n, self.seen - h - off)
            if i >= 0 and (best is None or (i + len(n), i) < best):
                best = (i + len(n), i)
        if best is not None:
            return best[1] + off
        self.held = [held_prefix(buf, self.seen - h - off, n) for n, h in zip(self.needles, self.held, strict=True)]
        self.seen = off + len(buf)
        return None


class TextShaper:
    """Streamed text to (field, delta) pairs: reasoning_content before think_end, content
    after it (leading whitespace dropped), cut at the first stop string. `fields()` is the
    same split computed from the whole text at once."""

    def __init__(self, think_end: str, stops: Sequence[str] = ()) -> None:
        self.end, self.stops = think_end, tuple(stops)
        self.sent = {REASONING: 0, CONTENT: 0}  # characters of each field sent so far
        self.stopped = False
        self._restart("")

    def _restart(self, text: str) -> None:
        self._parts = [text] if text else []
        self._buf, self._off = text, 0  # the text from _off on: all that may still be sent or matched
        self._think = Needles([self.end])
        self._stop: Needles | None = None  # once the answer has begun
        self.at: int | None = None  # where think_end begins
        self.answer_at: int | None = None  # where the answer begins (think_end and whitespace skipped)

    @property
    def text(self) -> str:
        """Everything fed (and not rewound)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def answering(self) -> bool:
        """think_end has been seen."""
        return self.at is not None

    def _ends(self, final: bool) -> tuple[int, int]:
        """Advance the search over the new text; how far reasoning and content may be sent
        (positions in the text; content's end is answer_at + its length)."""
        size = self._off + len(self._buf)
        if self.at is None:
            at = self._think.step(self._buf, self._off)
            if at is None:
                return (size if final else size - self._think.hold), 0
            self.at = at
        if self.answer_at is None:
            m = _NON_SPACE.search(self._buf, max(self.at + len(self.end) - self._off, 0))
            if m is None:
                return self.at, 0
            self.answer_at = m.start() + self._off
            self._stop = Needles(self.stops, seen=self.answer_at)
        assert self._stop is not None
        cut = self._stop.step(self._buf, self._off)
        if cut is not None:
            self.stopped = True
            return self.at, cut
        return self.at, (size if final else size - self._stop.hold)

    def _emit(self, final: bool) -> list[tuple[str, str]]:
        r_end, c_end = self._ends(final)
        out = []
        for name, origin, end in ((REASONING, 0, r_end), (CONTENT, self.answer_at, c_end)):
            if origin is not None and end - origin > self.sent[name]:
                out.append((name, self._buf[origin + self.sent[name] - self._off:end - self._off]))
                self.sent[name] = end - origin
        self._trim()
        return out

    def _trim(self) -> None:
        """Drop the part of the buffer nothing will look at again."""
        size = self._off + len(self._buf)
        if self.stopped:
            keep = size
        elif self.at is None:
            keep = min(self.sent[REASONING], self._think.start)
        elif self.answer_at is None:  # the reasoning is sent; after think_end only whitespace so far
            keep = size
        else:
            assert self._stop is not None
            keep = min(self.answer_at + self.sent[CONTENT], self._stop.start)
        if keep > self._off:
            self._buf, self._off = self._buf[keep - self._off:], keep

    def feed(self, role: str, delta: str) -> list[tuple[str, str]]:
        """One listener item's text (a rerouted item goes to rewind())."""
        if role == REROUTED:
            raise ValueError("use rewind() for a rerouted item")
        if self.stopped or not delta:
            return []
        self._parts.append(delta)
        self._buf += delta
        return self._emit(final=False)

    def flush(self) -> list[tuple[str, str]]:
        return [] if self.stopped else self._emit(final=True)

    def fields(self, final: bool = False) -> tuple[dict[str, str], bool]:
        """The split of the whole text so far, and whether a stop string cut it (not final:
        less the tail held back)."""
        text = self.text
        at = text.find(self.end)
        if at < 0:
            keep = len(text) if final else len(text) - held_prefix(text, 0, self.end)
            return {REASONING: text[:keep], CONTENT: ""}, False
        content = text[at + len(self.end):].lstrip()
        cut = stop_cut(content, self.stops)
        if cut is not None:
            return {REASONING: text[:at], CONTENT: content[:cut]}, True
        if not final:
            content = content[:len(content) - max((held_prefix(content, 0, s) for s in self.stops), default=0)]
        return {REASONING: text[:at], CONTENT: content}, False

    def rewind(self, void: str) -> list[tuple[str, str]]:
        """The last len(void) characters fed are void (the small server failed mid-turn).
        Returns, per field, the part of them the client was already sent."""
        if self.stopped or not void or not self.text.endswith(void):
            return []
        full, _ = self.fields(final=True)
        shown = {name: part[:self.sent[name]] for name, part in full.items()}
        self._restart(self.text[:-len(void)])
        self._ends(final=False)  # the search state of the shorter text (no stop: it is a prefix)
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

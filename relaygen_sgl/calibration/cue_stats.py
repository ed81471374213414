"""Cue statistics for calibration: pure functions over token ids, margins and a decode
function (no servers), so the selection is testable with known margins.

A cue's post-cue region is the tokens after the token holding the cue's last character,
up to and including the first token whose text holds ".", "!", "?" or "\\n". delta = mean
margin in the cue's regions - mean margin of every other scored token.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from relaygen_sgl.core.cues import MAX_STOP_REGEXES, word_occurrences
from relaygen_sgl.core.errors import CalibrationError

REGION_END_CHARS = (".", "!", "?", "\n")  # a post-cue region ends with the first token holding one
DEFAULT_THRESHOLD = 0.0
DEFAULT_MIN_COUNT = 3
STDERR_FORMULA = ("sqrt(var_in/n_in + var_out/n_out): Welch's standard error of the difference of two means, "
                  "sample variances (n-1) over tokens, tokens treated as independent (they are not: tokens of "
                  "one region are correlated, so this understates the uncertainty)")
Decode = Callable[[Sequence[int]], str]


def token_pieces(ids: Sequence[int], decode: Decode) -> list[str]:
    """The text each token adds, by incremental decoding (the detokenizers' prefix/read offset
    scheme): a token that ends inside a multi-byte character adds "" and the token that
    completes it adds the character. "".join(pieces) is the decoded text."""
    pieces: list[str] = []
    prefix, read = 0, 0
    for k in range(len(ids)):
        before = decode(ids[prefix:read])
        now = decode(ids[prefix:k + 1])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before):])
            prefix, read = read, k + 1
        else:
            pieces.append("")
    if read < len(ids) and ids:  # text held back to the end (e.g. a trailing broken byte)
        tail = decode(ids[prefix:])
        held = decode(ids[prefix:read])
        if len(tail) > len(held):
            pieces[-1] += tail[len(held):]
    return pieces


def _ends(pieces: Sequence[str]) -> list[int]:
    ends, acc = [], 0
    for p in pieces:
        acc += len(p)
        ends.append(acc)
    return ends


def cue_regions(pieces: Sequence[str], cue: str, scored: Sequence[bool] | None = None, *,
                text: str | None = None, ends: Sequence[int] | None = None,
                end_chars: Sequence[str] = REGION_END_CHARS) -> tuple[int, list[tuple[int, int]]]:
    """Word occurrences of `cue` in the pieces' text, and each one's post-cue region as a token
    range [a, b): the tokens after the token holding the cue's last character, up to and
    including the first token whose text contains an end char. A region also stops before
    an unscored token (text the program inserted) and at the end of the trajectory. When the
    cue's own token already holds an end char after the cue (" now." for "now"), the sentence
    ended there and the region is empty. Only occurrences in scored tokens are counted."""
    text = "".join(pieces) if text is None else text
    ends = _ends(pieces) if ends is None else ends
    n = len(pieces)
    count, regions = 0, []
    for _start, cut in word_occurrences(text, cue):
        last = bisect.bisect_right(ends, cut - 1)  # the token holding the cue's last character
        if last >= n or (scored is not None and not scored[last]):
            continue
        count += 1
        rest = text[cut:ends[last]]
        if any(c in rest for c in end_chars):
            continue
        a = b = last + 1
        while b < n and (scored is None or scored[b]):
            b += 1
            if any(c in pieces[b - 1] for c in end_chars):
                break
        if b > a:
            regions.append((a, b))
    return count, regions


# ---------------------------------------------------------------- statistics
@dataclass
class ScoredTrajectory:
    id: str
    completion_ids: list[int]
    margins: list[float]  # one per completion token
    scored: list[bool] | None = None  # False: not model text (inserted), out of every statistic

    def __post_init__(self) -> None:
        if len(self.margins) != len(self.completion_ids):
            raise CalibrationError(f"{self.id}: {len(self.margins)} margins for {len(self.completion_ids)} tokens")
        if self.scored is not None and len(self.scored) != len(self.completion_ids):
            raise CalibrationError(f"{self.id}: scored mask does not match the tokens")


@dataclass
class CueStat:
    cue: str
    occurrences: int = 0
    n_tokens: int = 0  # tokens in the union of its regions
    mean_margin: float | None = None  # inside its regions
    mean_margin_out: float | None = None  # every other scored token
    delta: float | None = None
    stderr: float | None = None
    selected: bool = False
    rank: int | None = None


@dataclass
class CalibrationStats:
    cues: dict[str, CueStat]
    baseline_mean_margin: float | None
    n_tokens: int
    n_trajectories: int
    regions: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)  # traj id -> cue -> ranges

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline_mean_margin": _r(self.baseline_mean_margin), "n_tokens": self.n_tokens,
            "n_trajectories": self.n_trajectories, "margin": "p(top1) - p(top2) of the small model, teacher-forced",
            "region": "tokens after the cue up to and including the first token containing "
                      + ", ".join(repr(c) for c in REGION_END_CHARS),
            "delta": "mean margin in the cue's regions - mean margin of all other tokens",
            "stderr": STDERR_FORMULA,
            "cues": {c: {k: (_r(v) if isinstance(v, float) else v) for k, v in asdict(s).items() if k != "cue"}
                     for c, s in self.cues.items()},
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


class _Acc:
    __slots__ = ("n", "s", "ss")

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.s += x
        self.ss += x * x


def _mean(n: int, s: float) -> float | None:
    return s / n if n else None


def _var(n: int, s: float, ss: float) -> float | None:
    if n < 2:
        return None
    return max(0.0, (ss - s * s / n) / (n - 1))


def cue_statistics(trajectories: Sequence[ScoredTrajectory], cues: Sequence[str], decode: Decode,
                   end_chars: Sequence[str] = REGION_END_CHARS) -> CalibrationStats:
    """Per cue: occurrences, mean margin in its post-cue regions, delta against every other
    scored token of all trajectories, and its standard error (STDERR_FORMULA). A trajectory
    without a cue adds only to the baseline (and to every cue's "other tokens")."""
    total = _Acc()
    inside = {c: _Acc() for c in cues}
    occurrences = dict.fromkeys(cues, 0)
    regions: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for traj in trajectories:
        pieces = token_pieces(traj.completion_ids, decode)
        text, ends = "".join(pieces), _ends(pieces)
        scored = traj.scored
        for k, m in enumerate(traj.margins):
            if scored is None or scored[k]:
                total.add(m)
        for cue in cues:
            count, spans = cue_regions(pieces, cue, scored, text=text, ends=ends, end_chars=end_chars)
            occurrences[cue] += count
            if not spans:
                continue
            regions.setdefault(traj.id, {})[cue] = spans
            tokens = set()
            for a, b in spans:
                tokens.update(range(a, b))
            acc = inside[cue]
            for k in tokens:
                acc.add(traj.margins[k])
    stats = {}
    for cue in cues:
        i = inside[cue]
        on, os_, oss = total.n - i.n, total.s - i.s, total.ss - i.ss
        m_in, m_out = _mean(i.n, i.s), _mean(on, os_)
        delta = m_in - m_out if m_in is not None and m_out is not None else None
        v_in, v_out = _var(i.n, i.s, i.ss), _var(on, os_, oss)
        se = math.sqrt(v_in / i.n + v_out / on) if v_in is not None and v_out is not None else None
        stats[cue] = CueStat(cue, occurrences[cue], i.n, m_in, m_out, delta, se)
    return CalibrationStats(stats, _mean(total.n, total.s), total.n, len(trajectories), regions)


def select_cues(stats: CalibrationStats, threshold: float = DEFAULT_THRESHOLD, min_count: int = DEFAULT_MIN_COUNT,
                max_cues: int = MAX_STOP_REGEXES) -> list[str]:
    """Cues with delta > threshold and at least `min_count` occurrences, by delta descending
    (ties: more occurrences, then candidate order), at most `max_cues`. Marks them in `stats`."""
    order = {c: i for i, c in enumerate(stats.cues)}
    eligible = [s for s in stats.cues.values()
                if s.delta is not None and s.delta > threshold and s.occurrences >= min_count]
    eligible.sort(key=lambda s: (-s.delta, -s.occurrences, order[s.cue]))  # type: ignore[operator]
    chosen = eligible[:max_cues]
    for s in stats.cues.values():
        s.selected, s.rank = False, None
    for rank, s in enumerate(chosen, 1):
        s.selected, s.rank = True, rank
    return [s.cue for s in chosen]


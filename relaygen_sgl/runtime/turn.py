"""One turn of one role: generate until a stop, a verified cue, EOS or the budget.

A turn is usually one /generate call. It takes more only when the server's cue match
is not a word match once the text before it is seen, or when a cue fires before the
turn's `min_tokens`: then the same role simply continues from every token it wrote,
so nothing is lost and its radix cache holds the whole prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.client.http import EngineClient, Finish, Generation
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.cues import CONTEXT_CHARS, cue_next, find_cue
from relaygen_sgl.core.errors import STOPPED, Cancelled
from relaygen_sgl.core.result import Segment
from relaygen_sgl.runtime.gen_params import INPUT_LOGPROB_KEYS, OUTPUT_LOGPROB_KEYS
from relaygen_sgl.runtime.plan import DeltaSink

CUE_WINDOW_TOKENS = 12  # tokens decoded to see whether the next one may complete a cue


class _Streamer:
    """Turns output_ids as they arrive into text deltas, holding back the last `holdback`
    tokens while a cue or stop may still cut them (with `hold_last_only`, only in a
    request's last chunk). Decodes a short window, not the whole prefix, per token."""

    WINDOW = 8

    def __init__(self, tok: Tokenizer, role: str, sink: DeltaSink | None, holdback: int,
                 ctx: str = "", stops: Sequence[str] = (), hold_last_only: bool = False) -> None:
        self.tok, self.role, self.sink, self.holdback = tok, role, sink, holdback
        self.hold_last_only = hold_last_only
        self.sent = 0  # tokens whose text was sent
        # a stop string begun before this turn ends it within its first characters: stream
        # nothing past it (run_turn cuts there too)
        self.ctx, self.stops = ctx, [s for s in stops if len(s) > 1]
        self.watch = bool(self.stops)
        self.frozen_at: int | None = None

    def update(self, ids: Sequence[int], final: bool = False, last: bool = True) -> None:
        """`ids`: the turn's tokens so far; `last`: they end a request (its last chunk)."""
        if self.sink is None:
            return
        hold = 0 if final or (self.hold_last_only and not last) else self.holdback
        upto = max(0, len(ids) - hold)
        if self.frozen_at is not None:
            upto = min(upto, self.frozen_at) if not final else upto
        elif self.watch and not final:
            text = self.tok.decode(ids[:upto])
            hit = _straddling_stop(self.ctx, "", text, self.stops)
            if hit is not None:
                self.frozen_at = upto = max(1, self.tok.cut_index(ids[:upto], hit[1]))
            elif len(text) >= max(len(s) for s in self.stops):
                self.watch = False  # past where a straddling stop could end
        if upto <= self.sent:
            return
        w = max(0, self.sent - self.WINDOW)
        prev = self.tok.decode(ids[w:self.sent])
        cur = self.tok.decode(ids[w:upto])
        if not final and cur.endswith("\ufffd"):  # half a multi-byte character: wait
            return
        if cur.startswith(prev) and len(cur) > len(prev):
            self.sink(self.role, cur[len(prev):])
        self.sent = upto


def _straddling_stop(ctx: str, before: str, text: str, stops: Sequence[str]) -> tuple[str, int] | None:
    """Earliest stop string that starts before the new output and ends inside it.
    Returns (stop, end offset in `text`)."""
    boundary = len(ctx) + len(before)
    full = ctx + text
    best: tuple[str, int] | None = None
    for stop in stops:
        lo = max(0, boundary - len(stop) + 1)
        i = full.find(stop, lo)
        if 0 <= i < boundary < i + len(stop):
            end = i + len(stop) - len(ctx)
            if best is None or end < best[1]:
                best = (stop, end)
    return best


def _cue_next(tok: Tokenizer, ctx: str, ids: list[int], patterns: Sequence[str]) -> bool:
    """The next token may complete a cue: the text so far ends with a cue word, or with all
    of a cue but its last punctuation. Decodes a window of the last tokens."""
    if not patterns:
        return False
    window = ids[-CUE_WINDOW_TOKENS:]
    text = tok.decode(window)
    return cue_next(ctx + text if len(window) == len(ids) else text, patterns)


@dataclass(frozen=True)
class TurnSpec:
    """The typed request for one turn: what the relay's policy asks the backend to run
    (runtime/policy.py builds one per turn), or what a plain `sgl.gen` means (the backend
    builds one from the gen's sampling parameters). Role None: the trajectory is over, with
    `finish` saying why."""

    role: str | None
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    cue_patterns: tuple[str, ...] = ()
    # A cue may not end the turn before this many tokens. Enforced here, not with SGLang's
    # min_new_tokens: that masks EOS (and not stop strings), which would change what the
    # model writes; gating only the cue keeps a greedy relay equal to the single model.
    min_tokens: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # top-level request fields (routed_dp_rank, logprobs)
    insert: str = ""  # text the program appends before this turn (the forced "\n</think>\n\n")
    finish: str = ""  # why the trajectory ended (role None)
    # The reference's vLLM semantics (protocol "reference"): `min_tokens` also goes to SGLang
    # as min_new_tokens (EOS held back) and a stop string completed within them is passed
    # over; stop strings match only this turn's own output, and one that ends inside a token
    # cuts the text there (vLLM's include_stop_str_in_output).
    reference: bool = False
    # A plain gen (not a relay turn) ends as on RuntimeEndpoint: the matched stop string leaves
    # the text (SGLang's detokenizer trims it, no_stop_trim off) and the turn's ids are the
    # trimmed text's; a stop regex ends it where the server matched, every token kept; a stop
    # begun in the text before the gen does not end it (the server searches its own output).
    # A relay turn keeps its stop (the hand-back's sentence end is the model's) and reads its
    # regexes as cues.
    plain: bool = False
    seed: int | None = None  # the seeded sampler's seed (runtime/seeding.py)
    prefetch: str = "off"  # warm the other server during the turn: auto | on | off
    last: bool = False  # no turn follows (the answer): nothing to warm
    # A turn that runs to its max_tokens is followed by the other role's (thinking's budget ends
    # and the answer role answers): that handoff is certain, so the prefetch warms the other
    # server once shortly before it whatever auto says (the preset's prefetch_closing_lead).
    hands_over_at_budget: bool = False
    # The request's input when it is not the trajectory's ids: the reference re-renders each
    # request after its first from the text so far, re-tokenized, as it re-sent its conversation.
    prefix_ids: tuple[int, ...] | None = None


class _Turn:
    """One turn's requests and what they returned so far; each way a request can end the
    turn is one method (a cue, a plain gen's regex, vLLM's stop, a stop begun before it)."""

    def __init__(self, engine: EngineClient, tok: Tokenizer, prefix_ids: Sequence[int], context_text: str,
                 spec: TurnSpec, stop: Stop | None = None, limit: int | None = None) -> None:
        self.engine, self.tok, self.prefix_ids, self.spec, self.stop = engine, tok, prefix_ids, spec, stop
        # the most tokens the trajectory may hold (every server it may go to accepts it again)
        self.limit = limit if limit is not None else engine.context_length
        # vLLM (the reference) and SGLang (a plain gen) match stop strings in a request's own
        # output only: no context.
        self.ctx = "" if spec.reference or spec.plain else context_text[-CONTEXT_CHARS:]
        self.kept: list[int] = []
        self.first: Generation | None = None
        self.latency = self.server_latency = 0.0
        self.requests = self.discarded = 0
        self.logprobs: dict[str, list] = {}  # with return_logprob: the turn's, as one request's meta_info holds them
        self.ids_out: list[int] | None = None  # text cut inside a token (a trimmed or vLLM's stop), re-encoded
        self.finish = Finish("length")

    def remaining(self) -> int:
        return min(self.budget_left(), self.room())

    def budget_left(self) -> int:
        return self.spec.max_tokens - len(self.kept)

    def room(self) -> int:
        """Tokens the limit leaves: past it SGLang refuses the input (HTTP 400) or cuts the
        output short without a word (client/http.py Limits)."""
        return (1 << 62) if self.limit is None else self.limit - len(self.prefix_ids) - len(self.kept)

    def at_limit(self) -> bool:
        """The turn ended because the trajectory is as long as a server accepts, not because
        its budget is spent."""
        return self.finish.kind == "length" and self.room() <= 0 < self.budget_left()

    def sampling(self, remaining: int) -> dict[str, Any]:
        spec, kept = self.spec, self.kept
        sampling: dict[str, Any] = {**spec.sampling, "max_new_tokens": remaining, "no_stop_trim": True}
        if spec.sampling.get("min_new_tokens"):  # a plain gen's: counted from the turn's start
            sampling["min_new_tokens"] = max(0, min(spec.sampling["min_new_tokens"] - len(kept), remaining))
        if spec.stop:
            sampling["stop"] = list(spec.stop)
        if spec.cue_patterns:
            sampling["stop_regex"] = list(spec.cue_patterns)
        if spec.reference and spec.min_tokens > len(kept):
            # vLLM's min_tokens masks EOS for these tokens, as SGLang's min_new_tokens does
            sampling["min_new_tokens"] = min(spec.min_tokens - len(kept), remaining)
        return sampling

    def request(self, remaining: int, on_tokens: Callable[[list[int], bool], None]) -> Generation:
        extra = self.spec.extra
        if self.first is not None and "logprob_start_len" in extra:
            # it counts from this request's prompt: only the turn's first request is asked
            # for prompt logprobs, the rest for their output's
            extra = {k: v for k, v in extra.items() if k != "logprob_start_len"}
        gen = self.engine.generate([*self.prefix_ids, *self.kept], self.sampling(remaining), on_tokens=on_tokens,
                                   extra=extra or None, stop=self.stop)
        self.requests += 1
        self.first = self.first or gen
        if self.spec.extra.get("return_logprob"):
            _take_logprobs(self.logprobs, gen.meta, len(self.kept))
        self.latency += gen.latency_s
        self.server_latency += gen.server_latency_s
        return gen

    def take(self, gen: Generation) -> bool:
        """Fold a request's output into the turn; True when the turn is over."""
        new, finish = gen.output_ids, gen.finish
        if new and new[-1] in self.tok.eos_ids and finish.kind in ("regex", "stop"):
            # SGLang checks stop strings before EOS, on text decoded with special tokens: an
            # EOS can complete a match ("Therefore" + "<|im_end|>" fits \W). The model ended.
            finish = Finish("eos", new[-1])
        self.finish = finish
        full = self.kept + new
        if finish.kind == "regex":
            return self.plain_regex(full) if self.spec.plain else self.cue(full)
        if self.spec.reference and finish.kind == "stop" and isinstance(finish.matched, str):
            return self.vllm_stop(full)
        return self.straddling_stop(full)

    def plain_regex(self, full: list[int]) -> bool:
        """SGLang's stop regex on a plain gen: it ends where the server matched, every token kept."""
        self.kept, self.finish = full, Finish("stop", self.finish.matched)
        return True

    def cue(self, full: list[int]) -> bool:
        """The server matched a cue pattern: the turn ends there if it is a word match past
        `min_tokens`; else every token is kept and the same role goes on."""
        tok, ctx = self.tok, self.ctx
        hit = find_cue(ctx + tok.decode(full), self.spec.cue_patterns, after=len(ctx) + len(tok.decode(self.kept)))
        if hit is not None:
            cut = tok.cut_index(full, hit.end - len(ctx))
            if cut >= self.spec.min_tokens:
                self.kept, self.discarded = full[:cut], self.discarded + len(full) - cut
                self.finish = Finish("cue", hit.cue)
                return True
        self.kept, self.finish = full, Finish("length")  # the budget check ends it if nothing remains
        return False

    def vllm_stop(self, full: list[int]) -> bool:
        hit = _vllm_stop(self.tok, full, len(self.kept), self.spec.stop, self.spec.min_tokens)
        if hit is None:  # within the first min_tokens: vLLM does not look yet; go on
            self.kept, self.finish = full, Finish("length")
            return False
        stop_str, count, text = hit
        self.discarded += len(full) - count
        self.kept = full[:count]
        whole = self.tok.decode(self.kept)
        if text != whole:  # vLLM cut the text inside the token that completed the stop
            self.ids_out = _ids_upto(self.tok, self.kept, whole, len(text))
        self.finish = Finish("stop", stop_str)
        return True

    def straddling_stop(self, full: list[int]) -> bool:
        """The server only searches its own output, so a stop string that began in the text
        before this request ("." + "</" | "think>") is found here; else the request's own
        finish ends the turn."""
        straddle = _straddling_stop(self.ctx, self.tok.decode(self.kept), self.tok.decode(full), self.spec.stop)
        if straddle is None:
            self.kept = full
            return True
        stop_str, end = straddle
        cut = max(1, self.tok.cut_index(full, end))
        self.discarded += len(full) - cut
        self.kept = full[:cut]
        self.finish = Finish("stop", stop_str)
        return True

    def segment(self) -> Segment:
        spec, kept, finish, first = self.spec, self.kept, self.finish, self.first
        for key in OUTPUT_LOGPROB_KEYS:
            if key in self.logprobs:  # the tokens a cue cut or a straddling stop dropped drop theirs too
                del self.logprobs[key][len(kept):]
        ids = self.ids_out if self.ids_out is not None else kept
        return Segment(
            role=spec.role or "", text=self.tok.decode(ids), token_ids=ids, completion_tokens=len(kept),
            prompt_tokens=first.prompt_tokens if first else 0, cached_tokens=first.cached_tokens if first else 0,
            latency_s=round(self.latency, 4), server_latency_s=round(self.server_latency, 4),
            ttft_s=round(first.ttft_s, 4) if first else 0.0, finish=finish.kind, matched=finish.matched,
            requests=self.requests, discarded_tokens=self.discarded, logprobs=self.logprobs or None,
        )

    def trim_plain(self) -> None:
        """A plain gen's output as SGLang returns it: the matched stop string (or EOS / stop
        token) leaves the text and ids."""
        finish, kept = self.finish, self.kept
        if finish.kind == "stop" and isinstance(finish.matched, str):
            self.ids_out = _trimmed(self.tok, kept, finish.matched)
        elif finish.kind == "eos" and kept and kept[-1] == finish.matched:
            self.ids_out = kept[:-1]


def run_turn(
    engine: EngineClient,
    tok: Tokenizer,
    prefix_ids: Sequence[int],
    context_text: str,
    spec: TurnSpec,
    sink: DeltaSink | None = None,
    stop: Stop | None = None,
    on_ids: Callable[[list[int], Callable[[], bool]], None] | None = None,
    limit: int | None = None,
) -> Segment:
    """Run `spec` on `engine` from `prefix_ids`; `context_text` is the trajectory text before
    it (the left side of a cue's word boundary). A set `stop` ends it at once, wherever its
    request is (client/cancel.py), and raises Cancelled. `on_ids` hears the turn's
    tokens so far as they arrive, but for a request's last chunk, with a check of whether the
    next token may complete a cue (the handoff prefetch; it decodes, so it is asked only when
    needed). `limit`: the most tokens the trajectory may hold (default: the server's context);
    a relay turn that reaches it first ends with finish "limit"."""
    assert spec.role is not None
    turn = _Turn(engine, tok, prefix_ids, context_text, spec, stop, limit)
    # held back: the last token while a cue may cut it, or (reference) a stop may cut inside
    # it; for a plain gen, as many tokens as a stop string may span, since it leaves the text.
    # A cue cuts only tokens of a request's last chunk (the server stops at the token that
    # completes its match, and the cut drops that token on), so a cue turn holds back only
    # there: a token in any earlier chunk, the turn's first included, goes out as it arrives.
    holdback = 1 if spec.reference or (spec.cue_patterns and not spec.plain) else 0
    if spec.plain and spec.stop:
        holdback = max(len(x) for x in spec.stop) + 1
    streamer = _Streamer(tok, spec.role, sink, holdback, turn.ctx, spec.stop,
                         hold_last_only=not spec.reference and not spec.plain)
    while (remaining := turn.remaining()) > 0:
        base = list(turn.kept)

        def on_tokens(ids: list[int], last: bool, base: list[int] = base) -> None:
            if stop is not None and stop.is_set():
                raise Cancelled(STOPPED)
            so_far = base + ids
            streamer.update(so_far, last=last)
            # The request's last chunk is not offered: what follows it at once is the next
            # request (the handoff, or this turn's next one), which a prefetch would delay.
            if on_ids is not None and not last:
                on_ids(so_far, lambda: _cue_next(tok, turn.ctx, so_far, spec.cue_patterns))

        if turn.take(turn.request(remaining, on_tokens)):
            break
    else:
        turn.finish = Finish("length")
    if spec.plain:  # cut short without a word, as SGLang itself cuts it
        turn.trim_plain()
    elif turn.at_limit():
        turn.finish = Finish("limit")
    streamer.update(turn.ids_out if turn.ids_out is not None else turn.kept, final=True)
    return turn.segment()


def _trimmed(tok: Tokenizer, ids: list[int], matched: str) -> list[int] | None:
    """The ids of the text SGLang's detokenizer returns for a stop match (trim_matched_stop):
    cut where `matched` first occurs; None when it does not (SGLang keeps the text then)."""
    text = tok.decode(ids)
    pos = text.find(matched)
    return None if pos < 0 else _ids_upto(tok, ids, text, pos)


def _ids_upto(tok: Tokenizer, ids: list[int], text: str, end: int) -> list[int]:
    """The ids of text[:end], `text` being decode(ids): the model's tokens that lie wholly
    before `end`, and the part before it of the token it falls inside, re-encoded."""
    keep = tok.cut_index(ids, end)
    head = tok.decode(ids[:keep])
    if len(head) > end:
        keep -= 1
        head = tok.decode(ids[:keep])
    rest = text[len(head):end]
    return ids[:keep] + (tok.encode(rest) if rest else [])


def _vllm_stop(tok: Tokenizer, ids: Sequence[int], start: int, stops: Sequence[str],
               min_tokens: int) -> tuple[str, int, str] | None:
    """The stop vLLM would have ended this turn at, with SGLang's output in `ids` (the turn's
    tokens; this request's begin at `start`): at each token past the first `min_tokens`, the
    first stop string in list order that ends inside that token's new characters. Returns
    (stop, tokens up to and with the one completing it, the text cut at the stop's end, as
    vLLM returns it with include_stop_str_in_output). SGLang stopped at the first token whose
    tail holds a stop, so only this request's first tokens (a stop begun in an earlier request
    of the turn) and its last token can hold one."""
    longest = max((len(s) for s in stops), default=0)
    candidates = list(range(start + 1, min(len(ids), start + longest + 1) + 1)) + [len(ids)]
    for count in sorted(set(candidates)):
        if count <= min_tokens:
            continue
        window = max(0, count - longest - 8)
        before = tok.decode(ids[window: count - 1])
        text = tok.decode(ids[window:count])
        fresh = len(text) - len(before) if text.startswith(before) else len(text)
        for stop in stops:
            i = text.find(stop, max(0, len(text) - fresh - len(stop) + 1))
            if i >= 0:
                whole = tok.decode(ids[:count])
                return stop, count, whole[: len(whole) - (len(text) - i - len(stop))]
    return None


def _take_logprobs(into: dict[str, list], meta: dict[str, Any], kept: int) -> None:
    """Add one request's logprobs to its turn's: prompt logprobs from the first request,
    output logprobs after the `kept` tokens the turn already holds (a request's output
    continues exactly there)."""
    for key in INPUT_LOGPROB_KEYS:
        if key in meta and key not in into:
            into[key] = list(meta[key] or [])
    for key in OUTPUT_LOGPROB_KEYS:
        if key in meta:
            del into.setdefault(key, [])[kept:]
            into[key].extend(meta[key] or [])

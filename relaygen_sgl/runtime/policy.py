"""The RelayGen routing policy as an object: given the last turn, what runs next.

think phase: large until a verified cue or </think>; small until a sentence end or
</think>; back to large. The large model needs `min_large_tokens` before a cue may end
its turn. After </think> one answer turn (small by default). One completion budget
spans both models. Under our protocol (the default) thinking may use all of it but an
answer reserve: there "\\n</think>\\n\\n" is inserted and the answer role answers within the
budget. Under `protocol="reference"` the plan reproduces the reference implementation
(docs/fidelity.md): cues are plain stop strings in list order, every large request holds
back EOS and stop strings for its first 5 tokens, an EOS inside thinking asks the same role
again and only an empty reply closes thinking with "\\n</think>", and thinking may spend the
whole budget, leaving no answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaygen_sgl.client.tokenizer import load_tokenizer
from relaygen_sgl.core.config import METHODS, ROLES, Family
from relaygen_sgl.core.cues import CUE_MATCHES, CueProfile
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.reference import (
    DEFAULT_PROTOCOL,
    REFERENCE,
    check_protocol,
    math_prompt,
    reference_protocol,
    rendering,
)
from relaygen_sgl.core.result import Segment
from relaygen_sgl.runtime.prefetch import prefetch_mode

MIN_LARGE_TOKENS = 5
DEFAULT_BUDGET = 32768  # completion tokens across both models, as in the paper
# Tokens kept for the answer by default (at most a quarter of the budget): thinking is closed
# when only this many are left, as Qwen3's documentation does at a thinking budget (force
# </think>, then let the model answer). Measured need: Qwen3 answers after </think> in a few
# hundred tokens; 1024 leaves room for a worked final answer.
DEFAULT_ANSWER_RESERVE = 1024


DeltaSink = Callable[[str, str], None]  # (role, text delta)


@dataclass(frozen=True)
class TurnSpec:
    """What to run next. The policy decides one (role None: the trajectory is over, with
    `finish` saying why); the backend rebuilds one from the gen's sampling parameters."""

    role: str | None
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    cue_patterns: tuple[str, ...] = ()
    # A cue may not end the turn before this many tokens. Enforced here, not with SGLang's
    # min_new_tokens: that masks EOS (and not stop strings), which would change what the
    # model writes; gating only the cue keeps a greedy relay equal to the single model.
    min_tokens: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # top-level request fields (routed_dp_rank)
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


@dataclass(frozen=True)
class RelayPlan:
    """One run's settings: method, cues, family (template, think_end), budget, sampling."""

    method: str
    profile: CueProfile
    family: Family
    tokenizer_path: str
    budget: int = DEFAULT_BUDGET
    answer_role: str = "small"
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k
    seed: int | None = None
    min_large_tokens: int = MIN_LARGE_TOKENS
    answer: bool = True  # False: stop once thinking is closed (the caller goes on)
    cue_match: str = "word"  # "substring": the reference's stop-string matching ("now" in "know")
    # warm the other server during each turn: "auto", "on", "off" (True/False: on/off; None:
    # the backend's default). Never for the one-model methods: they use one server.
    prefetch: bool | str | None = None
    protocol: str = DEFAULT_PROTOCOL  # "reference": reproduce the reference implementation (module doc)
    answer_reserve: int | None = None  # tokens kept for the answer (None: DEFAULT_ANSWER_RESERVE; 0: none)
    on_delta: DeltaSink | None = field(default=None, compare=False, repr=False)
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)  # set: stop the run

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget < 1:
            raise ConfigError(f"the token budget must be positive, got {self.budget}")
        if self.answer_role not in ROLES:
            raise ConfigError(f"answer role must be 'large' or 'small', got {self.answer_role!r}")
        prefetch_mode(self.prefetch)  # a bad value is refused here, before any request
        if self.cue_match not in CUE_MATCHES:
            raise ConfigError(f"cue matching must be one of {', '.join(CUE_MATCHES)}, got {self.cue_match!r}")
        check_protocol(self.protocol)
        if self.answer_reserve is not None and self.answer_reserve < 0:
            raise ConfigError(f"the answer reserve must be >= 0, got {self.answer_reserve}")
        if self.reference:
            rendering(self.family.name)  # refused here when the family has no reference rendering
            if self.answer_reserve:
                raise ConfigError("--protocol reference shares the budget between thinking and the answer, as the "
                                  "reference does: it takes no answer reserve")

    @property
    def reference(self) -> bool:
        return self.protocol == REFERENCE

    @property
    def reserve(self) -> int:
        """Tokens kept for the answer: none under the reference protocol (one shared budget) or
        when the caller answers itself; else the reserve, at most a quarter of the budget."""
        if self.reference or not self.answer:
            return 0
        want = DEFAULT_ANSWER_RESERVE if self.answer_reserve is None else self.answer_reserve
        return min(want, self.budget // 4)

    @property
    def think_budget(self) -> int:
        return self.budget - self.reserve

    def render(self, question: str | list[dict[str, str]]) -> str:
        """The prompt for a question, or for a conversation (OpenAI-style messages). Under the
        reference protocol: the reference's bytes (a question goes into its math prompt, the
        backspace of its "\\boxed" included; one user message is sent as it is)."""
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
        if not messages or not any(str(m.get("content") or "").strip() for m in messages):
            raise ConfigError("the question is empty")
        if self.reference:
            if len(messages) != 1 or messages[0].get("role") != "user":
                raise ConfigError("--protocol reference renders one user message, as the reference does")
            content = math_prompt(question) if isinstance(question, str) else str(messages[0]["content"])
            return rendering(self.family.name).first_prompt(content, relay=self.method == "relay")
        tok = load_tokenizer(self.tokenizer_path)
        prompt = tok.apply_chat_template(messages, **self.family.template_kwargs)
        return prompt + self.family.think_prefix

    def continuation(self, prompt: str) -> Callable[[str], str] | None:
        """Under the reference protocol, how a request after the first is rendered from the
        text written since `prompt` (the first request's, from `render`): the reference re-sends
        [user, assistant <text so far>] with continue_final_message, re-tokenized. None under ours
        (every request is the trajectory's token ids)."""
        if not self.reference:
            return None
        r = rendering(self.family.name)
        content = r.content_of(prompt, relay=self.method == "relay")
        if content is None:
            raise ConfigError("--protocol reference needs the reference's own prompt (program.prompt with the plan)")
        return lambda completion: r.continuation_prompt(content, completion)

    @property
    def prefetch_mode(self) -> str | None:
        """The trajectory's prefetch mode: off for single-large and single-small (the other
        server is never used), else the plan's (None: the backend's default)."""
        return "off" if self.method != "relay" else prefetch_mode(self.prefetch)

    @property
    def closing_text(self) -> str:
        if self.reference:
            return str(reference_protocol()["think_close"])  # "\n</think>", nothing after it
        return f"\n{self.family.think_end}\n\n"

    @property
    def cue_patterns(self) -> tuple[str, ...]:
        # the reference's cues are plain stop strings (large_stops), not patterns
        return () if self.reference else self.profile.patterns_for(self.cue_match)

    @property
    def large_stops(self) -> tuple[str, ...]:
        if self.reference:  # its stop list, in its order: </think> first, then the cues
            return (self.family.think_end, *self.profile.cues)
        return (self.family.think_end,)

    @property
    def small_stops(self) -> tuple[str, ...]:
        if self.reference:
            return (self.family.think_end, *self.profile.sentence_ends)
        return (*self.profile.sentence_ends, self.family.think_end)


class RelayPolicy:
    def __init__(self, plan: RelayPlan) -> None:
        self.plan = plan
        self.used = 0
        self.phase = "think"
        self.turns = 0  # model turns so far (the reference renders its first request apart)
        self.single_role = {"single-large": "large", "single-small": "small"}.get(plan.method)
        self.note = ""  # why the run ended the way it did, where a reader may wonder (no answer, a reserve)

    @property
    def remaining(self) -> int:
        return self.plan.budget - self.used

    @property
    def think_left(self) -> int:
        """Tokens thinking may still use: the budget less the answer reserve."""
        return self.plan.think_budget - self.used

    def _large(self) -> TurnSpec:
        left = self.think_left
        return TurnSpec("large", left, self.plan.large_stops, self.plan.cue_patterns,
                        min(self.plan.min_large_tokens, left), reference=self.plan.reference)

    def _small(self) -> TurnSpec:
        return TurnSpec("small", self.think_left, self.plan.small_stops, reference=self.plan.reference)

    def _same(self, role: str) -> TurnSpec:
        return self._large() if role == "large" else self._small()

    def _end(self, finish: str, insert: str = "") -> TurnSpec:
        return TurnSpec(None, insert=insert, finish=finish)

    def _close(self) -> str:
        """The text that closes thinking; the reference counts its "\\n</think>" as one token
        (utils/utils.py:398), so its answer gets one token less."""
        if self.plan.reference:
            self.used += 1
        return self.plan.closing_text

    def _answer(self, insert: str = "") -> TurnSpec:
        self.phase = "answer"
        if not self.plan.answer:
            return self._end("think_end", insert)
        if self.remaining <= 0:
            return self._end("budget", insert)
        return TurnSpec(self.single_role or self.plan.answer_role, self.remaining, insert=insert,
                        reference=self.plan.reference)

    def _out_of_budget(self) -> TurnSpec:
        """Thinking reached its budget. Ours closes it and answers within the reserve; the
        reference closes it and, with the shared budget spent, has no answer."""
        insert = self._close()
        if self.plan.reserve and self.remaining > 0:
            self.note = (f"thinking closed at {self.plan.think_budget} tokens: {self.plan.reserve} of the "
                         f"{self.plan.budget}-token budget are kept for the answer (--answer-reserve)")
            return self._answer(insert=insert)
        if self.plan.reference:
            self.note = (f"no answer: under --protocol reference thinking and the answer share the {self.plan.budget}-"
                         "token budget, as in the reference implementation, and thinking spent it all "
                         "(the default protocol keeps an answer reserve)")
        return self._end("budget", insert=insert)

    def start(self) -> TurnSpec:
        if self.single_role:
            if self.plan.reference:  # the reference's baseline: one request, no stop, thinking and answer
                self.phase = "answer"
                return TurnSpec(self.single_role, self.remaining, reference=True)
            return TurnSpec(self.single_role, self.think_left, self.plan.large_stops)
        return self._large()

    def after(self, turn: Segment, degraded: bool = False) -> TurnSpec:
        """The next turn, given the one that just finished; `degraded`: the small server
        failed, so the large model goes on alone (no more switching, it answers too)."""
        self.used += turn.completion_tokens
        self.turns += 1
        if degraded:
            self.single_role = "large"
        if self.phase == "answer":
            return self._end("eos" if turn.finish == "eos" else ("budget" if turn.finish == "length" else "done"))
        think_end = self.plan.family.think_end
        if turn.finish == "stop" and turn.matched == think_end:
            return self._answer()
        if turn.finish == "eos":
            if self.plan.reference:
                return self._reference_eos(turn)
            if self.plan.family.eos_in_thinking == "close":
                return self._answer(insert=self._close())
            return self._end("eos")
        if turn.finish == "length" or self.think_left <= 0:
            return self._out_of_budget()
        if self.single_role:  # a stop string other than </think> cannot end a single turn
            return TurnSpec(self.single_role, self.think_left, self.plan.large_stops)
        return self._small() if turn.role == "large" else self._large()

    def _reference_eos(self, turn: Segment) -> TurnSpec:
        """The reference's loop on an EOS inside thinking (utils/utils.py:330-394): an empty
        reply ends thinking ("\\n</think>" appended, the small model answers); otherwise the text
        is kept and, unless it happens to end in a cue (large) or a sentence end (small), the
        same model is asked again."""
        if not turn.text:  # its tokens (the EOS) are not counted: the reference breaks before it counts
            self.used -= turn.completion_tokens
            return self._answer(insert=self._close())
        if self.plan.family.think_end in turn.text:
            return self._answer()
        if self.think_left <= 0:
            return self._out_of_budget()
        if self.single_role:
            return TurnSpec(self.single_role, self.think_left, self.plan.large_stops, reference=True)
        ends = self.plan.profile.cues if turn.role == "large" else self.plan.profile.sentence_ends
        if any(turn.text.endswith(e) for e in ends):
            return self._small() if turn.role == "large" else self._large()
        return self._same(turn.role)

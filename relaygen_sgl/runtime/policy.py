"""The RelayGen routing policy as an object: given the last turn, what runs next.

think phase: large until a verified cue or </think>; small until a sentence end or
</think>; back to large. The large model needs `min_large_tokens` before a cue may end
its turn. After </think> one answer turn (small by default). One completion budget spans
both models; thinking may use it less the answer reserve, then it is closed and the
answer role answers within the budget. Where the two protocols differ (an EOS inside
thinking, the closing text, the reserve) the plan's rules decide (runtime/protocol.py).
"""

from __future__ import annotations

from dataclasses import replace

from relaygen_sgl.core.result import Segment
from relaygen_sgl.runtime.plan import RelayPlan
from relaygen_sgl.runtime.turn import TurnSpec

SINGLE_ROLE = {"single-large": "large", "single-small": "small"}


class RelayPolicy:
    def __init__(self, plan: RelayPlan) -> None:
        self.plan = plan
        self.used = 0
        self.phase = "think"
        self.turns = 0  # model turns so far (the reference renders its first request apart)
        self.single_role = SINGLE_ROLE.get(plan.method)
        self.note = ""  # why the run ended the way it did, where a reader may wonder (no answer, a reserve)

    @property
    def remaining(self) -> int:
        return self.plan.budget - self.used

    @property
    def think_left(self) -> int:
        """Tokens thinking may still use: the budget less the answer reserve."""
        return self.plan.think_budget - self.used

    # ------------------------------------------------------------------ the turns it can ask for
    def turn(self, role: str | None, max_tokens: int, stop: tuple[str, ...] = (), cue_patterns: tuple[str, ...] = (),
             min_tokens: int = 0, insert: str = "") -> TurnSpec:
        """A model turn with everything the backend needs to run it (the typed request)."""
        plan = self.plan
        return TurnSpec(role, max_tokens, stop, cue_patterns, min_tokens, sampling=plan.sampling, insert=insert,
                        reference=plan.rules.vllm_turns, seed=plan.seed, prefetch=plan.prefetch_mode,
                        last=self.phase == "answer")

    def large(self) -> TurnSpec:
        left = self.think_left
        return self._thinking(self.turn("large", left, self.plan.large_stops, self.plan.cue_patterns,
                                        min(self.plan.min_large_tokens, left)))

    def small(self) -> TurnSpec:
        return self._thinking(self.turn("small", self.think_left, self.plan.small_stops))

    def _thinking(self, spec: TurnSpec) -> TurnSpec:
        """A thinking turn, marked where running to its max_tokens hands the trajectory to the
        other role: thinking's budget is then closed and the answer role, the other, answers."""
        answers = self.plan.answer and self.plan.reserve > 0 and not self.single_role
        if answers and self.plan.answer_role != spec.role:
            return replace(spec, hands_over_at_budget=True)
        return spec

    def same(self, role: str) -> TurnSpec:
        return self.large() if role == "large" else self.small()

    def switch(self, role: str) -> TurnSpec:
        return self.small() if role == "large" else self.large()

    def end(self, finish: str, insert: str = "") -> TurnSpec:
        return TurnSpec(None, insert=insert, finish=finish)

    def close(self) -> str:
        """The text that closes thinking, its cost taken from the budget."""
        self.used += self.plan.rules.close_cost()
        return self.plan.closing_text

    def answer(self, insert: str = "") -> TurnSpec:
        self.phase = "answer"
        if not self.plan.answer:
            return self.end("think_end", insert)
        if self.remaining <= 0:
            return self.end("budget", insert)
        return self.turn(self.single_role or self.plan.answer_role, self.remaining, insert=insert)

    def out_of_budget(self) -> TurnSpec:
        """Thinking reached its budget: it is closed, and answered within the reserve if any."""
        insert = self.close()
        if self.plan.reserve and self.remaining > 0:
            self.note = (f"thinking closed at {self.plan.think_budget} tokens: {self.plan.reserve} of the "
                         f"{self.plan.budget}-token budget are kept for the answer (--answer-reserve)")
            return self.answer(insert=insert)
        self.note = self.plan.rules.no_answer_note(self.plan)
        return self.end("budget", insert=insert)

    # ------------------------------------------------------------------ the decisions
    def start(self) -> TurnSpec:
        if self.single_role:
            return self.plan.rules.first_single(self)
        return self.large()

    def after(self, turn: Segment, degraded: bool = False) -> TurnSpec:
        """The next turn, given the one that just finished; `degraded`: the small server
        failed, so the large model goes on alone (no more switching, it answers too)."""
        self.used += turn.completion_tokens
        self.turns += 1
        if degraded:
            self.single_role = "large"
        if turn.finish == "limit":
            self.note = ("the trajectory reached the most tokens a request may hold on this pair (the smaller "
                         "KV pool or context length of its servers): it ended there with its work kept, thinking "
                         "not closed; a larger pool (--kv-tokens) or a smaller --max-tokens avoids it")
            return self.end("limit")
        if self.phase == "answer":
            return self.end("eos" if turn.finish == "eos" else ("budget" if turn.finish == "length" else "done"))
        if turn.finish == "stop" and turn.matched == self.plan.family.think_end:
            return self.answer()
        if turn.finish == "eos":
            return self.plan.rules.after_eos(self, turn)
        if turn.finish == "length" or self.think_left <= 0:
            return self.out_of_budget()
        if self.single_role:  # a stop string other than </think> cannot end a single turn
            return self.turn(self.single_role, self.think_left, self.plan.large_stops)
        return self.switch(turn.role)

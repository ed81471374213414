"""The two protocols a relay runs under, each one object chosen once by the plan.

`Ours` (the default, "relaygen-sgl"): cues are word-matched patterns the server stops on,
thinking may use the budget less an answer reserve and is then closed with
"\\n</think>\\n\\n", an EOS inside thinking closes it (or ends the run, per family), and
every request is the trajectory's token ids.

`Reference` ("reference") reproduces jiwonsong-dev/RelayGen on vLLM point by point
(docs/fidelity.md): cues are plain stop strings in list order, every large request holds
back EOS and stop strings for its first tokens, an EOS inside thinking asks the same role
again and only an empty reply closes thinking with "\\n</think>", thinking may spend the
whole budget, and each request after the first is re-rendered from the text so far.

The policy (runtime/policy.py) asks its protocol at each point where the two differ; no
other module branches on the protocol's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relaygen_sgl.client.tokenizer import load_tokenizer
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.reference import DEFAULT_PROTOCOL, REFERENCE, math_prompt, reference_protocol, rendering
from relaygen_sgl.core.result import Segment
from relaygen_sgl.core.run_settings import DEFAULT_ANSWER_RESERVE

# The rules read a RelayPlan (runtime/plan.py) and steer a RelayPolicy (runtime/policy.py),
# both of which import this module: they are typed by name in the docstrings, not imported.
RelayPlan = RelayPolicy = TurnSpec = Any

MIN_LARGE_TOKENS = 5  # tokens a large turn writes before a cue may end it (the paper's, and the reference's)


class Ours:
    name = DEFAULT_PROTOCOL
    vllm_turns = False  # a turn's stops and min-tokens keep SGLang's semantics (TurnSpec.reference)

    def check(self, plan: RelayPlan) -> None:
        """Refuse a plan this protocol cannot run (nothing to refuse here)."""

    def reserve(self, plan: RelayPlan) -> int:
        """Tokens kept for the answer: none when the caller answers itself; else the
        reserve, at most a quarter of the budget."""
        if not plan.answer:
            return 0
        want = DEFAULT_ANSWER_RESERVE if plan.settings.answer_reserve is None else plan.settings.answer_reserve
        return min(want, plan.budget // 4)

    def closing_text(self, plan: RelayPlan) -> str:
        return f"\n{plan.family.think_end}\n\n"

    def close_cost(self) -> int:
        """Budget tokens the inserted closing text counts for."""
        return 0

    def cue_patterns(self, plan: RelayPlan) -> tuple[str, ...]:
        return plan.profile.patterns_for(plan.cue_match)

    def large_stops(self, plan: RelayPlan) -> tuple[str, ...]:
        return (plan.family.think_end,)

    def small_stops(self, plan: RelayPlan) -> tuple[str, ...]:
        return (*plan.profile.sentence_ends, plan.family.think_end)

    def render(self, plan: RelayPlan, messages: list[dict[str, str]], question: str | None) -> str:
        prompt = load_tokenizer(plan.tokenizer_path).apply_chat_template(messages, **plan.family.template_kwargs)
        return prompt + plan.family.think_prefix

    def continuation(self, plan: RelayPlan, prompt: str) -> Callable[[str], str] | None:
        """How a request after the first is rendered from the text written since `prompt`;
        None: every request is the trajectory's token ids."""
        return None

    def first_single(self, policy: RelayPolicy) -> TurnSpec:
        return policy.turn(policy.single_role, policy.think_left, policy.plan.large_stops)

    def after_eos(self, policy: RelayPolicy, turn: Segment) -> TurnSpec:
        if policy.plan.family.eos_in_thinking == "close":
            return policy.answer(insert=policy.close())
        return policy.end("eos")

    def no_answer_note(self, plan: RelayPlan) -> str:
        return ""

    def notes(self, plan: RelayPlan) -> list[str]:
        return []


class Reference(Ours):
    name = REFERENCE
    vllm_turns = True  # vLLM's stop and min-tokens semantics in each turn (runtime/turn.py)

    def check(self, plan: RelayPlan) -> None:
        rendering(plan.family.name)  # refused here when the family has no reference rendering

    def reserve(self, plan: RelayPlan) -> int:
        return 0  # one budget shared by thinking and the answer

    def closing_text(self, plan: RelayPlan) -> str:
        return str(reference_protocol()["think_close"])  # "\n</think>", nothing after it

    def close_cost(self) -> int:
        return 1  # the reference counts its "\n</think>" as one token (utils/utils.py)

    def cue_patterns(self, plan: RelayPlan) -> tuple[str, ...]:
        return ()  # its cues are plain stop strings (large_stops)

    def large_stops(self, plan: RelayPlan) -> tuple[str, ...]:
        return (plan.family.think_end, *plan.profile.cues)  # its stop list, in its order

    def small_stops(self, plan: RelayPlan) -> tuple[str, ...]:
        return (plan.family.think_end, *plan.profile.sentence_ends)

    def render(self, plan: RelayPlan, messages: list[dict[str, str]], question: str | None) -> str:
        """The reference's bytes: a question goes into its math prompt (the backspace of its
        "\\boxed" included); one user message is sent as it is."""
        if len(messages) != 1 or messages[0].get("role") != "user":
            raise ConfigError("--protocol reference renders one user message, as the reference does")
        content = math_prompt(question) if question is not None else str(messages[0]["content"])
        return rendering(plan.family.name).first_prompt(content, relay=plan.method == "relay")

    def continuation(self, plan: RelayPlan, prompt: str) -> Callable[[str], str] | None:
        """The reference re-sends [user, assistant <text so far>] with continue_final_message,
        re-tokenized."""
        r = rendering(plan.family.name)
        content = r.content_of(prompt, relay=plan.method == "relay")
        if content is None:
            raise ConfigError("--protocol reference needs the reference's own prompt (program.prompt with the plan)")
        return lambda completion: r.continuation_prompt(content, completion)

    def first_single(self, policy: RelayPolicy) -> TurnSpec:
        policy.phase = "answer"  # the reference's baseline: one request, no stop, thinking and answer
        return policy.turn(policy.single_role, policy.remaining)

    def after_eos(self, policy: RelayPolicy, turn: Segment) -> TurnSpec:
        """The reference's loop on an EOS inside thinking (utils/utils.py): an empty reply
        ends thinking ("\\n</think>" appended, the small model answers); otherwise the text is
        kept and, unless it happens to end in a cue (large) or a sentence end (small), the
        same model is asked again."""
        if not turn.text:  # its tokens (the EOS) are not counted: the reference breaks before it counts
            policy.used -= turn.completion_tokens
            return policy.answer(insert=policy.close())
        if policy.plan.family.think_end in turn.text:
            return policy.answer()
        if policy.think_left <= 0:
            return policy.out_of_budget()
        if policy.single_role:
            return policy.turn(policy.single_role, policy.think_left, policy.plan.large_stops)
        ends = policy.plan.profile.cues if turn.role == "large" else policy.plan.profile.sentence_ends
        if any(turn.text.endswith(e) for e in ends):
            return policy.switch(turn.role)
        return policy.same(turn.role)

    def no_answer_note(self, plan: RelayPlan) -> str:
        return (f"no answer: under --protocol reference thinking and the answer share the {plan.budget}-token "
                "budget, as in the reference implementation, and thinking spent it all (the default protocol "
                "keeps an answer reserve)")

    def notes(self, plan: RelayPlan) -> list[str]:
        """What a result run under this protocol says about itself: the bytes it sent and what
        SGLang cannot do as vLLM did (docs/fidelity.md)."""
        return [
            "prompt: the reference's bytes, with its leading newline and indentation and a backspace (U+0008) "
            "where it meant \\boxed (its template is a non-raw Python string)",
            f"rendering: the reference's {plan.family.name} chat template; every request after the first "
            "re-rendered from the text and re-tokenized, as the reference re-sent its conversation",
            "cues: plain stop strings in the profile's order (substring matches, the first in list order wins); "
            f"large requests hold back EOS and stop strings for {plan.min_large_tokens} tokens",
            "not as vLLM: SGLang's sampler and kernels differ, so sampled runs are not the reference's; the "
            "prefix cache is SGLang's radix cache, not vLLM's block cache",
        ]


PROTOCOL_RULES: dict[str, Ours] = {DEFAULT_PROTOCOL: Ours(), REFERENCE: Reference()}

"""Relay reasoning, then a multiple-choice letter picked with sgl.select.

The relay writes the reasoning up to </think>; the answer role then scores each letter
(token-exact, on its own server) after "The answer is (".

    relaygen batch programs/multiple_choice.py prompts.jsonl -o out.jsonl
    # each line: {"id": ..., "question": ..., "options": ["...", "...", ...]} (options optional:
    # without them the question lists its own options and the letters are A-D)
"""

import string

import sglang as sgl

from relaygen_sgl import program as rg


@sgl.function
def multiple_choice(s, question, options=None, plan=None):
    plan = plan or rg.backend_of(s).plan()
    letters = list(string.ascii_uppercase[: len(options) if options else 4])
    if options:
        question = question.rstrip() + "\n\n" + "\n".join(f"({a}) {o}" for a, o in zip(letters, options))
    rg.prompt(s, question + "\n\nThink it through, then answer with the letter of the correct option.", plan)
    thinking = rg.relay(s, plan.but(answer=False))
    rg.route(s, plan.answer_role)
    s += "The answer is (" + sgl.select("letter", choices=letters) + ")"
    return {"answer": s["letter"], "letters": letters, "reasoning": thinking.reasoning,
            "select": {k: v for k, v in (s.get_meta_info("letter") or {}).items() if k == "normalized_prompt_logprobs"}}

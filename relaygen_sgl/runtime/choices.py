"""`sgl.select` on the routing backend: each choice scored token-exact after the trajectory's
ids, on the routed server, then decided by SGLang's own choices method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.errors import ConfigError, EngineFailed


def score_choices(engine: EngineClient, tokenizer: Tokenizer, prefix: Sequence[int], choices: list[str],
                  method: ChoicesSamplingMethod, pin: dict[str, Any], stop: Stop | None = None) -> ChoicesDecision:
    if not choices:
        raise ConfigError("select needs at least one choice")
    # The prefix as the models wrote it, then each choice's own ids. Entry 0 of SGLang's input
    # logprobs is the token at logprob_start_len (None); entry j+1 scores choice token j given
    # everything before it. With return_logprob the cached prefix is capped at that start, so
    # only the last prefix token and the choice are computed.
    per_choice = []
    for choice in choices:
        ids = tokenizer.encode(choice)
        if not ids:
            raise ConfigError(f"select: the choice {choice!r} has no tokens")
        g = engine.generate([*prefix, *ids], {"max_new_tokens": 0, "temperature": 0},
                            extra={"return_logprob": True, "logprob_start_len": max(len(prefix) - 1, 0), **pin},
                            stop=stop)
        entries = list(g.meta.get("input_token_logprobs") or [])[-len(ids):]
        if len(entries) != len(ids) or any(e is None or e[0] is None for e in entries):
            raise EngineFailed(f"{engine.url}: select: no logprobs for the choice {choice!r}")
        per_choice.append((ids, [list(e) for e in entries]))
    unconditional = None
    if method.requires_unconditional_logprobs:
        unconditional = []
        for ids, _ in per_choice:
            g = engine.generate(ids, {"max_new_tokens": 0, "temperature": 0},
                                extra={"return_logprob": True, "logprob_start_len": 0, **pin}, stop=stop)
            unconditional.append([list(e) if e else [None, t, None]
                                  for e, t in zip(g.meta.get("input_token_logprobs") or [], ids)])
    logprobs = [entries for _, entries in per_choice]
    return method(choices=choices, normalized_prompt_logprobs=[sum(e[0] for e in x) / len(x) for x in logprobs],
                  input_token_logprobs=logprobs, output_token_logprobs=[[] for _ in choices],
                  unconditional_token_logprobs=unconditional)

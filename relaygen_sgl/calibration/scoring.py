"""Teacher-forced scoring on the small server: the top-2 probability margin p(top1) - p(top2)
of the small model's next-token distribution for every completion token of a trajectory,
read from SGLang's input logprobs (one /generate request per trajectory)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from relaygen_sgl.core.errors import CalibrationError, EngineError

TOP_LOGPROBS = 2


# Alignment of SGLang 0.5.23's input logprobs (sglang/srt in the installed package):
#   managers/schedule_batch.py (logprob_token_ids = req.origin_input_ids[global_start_idx + 1 :
#       global_end_idx + 1]): the hidden state at input position p (p >= logprob_start_len) is scored
#       against token p + 1, i.e. the distribution computed at p is the one that PREDICTS token p + 1.
#   managers/scheduler_components/logprob_result_processor.py (input_token_logprobs_val =
#       [None] + input_token_logprobs[:-1], input_top_logprobs_val = [None], then .pop()):
#       a None is put first and the last distribution (the one that samples the new token) dropped,
#       so entry k belongs to input token logprob_start_len + k and holds the distribution that
#       predicts it; entry 0 (the token at logprob_start_len itself) is None whatever the start.
#       The list has len(input_ids) - logprob_start_len entries.
#   the same file (input_token_logprobs_idx = origin_input_ids[logprob_start_len:]): the same
#       alignment (checked below when present).
#   managers/tokenizer_manager.py: each top entry becomes a list of (logprob, token_id,
#       text-or-None) tuples, an empty row becomes None; sent as meta_info["input_top_logprobs"].
#   managers/schedule_batch.py: with return_logprob, the radix-cache prefix match is capped at
#       logprob_start_len, so a cached prompt never drops entries.
#   managers/scheduler.py: logprob_start_len > len(input_ids) aborts the request.
# With logprob_start_len = len(prompt_ids) - 1, entry 0 is the last prompt token (None) and entry
# j + 1 predicts completion token j: exactly the teacher-forced distribution the relay's small
# model would sample that token from.
def score_request(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[list[int], dict, dict]:
    if not prompt_ids:
        raise CalibrationError("a trajectory has an empty prompt; cannot score it")
    sampling = {"max_new_tokens": 1, "temperature": 0}
    extra = {"return_logprob": True, "top_logprobs_num": TOP_LOGPROBS, "logprob_start_len": len(prompt_ids) - 1}
    return [*prompt_ids, *completion_ids], sampling, extra


def margins_from_meta(meta: dict[str, Any], input_ids: Sequence[int], start: int) -> list[float]:
    """Top-2 margin p1 - p2 for each input token start+1 .. len-1, from /generate's meta_info
    (see the alignment above). Raises CalibrationError when the answer does not fit."""
    top = meta.get("input_top_logprobs")
    want = len(input_ids) - start
    if not isinstance(top, list) or not top:
        raise CalibrationError("no input_top_logprobs in the answer")
    if len(top) != want:
        raise CalibrationError(f"input_top_logprobs has {len(top)} entries, expected {want} "
                               f"(input {len(input_ids)} tokens from logprob_start_len {start})")
    tokens = meta.get("input_token_logprobs")
    if isinstance(tokens, list) and len(tokens) == want:
        for k in (0, want - 1):  # both ends: a shifted alignment would show here
            entry = tokens[k]
            if entry is not None and len(entry) > 1 and entry[1] is not None and int(entry[1]) != input_ids[start + k]:
                raise CalibrationError(f"input_token_logprobs[{k}] is token {entry[1]}, expected "
                                       f"{input_ids[start + k]}: unexpected logprob alignment")
    out = []
    for k in range(1, want):
        row = top[k]
        if not row:
            raise CalibrationError(f"input_top_logprobs[{k}] is empty")
        lps = sorted((float(e[0]) for e in row), reverse=True)
        p1 = math.exp(lps[0])
        p2 = math.exp(lps[1]) if len(lps) > 1 else 0.0
        out.append(p1 - p2)
    return out


def completion_margins(meta: dict[str, Any], prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    ids, _, extra = score_request(prompt_ids, completion_ids)
    margins = margins_from_meta(meta, ids, extra["logprob_start_len"])
    assert len(margins) == len(completion_ids)
    return margins


def score_trajectory(engine: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    """One teacher-forced request to `engine` (an engine.EngineClient): a margin per completion token."""
    ids, sampling, extra = score_request(prompt_ids, completion_ids)
    gen = engine.generate(ids, sampling, extra=extra)
    return completion_margins(gen.meta, prompt_ids, completion_ids)


def probe_logprobs(engine: Any, probe_ids: Sequence[int]) -> None:
    """One short teacher-forced request up front: a small server that cannot return input
    top-logprobs fails here with one line, before any trajectory is generated."""
    if len(probe_ids) < 3:
        raise CalibrationError("the logprob probe needs at least 3 tokens")
    url = getattr(engine, "url", "the small server")
    try:
        score_trajectory(engine, probe_ids[:1], probe_ids[1:])
    except EngineError as e:
        raise CalibrationError(f"the small server {url} refused a teacher-forced logprob request "
                               f"(return_logprob, top_logprobs_num, logprob_start_len): {e}") from e
    except CalibrationError as e:
        raise CalibrationError(f"the small server {url} does not return input logprobs as calibration "
                               f"needs them: {e}") from e

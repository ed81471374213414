"""What an `sgl.gen`'s parameters become on the wire, and which of them a relay refuses.

A gen that runs on one role reaches its server with every field of SGLang 0.5.23's
SglSamplingParams meaning what it means on SGLang's own RuntimeEndpoint
(lang/backend/runtime_endpoint.py): `dtype` becomes RuntimeEndpoint's regex (plus its
" " / "\\n" stops for int and float), the logprob fields go top-level, the rest into
sampling_params. Fields left at their defaults are not sent (the server's defaults are
the same), so a plain gen's request stays what it was.

A relay (`relaygen_sgl.program.relay`) is one generation written by turns on two servers.
What a server holds for a request does not move with a handoff, so a parameter that needs
it is refused before anything is sent; what each turn can apply on its own applies per turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

from relaygen_sgl.core.errors import ConfigError

# top-level /generate fields, as RuntimeEndpoint sends them (only when set)
LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")
# sampling_params sent only when they differ from SGLang's default (which SglSamplingParams shares)
_SAMPLING_DEFAULTS: dict[str, Any] = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                                      "ignore_eos": False}
# meta_info keys a logprob request brings back (tokenizer_manager.add_logprob_to_meta_info)
INPUT_LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs")
OUTPUT_LOGPROB_KEYS = ("output_token_logprobs", "output_top_logprobs")


@dataclass(frozen=True)
class GenParams:
    """One gen's fields for the turn: `sampling` goes into sampling_params, `extra` at the
    request's top level; `stop` are the dtype's stops (RuntimeEndpoint appends them)."""

    sampling: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()


def dtype_regex(dtype: Any) -> tuple[str, tuple[str, ...]]:
    """RuntimeEndpoint._handle_dtype_to_regex: the regex for a dtype and the stops it adds."""
    if dtype in ("int", int):
        return REGEX_INT, (" ", "\n")
    if dtype in ("float", float):
        return REGEX_FLOAT, (" ", "\n")
    if dtype in ("str", str):
        return REGEX_STR, ()
    if dtype in ("bool", bool):
        return REGEX_BOOL, ()
    raise ConfigError(f"invalid dtype {dtype!r} in sgl.gen: use int, float, str or bool")


def gen_params(sp: SglSamplingParams) -> GenParams:
    """The fields of a gen beyond those the turn itself sets (max_new_tokens, temperature,
    top_p, top_k, stop, stop_regex): constrained decoding, min_p, penalties, ignore_eos,
    stop_token_ids and the logprob request. n > 1 is refused: one gen continues one
    trajectory (RuntimeEndpoint cannot read an n > 1 answer either)."""
    n = sp.n if sp.n is not None else 1
    if n != 1:
        raise ConfigError(f"sgl.gen(n={n}) is not supported: a gen continues one trajectory; "
                          f"use s.fork({n}) for {n} completions")
    sampling: dict[str, Any] = {k: getattr(sp, k) for k, default in _SAMPLING_DEFAULTS.items()
                                if getattr(sp, k) not in (None, default)}
    if sp.stop_token_ids:
        sampling["stop_token_ids"] = list(sp.stop_token_ids)
    stop: tuple[str, ...] = ()
    regex = sp.regex
    if sp.dtype is not None:  # as on RuntimeEndpoint, the dtype's regex wins over a regex
        regex, stop = dtype_regex(sp.dtype)
    if regex is not None:
        sampling["regex"] = regex
    if sp.json_schema is not None:
        sampling["json_schema"] = sp.json_schema
    extra = {k: getattr(sp, k) for k in LOGPROB_FIELDS if getattr(sp, k, None) is not None}
    return GenParams(sampling, extra, stop)


# ---------------------------------------------------------------------- a relay's parameters
# Each refused parameter with the reason, said in one line before any request.
RELAY_REFUSED: dict[str, str] = {
    "regex": "its grammar state lives in one server's request and cannot move with a handoff",
    "json_schema": "its grammar state lives in one server's request and cannot move with a handoff",
    "dtype": "it is a regex (RuntimeEndpoint's), whose grammar state cannot move with a handoff",
    "n": "a relay writes one trajectory; use s.fork(n) and relay each branch",
    "stop": "the relay's turns end at its own cues and sentence ends; end it with max_tokens or answer=False",
    "stop_regex": "the relay's turns end at its own cues and sentence ends; end it with max_tokens or answer=False",
    "stop_token_ids": "the relay's turns end at its own cues and sentence ends; end it with max_tokens or answer=False",
    "min_tokens": "the relay's turns are sized by its policy; min_tokens would apply to every turn",
    "logprob_start_len": "it counts from a request's prompt, and each relay turn's prompt is the trajectory so far",
    "choices": "a relay generates free text; run sgl.select after it",
}
# Applied to every turn, each on its own request (see docs/usage/composing.md). min_p > 0 is refused,
# before the request, by a server running --enable-deterministic-inference (runtime/seeding.py SeedSupport.check).
RELAY_PER_TURN = ("min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
                  "top_logprobs_num", "return_text_in_logprobs")


def relay_gen_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sgl.gen keyword arguments every relay turn carries, from a relay's gen parameters;
    a parameter that cannot survive a handoff raises ConfigError naming it (n=1, or a
    parameter given as None, is no request and passes)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if value is None or (key == "n" and value == 1):
            continue
        if key in RELAY_REFUSED:
            raise ConfigError(f"relay() does not take {key}: {RELAY_REFUSED[key]}")
        if key not in RELAY_PER_TURN:
            raise ConfigError(f"relay() got an unknown parameter {key!r}")
        out[key] = value
    return out


def is_gen_param(name: str) -> bool:
    return name in RELAY_REFUSED or name in RELAY_PER_TURN

"""The request side of `relaygen serve`: OpenAI-shaped errors, the body read under its
size limit, a chat completions request validated into its RunSettings, and the
OpenAPI schema of that request (what /openapi.json declares).

A request is refused as OpenAI refuses it: 400 for a field this server does not know (it
is named, a near miss suggested), for a value of the wrong type or out of range, and for
a feature it does not do; 415 unless the body is declared application/json."""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from relaygen_sgl.core.config import METHODS, ROLES
from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.core.run_settings import SEED_MAX, SEED_MIN, TEMPERATURE_MAX, RunSettings, SettingError

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # --body-timeout: the whole body must arrive within this after the headers
CLOSE = {"connection": "close"}  # a body left unread: the connection cannot carry another request
MAX_STOPS = 4  # OpenAI's limit on stop sequences (SGLang's /generate takes 32)
# Each stop string's length: the text held back for a stop string and the tail searched on each
# delta are this long at most (serve/shaper.py). SGLang caps each stop_regex pattern at 256
# bytes (MAX_STOP_REGEX_LEN) and the length of its plain stop strings not at all.
MAX_STOP_CHARS = 256
RELAY_KEYS = ("method", "profile", "answer_role", "timeout")
ROLES_IN = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# the request fields read below, by what becomes of them
USED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
        "stream", "stream_options", "relay")
REFUSED = ("n", "tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "response_format",
           "logit_bias", "frequency_penalty", "presence_penalty", "modalities", "audio", "reasoning_effort",
           "verbosity", "web_search_options", "ignore_eos")  # unless absent, null or the value that changes nothing
# OpenAI's fields that change nothing in the answer (ids, storage, routing and latency hints): taken and ignored
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
           "prediction")
FIELDS = USED + REFUSED + IGNORED


class ApiError(Exception):
    """An error answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def read_json(request: Request, limit: int = MAX_BODY_BYTES, timeout_s: float | None = BODY_TIMEOUT_S) -> Any:
    """The body as JSON: 415 unless it is declared application/json (a body without the
    header too: a browser posts one cross-site without asking first), 413 past `limit`
    bytes (counted while reading, so a chunked body is stopped too), 408 when all of it
    has not arrived `timeout_s` after the headers (a client that stalls holds a connection
    and a task, nothing more, and not for long), 400 when it does not parse. A client
    that leaves mid-body raises Starlette's ClientDisconnect."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "the body must be JSON, sent with 'Content-Type: application/json'",
                       code="unsupported_media_type", headers=CLOSE)
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(length) > limit:  # refused before reading
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large", headers=CLOSE)
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise ApiError(413, f"request body over {limit} bytes", code="request_too_large", headers=CLOSE)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout",
                       headers=CLOSE) from None
    try:
        return orjson.loads(buf)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


@dataclass
class ChatRequest:
    """A validated request: what Relay.run gets, and how to answer."""

    messages: list[dict[str, str]]
    settings: RunSettings  # the run's, checked where every run's are (core/run_settings.py)
    stream: bool = False
    include_usage: bool = False
    stops: tuple[str, ...] = ()
    timeout_s: float = 600.0
    profile_name: str | None = field(default=None)


def _typed(body: dict[str, Any], key: str, integer: bool, param: str | None = None) -> Any:
    """A JSON number of the right kind (a boolean is none); its range is checked elsewhere."""
    value = body.get(key)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        param = param or key
        raise ApiError(400, f"{param} must be {'an integer' if integer else 'a number'}", param=param,
                       code="invalid_type")
    return value


def _number(body: dict[str, Any], key: str, *, integer: bool, lo: float, hi: float, lo_open: bool = False,
            param: str | None = None) -> Any:
    """A number this server bounds itself (its token cap, a request's timeout)."""
    if body.get(key) is None:
        return None
    value = _typed(body, key, integer, param)
    param = param or key
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise ApiError(400, f"{param} must be {low} and <= {hi}", param=param, code="invalid_value")
    return value


def _content(m: dict[str, Any], i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                    "are supported", param="messages", code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None and m.get("role") == "assistant" and not m.get("tool_calls"):
        return ""
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
        role = ROLES_IN.get(m["role"])
        if role is None:
            raise ApiError(400, f"messages[{i}].role {_short(m['role'], 40)} is not supported; use system, "
                                "developer, user or assistant (this server runs no tools)", param="messages")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"messages[{i}]: tool calls are not supported", param="messages")
        clean.append({"role": role, "content": _content(m, i)})
    if not any(m["content"].strip() for m in clean if m["role"] == "user"):
        raise ApiError(400, "messages hold no user content", param="messages")
    return clean


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields that would change what the answer means, and that this server does not do."""
    def no(param: str, what: str) -> ApiError:
        return ApiError(400, f"{param}: {what} is not supported by this server", param=param, code="unsupported")

    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
        raise no("n", "more than one choice per request (n must be 1)")
    for key in ("tools", "functions"):
        if body.get(key):
            raise no(key, "tool calling")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise no(key, "tool calling")
    if body.get("logprobs") not in (None, False):
        raise no("logprobs", "returning log probabilities")
    if body.get("top_logprobs") not in (None, 0):
        raise no("top_logprobs", "returning log probabilities")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise no("response_format", "a response format other than {'type': 'text'}")
    if body.get("logit_bias"):
        raise no("logit_bias", "a logit bias")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise no(key, "a non-zero penalty")
    if body.get("modalities") not in (None, ["text"]):
        raise no("modalities", "output other than text")
    if body.get("audio") is not None:
        raise no("audio", "audio output")
    if body.get("ignore_eos") not in (None, False):  # SGLang's and vLLM's extension (bench_serving sends it)
        raise no("ignore_eos", "ignoring EOS (an EOS inside the relay's thinking closes it)")
    for key, what in (("reasoning_effort", "a reasoning effort (the relay's thinking is bounded by max_tokens)"),
                      ("verbosity", "a verbosity"), ("web_search_options", "web search")):
        if body.get(key) is not None:
            raise no(key, what)


def _refuse_unknown(body: dict[str, Any]) -> None:
    """A field OpenAI's chat completions do not have (a typo such as max_token would
    otherwise leave its setting at the default without a word)."""
    for key in body:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1) if len(key) <= 100 else []
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ApiError(400, f"Unknown parameter: {_short(key, 60)}{hint}", param=key[:80],
                           code="unknown_parameter")


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or not 1 <= len(stops) <= MAX_STOPS:
        raise ApiError(400, f"stop must be a non-empty string or a list of 1 to {MAX_STOPS} non-empty strings",
                       param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: each stop string must be at most {MAX_STOP_CHARS} characters, got "
                            f"{max(len(s) for s in stops)}", param="stop", code="invalid_value")
    return tuple(stops)


def _relay_options(body: dict[str, Any], profiles: Mapping[str, CueProfile], timeout_s: float) -> dict[str, Any]:
    opts = body.get("relay")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise ApiError(400, "relay must be an object", param="relay")
    unknown = sorted(set(opts) - set(RELAY_KEYS))
    if unknown:
        raise ApiError(400, f"relay: unknown option {_short(unknown[0], 40)}; accepted: {', '.join(RELAY_KEYS)}",
                       param="relay")
    out: dict[str, Any] = {k: opts[k] for k in ("method", "answer_role") if opts.get(k) is not None}
    out["timeout"] = timeout_s
    if opts.get("profile") is not None:
        name = opts["profile"]
        # only a name this server allows; never a path (the value is not echoed back)
        if not isinstance(name, str) or name not in profiles:
            raise ApiError(400, f"relay.profile is not an allowed profile; allowed: {', '.join(sorted(profiles))}",
                           param="relay.profile", code="unknown_profile")
        out["profile"] = name
    timeout = _number(opts, "timeout", integer=False, lo=0, hi=timeout_s, lo_open=True, param="relay.timeout")
    if timeout is not None:
        out["timeout"] = float(timeout)
    return out


def parse_request(body: Any, *, model_name: str, max_budget: int, default_max_tokens: int,
                  profiles: Mapping[str, CueProfile], timeout_s: float) -> ChatRequest:
    """Validate a chat completion request body (400 malformed, unknown, out of range or
    unsupported; 404 unknown model)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    _refuse_unknown(body)
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model {_short(model)} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    messages = _messages(body)
    _refuse_unsupported(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean (true or false, not a string)", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
    stops = _stops(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, integer=True, lo=1, hi=max_budget)  # this server's cap
    # without max_tokens: serve's default, cut by the backend to what the servers' pools hold
    values: dict[str, Any] = {"max_tokens": max_tokens, "default_max_tokens": default_max_tokens}
    for name, integer in (("temperature", False), ("top_p", False), ("seed", True), ("top_k", True)):
        if body.get(name) is not None:
            values[name] = _typed(body, name, integer)
    relay = _relay_options(body, profiles, timeout_s)
    values.update({k: relay[k] for k in ("method", "answer_role") if k in relay})
    profile_name = relay.get("profile")
    if profile_name is not None:
        values["profile"] = profiles[profile_name]
    try:
        settings = RunSettings.of(values)
    except SettingError as e:
        param = f"relay.{e.setting}" if e.setting in ("method", "answer_role") else e.setting
        raise ApiError(400, str(e), param=param, code="invalid_value") from None
    return ChatRequest(messages=messages, settings=settings, stream=bool(stream),
                       include_usage=bool((opts or {}).get("include_usage", False)), stops=stops,
                       timeout_s=relay["timeout"], profile_name=profile_name)


def chat_schema(model_name: str, max_budget: int, profile_names: list[str], timeout_s: float) -> dict[str, Any]:
    """The JSON schema of a chat completion request, for /openapi.json."""
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": list(ROLES_IN)},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
        "name": {"type": "string"}}}
    one_stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    stop = {"anyOf": [one_stop, {"type": "array", "minItems": 1, "maxItems": MAX_STOPS, "items": one_stop}]}
    relay = {"type": "object", "additionalProperties": False, "properties": {
        "method": {"type": "string", "enum": list(METHODS)},
        "profile": {"type": "string", "enum": profile_names},
        "answer_role": {"type": "string", "enum": list(ROLES)},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": timeout_s,
                    "description": "seconds; at most the server's --request-timeout"}}}
    tokens = {"type": "integer", "minimum": 1, "maximum": max_budget}
    none = {"type": "null", "description": "not supported: absent or null only"}
    used = {
        "model": {"type": "string", "enum": [model_name]},
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_tokens": tokens, "max_completion_tokens": tokens,
        "temperature": {"type": "number", "minimum": 0, "maximum": TEMPERATURE_MAX},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "not": {"const": 0}},
        "seed": {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX},
        "stop": stop, "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "relay": relay}
    refused = {  # what each accepts: the value that asks for nothing this server does not do
        "n": {"type": "integer", "enum": [1]},
        "tools": {"type": "array", "maxItems": 0}, "functions": {"type": "array", "maxItems": 0},
        "tool_choice": {"enum": ["none", None]}, "function_call": {"enum": ["none", None]},
        "logprobs": {"type": "boolean", "enum": [False]}, "top_logprobs": {"enum": [0, None]},
        "response_format": {"type": "object", "required": ["type"], "additionalProperties": False,
                            "properties": {"type": {"type": "string", "enum": ["text"]}}},
        "logit_bias": {"type": "object", "maxProperties": 0},
        "frequency_penalty": {"enum": [0, None]}, "presence_penalty": {"enum": [0, None]},
        "modalities": {"enum": [["text"], None]}, "ignore_eos": {"enum": [False, None]},
        **{key: none for key in ("audio", "reasoning_effort", "verbosity", "web_search_options")}}
    ignored = {key: {"description": "accepted and ignored (changes nothing in the answer)"} for key in IGNORED}
    return {"type": "object", "required": ["messages"], "additionalProperties": False,
            "properties": {**used, **refused, **ignored}}


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

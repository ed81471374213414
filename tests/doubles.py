"""Test doubles that speak SGLang 0.5.23's wire format over httpx.MockTransport.

FakeSGLang answers /generate (input_ids or text, sampling_params, stream) the way SGLang
does (sglang/srt/entrypoints/http_server.py, managers/tokenizer_manager.py,
managers/schedule_batch.py, managers/scheduler_components/output_streamer.py):

* output_ids include the token that completed a stop match; `matched` is the stop string,
  the regex, or the EOS id (an int); cached_tokens is the longest cached prefix (the last
  prompt token is always recomputed);
* each decode step checks stop strings (in list order), then stop regexes, on the decoded
  tail of the output, the tail sized as Req._stop_match_tail_len sizes it: the longest stop
  string in tokens + 1, or the regex's longest match (get_max_seq_length) + 1; then EOS;
  then max_new_tokens;
* streams are SSE `data: {text, output_ids, meta_info}` lines ending in `data: [DONE]`,
  deltas with incremental=True (--incremental-streaming-output), the whole output so far
  otherwise; meta_info.completion_tokens counts all tokens so far and only the last chunk
  carries finish_reason; a chunk is sent every Host.chunk_tokens tokens (stream_interval:
  the first token at once) and held back while the tail ends in a stop string's prefix;
* unknown sampling params are refused by the contract gate (HTTP 400 {"error": "..."} even
  for a stream); what SGLang refuses later (too many stops, a too long input) comes as
  HTTP 400 {"error": {"message"}}, or for a stream as HTTP 200 with
  `data: {"error": {..., "code": 400}}`;
* faults per host: HTTP errors (fail_on), connection errors (down_after), aborts, errors
  and garbage inside a stream.

/model_info (/get_model_info behind a router), /server_info, /v1/models, /flush_cache,
/tokenize and /health_generate answer as SGLang does; Host.api_key asks for SGLang's
`Authorization: Bearer` key on everything but the health routes.
Its "model" reads each next token from a tape per host, indexed by absolute position.

running() serves an ASGI app (serve's) on a real uvicorn, for tests that need real sockets.
"""

from __future__ import annotations

import contextlib
import re
import re._parser as sre_parse
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)

CORPUS = [
    "Therefore the answer is 42. Thus, we know that now the sum is 7. Otherwise we stop.",
    "Anyway, any number works. So the result follows. Now, consider the case. Wait, check it.",
    "First we add 2 and 3 to get 5. Then we multiply by 4! Is it right? Yes.\n\nThe answer is 20.",
    "<think>\nLet me think.</think>\n\nThe final answer is \\boxed{20}. Hence, similarly, alternatively.",
]


def build_tokenizer(folder, vocab_size: int = 400) -> str:
    """A small byte-level BPE tokenizer saved as a transformers folder; returns its path."""
    from transformers import PreTrainedTokenizerFast

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return str(folder)


# sglang/api/v1/api_types.py SamplingParams: the contract gate refuses any other key
SAMPLING_FIELDS = ("max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
                   "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
                   "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
                   "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
                   "sampling_seed", "custom_params", "beam_width", "watermark", "choice")
MAX_STOP_COUNT = MAX_STOP_REGEX_COUNT = 32  # sglang/srt/sampling/sampling_params.py
MAX_STOP_REGEX_LEN = 256
MAX_LEN = 2**30
OUTPUT_LOGPROB_KEYS = ("output_token_logprobs", "output_top_logprobs")


def get_max_seq_length(regex: str) -> int:
    """sampling_params.get_max_seq_length: an upper bound on the characters a match spans."""
    return _max_length(sre_parse.parse(regex))


def _max_length(subpattern) -> int:
    total = 0
    for token, value in subpattern:
        if token in (sre_parse.LITERAL, sre_parse.IN, sre_parse.ANY):
            total += 1
        elif token == sre_parse.SUBPATTERN:
            total += _max_length(value[3])
        elif token == sre_parse.BRANCH:
            total += max(_max_length(b) for b in value[1])
        elif token in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):
            _, most, inner = value
            total += MAX_LEN if most == sre_parse.MAXREPEAT else most * _max_length(inner)
        elif token == sre_parse.AT:
            pass
        else:
            total += MAX_LEN
    return total


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


# the two hosts every double-backed test connects to, and the question most of them ask
LARGE, SMALL = "http://large.test:1", "http://small.test:2"
QUESTION = "What is 2 + 3?"
ANSWER = " First we add 2 and 3 to get 5. Then we check it. Therefore the sum is 5. Yes."

@dataclass
class Host:
    tape: list[int]
    cache: list[list[int]] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # every /generate body, in order
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    fail_on: set[int] = field(default_factory=set)  # /generate request numbers (1-based) answered with fail_status
    fail_status: int = 500
    max_input: int | None = None  # longer inputs get SGLang's 400 (prompt longer than the context)
    dp_size: int | None = None  # answer /server_info with this --dp
    context_len: int | None = None  # max_model_len: input + max_new_tokens beyond it gets a 400, as in SGLang
    # the KV pool (--max-total-tokens): /server_info reports it and max_req_input_len; an input of
    # max_req_input_len tokens or more gets a 400, and max_new_tokens is cut to what the pool holds
    kv_tokens: int | None = None
    # an EAGLE server: {"speculative_algorithm": "EAGLE3", "speculative_eagle_topk": .., "speculative_num_steps":
    # .., "speculative_num_draft_tokens": ..}; it reserves max(topk * steps, drafts) of the context per request
    speculative: dict | None = None
    down_after: int | None = None  # /generate requests after this count get a connection error
    chunk_tokens: int = 1  # SGLang's stream_interval: a stream chunk every this many tokens
    chunk_delay_s: float = 0.0  # time between stream chunks (a decode step), for timing-sensitive tests
    # faults inside an answer, on the /generate requests numbered in faults_on (None: every one)
    faults_on: set[int] | None = None
    abort_after_tokens: int | None = None  # that many tokens, then finish_reason {"type": "abort"}
    abort_status_code: int | None = None  # the abort's status_code (None: an /abort_request-style abort)
    stream_error_after_tokens: int | None = None  # that many tokens, then data: {"error": {...}}
    stream_error_code: int = 500
    malformed_stream: bool = False  # a garbage data: line after the first chunk
    router: bool = False  # SGLang's router in front: no /tokenize, /model_info, /server_info
    api_key: str | None = None  # SGLang's --api-key
    healthy: bool = True  # /health_generate answers 503 when False
    # a model as a function instead of the tape: (input ids and output so far, EOS masked?) -> next token
    model: Callable[[list[int], bool], int] | None = None
    # what /v1/loads reports, one dict per DP rank ({"num_running_reqs": .., "num_waiting_reqs": ..}, the
    # rest of LoadSnapshot's core fields 0); None: no such route (404), as behind a router
    loads: list[dict] | None = None


def _max_req_len(host: Host) -> int:
    """managers/tp_worker.py: min(context - 1, pool - 1)."""
    return min((host.context_len or 1 << 30) - 1, host.kv_tokens - 1)


class Script:
    """A model that writes `tokens` in order whatever it is sent, for a protocol whose requests
    are not prefixes of each other (the reference re-renders each one): hosts given the same
    Script share one conversation. An EOS it may not write yet (min_new_tokens) is skipped,
    as SGLang's mask makes the next-best token win."""

    def __init__(self, tokens: list[int], eos_id: int) -> None:
        self.tokens, self.eos_id, self.pos = list(tokens), eos_id, 0

    def __call__(self, ids: list[int], eos_masked: bool) -> int:
        while self.pos < len(self.tokens) and eos_masked and self.tokens[self.pos] == self.eos_id:
            self.pos += 1
        tok = self.tokens[self.pos] if self.pos < len(self.tokens) else self.eos_id
        self.pos += 1
        return tok


class FakeSGLang:
    def __init__(self, tokenizer_path: str, eos_id: int, incremental: bool = True) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.tokenizer_path = tokenizer_path
        self.eos_id = eos_id
        self.incremental = incremental
        self.hosts: dict[str, Host] = {}
        self.tokenizer_paths: dict[str, str] = {}  # per host, to simulate a second vocabulary
        # what each host says it serves (--model-path); the tiny tokenizer stands in for its
        # tokenizer (--tokenizer-path). Default: the cpu-tiny preset's model.
        self.model_paths: dict[str, str] = {}
        self.default_model_path = "/models/smollm2-135m-instruct"

    def add_host(self, url: str, tape: list[int]) -> Host:
        host = Host(tape=list(tape))
        self.hosts[httpx.URL(url).netloc.decode()] = host
        return host

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    # ------------------------------------------------------------------ server
    def _handle(self, request: httpx.Request) -> httpx.Response:
        netloc = request.url.netloc.decode()
        host = self.hosts.get(netloc)
        if host is None:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        host.calls.append((request.method, path))
        # sglang/srt/utils/auth.py: the health, readiness and metrics routes never ask for a key
        if host.api_key and not path.startswith(("/health", "/ready", "/metrics")) \
                and request.headers.get("authorization") != f"Bearer {host.api_key}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        tokenizer_path = self.tokenizer_paths.get(netloc, self.tokenizer_path)
        model_path = self.model_paths.get(netloc, self.default_model_path)
        if path in ("/health", "/health_generate"):
            return httpx.Response(200 if host.healthy else 503)
        if path == ("/get_model_info" if host.router else "/model_info"):
            return httpx.Response(200, json={"model_path": model_path, "tokenizer_path": tokenizer_path,
                                             "served_model_name": model_path, "is_generation": True,
                                             "weight_version": "default"})
        if path == "/v1/models":
            card = {"id": model_path, "object": "model", "created": 0, "owned_by": "sglang", "root": model_path,
                    "max_model_len": host.context_len}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if path == "/server_info" and not host.router:
            pool = {"max_total_num_tokens": host.kv_tokens, "max_req_input_len": _max_req_len(host) - 5} \
                if host.kv_tokens else {}
            return httpx.Response(200, json={"dp_size": host.dp_size or 1, "tp_size": 1, "version": "0.5.23",
                                             "frontend": "python", "internal_states": [{}],
                                             **(host.speculative or {}), **pool})
        if path == "/v1/loads" and host.loads is not None:
            return self._loads(host, request)
        if path == "/flush_cache":
            host.cache.clear()
            return httpx.Response(200, text="Cache flushed.\nPlease check backend logs for more details. (When there "
                                            "are running or waiting requests, the operation will not be performed.)\n")
        if path == "/tokenize" and not host.router:
            prompt = orjson.loads(request.content).get("prompt")
            ids = self.tok.encode(prompt)
            return httpx.Response(200, json={"tokens": ids, "count": len(ids), "max_model_len": host.context_len or -1})
        if path != "/generate":
            return httpx.Response(404, json={"detail": "Not Found"})
        return self._generate(host, orjson.loads(request.content), request)

    @staticmethod
    def _loads(host: Host, request: httpx.Request) -> httpx.Response:
        """entrypoints/v1_loads.py: one LoadSnapshot.to_dict per DP rank (`dp_rank` filters; a rank
        outside the server gives none), `include` checked against its sections (400 otherwise)."""
        include = request.url.params.get("include")
        sections = {s.strip() for s in include.split(",")} if include else set()
        valid = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
        if not sections <= valid:
            detail = f"Invalid include sections: {sections - valid}. Valid options: {sorted(valid)}"
            return httpx.Response(400, json={"detail": detail})
        core = ("timestamp", "dp_rank", "num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens",
                "num_used_tokens", "num_total_tokens", "num_active_tokens", "num_prealloc_ready_tokens",
                "max_total_num_tokens", "max_running_requests", "token_usage", "gen_throughput", "cache_hit_rate",
                "utilization", "total_prefill_uncached_tokens", "total_prefill_busy_us", "decode_moments")
        loads = [{**{k: None if k == "decode_moments" else 0 for k in core}, "timestamp": time.time(),
                  **load, "dp_rank": rank} for rank, load in enumerate(host.loads or [])]
        rank = request.url.params.get("dp_rank")
        if rank is not None:
            loads = [x for x in loads if x["dp_rank"] == int(rank)]
        return httpx.Response(200, json={"timestamp": "2026-12-05T00:00:00+00:00", "version": "0.5.23",
                                         "accelerator": None, "num_accelerators": 1, "loads": loads})

    def _generate(self, host: Host, body: dict, request: httpx.Request) -> httpx.Response:
        host.requests.append(body)
        n = len(host.requests)
        if host.down_after is not None and n > host.down_after:
            raise httpx.ConnectError("connection refused", request=request)
        if n in host.fail_on:
            return httpx.Response(host.fail_status, json={"error": {"message": "injected failure"}})
        sp = body.get("sampling_params") or {}
        unknown = [k for k in sp if k not in SAMPLING_FIELDS]
        if unknown:  # the contract gate, before any stream starts
            expected = ", ".join(f"`{f}`" for f in SAMPLING_FIELDS)
            return httpx.Response(400, json={"error": f"unknown field `{unknown[0]}`, expected one of {expected}"})
        stream = bool(body.get("stream"))
        problem = self._refusal(host, body, sp)
        if problem is not None:
            if not stream:
                return httpx.Response(400, json={"error": {"message": problem}})
            err = {"error": {"message": problem, "type": "invalid_request_error", "code": 400, "retryable": False}}
            return self._sse([orjson.dumps(err)])
        ids = body["input_ids"] if body.get("input_ids") is not None else self.tok.encode(body["text"])
        out, finish = self._decode_loop(host, ids, sp)
        faulty = host.faults_on is None or n in host.faults_on
        abort_at = host.abort_after_tokens if faulty else None
        if abort_at is not None and abort_at < len(out):
            out = out[:abort_at]
            finish = {"type": "abort", "message": "Abort by the test double", "status_code": host.abort_status_code,
                      "err_type": None}
        cached = max((self._lcp(ids, c) for c in host.cache), default=0)
        cached = min(cached, len(ids) - 1)
        host.cache.append(ids + out[:-1])
        meta = {"id": f"req{n}", "finish_reason": finish, "prompt_tokens": len(ids), "weight_version": "default",
                "completion_tokens": len(out), "cached_tokens": cached}
        if body.get("return_logprob"):
            # scheduler_components/logprob_result_processor.py: entry 0 (the token at
            # logprob_start_len) is None; entry k is [logprob, id, None] of token start + k. The
            # double's "model" is sure of its tape: -0.1 for the tape's token, -5 otherwise.
            start = int(body.get("logprob_start_len") or 0)
            meta["input_token_logprobs"] = [
                [None if pos == start else (-0.1 if pos < len(host.tape) and host.tape[pos] == ids[pos] else -5.0),
                 ids[pos], None] for pos in range(start, len(ids))]
            # one entry per output token ([logprob, id, text or None]); top-k as k entries
            text_in = bool(body.get("return_text_in_logprobs"))
            meta["output_token_logprobs"] = [[-0.1, t, self.tok.decode([t]) if text_in else None] for t in out]
            if body.get("top_logprobs_num"):
                k = int(body["top_logprobs_num"])
                meta["output_top_logprobs"] = [[[-0.1 - j, t + j, None] for j in range(k)] for t in out]
        error_at = host.stream_error_after_tokens if faulty else None
        if error_at is not None and error_at >= len(out):
            error_at = None  # the generation finished first
        if not stream:
            return self._answer(host, out, finish, sp, meta, error_at, faulty and host.malformed_stream)
        return self._sse(self._chunks(host, out, finish, sp, meta, error_at, faulty and host.malformed_stream),
                         host.chunk_delay_s)

    def _refusal(self, host: Host, body: dict, sp: dict) -> str | None:
        """What SGLang refuses after the contract gate (a ValueError in generate_request)."""
        if (body.get("text") is None) == (body.get("input_ids") is None):
            return "Either text or input_ids should be provided."
        stops, regexes = _as_list(sp.get("stop")), _as_list(sp.get("stop_regex"))
        if len(stops) > MAX_STOP_COUNT:
            return f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(stops)}"
        if len(regexes) > MAX_STOP_REGEX_COUNT:
            return f"at most {MAX_STOP_REGEX_COUNT} stop_regex patterns are allowed, got {len(regexes)}"
        for r in regexes:
            if len(r.encode()) > MAX_STOP_REGEX_LEN:
                return f"stop_regex is {len(r.encode())} bytes, over the {MAX_STOP_REGEX_LEN}-byte limit"
        n_input = len(body["input_ids"]) if body.get("input_ids") is not None else len(self.tok.encode(body["text"]))
        if host.max_input is not None and n_input > host.max_input:
            return "The input is longer than the context length"
        if host.kv_tokens and n_input >= _max_req_len(host) - 5:  # scheduler.py, max_req_input_len
            return (f"Input length ({n_input} tokens) exceeds the maximum allowed length "
                    f"({_max_req_len(host) - 5} tokens). Use a shorter input or enable --allow-auto-truncate.")
        spec = host.speculative or {}
        reserved = max(spec.get("speculative_eagle_topk", 0) * spec.get("speculative_num_steps", 0),
                       spec.get("speculative_num_draft_tokens", 0))  # managers/utils.py compute_num_reserved_tokens
        if host.context_len is not None and n_input + sp.get("max_new_tokens", 128) + reserved > host.context_len:
            return "Requested token count exceeds the model's maximum context length"
        return None

    # ------------------------------------------------------------------ answers
    def _answer(self, host: Host, out: list[int], finish: dict, sp: dict, meta: dict, error_at: int | None,
                malformed: bool) -> httpx.Response:
        if malformed:
            return httpx.Response(200, content=b"<html>502 Bad Gateway</html>")
        if error_at is not None:
            return httpx.Response(host.stream_error_code, json={"error": {"message": "injected error"}})
        if finish["type"] == "abort" and finish["status_code"] is not None:
            # tokenizer_manager._handle_abort_finish_reason: 400 -> ValueError, else HTTPException
            if finish["status_code"] == 400:
                return httpx.Response(400, json={"error": {"message": finish["message"]}})
            return httpx.Response(finish["status_code"], json={"detail": finish["message"]})
        return httpx.Response(200, json={"text": self._text(out, sp, finish), "output_ids": out,
                                         "meta_info": {**meta, "e2e_latency": 0.001}})

    @staticmethod
    def _sse(payloads: list[bytes], delay_s: float = 0.0) -> httpx.Response:
        lines = [b"data: " + p + b"\n\n" for p in payloads] + [b"data: [DONE]\n\n"]
        if delay_s:
            def paced(lines: list[bytes] = lines, delay: float = delay_s):  # type: ignore[no-untyped-def]
                for line in lines:
                    time.sleep(delay)
                    yield line

            return httpx.Response(200, content=paced(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, content=b"".join(lines), headers={"content-type": "text/event-stream"})

    def _chunks(self, host: Host, out: list[int], finish: dict, sp: dict, meta: dict, error_at: int | None,
                malformed: bool) -> list[bytes]:
        """The stream's data payloads, as output_streamer.accept decides when to send and
        tokenizer_manager shapes each chunk."""
        aborted = finish["type"] == "abort"
        last = error_at if error_at is not None else len(out)
        chunks: list[bytes] = []
        sent = 0
        shown = ""  # the text sent so far
        for k in range(1, last + 1):
            final = k == len(out) and not aborted and error_at is None
            unsent = k - sent
            send = (final or (k == last and (aborted or error_at is not None))
                    or ((host.chunk_tokens <= 1 or unsent >= host.chunk_tokens or sent == 0)
                        and not self._holds_stop_prefix(out[:k], sp)))
            if not send:
                continue
            text = self._text(out[:k], sp, finish if final else None)
            if not final and text.endswith("\ufffd"):
                text = shown  # an incomplete character waits (the detokenizer's surrogate check)
            delta = text[len(shown):] if text.startswith(shown) else ""
            shown += delta
            m = {**meta, "completion_tokens": k, "finish_reason": finish if final else None}
            for key in OUTPUT_LOGPROB_KEYS:  # per chunk like output_ids (tokenizer_manager's incremental keys)
                if key in meta:
                    m[key] = meta[key][sent:k] if self.incremental else meta[key][:k]
            if final:
                m["e2e_latency"] = 0.001
            ids = out[sent:k] if self.incremental else out[:k]
            chunks.append(orjson.dumps({"text": delta if self.incremental else shown, "output_ids": ids,
                                        "meta_info": m}))
            sent = k
            if malformed and len(chunks) == 1:
                chunks.append(b'{"text": "", "output_ids": [1')  # cut off mid-object
        if error_at is not None:
            chunks.append(orjson.dumps({"error": {"message": "injected error", "type": "internal_error",
                                                  "code": host.stream_error_code, "retryable": False}}))
        elif aborted:
            m = {**meta, "completion_tokens": len(out), "finish_reason": finish, "e2e_latency": 0.001}
            if finish["status_code"] is None:
                # tokenizer_manager's abort path: the last token again (not a delta), the whole text
                ids = out[-1:] if self.incremental else out
                chunks.append(orjson.dumps({"text": shown, "output_ids": ids, "meta_info": m}))
            else:
                # a scheduler-side abort finishes like any request: whatever was not sent yet
                ids = out[sent:] if self.incremental else out
                chunks.append(orjson.dumps({"text": "" if self.incremental else shown, "output_ids": ids,
                                            "meta_info": m}))
        return chunks

    def _text(self, ids: list[int], sp: dict, finish: dict | None) -> str:
        """The detokenized text: special tokens skipped unless asked, the matched stop
        trimmed unless no_stop_trim (detokenizer_manager.trim_matched_stop)."""
        keep = bool(sp.get("no_stop_trim"))
        matched = (finish or {}).get("matched")
        if isinstance(matched, int) and not keep and ids:
            ids = ids[:-1]
        text = self.tok.decode(ids, skip_special_tokens=sp.get("skip_special_tokens", True))
        if isinstance(matched, str) and (pos := text.find(matched)) != -1:
            text = text[: pos + len(matched)] if keep else text[:pos]
        return text

    @staticmethod
    def _lcp(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    # ------------------------------------------------------------------ the model
    def _tail_len(self, sp: dict) -> int:
        """Req._stop_match_tail_len for one new token, before the min with the output length."""
        stops, regexes = _as_list(sp.get("stop")), _as_list(sp.get("stop_regex"))
        str_max = max((len(self.tok.encode(s, add_special_tokens=False)) for s in stops), default=0)
        regex_max = max((get_max_seq_length(r) for r in regexes), default=0)
        return max(str_max + 1, regex_max + 1)

    def _tail(self, out: list[int], sp: dict) -> str:
        return self.tok.decode(out[-min(self._tail_len(sp), len(out)):])

    def _holds_stop_prefix(self, out: list[int], sp: dict) -> bool:
        """Req.check_match_stop_str_prefix: a stream chunk waits while the tail ends in the
        beginning of a stop string."""
        stops = [s for s in _as_list(sp.get("stop")) if s]
        if not stops:
            return False
        tail = self._tail(out, sp)
        return bool(tail) and any(s in tail or any(tail[-i:] == s[:i] for i in range(1, min(len(tail), len(s)) + 1))
                                  for s in stops)

    def _decode_loop(self, host: Host, ids: list[int], sp: dict) -> tuple[list[int], dict]:
        out: list[int] = []
        stops, regexes = _as_list(sp.get("stop")), _as_list(sp.get("stop_regex"))
        min_new = sp.get("min_new_tokens", 0)
        max_new = sp.get("max_new_tokens", 128)
        if host.kv_tokens:  # scheduler.py: silently cut to what max_req_len leaves
            max_new = max(0, min(max_new, _max_req_len(host) - len(ids) - 1))
        while len(out) < max_new:
            pos = len(ids) + len(out)
            if host.model is not None:
                tok = host.model(ids + out, len(out) < min_new)
            else:
                tok = host.tape[pos] if pos < len(host.tape) else self.eos_id
                if tok == self.eos_id and len(out) < min_new:
                    tok = host.tape[pos + 1] if pos + 1 < len(host.tape) else 0  # EOS masked
            out.append(tok)
            # Req.update_finish_state: stop strings (first in list order), then stop regexes,
            # on the tail; then EOS; then the length
            if stops or regexes:
                tail = self._tail(out, sp)
                for s in stops:
                    if s in tail:
                        return out, {"type": "stop", "matched": s}
                for r in regexes:
                    if re.search(r, tail):
                        return out, {"type": "stop", "matched": r}
            if tok == self.eos_id or (tok in sp.get("stop_token_ids", ()) and not sp.get("ignore_eos")):
                return out, {"type": "stop", "matched": tok}  # FINISH_MATCHED_TOKEN
        return out, {"type": "length", "length": max_new}


@contextlib.contextmanager
def running(app, config: uvicorn.Config | None = None, timeout: float = 60,
            sndbuf: int | None = None) -> Iterator[httpx.Client]:
    """A client (read timeout `timeout` s) to `app` in uvicorn on an ephemeral 127.0.0.1 port.
    `config` is how uvicorn runs it (default: uvicorn's own, warnings only); `sndbuf` sets the
    listening socket's send buffer, which accepted connections inherit."""
    sock = socket.socket()
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=timeout) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=15)

"""Test doubles that speak SGLang's real /generate wire format over httpx.MockTransport.

FakeSGLang answers /generate (input_ids, sampling_params, stream) and /model_info the way
SGLang 0.5.23 does: output_ids include the token that completed a stop match, the stop
check decodes a tail window of the output, `matched` is the stop string, the regex, or
the EOS id (an int), cached_tokens is the longest cached prefix (the last prompt token is
always recomputed), and streams are SSE `data:` lines ending in `data: [DONE]`.
Its "model" reads each next token from a tape per host, indexed by absolute position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httpx
import orjson
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


@dataclass
class Host:
    tape: list[int]
    cache: list[list[int]] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    fail_on: set[int] = field(default_factory=set)  # request numbers (1-based) answered with HTTP 500
    max_input: int | None = None  # longer inputs get SGLang's 400 (prompt longer than the context)
    dp_size: int | None = None  # answer /server_info with this --dp
    context_len: int | None = None  # max_model_len: input + max_new_tokens beyond it gets a 400, as in SGLang
    down_after: int | None = None  # requests after this count get a connection error


class FakeSGLang:
    def __init__(self, tokenizer_path: str, eos_id: int, incremental: bool = True) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.tokenizer_path = tokenizer_path
        self.eos_id = eos_id
        self.incremental = incremental
        self.hosts: dict[str, Host] = {}
        self.tokenizer_paths: dict[str, str] = {}  # per host, to simulate a second vocabulary

    def add_host(self, url: str, tape: list[int]) -> Host:
        host = Host(tape=list(tape))
        self.hosts[httpx.URL(url).netloc.decode()] = host
        return host

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    # ------------------------------------------------------------------ server
    def _handle(self, request: httpx.Request) -> httpx.Response:
        host = self.hosts.get(request.url.netloc.decode())
        if host is None:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/model_info":
            path = self.tokenizer_paths.get(request.url.netloc.decode(), self.tokenizer_path)
            return httpx.Response(200, json={"model_path": path, "tokenizer_path": path})
        if request.url.path == "/v1/models" and host.context_len:
            models = [{"id": "m", "max_model_len": host.context_len}]
            return httpx.Response(200, json={"object": "list", "data": models})
        if request.url.path == "/server_info" and host.dp_size:
            return httpx.Response(200, json={"dp_size": host.dp_size})
        if request.url.path != "/generate":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = orjson.loads(request.content)
        host.requests.append(body)
        n = len(host.requests)
        if host.down_after is not None and n > host.down_after:
            raise httpx.ConnectError("connection refused", request=request)
        if n in host.fail_on:
            return httpx.Response(500, json={"error": {"message": "injected failure"}})
        if host.max_input is not None and len(body["input_ids"]) > host.max_input:
            return httpx.Response(400, json={"error": {"message": "The input is longer than the context length"}})
        sp = body["sampling_params"]
        if host.context_len is not None and len(body["input_ids"]) + sp.get("max_new_tokens", 128) > host.context_len:
            return httpx.Response(400, json={"error": {"message": "Requested token count exceeds the model's "
                                                                  "maximum context length"}})
        unknown = set(sp) - {"max_new_tokens", "min_new_tokens", "stop", "stop_regex", "temperature", "top_p",
                             "top_k", "sampling_seed", "no_stop_trim", "skip_special_tokens"}
        if unknown:
            return httpx.Response(400, json={"error": {"message": f"unknown sampling params {unknown}"}})
        if len(sp.get("stop") or []) > 32 or len(sp.get("stop_regex") or []) > 32:
            return httpx.Response(400, json={"error": {"message": "too many stops"}})
        ids = body["input_ids"]
        out, finish = self._decode_loop(host, ids, sp)
        cached = max((self._lcp(ids, c) for c in host.cache), default=0)
        cached = min(cached, len(ids) - 1)
        host.cache.append(ids + out[:-1])
        meta = {"id": f"req{n}", "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(out), "cached_tokens": cached, "e2e_latency": 0.001}
        if not body.get("stream"):
            return httpx.Response(200, json={"text": self.tok.decode(out), "output_ids": out, "meta_info": meta})
        lines = []
        for k in range(1, len(out) + 1):
            chunk = out[k - 1:k] if self.incremental else out[:k]
            m = {**meta, "completion_tokens": k, "finish_reason": finish if k == len(out) else None}
            lines.append(b"data: " + orjson.dumps({"text": "", "output_ids": chunk, "meta_info": m}) + b"\n\n")
        lines.append(b"data: [DONE]\n\n")
        return httpx.Response(200, content=b"".join(lines), headers={"content-type": "text/event-stream"})

    @staticmethod
    def _lcp(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    def _decode_loop(self, host: Host, ids: list[int], sp: dict) -> tuple[list[int], dict]:
        out: list[int] = []
        stops = sp.get("stop") or []
        regexes = sp.get("stop_regex") or []
        min_new = sp.get("min_new_tokens", 0)
        while len(out) < sp["max_new_tokens"]:
            pos = len(ids) + len(out)
            tok = host.tape[pos] if pos < len(host.tape) else self.eos_id
            if tok == self.eos_id and len(out) < min_new:
                tok = host.tape[pos + 1] if pos + 1 < len(host.tape) else 0  # EOS masked
            out.append(tok)
            if tok == self.eos_id:
                return out, {"type": "stop", "matched": tok}
            tail = self.tok.decode(out[-12:])
            for s in stops:
                if s in tail:
                    return out, {"type": "stop", "matched": s}
            for r in regexes:
                if re.search(r, tail):
                    return out, {"type": "stop", "matched": r}
        return out, {"type": "length", "length": len(out)}

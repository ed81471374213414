"""`relaygen serve`'s first token (issue 29 item 4): it leaves as the SGLang chunk that
carries it arrives, not a decode step later. The wire-format double holds each stream's
second chunk until the client has the first token, so a first token held back until the
next one arrives never comes."""

from __future__ import annotations

import threading

import httpx
import orjson
from doubles import LARGE, SMALL, FakeSGLang, running

from relaygen_sgl.api import Relay
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.serve.app import create_app

THINK = "First we add 2 and 3 to get 5. Therefore the sum is 5. Thus, the answer is 5.</think>\n\nThe answer is 5."
Q = "What is 2 + 3?"


def test_the_first_token_is_streamed_before_the_servers_second_chunk(fake, monkeypatch):
    first_seen = threading.Event()  # the client has the first token: the double may go on

    def held(payloads: list[bytes], delay_s: float = 0.0) -> httpx.Response:
        def lines():  # type: ignore[no-untyped-def]
            for i, p in enumerate([*payloads, b"[DONE]"]):
                if i == 1:
                    first_seen.wait(10)
                yield b"data: " + p + b"\n\n"
        return httpx.Response(200, content=lines(), headers={"content-type": "text/event-stream"})

    monkeypatch.setattr(FakeSGLang, "_sse", staticmethod(held))
    for url in (LARGE, SMALL):
        fake.add_host(url, [])
    relay = Relay(large=LARGE, small=SMALL, family="qwen3", profile="cpu-tiny",
                  client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport)
    ids = relay.tokenizer.encode(relay.plan().render([{"role": "user", "content": Q}]))
    for h in fake.hosts.values():
        h.tape = ids + relay.tokenizer.encode(THINK) + [fake.eos_id]
    fields = {"reasoning_content": "", "content": ""}
    with running(create_app(relay, health_interval_s=0), timeout=10) as client, client.stream(
            "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "stream": True,
                                                  "max_tokens": 200}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():  # a first token held back would time this read out (10 s)
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in orjson.loads(line[6:])["choices"]:
                for name in fields:
                    if choice["delta"].get(name):
                        if not first_seen.is_set():
                            assert fields == {"reasoning_content": "", "content": ""} and name == "reasoning_content"
                            first_seen.set()
                        fields[name] += choice["delta"][name]
    assert fields == {"reasoning_content": THINK.split("</think>")[0], "content": "The answer is 5."}

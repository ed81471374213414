"""The OpenAI-compatible server against the wire-format double, driven by the official
`openai` client (through FastAPI's TestClient, an httpx client)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from relaygen_sgl.api import Relay
from relaygen_sgl.engine import ClientConfig
from relaygen_sgl.serve import _ReasoningSplitter, create_app

LARGE, SMALL = "http://large.test:1", "http://small.test:2"
THINK = "First we add 2 and 3 to get 5. Therefore the sum is 5. Thus, the answer is 5.</think>\n\nThe answer is 5."


@pytest.fixture
def app_client(fake):
    for url in (LARGE, SMALL):
        fake.add_host(url, [])
    relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3",
                  client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport)
    prompt_ids = relay.tokenizer.encode(relay.plan().render([{"role": "user", "content": "What is 2 + 3?"}]))
    tape = prompt_ids + relay.tokenizer.encode(THINK) + [fake.eos_id]
    for h in fake.hosts.values():
        h.tape = tape
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(relay, api_key="sekret"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=10)


def oai(client, key="sekret"):
    return openai.OpenAI(api_key=key, base_url=str(client.base_url) + "/v1", max_retries=0)


def test_plain_completion_with_relay_usage(app_client):
    r = oai(app_client).chat.completions.create(
        model="relaygen", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=200)
    assert r.choices[0].message.content == "The answer is 5."
    assert r.choices[0].finish_reason == "stop"
    relay = r.usage.model_extra["relay"]
    assert relay["switches"] >= 2 and relay["large_tokens"] + relay["small_tokens"] == r.usage.completion_tokens


def test_streamed_completion_splits_reasoning_and_answer(app_client):
    stream = oai(app_client).chat.completions.create(
        model="relaygen", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=200, stream=True,
        stream_options={"include_usage": True})
    content, reasoning, roles, usage = "", "", set(), None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            content += c.delta.content or ""
            reasoning += extra.get("reasoning_content") or ""
            if extra.get("relay_role"):
                roles.add(extra["relay_role"])
    assert content == "The answer is 5."
    assert reasoning.startswith("First we add") and "</think>" not in reasoning
    assert roles == {"large", "small"} and usage is not None


@pytest.mark.parametrize("body,status", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": "   "}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "relay": {"method": "both"}}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "relay": {"profile": "nope"}}, 422),
])
def test_bad_requests_get_openai_errors(app_client, body, status):
    r = app_client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sekret"})
    assert r.status_code == status
    assert set(r.json()["error"]) >= {"message", "type"}


def test_malformed_body_oversized_body_and_api_key(app_client):
    auth = {"authorization": "Bearer sekret"}
    r = app_client.post("/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]
    r = app_client.post("/v1/chat/completions", content=b" " * (2 << 20), headers=auth)
    assert r.status_code == 413
    assert app_client.get("/v1/models").status_code == 401
    assert app_client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        oai(app_client, key="wrong").models.list()
    assert [m.id for m in oai(app_client).models.list()] == ["relaygen"]


def test_reasoning_splitter_holds_back_a_partial_think_end():
    s = _ReasoningSplitter("</think>")
    out = s.feed("abc</thi") + s.feed("nk>\n\nAns") + s.feed("wer") + s.flush()
    reasoning = "".join(t for f, t in out if f == "reasoning_content")
    content = "".join(t for f, t in out if f == "content")
    assert reasoning == "abc" and content == "Answer"

"""The OpenAI-compatible server against the wire-format double, driven by the official
`openai` client and raw httpx (the app runs in uvicorn on a thread)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from doubles import LARGE, SMALL, running

from relaygen_sgl.api import Relay
from relaygen_sgl.cli import main as cli
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.serve.app import create_app, key_digest, key_ok
from relaygen_sgl.serve.protocol import FIELDS
from relaygen_sgl.serve.setup import allowed_profiles, check_exposure, resolve_api_key
from relaygen_sgl.serve.shaper import CONTENT, REASONING, TextShaper, stop_cut

THINK = "First we add 2 and 3 to get 5. Therefore the sum is 5. Thus, the answer is 5.</think>\n\nThe answer is 5."
Q = "What is 2 + 3?"
LONG_Q = "Count colours for me."
AUTH = {"authorization": "Bearer sekret"}
JSON = {"content-type": "application/json"}


class _Drip(httpx.SyncByteStream):
    def __init__(self, parts: list[bytes], owner: SlowSSE) -> None:
        self.parts, self.owner, self.sent, self.done = parts, owner, 0, False

    def __iter__(self):
        for i, part in enumerate(self.parts):
            if i:
                time.sleep(self.owner.delay)
            self.sent = i + 1
            yield part
        self.done = True

    def close(self) -> None:
        if not self.done:  # what SGLang sees as a client gone: it aborts the request
            self.owner.cut.append(self.sent)


class SlowSSE(httpx.BaseTransport):
    """The double, with its stream chunks `delay` seconds apart; `cut` records streams
    closed before their end."""

    def __init__(self, fake) -> None:
        self.fake, self.delay, self.cut = fake, 0.0, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        resp = self.fake._handle(request)
        if self.delay <= 0 or "text/event-stream" not in resp.headers.get("content-type", ""):
            return resp
        parts = [p + b"\n\n" for p in resp.content.split(b"\n\n") if p]
        return httpx.Response(resp.status_code, headers={"content-type": "text/event-stream"},
                              stream=_Drip(parts, self))


class Served:
    def __init__(self, relay, fake, transport, app, client) -> None:
        self.relay, self.fake, self.transport, self.app, self.client = relay, fake, transport, app, client

    def tape(self, question: str, text: str) -> None:
        ids = self.relay.tokenizer.encode(self.relay.plan().render([{"role": "user", "content": question}]))
        tape = ids + self.relay.tokenizer.encode(text) + [self.fake.eos_id]
        for h in self.fake.hosts.values():
            h.tape = tape

    def generate_calls(self) -> int:
        return sum(len(h.requests) for h in self.fake.hosts.values())

    def oai(self, key: str = "sekret") -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=str(self.client.base_url) + "/v1", max_retries=0)


@pytest.fixture
def make(fake):
    """make(**create_app options) -> Served; the tape answers Q with THINK."""
    with contextlib.ExitStack() as stack:
        def build(**options) -> Served:
            for url in (LARGE, SMALL):
                fake.add_host(url, [])
            transport = SlowSSE(fake)
            relay = Relay(large=LARGE, small=SMALL, family="qwen3", profile="cpu-tiny",
                          client=ClientConfig(retries=0, backoff_s=0), transport=transport)
            prepare = options.pop("prepare", None)
            options = {"api_key": "sekret", "health_interval_s": 0, **options}
            app = create_app(relay, **options)
            served = Served(relay, fake, transport, app, None)
            served.tape(Q, THINK)
            if prepare is not None:  # before the server starts
                prepare(served)
            served.client = stack.enter_context(running(app))
            return served
        yield build


@pytest.fixture
def served(make) -> Served:
    return make()


def chat(s: Served, body: dict, headers: dict | None = None, **kw) -> httpx.Response:
    return s.client.post("/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})}, **kw)


def is_openai_error(r: httpx.Response) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} \
        and isinstance(err["message"], str) and isinstance(err["type"], str)


def sse_events(lines) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ---------------------------------------------------------------- answers
def test_plain_completion_with_relay_usage(served):
    r = served.oai().chat.completions.create(model="relaygen", messages=[{"role": "user", "content": Q}],
                                             max_tokens=200)
    assert r.choices[0].message.content == "The answer is 5."
    assert r.choices[0].finish_reason == "stop"
    relay = r.usage.model_extra["relay"]
    assert relay["switches"] >= 2 and relay["large_tokens"] + relay["small_tokens"] == r.usage.completion_tokens


def test_streamed_completion_splits_reasoning_and_answer(served):
    stream = served.oai().chat.completions.create(
        model="relaygen", messages=[{"role": "user", "content": Q}], max_tokens=200, stream=True,
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


def test_stop_strings_cut_the_answer_plain_and_streamed(served):
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}
    r = chat(served, {**body, "stop": ["is", "zzz"]}).json()
    assert r["choices"][0]["message"]["content"] == "The answer "
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["reasoning_content"].startswith("First we add 2")  # never cut
    # "swer is" spans two tokens: " answer" must wait until " is" decides it
    with served.client.stream("POST", "/v1/chat/completions", json={**body, "stop": "swer is", "stream": True},
                              headers=AUTH) as resp:
        events = sse_events(resp.iter_lines())
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert "".join(p for p in pieces if p) == "The an"  # what was held back was never sent
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_cut_and_shaper_hold_back_partial_markers():
    assert stop_cut("abcd", ["abcd", "c"]) == 2  # "c" is complete first
    assert stop_cut("xabcx", ["bc", "abc"]) == 1  # a tie: the longer one
    assert stop_cut("abc", ["z"]) is None
    s = TextShaper("</think>", ["STOP"])
    out = s.feed("large", "abc</thi") + s.feed("large", "nk>\n\nAns") + s.feed("small", "wer ST")
    assert "".join(t for f, t in out if f == CONTENT) == "Answer "  # "ST" held back
    out += s.feed("small", "OP more")
    assert s.stopped and "".join(t for f, t in out if f == REASONING) == "abc"
    assert "".join(t for f, t in out if f == CONTENT) == "Answer "


def test_shaper_rewind_reports_what_the_client_already_got():
    s = TextShaper("</think>")
    s.feed("large", "One. ")
    sent = s.feed("small", "Two thr")
    assert sent == [(REASONING, "Two thr")]
    assert s.rewind("Two thr") == [(REASONING, "Two thr")]
    assert s.feed("large", "Three.") == [(REASONING, "Three.")]
    assert s.fields(final=True)[0][REASONING] == "One. Three."


def test_a_small_failure_mid_turn_is_announced_and_never_spliced(make):
    s = make()
    small = s.fake.hosts["small.test:2"]
    small.stream_error_after_tokens = 3  # every small stream fails after 3 tokens
    with s.client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": Q}], "max_tokens": 200, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    fields = {REASONING: "", CONTENT: ""}
    announced = []
    for e in events:
        if "relay_event" in e:
            ev = e["relay_event"]
            assert ev["type"] == "small_failed" and fields[ev["field"]].endswith(ev["discard"])
            fields[ev["field"]] = fields[ev["field"]][:len(fields[ev["field"]]) - len(ev["discard"])]
            announced.append(ev)
        for c in e["choices"]:
            for name in fields:
                fields[name] += c["delta"].get(name) or ""
    assert announced and announced[0]["discard"]  # the client had got some of the dead turn
    assert fields[REASONING] == THINK.split("</think>")[0] and fields[CONTENT] == "The answer is 5."


# ---------------------------------------------------------------- profiles
def test_a_profile_path_from_a_request_is_refused_and_nothing_leaks(served):
    r = chat(served, {"messages": [{"role": "user", "content": "hi"}], "relay": {"profile": "/etc/passwd"}})
    assert r.status_code == 400 and is_openai_error(r)
    text = r.text
    assert "/etc/passwd" not in text and "root:" not in text
    assert not any(line and line in text for line in Path("/etc/passwd").read_text().splitlines())
    assert "relaygen_sgl" not in text and "/data/profiles" not in text
    r = chat(served, {"messages": [{"role": "user", "content": "hi"}], "relay": {"profile": "nope"}})
    assert r.status_code == 400 and "cpu-tiny" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "relay.profile"


def test_profiles_allowed_at_start_are_picked_by_name(make, tmp_path):
    src = Path(__file__).parent.parent / "relaygen_sgl" / "data" / "profiles" / "cpu-tiny.json"
    raw = orjson.loads(src.read_bytes())
    raw["cues"] = ["Thus,", "Hence"]
    (tmp_path / "mine.json").write_bytes(orjson.dumps(raw))
    allowed = allowed_profiles([str(tmp_path / "mine.json"), f"other={tmp_path / 'mine.json'}", "cpu-tiny"])
    assert {"mine", "other", "cpu-tiny", "r1-32b-1.5b"} <= set(allowed)
    with pytest.raises(ConfigError, match="taken"):
        allowed_profiles([f"cpu-tiny={tmp_path / 'mine.json'}"])
    with pytest.raises(ConfigError, match="no such file"):
        allowed_profiles([str(tmp_path / "missing.json")])
    s = make(profiles=allowed)
    r = chat(s, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200, "relay": {"profile": "mine"}})
    assert r.status_code == 200
    first = s.fake.hosts["large.test:1"].requests[0]["sampling_params"]["stop_regex"]
    assert first == list(allowed["mine"].patterns)


# ---------------------------------------------------------------- cancel
LONG = "blue green red " * 50  # ~600 tokens, no cue, no sentence end
SLOW = 0.03  # seconds between stream chunks: uncancelled, LONG takes 18 s


def test_a_streaming_client_that_leaves_stops_its_relay(served):
    served.tape(LONG_Q, LONG)
    served.transport.delay = SLOW
    t0 = time.monotonic()
    with served.client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": LONG_Q}], "max_tokens": 1000, "stream": True}) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any("reasoning_content" in line for line in got)
    gate = served.app.state.gate
    assert wait_for(lambda: gate.running == 0 and served.transport.cut, 8.0), "the relay kept running"
    assert time.monotonic() - t0 < 10
    calls = served.generate_calls()
    time.sleep(0.5)
    assert served.generate_calls() == calls  # no next turn started
    assert served.transport.cut[0] < 300  # the SGLang stream was closed long before its end


def test_a_plain_client_that_leaves_stops_its_relay(served):
    served.tape(LONG_Q, LONG)
    served.transport.delay = SLOW
    with pytest.raises(httpx.ReadTimeout):
        chat(served, {"messages": [{"role": "user", "content": LONG_Q}], "max_tokens": 1000}, timeout=1.0)
    assert wait_for(lambda: served.app.state.gate.running == 0 and served.transport.cut, 8.0), \
        (served.app.state.gate.running, served.transport.cut)
    assert served.transport.cut[0] < 300


def test_a_request_past_its_deadline_is_stopped(make):
    s = make(request_timeout_s=30)
    s.tape(LONG_Q, LONG)
    s.transport.delay = SLOW
    body = {"messages": [{"role": "user", "content": LONG_Q}], "max_tokens": 1000, "relay": {"timeout": 0.5}}
    r = chat(s, body)
    assert r.status_code == 504 and is_openai_error(r) and r.json()["error"]["code"] == "timeout"
    assert wait_for(lambda: s.app.state.gate.running == 0, 8.0)
    with s.client.stream("POST", "/v1/chat/completions", headers=AUTH, json={**body, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    assert events[-1]["error"]["code"] == "timeout"
    assert wait_for(lambda: s.app.state.gate.running == 0 and len(s.transport.cut) == 2, 8.0), \
        (s.app.state.gate.running, s.transport.cut, s.generate_calls())
    r = chat(s, {**body, "relay": {"timeout": 31}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "relay.timeout"


# ---------------------------------------------------------------- backpressure
def test_past_concurrency_and_queue_a_request_gets_429(make):
    s = make(max_concurrency=1, max_queue=0)
    s.tape(LONG_Q, LONG)
    s.transport.delay = SLOW
    long_body = {"messages": [{"role": "user", "content": LONG_Q}], "max_tokens": 1000, "stream": True}
    with s.client.stream("POST", "/v1/chat/completions", headers=AUTH, json=long_body) as resp:
        lines = resp.iter_lines()
        next(lines)
        r = chat(s, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200})
        assert r.status_code == 429 and is_openai_error(r) and int(r.headers["retry-after"]) >= 1, \
            (r.text[:200], [line[:200] for line in lines if "error" in line or "DONE" in line])
    assert wait_for(lambda: s.app.state.gate.running == 0, 8.0)
    s.transport.delay = 0
    assert chat(s, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}).status_code == 200


def test_a_queued_request_waits_for_a_slot(make):
    s = make(max_concurrency=1, max_queue=1)
    s.transport.delay = 0.02
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(chat(s, body).status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [200, 200]


def test_a_request_without_max_tokens_gets_the_default(make):
    s = make(default_max_tokens=7)
    r = chat(s, {"messages": [{"role": "user", "content": Q}]}).json()
    assert s.fake.hosts["large.test:1"].requests[0]["sampling_params"]["max_new_tokens"] <= 7
    assert r["usage"]["completion_tokens"] <= 7 and r["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------- keys and health
def test_api_keys_any_bearer_case_and_digests(served):
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}
    assert chat(served, body, {"authorization": "bearer sekret"}).status_code == 200
    assert chat(served, body, {"authorization": "BEARER   sekret"}).status_code == 200
    for bad in ("Bearer wrong", "sekret", "Basic sekret", "Bearer", "Bearer sekret2"):
        r = chat(served, body, {"authorization": bad})
        assert r.status_code == 401 and is_openai_error(r) and r.headers["www-authenticate"] == "Bearer"
    assert served.client.get("/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        served.oai(key="wrong").models.list()
    assert [m.id for m in served.oai().models.list()] == ["relaygen"]
    assert key_ok(b"bEaReR k", key_digest("k")) and not key_ok(b"Bearer k ", key_digest("x"))


def test_key_sources_and_exposure(tmp_path, monkeypatch, capsys):
    (tmp_path / "key").write_text("from-file\nsecond line\n")
    assert resolve_api_key(None, str(tmp_path / "key"), {}) == "from-file"
    assert resolve_api_key(None, None, {"RELAYGEN_API_KEY": "from-env"}) == "from-env"
    assert resolve_api_key("flag", None, {"RELAYGEN_API_KEY": "from-env"}) == "flag"
    assert resolve_api_key(None, None, {}) is None
    with pytest.raises(ConfigError):
        resolve_api_key("a", str(tmp_path / "key"), {})
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_api_key(None, str(tmp_path / "nokey"), {})
    for host in ("127.0.0.1", "localhost", "::1", "127.1.2.3"):
        check_exposure(host, None, False)
    check_exposure("0.0.0.0", "k", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(ConfigError):
        check_exposure("0.0.0.0", None, False)
    monkeypatch.delenv("RELAYGEN_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--large", LARGE, "--small", SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--insecure" in err


def test_serve_waits_for_sglang_no_longer_than_a_request_and_checks_its_limits(monkeypatch, capsys):
    from relaygen_sgl.cli import commands

    seen = []

    def opened(args):  # the relay serve would open, with the client's read timeout
        seen.append(args.timeout)
        raise ConfigError("stopped before serving")

    monkeypatch.setattr(commands, "open_relay", opened)
    base = ["serve", "--large", LARGE, "--small", SMALL]
    for extra, timeout in (([], 600.0), (["--request-timeout", "42"], 42.0), (["--timeout", "7"], 7)):
        assert cli.main([*base, *extra]) == 2
        assert seen.pop() == timeout
    capsys.readouterr()
    for extra, words in ((["--max-connections", "80"], "--max-connections 80 must be above"),
                         (["--header-timeout", "0"], "--header-timeout must be above 0"),
                         (["--send-timeout", "0"], "--send-timeout must be above 0")):
        assert cli.main([*base, *extra]) == 2 and not seen
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_health_is_open_cheap_and_reveals_nothing(served):
    calls = served.generate_calls()
    for _ in range(5):
        r = served.client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
    assert served.generate_calls() == calls
    assert "large.test" not in r.text and "/" not in r.text
    assert served.client.get("/openapi.json").status_code == 200


def test_health_reports_a_failing_server_from_its_background_check(make):
    def small_down(served: Served) -> None:
        served.fake.hosts["small.test:2"].down_after = 0

    s = make(health_interval_s=3600, prepare=small_down)
    assert wait_for(lambda: s.client.get("/health").status_code == 503, 10)
    body = s.client.get("/health").json()
    assert body == {"status": "degraded", "servers": {"large": "ok", "small": "failing"}}


# ---------------------------------------------------------------- bad requests
@pytest.mark.parametrize("body,status", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": "   "}]}, 400),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 0}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "relay": {"method": "both"}}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "relay": {"profile": "nope"}}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "relay": {"mehtod": "relay"}}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "false"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400),
    ([1, 2], 400),
])
def test_bad_requests_get_openai_errors(served, body, status):
    r = chat(served, body)
    assert r.status_code == status and is_openai_error(r)


def test_bodies_size_type_and_json(served):
    r = served.client.post("/v1/chat/completions", content=b"{not json",
                           headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = served.client.post("/v1/chat/completions", content=b" " * (2 << 20), headers={**AUTH, **JSON})
    assert r.status_code == 413 and is_openai_error(r)

    def chunked():
        for _ in range(40):
            yield b" " * 65536

    r = served.client.post("/v1/chat/completions", content=chunked(), headers={**AUTH, **JSON})
    assert r.status_code == 413 and is_openai_error(r)
    r = served.client.post("/v1/chat/completions", content=b"messages=hi",
                           headers={**AUTH, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and is_openai_error(r)


def test_404_and_405_in_openai_shape(served):
    for r in (served.client.get("/v1/nothing", headers=AUTH), served.client.get("/nothing", headers=AUTH),
              served.client.get("/v1/models/gpt-4", headers=AUTH)):
        assert r.status_code == 404 and is_openai_error(r)
    r = served.client.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and is_openai_error(r) and "POST" in r.headers["allow"]
    assert served.client.get("/v1/models/relaygen", headers=AUTH).json()["id"] == "relaygen"


def test_an_unknown_field_is_named_in_a_400_and_known_openai_fields_keep_working(served):
    hi = {"messages": [{"role": "user", "content": Q}]}
    r = chat(served, {**hi, "max_token": 50})  # a typo that used to leave max_tokens at 4096
    err = r.json()["error"]
    assert r.status_code == 400 and is_openai_error(r) and err["param"] == "max_token"
    assert err["code"] == "unknown_parameter" and "'max_token'" in err["message"] and "'max_tokens'" in err["message"]
    r = chat(served, {**hi, "x" * 5000: 1})
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 200 and len(r.json()["error"]["param"]) <= 80
    ignored = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
               "parallel_tool_calls": False, "prompt_cache_key": "k", "safety_identifier": "s",
               "prediction": {"type": "content", "content": "x"}}
    r = chat(served, {**hi, "max_tokens": 200, **ignored, "reasoning_effort": None, "n": 1, "tools": []})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "The answer is 5."
    for key, value in (("reasoning_effort", "high"), ("verbosity", "low"), ("web_search_options", {})):
        r = chat(served, {**hi, key: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == key and is_openai_error(r)
    schema = served.app.openapi()["paths"]["/v1/chat/completions"]["post"]
    props = schema["requestBody"]["content"]["application/json"]["schema"]
    assert props["additionalProperties"] is False and set(props["properties"]) == set(FIELDS)
    assert "400" in schema["responses"] and "415" in schema["responses"] and "422" not in schema["responses"]


def test_sglang_bench_serving_s_body_is_served_and_ignore_eos_true_refused(served):
    # what `python -m sglang.bench_serving --backend sglang-oai-chat --disable-ignore-eos` sends
    body = {"model": "relaygen", "messages": [{"role": "user", "content": Q}], "max_completion_tokens": 200,
            "stream": False, "temperature": 0.0, "ignore_eos": False}
    r = chat(served, body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "The answer is 5."
    r = chat(served, {**body, "ignore_eos": True})
    assert r.status_code == 400 and is_openai_error(r) and r.json()["error"]["param"] == "ignore_eos"
    assert r.json()["error"]["code"] == "unsupported"


@pytest.mark.parametrize("extra", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 2}, {"seed": -1},
                                   {"temperature": "hot"}, {"relay": {"timeout": 10**9}}])
def test_a_value_out_of_range_or_of_the_wrong_type_is_an_openai_400(served, extra):
    r = chat(served, {"messages": [{"role": "user", "content": Q}], **extra})
    assert r.status_code == 400 and is_openai_error(r), r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] in {*extra, "relay.timeout"}


def test_a_body_not_declared_as_json_gets_415(served):
    payload = orjson.dumps({"messages": [{"role": "user", "content": Q}], "max_tokens": 200})
    calls = served.generate_calls()
    for headers in ({"content-type": "text/plain"}, {"content-type": "text/plain;charset=UTF-8"}, {}):
        r = served.client.post("/v1/chat/completions", content=payload, headers={**AUTH, **headers})
        assert r.status_code == 415 and is_openai_error(r) and r.json()["error"]["code"] == "unsupported_media_type"
    assert served.generate_calls() == calls  # no relay ran
    r = served.client.post("/v1/chat/completions", content=payload,
                           headers={**AUTH, "content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200


def test_the_access_log_escapes_the_path(served):
    import logging

    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")  # serve's
    with captured_logs() as records:
        for target in (b"/x%0Afoo", b"/x%0D%0Afoo%20bar", b"/v1/models%0A200%201.0s"):
            with socket.create_connection(("127.0.0.1", port_of(served))) as sock:
                sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sekret\r\n"
                             b"Connection: close\r\n\r\n")
                sock.settimeout(10)
                assert sock.recv(65536).startswith(b"HTTP/1.1 ")
        assert wait_for(lambda: len(access_lines(records)) == 3)
    lines = [line for r in records for line in formatter.format(r).splitlines()]
    assert not any(line.startswith("foo") or line.startswith("200") for line in lines), lines
    assert any("GET /x%0Afoo 404 " in line for line in lines), lines


def test_a_failed_relay_names_no_sglang_url(make):
    s = make()
    s.fake.hosts["small.test:2"].down_after = 0
    s.fake.hosts["large.test:1"].down_after = 0
    r = chat(s, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200})
    assert r.status_code == 502 and is_openai_error(r)
    assert "large.test" not in r.text and "small.test" not in r.text and "http" not in r.text, r.text


def test_metrics_follow_prometheus_naming(served):
    chat(served, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200})
    text = served.client.get("/metrics", headers=AUTH).text
    assert "_created" not in text
    assert 'relaygen_requests_total{code="200",route="/v1/chat/completions"} 1.0' in text
    assert "relaygen_large_share_ratio_count 1.0" in text and "relaygen_large_share_count" not in text
    assert 'relaygen_rejections_total{code="429"}' in text and "status=" not in text
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
        assert f"\n{name} " in text, name
    # the relays waiting for room in the KV pools are the backend's own count (runtime/pools.py)
    assert "\nrelaygen_relays_waiting_for_kv 0.0" in text
    pools = served.relay.backend.pools
    pools._queue.extend([-1, -2])
    try:
        assert "\nrelaygen_relays_waiting_for_kv 2.0" in served.client.get("/metrics", headers=AUTH).text
    finally:
        pools._queue.clear()


# ---------------------------------------------------------------- fuzz
def test_fuzzed_requests_never_500_and_errors_are_openai_shaped(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_asgi("/openapi.json", served.app)
    body_schema = served.app.openapi()["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body_schema["content"]["application/json"]["schema"]["properties"]["messages"]["minItems"] == 1
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    seen: dict[int, int] = {}

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.function_scoped_fixture])
    @given(case=cases)
    def check(case):
        r = case.call(headers=AUTH)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        if r.status_code >= 400:
            err = orjson.loads(r.content).get("error")
            assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, r.text
            # a valid request whose own relay.timeout (down to a few ms) runs out gets the
            # gateway timeout it asked for, whether it did depends on the machine's speed
            timed_out = r.status_code == 504 and err["code"] == "timeout" and "deadline" in err["message"]
            assert r.status_code < 500 or timed_out, r.text

    check()
    assert any(code == 200 for code in seen) and any(code >= 400 for code in seen), seen


# ---------------------------------------------------------------- clients that leave or stall, the access log
@contextlib.contextmanager
def captured_logs():
    """Every record of relaygen's and uvicorn's loggers (attached after uvicorn configured its own)."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.DEBUG)
    ours = logging.getLogger("relaygen")
    level = ours.level
    ours.setLevel(logging.INFO)
    for name in ("relaygen", "uvicorn"):
        logging.getLogger(name).addHandler(keep)
    try:
        yield records
    finally:
        for name in ("relaygen", "uvicorn"):
            logging.getLogger(name).removeHandler(keep)
        ours.setLevel(level)


def access_lines(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == "relaygen.serve.access"]


def port_of(s: Served) -> int:
    return int(str(s.client.base_url).rsplit(":", 1)[1])


PARTIAL = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sekret\r\n"
           b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"messages\": [{\"role\": \"us")


def test_clients_that_leave_mid_body_are_one_info_line_each_never_an_error(served):
    with captured_logs() as records:
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", port_of(served))) as sock:
                sock.sendall(PARTIAL)
                time.sleep(0.01)  # the app is reading the body when the client goes
        assert wait_for(lambda: len(access_lines(records)) == 30, 10), access_lines(records)
    lines = access_lines(records)
    assert all(" 499 " in line and "(client left mid-body)" in line for line in lines), lines[:3]
    assert all(r.levelname == "INFO" and r.exc_info is None for r in records), \
        [(r.name, r.levelname, r.getMessage()[:200]) for r in records if r.levelname != "INFO" or r.exc_info]
    assert served.app.state.gate.running == 0
    assert chat(served, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}).status_code == 200


def test_a_client_that_stalls_mid_body_gets_408_and_its_connection_closed(make):
    s = make(body_timeout_s=0.5)
    with captured_logs() as records, socket.create_connection(("127.0.0.1", port_of(s))) as sock:
        sock.settimeout(10)
        t0 = time.monotonic()
        sock.sendall(PARTIAL)
        answer = b""
        while chunk := sock.recv(65536):  # read to the end: the server closes the connection
            answer += chunk
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer[:300]
    assert b'"code":"body_timeout"' in answer and 0.5 <= took < 3, took
    assert wait_for(lambda: any(" 408 " in line for line in access_lines(records)))
    families = scrape(s)
    assert sample(families, "relaygen_rejections", code="408") == 1
    assert sample(families, "relaygen_requests", route="/v1/chat/completions", code="408") == 1


def test_a_streaming_client_that_leaves_is_one_info_line(served):
    served.tape(LONG_Q, LONG)
    served.transport.delay = SLOW
    with captured_logs() as records:
        with served.client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
                "messages": [{"role": "user", "content": LONG_Q}], "max_tokens": 1000, "stream": True}) as resp:
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
        assert wait_for(lambda: served.app.state.gate.running == 0 and access_lines(records), 8.0)
    (line,) = access_lines(records)
    assert " 200 " in line and "stream" in line and "(client left mid-stream)" in line
    assert all(r.levelname == "INFO" and r.exc_info is None for r in records)


def test_the_access_log_has_one_line_per_request_with_status_relay_stats_and_duration(served):
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}
    with captured_logs() as records:
        usage = chat(served, body).json()["usage"]
        served.client.get("/v1/models")  # no key: 401
        chat(served, {"messages": []})  # 400
        with served.client.stream("POST", "/v1/chat/completions", headers=AUTH,
                                  json={**body, "stream": True}) as resp:
            list(resp.iter_lines())
        assert wait_for(lambda: len(access_lines(records)) == 4)
    plain, unauthorized, bad, streamed = access_lines(records)
    relay = usage["relay"]
    assert plain.startswith("POST /v1/chat/completions 200 ") and \
        f"switches={relay['switches']} large_share={relay['large_share']:.3f} tokens={usage['completion_tokens']} " \
        f"(large {relay['large_tokens']}, small {relay['small_tokens']})" in plain, plain
    assert float(plain.split()[3].rstrip("s")) > 0
    assert unauthorized.startswith("GET /v1/models 401 ") and bad.startswith("POST /v1/chat/completions 400 ")
    assert " 200 " in streamed and "stream relay switches=" in streamed and "client left" not in streamed


# ---------------------------------------------------------------- /metrics
def scrape(s: Served) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = s.client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def sample(families: dict, name: str, suffix: str = "_total", **labels) -> float:
    """One sample's value: a counter's _total (suffix), a histogram's _count or _sum."""
    fam = families[name]
    found = [x.value for x in fam.samples if x.name == name + suffix and all(x.labels.get(k) == v
                                                                              for k, v in labels.items())]
    assert len(found) == 1, (name, labels, fam.samples)
    return found[0]


def test_metrics_count_what_five_requests_reported(make):
    """Two plain answers, one streamed with usage, one more plain, and one refused with 429
    while the stream runs: the counters equal what the responses said."""
    s = make(max_concurrency=1, max_queue=0)
    assert s.client.get("/metrics").status_code == 401  # behind the key, like the API
    before = scrape(s)
    assert sample(before, "relaygen_switches") == 0 and sample(before, "relaygen_tokens", role="small") == 0
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}
    usages = [chat(s, body).json()["usage"] for _ in range(2)]
    s.tape(LONG_Q, LONG)
    s.transport.delay = 0.01
    with s.client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": LONG_Q}], "max_tokens": 60, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        lines = resp.iter_lines()
        next(lines)
        during = scrape(s)
        assert sample(during, "relaygen_relays_running", "") == 1 and sample(during, "relaygen_relays_queued", "") == 0
        assert chat(s, body).status_code == 429
        usages.append(next(e for e in sse_events(lines) if e.get("usage"))["usage"])
    s.transport.delay = 0
    assert wait_for(lambda: s.app.state.gate.running == 0)
    usages.append(chat(s, body).json()["usage"])
    m = scrape(s)
    chat_route = "/v1/chat/completions"
    assert sample(m, "relaygen_requests", route=chat_route, code="200") == 4
    assert sample(m, "relaygen_requests", route=chat_route, code="429") == 1
    assert sample(m, "relaygen_rejections", code="429") == 1 and sample(m, "relaygen_rejections", code="413") == 0
    for role in ("large", "small"):
        assert sample(m, "relaygen_tokens", role=role) == sum(u["relay"][f"{role}_tokens"] for u in usages)
    switches = sum(u["relay"]["switches"] for u in usages)
    assert switches > 0 and sample(m, "relaygen_switches") == switches
    assert sample(m, "relaygen_handoff_seconds", "_count") == switches  # one handoff per switch
    assert sample(m, "relaygen_prompt_tokens") == sum(u["prompt_tokens"] for u in usages)
    assert sample(m, "relaygen_relays", outcome="completed") == 4
    assert sample(m, "relaygen_relays", outcome="failed") == 0
    assert sample(m, "relaygen_relay_seconds", "_count", method="relay") == 4
    assert sample(m, "relaygen_large_share_ratio", "_count") == 4 and sample(m, "relaygen_relays_degraded") == 0
    assert sample(m, "relaygen_relays_running", "") == 0
    other = make()  # its own registry: nothing of the first app's counts
    assert sample(scrape(other), "relaygen_switches") == 0


def test_metrics_count_degraded_and_failed_relays(make):
    s = make()
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 200}
    s.fake.hosts["small.test:2"].down_after = 0  # the small server is gone: the large model goes on alone
    assert chat(s, body).status_code == 200
    s.fake.hosts["large.test:1"].down_after = 0  # both gone: the relay fails
    assert chat(s, body).status_code == 502
    m = scrape(s)
    assert sample(m, "relaygen_relays_degraded") == 1
    assert sample(m, "relaygen_relays", outcome="failed") == 1
    assert sample(m, "relaygen_relays", outcome="completed") == 1


def test_a_small_server_down_at_start_serves_degraded_and_says_so(fake):
    fake.add_host(LARGE, [])  # the small server never answered
    relay = Relay(large=LARGE, small=SMALL, family="qwen3", profile="cpu-tiny",
                  client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport)
    assert relay.small_down
    app = create_app(relay, api_key="sekret", health_interval_s=0)
    s = Served(relay, fake, None, app, None)
    s.tape(Q, THINK)
    with running(app) as client, captured_logs() as records:
        s.client = client
        assert client.get("/health").json() == {"status": "degraded", "servers": {"large": "unknown",
                                                                                  "small": "failing"}}
        r = chat(s, {"messages": [{"role": "user", "content": Q}], "max_tokens": 200})
        assert r.status_code == 200 and r.json()["usage"]["relay"]["small_tokens"] == 0
        assert r.json()["choices"][0]["message"]["content"] == "The answer is 5."
        assert sample(scrape(s), "relaygen_relays_degraded") == 1
        assert wait_for(lambda: any("degraded" in line for line in access_lines(records)))


def test_a_budget_past_the_kv_pool_gets_a_400_naming_it_before_any_request(served):
    for h in served.fake.hosts.values():
        h.kv_tokens = 300
    for engine in served.relay.backend.engines.values():
        engine.__dict__.pop("limits", None)  # read again: the pools were set after the relay was made
    before = served.generate_calls()
    r = chat(served, {"messages": [{"role": "user", "content": Q}], "max_tokens": 1000})
    assert r.status_code == 400 and is_openai_error(r), r.text
    message = r.json()["error"]["message"]
    assert "KV pool holds 300 tokens" in message and "the largest budget that fits is max_tokens=" in message
    assert "http://" not in message and served.generate_calls() == before
    assert chat(served, {"messages": [{"role": "user", "content": Q}], "max_tokens": 100}).status_code == 200


def test_a_request_without_max_tokens_on_small_pools_gets_what_fits(served):
    """serve's default (4096) where it fits, else the largest budget that does: a 200, not a
    400 asking the client for a max_tokens it never gave; a max_tokens given is kept or refused."""
    for h in served.fake.hosts.values():
        h.kv_tokens = 300
    for engine in served.relay.backend.engines.values():
        engine.__dict__.pop("limits", None)  # read again: the pools were set after the relay was made
    r = chat(served, {"messages": [{"role": "user", "content": Q}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "The answer is 5."
    asked = [req["sampling_params"]["max_new_tokens"] + len(req["input_ids"])
             for h in served.fake.hosts.values() for req in h.requests if "input_ids" in req]
    assert asked and max(asked) < 300, asked
    too_large = chat(served, {"messages": [{"role": "user", "content": Q}], "max_completion_tokens": 1000})
    assert too_large.status_code == 400 and "the largest budget that fits is max_tokens=" in too_large.text

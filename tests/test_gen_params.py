"""sgl.gen's parameters on connect(), on the doubles: each field reaches the /generate body as
RuntimeEndpoint sends it, logprobs come back in meta_info, and a relay refuses what cannot
survive a handoff before any request."""

from __future__ import annotations

import json

import pytest
import sglang as sgl
from doubles import ANSWER, QUESTION
from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, SglSamplingParams

from relaygen_sgl import program as rg
from relaygen_sgl.core.errors import ConfigError, RelayAborted
from relaygen_sgl.runtime.gen_params import RELAY_REFUSED, gen_params
from relaygen_sgl.runtime.trajectory import KEY

SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})


def _gens(fake, host="large.test:1"):
    """The generating /generate bodies a host received (not prefills, not select scoring)."""
    return [r for r in fake.hosts[host].requests if r["sampling_params"].get("max_new_tokens", 128) > 0]


@sgl.function
def one_gen(s, question, gen):
    rg.prompt(s, question)
    s += sgl.gen("out", max_tokens=6, temperature=0, **gen)


@pytest.mark.parametrize("gen, sampling, top", [
    ({"regex": r"[0-9]{3}"}, {"regex": r"[0-9]{3}"}, {}),
    ({"json_schema": SCHEMA}, {"json_schema": SCHEMA}, {}),
    ({"min_p": 0.1, "frequency_penalty": 0.5, "presence_penalty": 0.25}, {"min_p": 0.1, "frequency_penalty": 0.5,
                                                                          "presence_penalty": 0.25}, {}),
    ({"ignore_eos": True, "stop_token_ids": [7, 9]}, {"ignore_eos": True, "stop_token_ids": [7, 9]}, {}),
    ({"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 3, "return_text_in_logprobs": True}, {},
     {"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 3, "return_text_in_logprobs": True}),
], ids=["regex", "json_schema", "min_p-penalties", "ignore_eos-stop_token_ids", "logprobs"])
def test_each_gen_field_reaches_the_server_body(fake, backend, gen, sampling, top):
    state = one_gen.run(question=QUESTION, gen=gen, backend=backend)
    assert state.error() is None
    body = _gens(fake)[0]
    assert {k: body["sampling_params"].get(k) for k in sampling} == sampling
    assert {k: body.get(k) for k in top} == top
    assert not _gens(fake, "small.test:2")


def test_dtype_becomes_runtime_endpoints_regex_and_stops(fake, backend):
    for dtype, regex in ((int, REGEX_INT), ("float", REGEX_FLOAT)):
        assert one_gen.run(question=QUESTION, gen={"dtype": dtype}, backend=backend).error() is None
        body = _gens(fake)[-1]["sampling_params"]
        assert body["regex"] == regex and {" ", "\n"} <= set(body["stop"])
    # as on RuntimeEndpoint, a dtype wins over a regex
    params = gen_params(SglSamplingParams(dtype="bool", regex="x+"))
    assert params.sampling["regex"] == "(True|False)"
    with pytest.raises(ConfigError, match="dtype"):
        gen_params(SglSamplingParams(dtype="list"))


def test_a_plain_gen_at_defaults_sends_no_new_fields(fake, backend):
    assert one_gen.run(question=QUESTION, gen={}, backend=backend).error() is None
    body = _gens(fake)[0]
    new = {"min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "stop_token_ids", "regex",
           "json_schema"}
    assert not new & set(body["sampling_params"]) and not {"return_logprob", "top_logprobs_num"} & set(body)


def test_logprobs_come_back_in_meta_info_one_per_token(fake, backend):
    state = one_gen.run(question=QUESTION, gen={"return_logprob": True, "top_logprobs_num": 2,
                                                 "return_text_in_logprobs": True}, backend=backend)
    meta = state.get_meta_info("out")
    seg = state.stream_executor.variables[KEY].segments[-1]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] == len(seg.token_ids) == 6
    assert [e[1] for e in meta["output_token_logprobs"]] == seg.token_ids  # in token order, deltas added up
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert "".join(e[2] for e in meta["output_token_logprobs"]) == state["out"]


def test_n_above_one_is_refused_before_any_request(fake, backend):
    state = one_gen.run(question=QUESTION, gen={"n": 3}, backend=backend)
    state.sync()
    assert isinstance(state.stream_executor.error_, ConfigError)
    assert "n=3" in str(state.stream_executor.error_) and "fork" in str(state.stream_executor.error_)
    assert not _gens(fake) and not _gens(fake, "small.test:2")


@sgl.function
def relayed(s, question, gen):
    rg.prompt(s, question)
    return rg.relay(s, max_tokens=40, temperature=0.0, **gen)


@pytest.mark.parametrize("name, value", [("regex", r"[0-9]{3}"), ("json_schema", SCHEMA), ("dtype", int),
                                         ("n", 2), ("stop", ["x"]), ("logprob_start_len", 0)])
def test_a_relay_refuses_what_cannot_survive_a_handoff_before_any_request(fake, backend, name, value):
    with pytest.raises(ConfigError) as err:
        relayed.run(question=QUESTION, gen={name: value}, backend=backend)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"relay() does not take {name}: ")
    assert RELAY_REFUSED[name] in message
    assert not [r for h in fake.hosts.values() for r in h.requests]  # nothing sent to either server


def test_a_relay_applies_penalties_min_p_ignore_eos_and_logprobs_to_every_turn(fake, backend):
    state = relayed.run(question=QUESTION, gen={"frequency_penalty": 0.5, "presence_penalty": 0.25, "min_p": 0.05,
                                                "ignore_eos": True, "return_logprob": True}, backend=backend)
    assert state.error() is None
    result = state.ret_value
    turns = [s for s in result.segments if s.role in ("large", "small")]
    assert {s.role for s in turns} == {"large", "small"}
    bodies = _gens(fake) + _gens(fake, "small.test:2")
    assert len(bodies) >= len(turns) >= 2
    for body in bodies:
        sp = body["sampling_params"]
        assert (sp["frequency_penalty"], sp["presence_penalty"], sp["min_p"], sp["ignore_eos"]) == (0.5, 0.25, 0.05,
                                                                                                    True)
        assert body["return_logprob"] is True
    for seg in turns:  # each segment records its own tokens' logprobs, cut where the turn was cut
        assert [e[1] for e in seg.logprobs["output_token_logprobs"]] == seg.token_ids


def test_a_plain_gens_min_tokens_masks_eos_as_on_runtime_endpoint_a_relay_turns_does_not(fake, backend):
    state = one_gen.run(question=QUESTION, gen={"min_tokens": 4}, backend=backend)
    assert state.error() is None
    assert _gens(fake)[0]["sampling_params"]["min_new_tokens"] == 4
    before = len(_gens(fake))
    assert relayed.run(question=QUESTION, gen={}, backend=backend).error() is None
    # the relay's large turns carry min_tokens=5, which gates only its cues
    turns = _gens(fake)[before:] + _gens(fake, "small.test:2")
    assert turns and not [b for b in turns if "min_new_tokens" in b["sampling_params"]]


# ---------------------------------------------------------------- a plain gen's stops end it as on RuntimeEndpoint
@sgl.function
def two_gens(s, question, first, second):
    rg.prompt(s, question)
    s += sgl.gen("a", temperature=0, **first)
    s += sgl.gen("b", temperature=0, **second)


def _prefix(backend, text: str) -> list[int]:
    return backend.tokenizer.encode(backend.plan().render(QUESTION) + text)


@pytest.mark.parametrize("stop", [" Then", "dd"], ids=["at-a-token", "inside-a-token"])
def test_a_plain_gens_matched_stop_leaves_the_text_and_the_next_gen_goes_on_from_it(fake, backend, stop):
    state = two_gens.run(question=QUESTION, first={"max_tokens": 30, "stop": stop}, second={"max_tokens": 2},
                         backend=backend)
    assert state.error() is None
    cut = ANSWER.index(stop)
    assert state["a"] == ANSWER[:cut]  # SGLang's detokenizer trims the stop (no_stop_trim off)
    assert state.get_meta_info("a")["finish_reason"] == {"type": "stop", "matched": stop}
    traj = state.stream_executor.variables[KEY]
    # the trajectory holds what the program holds, its ids those of that text
    assert traj.prompt + "".join(seg.text for seg in traj.segments) == state.text()
    assert backend.tokenizer.decode(traj.ids, skip_special=False) == state.text()
    body = _gens(fake)[1]
    # the next gen's input: the trimmed text's tokens (the part of a token before the cut
    # re-encoded), the model's own tokens kept where the cut left them whole
    assert backend.tokenizer.decode(body["input_ids"]) == backend.tokenizer.decode(_prefix(backend, ANSWER[:cut]))
    assert state["b"] == backend.tokenizer.decode(fake.hosts["large.test:1"].tape[len(body["input_ids"]):][:2])


def test_a_plain_gens_stop_token_leaves_its_ids_and_text(fake, backend):
    answer_ids = backend.tokenizer.encode(ANSWER)
    stop_id = answer_ids[4]
    state = two_gens.run(question=QUESTION, first={"max_tokens": 30, "stop_token_ids": [stop_id]},
                         second={"max_tokens": 1}, backend=backend)
    assert state.error() is None
    assert state["a"] == backend.tokenizer.decode(answer_ids[:4])
    assert state.get_meta_info("a")["completion_tokens"] == 5  # counted as SGLang counts it
    assert _gens(fake)[1]["input_ids"] == _prefix(backend, "") + answer_ids[:4]


def test_a_plain_gens_stop_regex_ends_where_the_server_matched_every_token_kept(fake, backend):
    state = two_gens.run(question=QUESTION, first={"max_tokens": 30, "stop_regex": r"[0-9]"},
                         second={"max_tokens": 1}, backend=backend)
    assert state.error() is None
    assert state["a"] == ANSWER[:ANSWER.index("2") + 1]  # no word-boundary test, no follower cut: not a cue
    assert state.get_meta_info("a")["finish_reason"] == {"type": "stop", "matched": "[0-9]"}


def test_a_stop_begun_before_a_plain_gen_does_not_end_it(fake, backend):
    # " First we" | " add 2 ...": SGLang searches the gen's own output only
    words = ANSWER.split(" ")
    first = backend.tokenizer.encode(" First we")
    state = two_gens.run(question=QUESTION, first={"max_tokens": len(first)},
                         second={"max_tokens": 3, "stop": ["we add"]}, backend=backend)
    assert state.error() is None and state["a"] == " First we" and words[3] == "add"
    assert state["b"].startswith(" add") and len(_gens(fake)) == 2


def test_a_streamed_plain_gen_never_sends_the_stop_it_trims(backend):
    state = two_gens.run(question=QUESTION, first={"max_tokens": 30, "stop": " we check"}, second={"max_tokens": 1},
                         backend=backend, stream=True)
    chunks = list(state.text_iter("a"))
    assert state.error() is None
    assert "".join(chunks) == state["a"] == ANSWER[:ANSWER.index(" we check")]


@sgl.function
def relay_then_gen(s, question, route):
    rg.prompt(s, question)
    if route:
        rg.route(s, route)
    rg.relay(s, max_tokens=40, temperature=0.0)
    s += sgl.gen("after", max_tokens=4, min_tokens=3, temperature=0)


@pytest.mark.parametrize("route", [None, "small"])
def test_after_a_relay_gens_are_plain_again_and_go_where_the_program_routed_before(fake, backend, route):
    state = relay_then_gen.run(question=QUESTION, route=route, backend=backend)
    assert state.error() is None
    assert state.stream_executor.variables.get("route") == route
    last = state.stream_executor.variables[KEY].segments[-1]
    assert last.role == (route or "large")
    host = "small.test:2" if route else "large.test:1"
    # a plain gen's min_tokens masks EOS on the server; a relay turn's would not be sent
    assert _gens(fake, host)[-1]["sampling_params"].get("min_new_tokens") == 3


@pytest.fixture
def deterministic_large(fake, monkeypatch):
    """The large double as a server started with --enable-deterministic-inference."""
    import httpx

    handle = fake._handle

    def handle_deterministic(request):
        resp = handle(request)
        if request.url.path == "/server_info" and request.url.host == "large.test" and resp.status_code == 200:
            return httpx.Response(200, json={**resp.json(), "enable_deterministic_inference": True})
        return resp

    monkeypatch.setattr(fake, "_handle", handle_deterministic)


@pytest.mark.parametrize("how", ["relay", "gen"])
def test_min_p_is_refused_in_one_line_where_a_server_runs_deterministic_inference(deterministic_large, fake,
                                                                                   backend, how):
    """SGLang's deterministic sampler asserts min_p == 0 (layers/sampler.py), which would stop the
    server: the request is refused before it is sent, in one line naming min_p and the flag."""
    if how == "relay":  # the relay says how far it got: "relay stopped after N segments: " + the line
        with pytest.raises((ConfigError, RelayAborted)) as err:
            relayed.run(question=QUESTION, gen={"min_p": 0.05}, backend=backend)
        error = err.value
    else:
        state = one_gen.run(question=QUESTION, gen={"min_p": 0.05}, backend=backend)  # greedy: asserts too
        state.sync()
        error = state.stream_executor.error_
        assert isinstance(error, ConfigError), error
    message = str(error)
    assert "\n" not in message and "min_p=0.05 cannot be sent to http://large.test:1: " in message
    assert "--enable-deterministic-inference" in message
    assert not any(r["sampling_params"].get("min_p") for r in fake.hosts["large.test:1"].requests)

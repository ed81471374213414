"""sgl.gen's parameters on connect(), on the doubles: each field reaches the /generate body as
RuntimeEndpoint sends it, logprobs come back in meta_info, and a relay refuses what cannot
survive a handoff before any request."""

from __future__ import annotations

import json

import pytest
import sglang as sgl
from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, SglSamplingParams

from relaygen_sgl import program as rg
from relaygen_sgl.api import close, connect
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.runtime.gen_params import RELAY_REFUSED, gen_params
from relaygen_sgl.runtime.trajectory import KEY

LARGE, SMALL = "http://large.test:1", "http://small.test:2"
QUESTION = "What is 2 + 3?"
ANSWER = " First we add 2 and 3 to get 5. Then we check it. Therefore the sum is 5. Yes."
SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})


@pytest.fixture
def backend(fake):
    for url in (LARGE, SMALL):
        fake.add_host(url, [])
    be = connect(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3", prefetch=False,
                 client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport)
    prompt = be.plan().render(QUESTION)
    tape = be.tokenizer.encode(prompt) + be.tokenizer.encode(ANSWER) + [fake.eos_id]
    for h in fake.hosts.values():
        h.tape = tape
    yield be
    close(be)


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

"""sgl.gen's parameters on connect() against SGLang's own RuntimeEndpoint, on the real CPU pair.

Each feature group runs one program on RuntimeEndpoint (the large server) and on connect()
(routed to large, its default), and compares what the program sees. Both use the family's
chat template, so both send the same prompt text."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

import relaygen_sgl
from relaygen_sgl import program as rg
from relaygen_sgl.api import close
from relaygen_sgl.core.errors import ConfigError

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


class Recording(httpx.HTTPTransport):
    """The real transport, noting every path it sends (to see what reached the servers)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.url.netloc.decode(), request.url.path))
        return super().handle_request(request)


@pytest.fixture(scope="module")
def backends(cpu_pair):
    relay = relaygen_sgl.connect(preset="cpu-tiny", large=cpu_pair.large, small=cpu_pair.small)
    endpoint = RuntimeEndpoint(cpu_pair.large, chat_template_name=relay.family.sgl_chat_template)
    yield {"runtime_endpoint": endpoint, "connect": relay}
    close(relay)


def run_both(backends, prog, **kwargs):
    """The program's state on each backend; both must finish without error."""
    states = {}
    for name, be in backends.items():
        state = prog.run(backend=be, **kwargs)
        assert state.error() is None, (name, state.error())
        states[name] = state
    return states


@sgl.function
def ask(s, question, gen):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("out", **gen))


def test_a_regex_gen_matches_its_regex_on_both(backends):
    gen = {"regex": r"[0-9]{3}", "max_tokens": 12, "temperature": 0}
    states = run_both(backends, ask, question="Pick a number between 100 and 999.", gen=gen)
    outs = {k: s["out"] for k, s in states.items()}
    assert all(re.fullmatch(r"[0-9]{3}", o) for o in outs.values()), outs
    assert outs["connect"] == outs["runtime_endpoint"]


def test_a_json_schema_gen_parses_and_validates_on_both(backends):
    gen = {"json_schema": json.dumps(SCHEMA), "max_tokens": 96, "temperature": 0}
    states = run_both(backends, ask, question="Describe a person called Ann, aged 31, as JSON.", gen=gen)
    for state in states.values():
        jsonschema.validate(json.loads(state["out"]), SCHEMA)  # the whole text: nothing after the object
    assert states["connect"]["out"] == states["runtime_endpoint"]["out"]


@pytest.mark.parametrize("dtype", [int, float])
def test_dtype_gives_a_value_of_that_type_on_both(backends, dtype):
    gen = {"dtype": dtype, "max_tokens": 10, "temperature": 0}
    states = run_both(backends, ask, question="How many legs does a spider have? Answer with a number.", gen=gen)
    values = {k: dtype(s["out"]) for k, s in states.items()}  # raises on free text
    assert values["connect"] == values["runtime_endpoint"]
    assert states["connect"]["out"] == states["runtime_endpoint"]["out"]  # the matched " " / "\n" trimmed on both


def test_a_logprob_gen_returns_the_same_number_of_entries_on_both(backends):
    gen = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_logprob": True, "top_logprobs_num": 3,
           "logprob_start_len": 0, "return_text_in_logprobs": True}
    states = run_both(backends, ask, question="Name three colours.", gen=gen)
    metas = {k: s.get_meta_info("out") for k, s in states.items()}
    ours, theirs = metas["connect"], metas["runtime_endpoint"]
    assert len(ours["output_token_logprobs"]) == len(theirs["output_token_logprobs"]) == 8
    assert [e[1] for e in ours["output_token_logprobs"]] == [e[1] for e in theirs["output_token_logprobs"]]
    assert [e[2] for e in ours["output_token_logprobs"]] == [e[2] for e in theirs["output_token_logprobs"]]
    assert [len(t) for t in ours["output_top_logprobs"]] == [len(t) for t in theirs["output_top_logprobs"]] == [3] * 8
    # logprob_start_len=0: one entry per prompt token, the same prompt
    assert len(ours["input_token_logprobs"]) == len(theirs["input_token_logprobs"]) > 10
    assert all(abs(a[0] - b[0]) < 1e-3 for a, b in zip(ours["output_token_logprobs"], theirs["output_token_logprobs"]))


@sgl.function
def sentence_then_more(s, question, stops):
    s += sgl.user(question)
    s += sgl.assistant_begin()
    s += sgl.gen("first", max_tokens=60, temperature=0, stop=stops)
    s += sgl.gen("rest", max_tokens=12, temperature=0)
    s += sgl.assistant_end()


@pytest.mark.parametrize("stop", [".", [" blue", "\n"]], ids=["sentence-end", "word-or-newline"])
def test_a_stop_string_is_trimmed_and_the_next_gen_goes_on_from_the_same_text_on_both(backends, stop):
    states = run_both(backends, sentence_then_more, question="Explain why the sky is blue in two sentences.",
                      stops=stop)
    ours, theirs = states["connect"], states["runtime_endpoint"]
    # the stop did match here (not the chat template's end, which RuntimeEndpoint reports as a stop too)
    assert theirs.get_meta_info("first")["finish_reason"]["matched"] in ([stop] if isinstance(stop, str) else stop)
    assert ours["first"] == theirs["first"] and ours.get_meta_info("first")["finish_reason"] == \
        theirs.get_meta_info("first")["finish_reason"]
    # RuntimeEndpoint re-tokenizes the program's text; connect() goes on from the model's own
    # tokens: the same text, and here the same greedy continuation
    assert ours["rest"] == theirs["rest"] and ours.text() == theirs.text()


@sgl.function
def repeat(s, gen):
    s += "Count: one two three one two three one two three one two three"
    s += sgl.gen("out", **gen)


def test_frequency_penalty_changes_a_greedy_repetition_the_same_way(backends):
    plain = {"max_tokens": 24, "temperature": 0}
    without = run_both(backends, repeat, gen=plain)
    penalized = run_both(backends, repeat, gen={**plain, "frequency_penalty": 1.5})
    assert without["runtime_endpoint"]["out"] != penalized["runtime_endpoint"]["out"]  # the penalty matters here
    assert without["connect"]["out"] == without["runtime_endpoint"]["out"]
    assert penalized["connect"]["out"] == penalized["runtime_endpoint"]["out"]


def test_greedy_gens_with_the_same_params_give_the_same_text(backends):
    gen = {"max_tokens": 20, "temperature": 0, "min_p": 0.2, "presence_penalty": 0.7, "ignore_eos": True}
    states = run_both(backends, ask, question="Say hi.", gen=gen)
    assert states["connect"]["out"] == states["runtime_endpoint"]["out"]
    # ignore_eos: the whole budget on both, past the model's short answer
    assert states["connect"].get_meta_info("out")["completion_tokens"] == 20
    assert states["runtime_endpoint"].get_meta_info("out")["completion_tokens"] == 20


def test_min_tokens_holds_back_eos_on_both(backends):
    question = "What is 2 + 2? Answer with one number."
    plain = {"max_tokens": 40, "temperature": 0}
    ended = run_both(backends, ask, question=question, gen=plain)
    n = ended["runtime_endpoint"].get_meta_info("out")["completion_tokens"]
    assert n < 30  # the model ends early here (EOS)
    held = run_both(backends, ask, question=question, gen={**plain, "min_tokens": n + 8})
    for state in held.values():
        assert state.get_meta_info("out")["completion_tokens"] >= n + 8
    assert held["connect"]["out"] == held["runtime_endpoint"]["out"]


@sgl.function
def three_fields(s, topic):
    s += sgl.user(f"Give a three-digit code for {topic}.")
    s += sgl.assistant(sgl.gen("code", regex=r"[0-9]{3}", max_tokens=8))
    s += sgl.user(f"How many letters are in the word {topic}?")
    s += sgl.assistant(sgl.gen("count", dtype=int, max_tokens=8))
    s += sgl.user(f"Describe a person who likes {topic} as JSON.")
    s += sgl.assistant(sgl.gen("person", json_schema=json.dumps(SCHEMA), max_tokens=128))


def test_run_batch_of_regex_dtype_and_schema_gens_on_connect(cpu_pair):
    backend = relaygen_sgl.connect(preset="cpu-tiny", large=cpu_pair.large, small=cpu_pair.small)
    try:
        topics = ["tea", "rain", "chess", "boats"]
        states = three_fields.run_batch([{"topic": t} for t in topics], backend=backend, num_threads=4,
                                        temperature=0.7)
    finally:
        close(backend)
    for state in states:
        assert state.error() is None
        assert re.fullmatch(r"[0-9]{3}", state["code"]), state["code"]
        assert isinstance(int(state["count"]), int)
        jsonschema.validate(json.loads(state["person"]), SCHEMA)


@sgl.function
def relay_with(s, gen):
    rg.prompt(s, "What is 2 + 3?")
    rg.relay(s, max_tokens=40, **gen)


def test_a_relay_given_a_regex_fails_at_once_and_sends_nothing(cpu_pair):
    transport = Recording()
    backend = relaygen_sgl.connect(preset="cpu-tiny", large=cpu_pair.large, small=cpu_pair.small, transport=transport)
    try:
        before = len(transport.sent)
        with pytest.raises(ConfigError) as err:
            relay_with.run(gen={"regex": r"[0-9]+"}, backend=backend)
        assert not [p for _, p in transport.sent[before:] if p == "/generate"]  # neither server got a request
    finally:
        close(backend)
    message = str(err.value)
    assert "\n" not in message and message.startswith("relay() does not take regex: "), message

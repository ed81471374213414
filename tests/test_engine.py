"""EngineClient against the SGLang doubles: the stream as SGLang 0.5.23 sends it (deltas or
the whole output so far, chunks of several tokens), typed errors for aborts, in-stream
errors and garbage, what is retried and what is not, and the control endpoints."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
from doubles import FakeSGLang

from relaygen_sgl.client.http import ClientConfig, EngineClient, Finish
from relaygen_sgl.core.errors import Cancelled, EngineFailed, EngineRejected, EngineUnreachable

STREAM_MODES = "both"  # the stream parser: deltas and cumulative output both
URL = "http://engine.test:1"
PROMPT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
# "é" and "ü" are two byte-level tokens each: a chunk may end inside a character
COMPLETION = "First we add 2 and 3 to get 5. Therefore the answer is 42 é. Thus, we know that now the sum is 7 ü!"
GREEDY = {"max_new_tokens": 200, "temperature": 0}


def make(fake: FakeSGLang, completion: str = COMPLETION, **host_fields) -> tuple[list[int], list[int]]:
    """One host whose tape is PROMPT + completion + EOS; returns (prompt ids, completion ids + EOS)."""
    p_ids = fake.tok.encode(PROMPT)
    c_ids = fake.tok.encode(completion) + [fake.eos_id]
    host = fake.add_host(URL, p_ids + c_ids)
    for k, v in host_fields.items():
        setattr(host, k, v)
    return p_ids, c_ids


def client(fake: FakeSGLang, retries: int = 0, **kw) -> EngineClient:
    return EngineClient(URL, ClientConfig(retries=retries, backoff_s=0.0), fake.transport, **kw)


def host(fake: FakeSGLang):
    return fake.hosts["engine.test:1"]


class Recorder:
    """An on_tokens callback that keeps a copy of every cumulative list it is handed."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.last: list[bool] = []

    def __call__(self, ids: list[int], last: bool = False) -> None:
        self.calls.append(list(ids))
        self.last.append(last)


# ---------------------------------------------------------------- the stream as SGLang sends it
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_incremental_and_cumulative_streams_give_the_same_generation(tiny_tokenizer, chunk):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_tokenizer).eos_token_id
    gens = {}
    for mode in (True, False):
        fake = FakeSGLang(tiny_tokenizer, eos_id=eos, incremental=mode)
        p_ids, c_ids = make(fake, chunk_tokens=chunk)
        rec = Recorder()
        with client(fake) as eng:
            gens[mode] = (eng.generate(p_ids, GREEDY, on_tokens=rec), rec.calls, eng.generate(p_ids, GREEDY))
    (inc, inc_calls, plain), (cum, cum_calls, _) = gens[True], gens[False]
    assert inc.output_ids == cum.output_ids == plain.output_ids == c_ids  # EOS included, as SGLang sends it
    assert inc.text == cum.text == plain.text == COMPLETION  # the EOS text is not
    assert inc.finish == cum.finish == Finish("eos", c_ids[-1])
    assert inc_calls == cum_calls and inc_calls[-1] == c_ids
    assert inc.completion_tokens == len(c_ids) and inc.prompt_tokens == len(p_ids)


def test_chunks_of_several_tokens_reach_the_callback_whole(fake):
    p_ids, c_ids = make(fake, chunk_tokens=4)
    rec = Recorder()
    with client(fake) as eng:
        g = eng.generate(p_ids, GREEDY, on_tokens=rec)
    sizes = [len(c) for c in rec.calls]
    # SGLang sends the first token at once, then every stream_interval tokens, then the rest
    assert sizes[0] == 1 and sizes[-1] == len(c_ids)
    assert all(b - a == 4 for a, b in zip(sizes, sizes[1:-1]))
    assert all(later[: len(earlier)] == earlier for earlier, later in zip(rec.calls, rec.calls[1:]))
    assert rec.last == [False] * (len(rec.calls) - 1) + [True]  # the chunk with the finish reason
    assert g.output_ids == c_ids and g.text == COMPLETION and 0 < g.ttft_s <= g.latency_s


def test_a_turn_offers_the_prefetch_every_chunk_but_the_last(fake, tiny_tokenizer):
    # The last chunk ends the request: the next request (the handoff) follows at once, and a
    # prefetch sent then would only run ahead of it on the receiving server.
    from relaygen_sgl.client.tokenizer import load_tokenizer
    from relaygen_sgl.runtime.policy import TurnSpec
    from relaygen_sgl.runtime.turn import run_turn

    p_ids, c_ids = make(fake, chunk_tokens=3)
    offered: list[list[int]] = []
    with client(fake) as eng:
        seg = run_turn(eng, load_tokenizer(tiny_tokenizer), p_ids, PROMPT, TurnSpec(role="large", max_tokens=200),
                       on_ids=lambda ids, cue_next: offered.append(list(ids)))
    assert seg.finish == "eos" and seg.token_ids == c_ids
    assert [len(x) for x in offered] == [1, *range(4, len(c_ids), 3)]
    assert all(x == c_ids[:len(x)] for x in offered)


def test_a_turn_tells_the_prefetch_when_the_next_token_may_complete_a_cue(fake, tiny_tokenizer):
    from relaygen_sgl.client.tokenizer import load_tokenizer
    from relaygen_sgl.core.cues import cue_patterns
    from relaygen_sgl.runtime.policy import TurnSpec
    from relaygen_sgl.runtime.turn import run_turn

    p_ids, c_ids = make(fake)
    tok = load_tokenizer(tiny_tokenizer)
    hints: list[tuple[str, bool]] = []
    with client(fake) as eng:
        seg = run_turn(eng, tok, p_ids, PROMPT, TurnSpec(role="large", max_tokens=200,
                                                         cue_patterns=cue_patterns(["Therefore", "Thus,"])),
                       on_ids=lambda ids, cue_next: hints.append((tok.decode(ids), cue_next())))
    assert seg.finish == "cue" and seg.text.endswith("Therefore")
    # told once: at the token that ends "Therefore" (the server completes the match on the next)
    assert [text for text, soon in hints if soon] == [seg.text]


def test_a_chunk_waits_while_the_output_ends_in_a_stop_strings_prefix(fake):
    # "the answer is 42" is five tokens: while the tail reads "the answer", SGLang holds the chunk
    p_ids, c_ids = make(fake)
    rec = Recorder()
    with client(fake) as eng:
        g = eng.generate(p_ids, {**GREEDY, "stop": ["the answer is 42"]}, on_tokens=rec)
    assert g.finish == Finish("stop", "the answer is 42")
    assert g.text.endswith(" Therefore ")  # SGLang trims the matched stop string from the text...
    assert fake.tok.decode(g.output_ids).endswith("the answer is 42")  # ...not from the ids
    assert max(b - a for a, b in zip([0] + [len(c) for c in rec.calls], [len(c) for c in rec.calls])) > 1


def test_stop_strings_match_in_list_order_in_a_tail_sized_as_sglang_sizes_it(fake):
    p_ids, c_ids = make(fake, "We add 2 and 3 to get 5. Thus, we know that now éé is the sum.")
    with client(fake) as eng:
        # " know" completes both "now" and "know" in one step: the first listed wins
        assert eng.generate(p_ids, {**GREEDY, "stop": ["now", "know"]}).finish == Finish("stop", "now")
        assert eng.generate(p_ids, {**GREEDY, "stop": ["know", "now"]}).finish == Finish("stop", "know")
        # the window is the longest stop string's token count + 1: a long one is still seen whole
        long = "We add 2 and 3 to get 5. Thus, we"
        assert len(fake.tok.encode(long)) > 12
        assert eng.generate(p_ids, {**GREEDY, "stop": [long]}).finish == Finish("stop", long)
        # ...and a regex's longest match in characters + 1, counted as tokens: "éé" is two
        # characters but four byte-level tokens, so SGLang never sees it whole (a stop string,
        # sized by its tokens, is seen)
        assert len(fake.tok.encode("éé")) == 4
        assert eng.generate(p_ids, {**GREEDY, "stop_regex": ["éé"]}).finish == Finish("eos", c_ids[-1])
        assert eng.generate(p_ids, {**GREEDY, "stop": ["éé"]}).finish == Finish("stop", "éé")
        assert eng.generate(p_ids, {**GREEDY, "stop_regex": ["é+"]}).finish == Finish("regex", "é+")


def test_a_stop_string_is_checked_before_eos(fake):
    # Req.update_finish_state: stop strings first, on text decoded with special tokens, so
    # the EOS token's own text as a stop string turns an EOS finish into a string finish
    p_ids, c_ids = make(fake)
    eos_text = fake.tok.convert_ids_to_tokens(fake.eos_id)
    with client(fake) as eng:
        g = eng.generate(p_ids, {**GREEDY, "stop": [eos_text]})
    assert g.finish == Finish("stop", eos_text) and g.output_ids == c_ids


def test_the_double_streams_deltas_or_the_whole_output(fake):
    p_ids, c_ids = make(fake, chunk_tokens=3)
    body = {"input_ids": p_ids, "sampling_params": GREEDY, "stream": True}
    with httpx.Client(transport=fake.transport) as http:
        lines = http.post(f"{URL}/generate", json=body).text.split("\n\n")
    assert lines[-2] == "data: [DONE]"
    chunks = [orjson.loads(line[len("data: "):]) for line in lines[:-2]]
    counts = [c["meta_info"]["completion_tokens"] for c in chunks]
    assert [c["meta_info"]["finish_reason"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    if fake.incremental:
        assert [t for c in chunks for t in c["output_ids"]] == c_ids
        assert "".join(c["text"] for c in chunks) == COMPLETION
    else:
        assert [c["output_ids"] for c in chunks] == [c_ids[:n] for n in counts]
        assert chunks[-1]["text"] == COMPLETION
    assert counts[0] == 1 and counts[-1] == len(c_ids)


def test_text_generation_is_tokenized_by_the_server(fake):
    p_ids, c_ids = make(fake)
    with client(fake) as eng:
        by_text = eng.generate_text(PROMPT, GREEDY, on_tokens=lambda ids, last: None)
        by_ids = eng.generate(p_ids, GREEDY)
        assert eng.tokenize(PROMPT) == p_ids
    assert by_text.output_ids == by_ids.output_ids == c_ids and by_text.prompt_tokens == len(p_ids)
    assert host(fake).requests[0]["text"] == PROMPT and "input_ids" not in host(fake).requests[0]


# ---------------------------------------------------------------- failures inside a stream
def test_an_abort_after_tokens_is_typed_and_not_retried(fake):
    p_ids, c_ids = make(fake, abort_after_tokens=5, chunk_tokens=2)
    rec = Recorder()
    with client(fake, retries=3) as eng, pytest.raises(EngineFailed, match="aborted the request after 5") as e:
        eng.generate(p_ids, GREEDY, on_tokens=rec)
    assert len(host(fake).requests) == 1  # a retry would splice a second generation onto the first
    assert rec.calls[-1] == c_ids[:5]  # the abort chunk's token is not handed on
    assert "\n" not in str(e.value) and e.value.status is None


def test_an_abort_from_a_failing_server_after_tokens_is_not_retried(fake):
    p_ids, _ = make(fake, abort_after_tokens=4, abort_status_code=503)
    with client(fake, retries=3) as eng, pytest.raises(EngineFailed, match="after 4 streamed tokens") as e:
        eng.generate(p_ids, GREEDY, on_tokens=Recorder())
    assert len(host(fake).requests) == 1 and e.value.status == 503


def test_an_abort_before_any_token(fake):
    p_ids, _ = make(fake, abort_after_tokens=0)
    with client(fake, retries=2) as eng, pytest.raises(EngineFailed, match="aborted"):
        eng.generate(p_ids, GREEDY, on_tokens=Recorder())
    assert len(host(fake).requests) == 1  # aborted on purpose (no status_code): final
    fake.hosts.clear()
    p_ids, _ = make(fake, abort_after_tokens=0, abort_status_code=503)
    with client(fake, retries=2) as eng, pytest.raises(EngineFailed, match="aborted") as e:
        eng.generate(p_ids, GREEDY, on_tokens=Recorder())
    assert len(host(fake).requests) == 3 and e.value.status == 503  # a failing server, nothing streamed: retried
    fake.hosts.clear()
    p_ids, _ = make(fake, abort_after_tokens=0, abort_status_code=400)
    with client(fake, retries=2) as eng, pytest.raises(EngineRejected, match="aborted"):
        eng.generate(p_ids, GREEDY, on_tokens=Recorder())
    assert len(host(fake).requests) == 1


def test_an_abort_of_a_request_that_was_not_streamed(fake):
    p_ids, _ = make(fake, abort_after_tokens=3)
    with client(fake, retries=2) as eng, pytest.raises(EngineFailed, match="aborted the request"):
        eng.generate(p_ids, GREEDY)
    assert len(host(fake).requests) == 1


def test_an_error_inside_the_stream_is_typed_and_not_retried(fake):
    p_ids, c_ids = make(fake, stream_error_after_tokens=6, faults_on={1})
    rec = Recorder()
    with client(fake, retries=3) as eng, pytest.raises(EngineFailed, match="HTTP 500 in the stream after 6") as e:
        eng.generate(p_ids, GREEDY, on_tokens=rec)
    assert len(host(fake).requests) == 1 and rec.calls[-1] == c_ids[:6]
    assert "\n" not in str(e.value)


def test_a_request_refused_inside_the_stream_is_a_4xx(fake):
    # SGLang checks the input length after a stream has begun: HTTP 200, then the error
    p_ids, _ = make(fake, max_input=3)
    with client(fake, retries=3) as eng, pytest.raises(EngineRejected, match="HTTP 400 in the stream") as e:
        eng.generate(p_ids, GREEDY, on_tokens=Recorder())
    assert e.value.status == 400 and len(host(fake).requests) == 1
    with client(fake, retries=3) as eng, pytest.raises(EngineRejected, match="HTTP 400: The input is longer"):
        eng.generate(p_ids, GREEDY)


def test_a_malformed_stream_line_is_one_typed_line(fake):
    p_ids, _ = make(fake, malformed_stream=True)
    with client(fake, retries=3) as eng:
        with pytest.raises(EngineFailed, match="malformed answer: not JSON") as e:
            eng.generate(p_ids, GREEDY, on_tokens=Recorder())
        assert "\n" not in str(e.value) and len(host(fake).requests) == 1
        with pytest.raises(EngineFailed, match="malformed answer: not JSON") as e:
            eng.generate(p_ids, GREEDY)  # a body that is not JSON at all
        assert "\n" not in str(e.value) and "orjson" not in str(e.value)


# ---------------------------------------------------------------- what is retried
def test_5xx_is_retried_4xx_is_not(fake):
    p_ids, c_ids = make(fake, fail_on={1})
    with client(fake, retries=1) as eng:
        assert eng.generate(p_ids, GREEDY, on_tokens=Recorder()).output_ids == c_ids
    assert len(host(fake).requests) == 2
    host(fake).requests.clear()
    host(fake).fail_on = {1, 2, 3}
    with client(fake, retries=2) as eng, pytest.raises(EngineFailed, match="HTTP 500: injected failure") as e:
        eng.generate(p_ids, GREEDY)
    assert len(host(fake).requests) == 3 and e.value.status == 500
    host(fake).requests.clear()
    host(fake).fail_on, host(fake).fail_status = {1}, 400
    with client(fake, retries=3) as eng, pytest.raises(EngineRejected, match="HTTP 400") as e:
        eng.generate(p_ids, GREEDY, on_tokens=Recorder())
    assert len(host(fake).requests) == 1 and e.value.status == 400


def test_an_unknown_sampling_param_is_refused_before_the_stream(fake):
    p_ids, _ = make(fake)
    with client(fake, retries=3) as eng, pytest.raises(EngineRejected, match="unknown field `temprature`"):
        eng.generate(p_ids, {"temprature": 0.0}, on_tokens=Recorder())
    assert len(host(fake).requests) == 1


class _DroppedStream(httpx.SyncByteStream):
    """SSE bytes, then the connection breaks."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads

    def __iter__(self) -> Iterator[bytes]:
        yield from self.payloads
        raise httpx.ReadError("connection reset by peer")


def _chunk(ids: list[int], done: int, finish: dict | None = None) -> bytes:
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": 3, "completion_tokens": done, "cached_tokens": 0}
    return b"data: " + orjson.dumps({"text": "", "output_ids": ids, "meta_info": meta}) + b"\n\n"


def _scripted(answers: list) -> tuple[EngineClient, list[httpx.Request]]:
    """A client whose n-th request gets answers[n] (a Response, or an exception to raise)."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return EngineClient(URL, ClientConfig(retries=2, backoff_s=0.0), httpx.MockTransport(handle)), seen


def test_a_connection_lost_mid_stream_is_not_retried_once_tokens_went_out():
    dropped = httpx.Response(200, stream=_DroppedStream([_chunk([5], 1), _chunk([6, 7], 3)]))
    eng, seen = _scripted([dropped])
    rec = Recorder()
    with eng, pytest.raises(EngineUnreachable, match="after 3 streamed tokens"):
        eng.generate([1, 2, 3], GREEDY, on_tokens=rec)
    assert len(seen) == 1 and rec.calls == [[5], [5, 6, 7]]


def test_a_connection_lost_before_any_token_is_retried():
    whole = httpx.Response(200, content=_chunk([5, 6], 2, {"type": "length", "length": 2}) + b"data: [DONE]\n\n")
    eng, seen = _scripted([httpx.ConnectError("refused"), httpx.Response(200, stream=_DroppedStream([])), whole])
    with eng:
        assert eng.generate([1, 2, 3], GREEDY, on_tokens=Recorder()).output_ids == [5, 6]
    assert len(seen) == 3


def test_a_stream_out_of_step_with_completion_tokens_or_cut_short_is_an_error():
    # two ids said to bring the count to 5 after 1: neither the whole output nor a delta
    bad = httpx.Response(200, content=_chunk([5], 1) + _chunk([6, 7], 5) + b"data: [DONE]\n\n")
    eng, _ = _scripted([bad])
    with eng, pytest.raises(EngineFailed, match="a chunk of 2 ids with completion_tokens=5 after 1 ids"):
        eng.generate([1], GREEDY, on_tokens=Recorder())
    short = httpx.Response(200, content=_chunk([5], 1) + b"data: [DONE]\n\n")  # no finish_reason ever
    eng, seen = _scripted([short])
    with eng, pytest.raises(EngineUnreachable, match="ended before the generation finished after 1"):
        eng.generate([1], GREEDY, on_tokens=Recorder())
    assert len(seen) == 1


def test_an_exception_from_the_callback_ends_the_request_unretried(fake):
    p_ids, _ = make(fake)

    def stop_listening(ids: list[int], last: bool) -> None:
        if len(ids) >= 3:
            raise Cancelled("the caller stopped listening")

    with client(fake, retries=3) as eng, pytest.raises(Cancelled):
        eng.generate(p_ids, GREEDY, on_tokens=stop_listening)
    assert len(host(fake).requests) == 1


# ---------------------------------------------------------------- control endpoints
def test_health(fake):
    make(fake)
    with client(fake) as eng:
        assert eng.health(5.0) is True
    with EngineClient("http://nowhere.test:9", transport=fake.transport) as eng:
        assert eng.health(5.0) is False  # connection refused
    host(fake).fail_on = {2}
    with client(fake) as eng:
        assert eng.health(5.0) is False  # HTTP 500
    host(fake).down_after = 0
    with client(fake) as eng:
        assert eng.health(5.0) is False
    assert [r["sampling_params"]["max_new_tokens"] for r in host(fake).requests] == [1, 1, 1]


def test_tokenize_is_none_where_the_server_has_no_tokenize(fake):
    p_ids, _ = make(fake)
    with client(fake) as eng:
        assert eng.tokenize(PROMPT) == p_ids
    host(fake).router = True  # SGLang's router serves no /tokenize
    with client(fake) as eng:
        assert eng.tokenize(PROMPT) is None
        assert eng.model_info()["tokenizer_path"] == fake.tokenizer_path  # from /get_model_info


def test_flush_cache_empties_the_radix_cache(fake):
    p_ids, _ = make(fake)
    with client(fake) as eng:
        eng.generate(p_ids, GREEDY)
        assert eng.generate(p_ids, GREEDY).cached_tokens == len(p_ids) - 1
        eng.flush_cache()
        assert eng.generate(p_ids, GREEDY).cached_tokens == 0


def test_the_api_key_is_sent_as_a_bearer_token(fake):
    p_ids, c_ids = make(fake, api_key="s3cret")
    with client(fake) as eng:
        with pytest.raises(EngineRejected, match="HTTP 401: Unauthorized"):
            eng.generate(p_ids, GREEDY)
        assert eng.health(5.0) is False
    with client(fake, api_key="s3cret") as eng:
        assert eng.generate(p_ids, GREEDY, on_tokens=Recorder()).output_ids == c_ids
        assert eng.health(5.0) is True and eng.tokenize(PROMPT) == p_ids
        assert eng.server_info()["dp_size"] == 1


def test_chat_stream_reports_usage_and_ttft():
    body: dict = {}

    def handle(request: httpx.Request) -> httpx.Response:
        body.update(orjson.loads(request.content))
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"index": 0, "delta": {"content": "5"}}]},
                  {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41,
                                            "prompt_tokens_details": {"cached_tokens": 32}}}]
        lines = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return httpx.Response(200, content=lines, headers={"content-type": "text/event-stream"})

    messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "It is"}]
    with EngineClient(URL, transport=httpx.MockTransport(handle)) as eng:
        usage = eng.chat_stream(messages, continue_final_message=True, max_tokens=1)
    prompt_tokens, cached, ttft = usage
    assert (prompt_tokens, cached) == (40, 32) and 0 < ttft
    assert body["continue_final_message"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == messages and body["max_tokens"] == 1


def test_chat_stream_error_inside_the_stream():
    def handle(request: httpx.Request) -> httpx.Response:
        err = {"error": {"object": "error", "message": "bad template", "type": "BadRequestError", "code": 400}}
        return httpx.Response(200, content=b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")

    with EngineClient(URL, transport=httpx.MockTransport(handle)) as eng, \
            pytest.raises(EngineRejected, match="HTTP 400 in the stream: bad template"):
        eng.chat_stream([{"role": "user", "content": "x"}])

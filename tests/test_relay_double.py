"""The relay loop against protocol-faithful doubles: switching, word cues, EOS, budget,
</think>, errors. Both hosts read the same tape unless a test says otherwise, so the
trajectory must reproduce the tape exactly whatever the switching does."""

from __future__ import annotations

import time

import pytest
from doubles import LARGE, QUESTION, SMALL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaygen_sgl.api import Relay
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.core.errors import ConfigError, DoesNotFit, RelayAborted
from relaygen_sgl.runtime.prefetch import PrefetchRule


def make_relay(fake, cues=("Therefore", "now", "Thus,", "Other", "Any"), family=None, retries=0,
               prefetch="off") -> Relay:
    # prefetch off by default here: these tests count each host's requests
    profile = CueProfile(name="t", models={}, cues=tuple(cues)).validate()
    return Relay(preset="cpu-tiny", large=LARGE, small=SMALL, profile=profile, family=family,
                 client=ClientConfig(retries=retries, backoff_s=0.0), transport=fake.transport, prefetch=prefetch)


def tape_for(relay: Relay, completion: str, eos: int) -> tuple[list[int], list[int]]:
    prompt = relay.plan("relay").render(QUESTION)
    p_ids = relay.tokenizer.encode(prompt)
    c_ids = relay.tokenizer.encode(completion)
    return p_ids, p_ids + c_ids + [eos]


def setup(fake, completion, **kw):
    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    relay = make_relay(fake, **kw)
    p_ids, tape = tape_for(relay, completion, fake.eos_id)
    for host in fake.hosts.values():
        host.tape = tape
    return relay, p_ids, tape


def model_ids(result):
    return [t for s in result.segments if s.role in ("large", "small") for t in s.token_ids]


THINK = ("First we add 2 and 3 to get 5. Therefore the sum is 5. Then we check it again. "
         "Thus, the answer is 5.</think>\n\nThe answer is 5.")


def test_relay_switches_and_reproduces_the_tape(fake):
    relay, p_ids, tape = setup(fake, THINK, family="qwen3")
    res = relay.run(QUESTION, max_tokens=500)
    assert res.prompt_ids == p_ids
    assert p_ids + res.token_ids + [fake.eos_id] == tape or p_ids + res.token_ids == tape
    roles = [s.role for s in res.segments]
    assert roles[0] == "large" and "small" in roles
    cue_segs = [s for s in res.segments if s.finish == "cue"]
    assert [s.matched for s in cue_segs] == ["Therefore", "Thus,"]
    assert all(s.text.endswith(s.matched) for s in cue_segs)  # the cue stays with the large model
    small_segs = [s for s in res.segments if s.role == "small"]
    assert small_segs[0].text.endswith(".") and small_segs[0].finish == "stop"
    assert res.answer == "The answer is 5."
    assert res.segments[-1].role == "small"  # the answer is the small model's
    assert res.stats.large_tokens + res.stats.small_tokens == len(res.token_ids)


def test_cue_inside_a_word_never_fires(fake):
    text = "I know the answer is 5. Otherwise the sum of any anyway is 5. Anyway it is 5.</think>\n\n5"
    relay, _, _ = setup(fake, text, family="qwen3", cues=("now", "Other", "Any"))
    res = relay.run(QUESTION, max_tokens=500)
    assert not [s for s in res.segments if s.finish == "cue"]
    assert res.answer == "5"


def test_substring_matching_fires_inside_a_word_as_the_reference_does(fake):
    text = "Let me add the numbers so that I know the answer is 5. Done.</think>\n\n5"
    relay, _, _ = setup(fake, text, family="qwen3", cues=("now",))
    word = relay.run(QUESTION, max_tokens=500)
    assert not [s for s in word.segments if s.finish == "cue"]  # "know" is not the word "now"
    sub = relay.run(QUESTION, max_tokens=500, cue_match="substring")
    cue = [s for s in sub.segments if s.finish == "cue"]
    assert cue and cue[0].role == "large" and cue[0].text.endswith("know") and cue[0].matched == "now"
    assert sub.segments[sub.segments.index(cue[0]) + 1].role == "small"
    assert sub.to_dict()["cue_match"] == "substring" and word.to_dict()["cue_match"] == "word"
    assert sub.token_ids == word.token_ids  # both read the same tape: only the roles differ


def test_cue_as_first_token_of_a_large_segment_waits_for_min_tokens(fake):
    text = "We add them and now the small part. Therefore it is 5 and we are sure now. Done.</think>\n\n5"
    relay, _, _ = setup(fake, text, family="qwen3", cues=("Therefore", "now"))
    res = relay.run(QUESTION, max_tokens=500)
    large = [s for s in res.segments if s.role == "large"]
    # the second large turn starts on " Therefore": not accepted before 5 tokens
    assert large[1].text.lstrip().startswith("Therefore")
    assert large[1].finish == "cue" and large[1].matched == "now"
    assert large[1].completion_tokens >= 5


@pytest.mark.parametrize("family", ["qwen3", "r1", "smollm2"])
@pytest.mark.parametrize("text,last_thinker", [("So 5", "large"),
                                               ("Let me add the numbers now 2 and 3 make 5", "small")])
def test_eos_in_thinking_closes_it_and_the_answer_role_answers(fake, family, text, last_thinker):
    # As the reference does for every family: an EOS inside thinking never ends a sample
    # without an answer; "\n</think>\n\n" is inserted and the answer role writes the answer.
    fake.hosts.clear()
    relay, _, _ = setup(fake, text, family=family)
    res = relay.run(QUESTION, max_tokens=500)
    roles = [s.role for s in res.segments]
    eos_turn = res.segments[roles.index("inserted") - 1]
    assert eos_turn.role == last_thinker and eos_turn.finish == "eos" and eos_turn.matched == fake.eos_id
    assert res.segments[roles.index("inserted")].text == "\n</think>\n\n"
    assert roles[-2:] == ["inserted", "small"]  # the answer turn ran (the tape gives it an EOS)
    assert "</think>" in res.text and res.stats.finish == "eos"


def test_budget_hit_mid_segment_closes_thinking(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    res = relay.run(QUESTION, max_tokens=12, answer_reserve=0)  # no reserve: thinking may spend it all
    assert res.stats.large_tokens + res.stats.small_tokens == 12
    assert res.segments[-1].role == "inserted" and res.segments[-1].text == "\n</think>\n\n"
    assert res.stats.finish == "budget" and res.answer == ""


def test_the_answer_reserve_closes_thinking_early_and_the_answer_role_answers(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    res = relay.run(QUESTION, max_tokens=40, answer_reserve=10)
    roles = [s.role for s in res.segments]
    thinking = sum(s.completion_tokens for s in res.segments[: roles.index("inserted")])
    assert thinking == 30  # the budget less the reserve
    assert res.segments[roles.index("inserted")].text == "\n</think>\n\n"
    assert roles[-2:] == ["inserted", "small"] and res.answer != ""
    assert res.stats.large_tokens + res.stats.small_tokens <= 40
    assert "kept for the answer" in res.extra["note"]
    # the default reserve: at most a quarter of a small budget
    assert relay.plan("relay", max_tokens=40).reserve == 10
    assert relay.plan("relay", max_tokens=32768).reserve == 1024


def test_think_end_from_the_small_model_starts_the_answer(fake):
    text = "Let me add. Therefore it is</think>\n\nFive."
    relay, _, _ = setup(fake, text, family="qwen3")
    res = relay.run(QUESTION, max_tokens=500)
    ends = [s for s in res.segments if s.matched == "</think>"]
    assert ends and ends[0].role == "small"
    assert res.answer == "Five."


def test_profile_with_too_many_stops_is_refused():
    with pytest.raises(ConfigError, match="at most 32"):
        CueProfile(name="x", models={}, cues=tuple(f"cue{i}" for i in range(33))).validate()
    with pytest.raises(ConfigError, match="stop strings"):
        CueProfile(name="x", models={}, cues=("Thus",), sentence_ends=tuple(str(i) for i in range(32))).validate()


def test_large_server_error_mid_trajectory_carries_the_partial_result(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    fake.hosts["large.test:1"].down_after = 1  # its first turn succeeds, then it is gone
    with pytest.raises(RelayAborted) as err:
        relay.run(QUESTION, max_tokens=500)
    partial = err.value.partial
    assert partial is not None and [s.role for s in partial.segments] == ["large", "small"]
    assert partial.segments[0].matched == "Therefore"


def test_5xx_is_retried_4xx_is_not(fake):
    from relaygen_sgl.core.errors import EngineRejected

    relay, _, _ = setup(fake, THINK, family="qwen3", retries=1)
    small = fake.hosts["small.test:2"]
    small.fail_on = {1}  # the small server's first request gets an HTTP 500
    res = relay.run(QUESTION, max_tokens=500)
    assert res.answer == "The answer is 5."
    assert res.degraded is None  # the retry answered: the small server was not given up
    turns = [s for s in res.segments if s.role == "small"]
    assert turns and all(s.rerouted_from is None for s in turns)
    # one request per small request the trajectory counts, plus the failed one (its retry is the next)
    assert len(small.requests) == sum(s.requests for s in turns) + 1
    # the same request again, under a request id of its own (the failed one's may still be held)
    assert {**small.requests[0], "rid": None} == {**small.requests[1], "rid": None}
    assert small.requests[0]["rid"] != small.requests[1]["rid"]

    # an HTTP 400 is the request's fault: sent once, never retried, and the run fails with it
    fake.hosts.clear()
    relay, _, _ = setup(fake, THINK, family="qwen3", retries=3)
    small = fake.hosts["small.test:2"]
    small.fail_on, small.fail_status = {1}, 400
    with pytest.raises(RelayAborted, match="HTTP 400") as err:
        relay.run(QUESTION, max_tokens=500)
    assert len(small.requests) == 1
    assert isinstance(err.value.__cause__, EngineRejected) and err.value.__cause__.status == 400
    assert err.value.partial is not None and [s.role for s in err.value.partial.segments] == ["large"]


def test_handoffs_reprefill_only_the_other_roles_tokens(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    res = relay.run(QUESTION, max_tokens=500)
    last_seen: dict[str, int] = {}
    pos = 0
    for seg in res.segments:
        if seg.role in ("large", "small") and seg.role in last_seen:
            added = pos - last_seen[seg.role]
            assert seg.prompt_tokens - seg.cached_tokens in (added, added + 1)
        pos += len(seg.token_ids)
        if seg.role in ("large", "small"):
            last_seen[seg.role] = pos


def test_small_server_dies_mid_trajectory_large_goes_on_alone(fake):
    relay, _, tape = setup(fake, THINK, family="qwen3")
    fake.hosts["small.test:2"].down_after = 1  # answers its first turn, then is gone
    res = relay.run(QUESTION, max_tokens=500)
    assert res.degraded is not None and res.degraded["role"] == "small"
    first = next(i for i, s in enumerate(res.segments) if s.rerouted_from == "small")
    assert res.degraded["from_token"] == sum(len(s.token_ids) for s in res.segments[:first])
    assert [s.role for s in res.segments].count("small") == 1
    assert all(s.role == "large" for s in res.segments[first:])
    assert res.answer == "The answer is 5."  # nothing lost: the tape is reproduced
    assert res.to_dict()["degraded"]["from_token"] == res.degraded["from_token"]


def test_small_server_failure_can_be_made_fatal(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    relay.backend.on_small_failure = "fail"
    fake.hosts["small.test:2"].down_after = 0
    with pytest.raises(RelayAborted):
        relay.run(QUESTION, max_tokens=500)


def test_a_4xx_is_never_retried(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3", retries=3)
    fake.hosts["large.test:1"].max_input = 1
    with pytest.raises(RelayAborted, match="HTTP 400"):
        relay.run(QUESTION, max_tokens=500)
    assert len(fake.hosts["large.test:1"].requests) == 1


WORDS = ["Therefore", " therefore", " now", " know", " Thus,", " the", " sum", " is", " 5", ".", "\n\n", " Other",
         " Otherwise", " Any", " Anyway", " we", " add", "!", "?", " So", " Some"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=40))
def test_property_segments_concatenate_to_the_trajectory(fake, words):
    fake.hosts.clear()
    relay, p_ids, tape = setup(fake, "".join(words), family="qwen3")
    res = relay.run(QUESTION, max_tokens=400)
    body = tape[len(p_ids):]
    assert [t for s in res.segments for t in s.token_ids] == res.token_ids
    # both hosts read one tape, so the relay must reproduce it exactly (its EOS included) until
    # thinking ends; an EOS inside thinking is followed by the inserted close and an answer turn
    first_insert = next((i for i, s in enumerate(res.segments) if s.role == "inserted"), len(res.segments))
    ids = [t for s in res.segments[:first_insert] for t in s.token_ids]
    assert ids == body[: len(ids)] and (ids[-1] == fake.eos_id or len(ids) == 400)
    if first_insert < len(res.segments) and ids[-1] == fake.eos_id:
        assert res.segments[first_insert].text == "\n</think>\n\n" and res.segments[-1].role == "small"
    cues = set(relay.profile.cues)
    for s in res.segments:
        if s.finish == "cue":
            assert s.matched in cues


def test_two_roles_with_different_tokenizers_are_refused(fake, tmp_path):
    from doubles import build_tokenizer

    from relaygen_sgl.core.errors import TokenizerMismatch

    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    fake.tokenizer_paths["small.test:2"] = build_tokenizer(tmp_path / "other", vocab_size=350)
    with pytest.raises(TokenizerMismatch, match="one vocabulary"):
        make_relay(fake)


def test_a_lost_cache_changes_only_cached_tokens(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    relay.run(QUESTION, max_tokens=500)
    first = relay.run(QUESTION, max_tokens=500)  # warm: its prefixes are cached
    for host in fake.hosts.values():  # a restarted server: its radix cache is gone
        host.cache.clear()
    second = relay.run(QUESTION, max_tokens=500)
    assert second.token_ids == first.token_ids and second.text == first.text
    assert [s.prompt_tokens for s in second.segments] == [s.prompt_tokens for s in first.segments]
    assert [s.cached_tokens for s in second.segments] != [s.cached_tokens for s in first.segments]


def test_in_server_dp_pins_each_trajectory_to_one_rank(fake):
    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    for h in fake.hosts.values():
        h.dp_size = 2
    relay = make_relay(fake, family="qwen3")
    p_ids, tape = tape_for(relay, THINK, fake.eos_id)
    for h in fake.hosts.values():
        h.tape = tape
    relay.run(QUESTION, max_tokens=500)
    relay.run(QUESTION, max_tokens=500)
    for h in fake.hosts.values():
        ranks = [r.get("routed_dp_rank") for r in h.requests]
        assert None not in ranks
        half = len(ranks) // 2  # both runs make the same requests: each run keeps one rank
        assert len(set(ranks[:half])) == 1 and len(set(ranks[half:])) == 1 and ranks[0] != ranks[-1]


def test_requests_stay_within_the_servers_context(fake):
    relay, p_ids, _ = setup(fake, THINK * 3, family="qwen3")
    for h in fake.hosts.values():
        h.context_len = len(p_ids) + 40
    relay = make_relay(fake, family="qwen3")  # picks up max_model_len from /v1/models
    res = relay.run(QUESTION)  # the default 32768-token budget is far beyond the context
    assert len(res.prompt_ids) + res.stats.large_tokens + res.stats.small_tokens <= len(p_ids) + 40
    assert res.stats.finish == "budget"
    for h in fake.hosts.values():
        assert all(len(r["input_ids"]) + r["sampling_params"]["max_new_tokens"] <= h.context_len for r in h.requests)


def test_the_context_clamp_leaves_room_for_an_eagle_servers_drafts(fake):
    relay, p_ids, _ = setup(fake, THINK * 3, family="qwen3")
    for h in fake.hosts.values():
        h.context_len = len(p_ids) + 60
    fake.hosts["large.test:1"].speculative = {"speculative_algorithm": "EAGLE3", "speculative_eagle_topk": 1,
                                              "speculative_num_steps": 3, "speculative_num_draft_tokens": 4}
    relay = make_relay(fake, family="qwen3")
    res = relay.run(QUESTION)  # without the reserve, the large server would answer HTTP 400
    assert res.stats.finish == "budget"
    large = fake.hosts["large.test:1"]
    assert all(len(r["input_ids"]) + r["sampling_params"]["max_new_tokens"] + 4 <= large.context_len
               for r in large.requests)
    assert relay.engines["large"].reserved_tokens == 4 and relay.engines["small"].reserved_tokens == 0


def test_a_prompt_longer_than_the_context_is_refused_not_hidden(fake):
    relay, p_ids, _ = setup(fake, THINK, family="qwen3")
    for h in fake.hosts.values():
        h.context_len = len(p_ids) - 1
    relay = make_relay(fake, family="qwen3")
    with pytest.raises(DoesNotFit, match="the prompt alone does not fit"):
        relay.run(QUESTION, max_tokens=50)
    assert all(not h.requests for h in fake.hosts.values())


def _small_pools(fake, kv_tokens):
    relay, p_ids, tape = setup(fake, THINK.split("</think>")[0] * 8, family="qwen3")  # thinking, never closed
    for h in fake.hosts.values():
        h.kv_tokens = kv_tokens
    fake.hosts["large.test:1"].kv_tokens = kv_tokens * 2  # the small server's pool is the tighter
    return make_relay(fake, family="qwen3"), p_ids


def test_a_budget_past_the_pool_is_refused_before_any_request(fake):
    relay, p_ids = _small_pools(fake, 120)
    with pytest.raises(DoesNotFit) as err:
        relay.run(QUESTION, max_tokens=400)
    message = str(err.value)
    assert "small server" in message and "KV pool holds 120 tokens" in message
    assert f"max_tokens={err.value.fits}" in message and 0 < err.value.fits < 120 - len(p_ids)
    assert all(not h.requests for h in fake.hosts.values())
    res = relay.run(QUESTION, max_tokens=err.value.fits)  # the budget it names runs
    assert res.stats.finish in ("budget", "done", "eos")
    # a run that sets no budget gets what the pair holds, not the 32768 default
    res = relay.run(QUESTION)
    assert res.stats.budget == err.value.fits
    # a default smaller than what the pools hold is kept as it is
    res = relay.run(QUESTION, default_max_tokens=err.value.fits - 3)
    assert res.stats.budget == err.value.fits - 3


def test_a_turn_at_the_pool_ends_the_run_with_its_work_kept(fake, monkeypatch):
    from relaygen_sgl.runtime.backend import RelayBackend

    relay, p_ids = _small_pools(fake, 120)
    monkeypatch.setattr(RelayBackend, "fit", lambda self, plan, n: plan)  # the safety net alone
    res = relay.run(QUESTION, max_tokens=400)  # no HTTP 400: each turn stops where the small pool would
    assert res.stats.finish == "limit" and "KV pool" in res.extra["note"]
    most = 120 - 1 - 5 - 1  # the small pool's max_req_len, its max_req_input_len, one input shorter
    assert len(res.prompt_ids) + len(res.token_ids) == most
    assert res.segments[-1].role in ("large", "small") and res.segments[-1].finish == "limit"
    assert "</think>" not in res.text  # thinking was not closed as if the budget were spent
    for h in fake.hosts.values():
        assert all(len(r["input_ids"]) + r["sampling_params"]["max_new_tokens"] <= most for r in h.requests)


def test_streaming_yields_role_deltas_across_switches(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    items = list(relay.stream(QUESTION, max_tokens=500))
    assert items[-1][0] == "result"
    result = items[-1][1]
    deltas = items[:-1]
    assert {role for role, _ in deltas} == {"large", "small"}
    # the deltas, joined per segment in order, are the model text of the trajectory
    streamed = "".join(d for role, d in deltas)
    assert streamed == "".join(s.text for s in result.segments if s.role != "inserted")


def test_a_cue_turn_streams_its_first_token_with_its_first_chunk(fake, monkeypatch):
    """Only a request's last chunk is held back (a cue cuts only tokens the server sent in
    it), so the first token reaches the listener as its chunk arrives, not a decode step
    later; what a cue cuts is still never streamed."""
    import httpx
    from doubles import FakeSGLang

    pulled: list[bytes] = []  # stream payloads the client has read so far, all requests

    def paced(payloads: list[bytes], delay_s: float = 0.0) -> httpx.Response:
        def lines():  # type: ignore[no-untyped-def]
            for p in [*payloads, b"[DONE]"]:
                pulled.append(p)
                yield b"data: " + p + b"\n\n"
        return httpx.Response(200, content=lines(), headers={"content-type": "text/event-stream"})

    monkeypatch.setattr(FakeSGLang, "_sse", staticmethod(paced))
    relay, _, _ = setup(fake, THINK, family="qwen3")
    deltas: list[tuple[str, str, int]] = []
    result = relay.run(QUESTION, max_tokens=500, on_delta=lambda role, d: deltas.append((role, d, len(pulled))))
    assert deltas[0][0] == "large" and deltas[0][2] == 1  # sent while the stream's second chunk is unread
    assert "".join(d for _, d, _ in deltas) == "".join(s.text for s in result.segments if s.role != "inserted")
    assert [s.matched for s in result.segments if s.finish == "cue"] == ["Therefore", "Thus,"]


def test_prefetch_warms_the_other_server_and_never_changes_a_token(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    cold = relay.run(QUESTION, max_tokens=500)
    for h in fake.hosts.values():  # new servers: nothing cached; a decode step takes 20 ms
        h.cache.clear()
        h.requests.clear()
        h.chunk_delay_s = 0.02
    warm_relay = make_relay(fake, family="qwen3", prefetch="on")
    assert warm_relay.backend.prefetching.rule.every == 2  # the cpu-tiny preset's; every token here
    warm_relay.backend.prefetching.rule = PrefetchRule(every=1)
    warm = warm_relay.run(QUESTION, max_tokens=500)
    assert warm.token_ids == cold.token_ids and [s.role for s in warm.segments] == [s.role for s in cold.segments]
    prefills = [r for h in fake.hosts.values() for r in h.requests if r["sampling_params"]["max_new_tokens"] == 0]
    assert prefills  # prefill-only requests went out
    # every model turn after the first, on either role, found all but its last token cached
    # (the small server's first turn included: its prompt prefill overlapped the large turn)
    turns = [s for s in warm.segments if s.role in ("large", "small")][1:]
    assert all(s.prompt_tokens - s.cached_tokens <= 2 for s in turns), [(s.role, s.reprefilled) for s in turns]
    # the prefix goes out at a turn's start only where the other server lacks more than the
    # last token: the small one on the first turn, never the role that has just written
    starts, pos, prev = [], len(warm.prompt_ids), None
    for seg in warm.segments:
        if seg.role in ("large", "small"):
            starts.append((seg.role, prev, pos))
            prev = seg.role
        pos += len(seg.token_ids)
    ids = warm.prompt_ids + warm.token_ids
    for role, before, at in starts:
        other = SMALL if role == "large" else LARGE
        sent = [r for r in fake.hosts[other.split("//")[1]].requests
                if r["sampling_params"]["max_new_tokens"] == 0 and r["input_ids"] == ids[:at]]
        assert len(sent) == (0 if before == ("small" if role == "large" else "large") else 1), (role, before, at)
    no = make_relay(fake, family="qwen3", prefetch="on").run(QUESTION, max_tokens=500, prefetch="off")
    assert no.token_ids == cold.token_ids


def test_a_deadline_stops_the_run_and_its_requests(fake):
    from relaygen_sgl.core.errors import Cancelled

    relay, _, _ = setup(fake, THINK * 4, family="qwen3")
    for h in fake.hosts.values():
        h.chunk_delay_s = 0.05  # a decode step
    with pytest.raises(RelayAborted) as err:
        relay.run(QUESTION, max_tokens=500, deadline_s=0.6)
    assert isinstance(err.value.__cause__, Cancelled) and "deadline" in str(err.value)
    assert err.value.partial is not None
    sent = sum(len(h.requests) for h in fake.hosts.values())
    import time

    time.sleep(0.5)
    assert sum(len(h.requests) for h in fake.hosts.values()) == sent  # nothing more was asked


# ---------------------------------------------------------------- a small server down at start
def test_a_small_server_down_at_start_runs_degraded_until_it_is_back(fake, monkeypatch):
    from relaygen_sgl.runtime import pairing

    monkeypatch.setattr(pairing, "RECHECK_S", 0.0)
    fake.add_host(LARGE, [])  # no small host: every call to it is refused (ConnectError)
    relay = make_relay(fake)
    assert relay.small_down and "ConnectError" in relay.small_down and "\n" not in relay.small_down
    _, tape = tape_for(relay, THINK, fake.eos_id)
    fake.hosts["large.test:1"].tape = tape
    res = relay.run(QUESTION, max_tokens=500)
    assert res.degraded == {"role": "small", "from_token": 0, "error": relay.small_down}
    assert {s.role for s in res.segments} <= {"large", "inserted"} and res.answer == "The answer is 5."
    # it comes back serving another model: the probe (off the request path) keeps it out
    small = fake.add_host(SMALL, tape)
    fake.model_paths["small.test:2"] = "acme/Other-1B"
    down = relay.backend.small_down
    relay.run(QUESTION, max_tokens=500)
    assert _wait(lambda: not down._probing) and relay.small_down is not None
    assert relay.run(QUESTION, max_tokens=500).degraded is not None
    assert not [r for r in small.requests if r["sampling_params"]["max_new_tokens"] > 1]  # only probes
    # the preset's model again: runs started after the probe relay on both servers
    del fake.model_paths["small.test:2"]
    relay.run(QUESTION, max_tokens=500)
    assert _wait(lambda: relay.small_down is None)
    res = relay.run(QUESTION, max_tokens=500)
    assert res.degraded is None and "small" in [s.role for s in res.segments] and res.answer == "The answer is 5."


def test_a_small_server_down_at_start_is_refused_in_one_line_when_it_must_not_fail(fake):
    from relaygen_sgl.core.errors import EngineUnreachable

    fake.add_host(LARGE, [])
    with pytest.raises(EngineUnreachable) as err:
        Relay(preset="cpu-tiny", large=LARGE, small=SMALL, on_small_failure="fail",
              client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport)
    msg = str(err.value)
    assert "small server" in msg and "small.test:2" in msg and "--on-small-failure large" in msg and "\n" not in msg


def test_a_small_server_down_at_start_with_urls_only_is_detected_by_the_large_one(fake):
    fake.add_host(LARGE, [])
    with Relay(large=LARGE, small=SMALL, client=ClientConfig(retries=0, backoff_s=0.0),
               transport=fake.transport) as r:
        assert r.preset.name == "cpu-tiny" and r.small_down


def _wait(cond, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.01)
    return cond()


def test_closing_a_stream_stops_its_relay(fake):
    relay, _, _ = setup(fake, THINK, family="qwen3")
    for host in fake.hosts.values():
        host.chunk_delay_s = 0.05  # the whole relay takes seconds
    gen = relay.stream(QUESTION, max_tokens=500)
    role, _ = next(gen)
    assert role == "large"
    gen.close()  # the caller is gone
    time.sleep(0.5)  # the turn in flight ends at once
    sent = sum(len(h.requests) for h in fake.hosts.values())
    time.sleep(1.5)
    assert sum(len(h.requests) for h in fake.hosts.values()) == sent == 1  # no turn after the first


def test_a_stream_hears_the_text_the_relay_inserts(fake):
    # thinking reaches its budget: the relay closes it itself, and a listener must see that too
    # (serve's stream splits reasoning from the answer at it)
    relay, _, _ = setup(fake, THINK.split("</think>")[0] * 4, family="qwen3")
    items = list(relay.stream(QUESTION, max_tokens=40))
    result = items[-1][1]
    deltas = items[:-1]
    assert ("inserted", "\n</think>\n\n") in deltas
    assert "".join(d for _, d in deltas) == result.text

"""`protocol="reference"` on the SGLang doubles: one test per behaviour of the reference
implementation (jiwonsong-dev/RelayGen on vLLM; docs/fidelity.md) that the protocol reproduces.

The reference re-renders every request after its first from text, so requests are not
prefixes of each other: these doubles run a Script (tests/doubles.py), a model that writes
one token stream in order whatever it is sent, shared by both hosts (one conversation)."""

from __future__ import annotations

import pytest
from doubles import LARGE, QUESTION, SMALL, Script

from relaygen_sgl.api import Relay
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.reference import continued, math_prompt

EOS = "<EOS>"  # in a script: the model writes its EOS token here


def scripted(fake, script: str, cues=("Therefore",), family="qwen3") -> Relay:
    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    profile = CueProfile(name="t", models={}, cues=tuple(cues)).validate()
    relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, profile=profile, family=family,
                  client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport, prefetch="off")
    ids: list[int] = []
    for i, piece in enumerate(script.split(EOS)):
        ids += ([fake.eos_id] if i else []) + relay.tokenizer.encode(piece)
    model = Script(ids, fake.eos_id)
    for host in fake.hosts.values():
        host.model = model
    return relay


def model_turns(res):
    return [s for s in res.segments if s.role in ("large", "small")]


def test_a_substring_cue_inside_a_word_ends_a_large_turn(fake):
    text = "First we add the numbers so that I know it is 5. Done.</think>\n\n5" + EOS
    res = scripted(fake, text, cues=("now",)).run(QUESTION, max_tokens=200, protocol="reference")
    first = res.segments[0]
    assert first.role == "large" and first.finish == "stop" and first.matched == "now"
    assert first.text.endswith("I know")  # "now" inside "know", as vLLM's stop strings match
    assert res.segments[1].role == "small"


def test_now_ends_a_turn_before_now_comma_completes(fake):
    # the reference's Qwen3 list holds "Now" (4th) before "Now," (16th): the first stop string
    # found ends the turn, so "Now," never completes; our word matching prefers "Now,"
    text = "First we add the numbers 2 and 3. Now, the sum is 5. Done.</think>\n\n5" + EOS
    ref = scripted(fake, text, cues=("Now", "Now,")).run(QUESTION, max_tokens=200, protocol="reference")
    assert ref.segments[0].matched == "Now" and ref.segments[0].text.endswith("3. Now")
    fake.hosts.clear()
    ours = scripted(fake, text, cues=("Now", "Now,")).run(QUESTION, max_tokens=200)
    assert ours.segments[0].matched == "Now," and ours.segments[0].text.endswith("Now,")


def test_no_eos_and_no_cue_in_a_large_turns_first_5_tokens(fake):
    # a cue and an EOS inside the first 5 tokens: vLLM's min_tokens=5 holds back both
    text = "Therefore" + EOS + " we add the numbers. Therefore it is 5.</think>\n\n5" + EOS
    relay = scripted(fake, text)
    res = relay.run(QUESTION, max_tokens=200, protocol="reference")
    first = res.segments[0]
    assert first.role == "large" and first.finish == "stop" and first.matched == "Therefore"
    assert first.text == "Therefore we add the numbers. Therefore"  # the first cue passed over, the EOS skipped
    assert first.completion_tokens > 5
    large_reqs = [r["sampling_params"] for r in fake.hosts["large.test:1"].requests]
    assert large_reqs[0]["min_new_tokens"] == 5  # SGLang's min_new_tokens masks EOS, as vLLM's min_tokens
    assert all("min_new_tokens" not in r["sampling_params"] for r in fake.hosts["small.test:2"].requests)


def test_eos_in_thinking_asks_the_same_role_and_an_empty_reply_closes_with_think_end(fake):
    text = ("First we add the numbers" + EOS + " two and three. Therefore" + " it is five" + EOS + EOS
            + "The answer is 5." + EOS)
    res = scripted(fake, text).run(QUESTION, max_tokens=200, protocol="reference")
    turns = [(s.role, s.finish, s.text) for s in res.segments]
    assert turns[0][:2] == ("large", "eos") and turns[1][0] == "large"  # the large model again
    assert turns[1][1:] == ("stop", " two and three. Therefore")
    assert turns[2] == ("small", "eos", " it is five")
    assert turns[3] == ("small", "eos", "")  # asked again: an empty reply
    assert turns[4] == ("inserted", "inserted", "\n</think>")  # nothing after it, unlike ours
    assert turns[5][0] == "small" and res.answer == "The answer is 5."


def test_the_math_prompt_bytes_equal_the_references_rendered_string(fake):
    relay = scripted(fake, "x" + EOS)
    # the reference's template is a non-raw Python string: its "\b" is a backspace
    rendered = ("\n        {problem}\n        Please reason step by step, and put your final answer within "
                "\boxed{{}}.\n        ")
    want = rendered.format(problem=QUESTION)
    assert "\x08oxed{}" in want and math_prompt(QUESTION) == want
    prompt = relay.plan("relay", protocol="reference").render(QUESTION)
    # qwen3_modified.jinja: no system prompt; the first request's empty assistant turn, then the generation prompt
    assert prompt == ("<|im_start|>user\n" + want + "<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
                      "<|im_start|>assistant\n")
    # the one-model baseline's single request has no empty assistant turn
    assert relay.plan("single-large", protocol="reference").render(QUESTION) == (
        "<|im_start|>user\n" + want + "<|im_end|>\n<|im_start|>assistant\n")


def test_r1_renders_a_literal_backslash_n_after_think_and_continuations_drop_it(fake):
    text = "Okay, we add the numbers. Therefore it is five. Done.</think>\n\n5" + EOS
    relay = scripted(fake, text, family="r1")
    res = relay.run(QUESTION, max_tokens=200, protocol="reference")
    sent = [relay.tokenizer.decode(r["input_ids"], skip_special=False) for r in fake.hosts["large.test:1"].requests]
    assert sent[0].endswith("<｜Assistant｜><｜end▁of▁sentence｜><｜Assistant｜><think>\\n")  # backslash, n
    later = [relay.tokenizer.decode(r["input_ids"], skip_special=False)
             for h in fake.hosts.values() for r in h.requests][1:]
    assert later and all("<think>" not in t for t in later)
    assert all(t.startswith("<｜begin▁of▁sentence｜><｜User｜>" + math_prompt(QUESTION) + "<｜Assistant｜>Okay")
               for t in later)
    assert res.answer == "5"


def test_the_budget_is_shared_and_a_run_that_spends_it_thinking_has_no_answer(fake):
    text = "First we add the numbers two and three and then we add more numbers" + EOS
    ours = scripted(fake, text).run(QUESTION, max_tokens=12)
    assert ours.answer != "" and "kept for the answer" in ours.extra["note"]
    fake.hosts.clear()
    ref = scripted(fake, text).run(QUESTION, max_tokens=12, protocol="reference")
    assert ref.stats.finish == "budget" and ref.answer == ""
    assert ref.segments[-1].text == "\n</think>"
    assert "share the 12-token budget" in ref.extra["note"] and ref.extra["protocol"] == "reference"
    assert any("\\boxed" in line and "backspace" in line for line in ref.extra["reference"])


def test_continue_final_message_drops_trailing_space_only_after_leading_space():
    assert continued("So ") == "So "
    assert continued("\nSo ") == "\nSo"
    assert continued("\n\nabc.\n\n") == "\n\nabc."


def test_the_reference_takes_no_answer_reserve(fake):
    relay = scripted(fake, "x" + EOS)
    with pytest.raises(ConfigError, match="no answer reserve"):
        relay.plan("relay", protocol="reference", answer_reserve=64)
    with pytest.raises(ConfigError, match="protocol must be one of"):
        relay.plan("relay", protocol="vllm")


def test_a_stop_cut_inside_a_token_streams_the_cut_text(fake):
    # "So " completes only with the next token (" we"): vLLM cuts the text after "So "
    text = "First we add the numbers 2 and 3. So we get 5. Done.</think>\n\n5" + EOS
    relay = scripted(fake, text, cues=("So ",))
    items = list(relay.stream(QUESTION, max_tokens=200, protocol="reference"))
    res = items[-1][1]
    first = res.segments[0]
    assert first.matched == "So " and first.text.endswith("3. So ")
    assert res.segments[1].role == "small" and not res.segments[1].text.startswith("we")
    streamed = "".join(d for r, d in items[:-1] if r in ("large", "small"))
    assert streamed == "".join(s.text for s in res.segments if s.role in ("large", "small"))

"""Seeded sampling (relaygen_sgl.runtime.seeding) on the real cpu-tiny pair: the same seed gives the
same tokens however the request reaches the server. Needs --enable-custom-logit-processor
in the cpu-tiny preset's args."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.runtime import seeding
from relaygen_sgl.runtime.seeding import SeedSupport, processor_str, seeded_fields, server_supports_seeding

pytestmark = pytest.mark.integration

N = 64
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 20, "max_new_tokens": N, "ignore_eos": True}
# SmolLM2 chat prompts as token ids (the relay sends input_ids), apply_chat_template of
# "Describe a walk through a forest after the rain." and "List five uses for a paperclip."
_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
           8182, 2, 198, 1, 4093, 198]
_ASSISTANT = [2, 198, 1, 520, 9531, 198]
PROMPT = _SYSTEM + [37964, 253, 4549, 738, 253, 3150, 990, 260, 5249, 30] + _ASSISTANT
OTHER = _SYSTEM + [6106, 2531, 2925, 327, 253, 1941, 14194, 30] + _ASSISTANT


def seeded(client: EngineClient, ids: list[int], seed: int, *, stream: bool = False, **over):
    sampling = dict(SAMPLING, **over)
    extra, add = seeded_fields(seed, sampling)
    sampling.update(add)
    return client.generate(ids, sampling, extra=extra or None, on_tokens=(lambda *_: None) if stream else None)


@pytest.fixture(scope="module")
def clients(cpu_pair):
    with EngineClient(cpu_pair.large) as large, EngineClient(cpu_pair.small) as small:
        yield large, small


@pytest.fixture(scope="module")
def reference(clients):
    """The seed-5 generation on the large server, prefilled from scratch."""
    large, _ = clients
    large.flush_cache(timeout_s=60)
    ref = seeded(large, PROMPT, 5)
    assert ref.cached_tokens == 0 and len(ref.output_ids) == N
    return ref.output_ids


def test_both_servers_support_seeding(clients):
    for c in clients:
        info = c.server_info()
        assert server_supports_seeding(info), {k: info.get(k) for k in (
            "enable_custom_logit_processor", "speculative_algorithm", "enable_watermark")}


def test_same_seed_same_tokens_streamed_and_with_the_prefix_cached(clients, reference):
    large, _ = clients
    again = seeded(large, PROMPT, 5, stream=True)
    assert again.cached_tokens > 0
    assert again.output_ids == reference


def test_same_tokens_while_another_request_shares_the_batch(clients, reference):
    large, _ = clients
    done: dict[str, object] = {}
    other = threading.Thread(target=lambda: done.setdefault("g", large.generate(
        OTHER, dict(SAMPLING, max_new_tokens=2 * N))))
    other.start()
    try:
        during = seeded(large, PROMPT, 5)
    finally:
        other.join()
    assert during.output_ids == reference
    assert done["g"].completion_tokens == 2 * N  # type: ignore[attr-defined]


def test_another_seed_gives_another_output(clients, reference):
    large, _ = clients
    assert seeded(large, PROMPT, 6).output_ids != reference


def test_a_continuation_on_either_server_samples_the_same_tokens(clients, reference):
    """As the relay hands off: prefix = prompt + output so far, resent as input_ids. Both
    cpu-tiny roles run the same model, so the other server continues identically too."""
    for c in clients:
        for k in (1, 23, 50):
            cont = seeded(c, PROMPT + reference[:k], 5, max_new_tokens=N - k)
            assert cont.output_ids == reference[k:], (c.url, k)


def test_greedy_is_left_alone(clients):
    large, _ = clients
    assert seeded_fields(5, dict(SAMPLING, temperature=0.0)) == ({}, {})
    plain = large.generate(PROMPT, dict(SAMPLING, temperature=0.0, max_new_tokens=24))
    forced = large.generate(PROMPT, dict(SAMPLING, temperature=0.0, max_new_tokens=24, custom_params={"seed": 5}),
                            extra={"custom_logit_processor": processor_str()})
    assert forced.output_ids == plain.output_ids


def test_the_probe_tells_a_seeded_answer_from_an_unseeded_one(clients):
    """SeedSupport's probe on the real servers: with the processor the token comes back with
    logprob 0 (SGLang's logprobs come from the processor's row), without it the model's own."""
    seeds = SeedSupport()
    for c in clients:
        assert seeds.mode(c) == "processor", c.url
    large, _ = clients
    plain = [large.generate([0], {"max_new_tokens": 1, "temperature": 1.0}, extra={"return_logprob": True})
             for _ in range(4)]
    assert all(g.meta["output_token_logprobs"][0][0] < -1e-4 for g in plain)


def test_sixteen_threads_sending_their_first_seeded_requests_print_nothing(clients, monkeypatch, capfd):
    """Each thread builds its request's processor string at once (it used to be dill.dumps, which
    swaps sys.stdout around `dis`); the server runs what they send."""
    large, _ = clients
    monkeypatch.setattr(seeding, "_processor", None)
    stdout = sys.stdout
    barrier = threading.Barrier(16)

    def first(seed):
        barrier.wait()
        return seeded(large, PROMPT, seed, max_new_tokens=4).output_ids

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(first, [5] * 8 + [6] * 8))
    assert sys.stdout is stdout and capfd.readouterr().out == ""
    assert len({tuple(o) for o in outs[:8]}) == 1 and len({tuple(o) for o in outs[8:]}) == 1

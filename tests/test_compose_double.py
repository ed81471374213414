"""The routing backend as an SGLang backend, on the doubles: plain programs (no route),
select, fork, streaming, run_batch; errors carry the partial trajectory."""

from __future__ import annotations

import pytest
import sglang as sgl
from doubles import ANSWER, LARGE, QUESTION, SMALL

from relaygen_sgl import program as rg
from relaygen_sgl.api import close, connect
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.errors import RelayAborted
from relaygen_sgl.runtime.trajectory import KEY


@sgl.function
def plain(s, question, branches=2):
    rg.prompt(s, question)
    s += sgl.gen("first", max_tokens=6, temperature=0)
    s += sgl.select("pick", choices=[" Then", " Zebra"])
    forks = s.fork(branches)
    forks[1]["route"] = "small"
    for f in forks:
        f += sgl.gen("more", max_tokens=4, temperature=0)
    forks.join()
    return [forks[i].stream_executor.variables[KEY] for i in range(branches)]


def test_gens_without_a_route_go_to_the_large_model_and_select_scores_token_exact(fake, backend):
    state = plain.run(question=QUESTION, backend=backend)
    assert state.error() is None
    large, small = fake.hosts["large.test:1"], fake.hosts["small.test:2"]
    first_gen = next(r for r in large.requests if r.get("stream"))
    assert first_gen["sampling_params"]["max_new_tokens"] == 6
    assert not [r for r in small.requests if r.get("stream") and r["sampling_params"]["max_new_tokens"] == 6]
    # " Then" continues the tape; the double's model is sure of it
    assert state["pick"] == " Then"
    scored = [r for r in large.requests if r.get("return_logprob")]
    assert len(scored) == 2 and all(r["logprob_start_len"] == len(r["input_ids"]) - 1 - len(
        backend.tokenizer.encode(c)) for r, c in zip(scored, [" Then", " Zebra"]))


def test_each_branch_of_a_fork_has_its_own_trajectory_from_a_shared_cached_prefix(fake, backend):
    state = plain.run(question=QUESTION, backend=backend)
    trunk = state.stream_executor.variables[KEY]
    branches = state.ret_value
    assert len({b.sid for b in branches}) == 2 and trunk.sid not in {b.sid for b in branches}
    for b, role in zip(branches, ("large", "small")):
        seg = b.segments[-1]
        assert seg.role == role and b.ids[: len(trunk.ids)] == trunk.ids
        assert seg.prompt_tokens - seg.cached_tokens == 1  # prefilled on both servers before the fork
    prefills = [r for h in fake.hosts.values() for r in h.requests if r["sampling_params"]["max_new_tokens"] == 0
                and not r.get("return_logprob")]
    assert len(prefills) == 2  # once per server, not once per branch


def test_stream_and_text_iter_across_switches(backend):
    from relaygen_sgl.loader import load_program

    state = load_program("relay").run(question=QUESTION, plan=backend.plan(max_tokens=60), backend=backend,
                                      stream=True)
    chunks = list(state.text_iter())
    result = state.ret_value
    assert "".join(chunks) == state.text() and len(chunks) >= 3
    assert {"large", "small"} <= {s.role for s in result.segments}


def test_run_batch(backend):
    states = plain.run_batch([{"question": QUESTION}] * 4, backend=backend, num_threads=4)
    assert [s.error() for s in states] == [None] * 4 and all(s["pick"] == " Then" for s in states)


def test_a_failing_server_gives_the_typed_error_with_the_partial_trajectory(fake, backend):
    from relaygen_sgl.api import Relay

    fake.hosts["large.test:1"].down_after = 1
    r = Relay.__new__(Relay)
    r.backend = backend
    with pytest.raises(RelayAborted) as err:
        r.run(QUESTION, max_tokens=60)
    assert err.value.partial is not None and err.value.partial.segments
    assert "segments" in str(err.value) and "None" not in str(err.value)


def test_with_the_small_server_down_at_start_forks_selects_and_small_routes_run_on_the_large_one(fake):
    fake.add_host(LARGE, [])  # the small server never answers
    be = connect(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3", prefetch="off",
                 client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport)
    try:
        fake.hosts["large.test:1"].tape = (be.tokenizer.encode(be.plan().render(QUESTION))
                                           + be.tokenizer.encode(ANSWER) + [fake.eos_id])
        state = plain.run(question=QUESTION, backend=be)
        assert state.error() is None and state["pick"] == " Then"
        for b in state.ret_value:
            assert b.degraded["from_token"] == 0 and b.segments[-1].role == "large"
        assert b.segments[-1].rerouted_from == "small"  # the branch routed to the small model
    finally:
        close(be)

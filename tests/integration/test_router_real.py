"""Two small replicas behind SGLang's cache-aware router: handoffs keep their prefix cache.

The large role is the session pair's large server (conftest `cpu_pair`), not a second one:
`relaygen up` keeps a server of the preset that is recorded in its home and answers, so its
record (as `up` wrote it in the pair's home) is copied into this module's home first, and `up`
starts only the small replicas and their router (issue 31). At the end this home's `down`
stops those; the large server's record is taken out of this home's state first, so the pair
keeps its large server for the tests after this module."""

from __future__ import annotations

import dataclasses

import pytest
from paths import REAL_MODELS

from relaygen_sgl.api import Relay
from relaygen_sgl.core.config import Settings, load_preset
from relaygen_sgl.core.state import read_state, write_state
from relaygen_sgl.servers import stack
from relaygen_sgl.servers.processes import answers_generation, is_ours

pytestmark = pytest.mark.integration
# not the question other modules run on the pair: the large server's radix cache must hold
# only this module's trajectories, or a later large turn finds more of itself cached than it wrote
QUESTION = "Sara has 4 pens and buys 6 more. Then she loses 3. How many pens does she have? Explain step by step."
# seed 1 first: on this question its trajectory hands off early (3 checks in one run of 96 tokens
# on this machine); the others in case numerics differ elsewhere
SEEDS = (1, 2, 3, 0)
MAX_TOKENS = 96  # a quarter kept for the answer (the small model's turn after the inserted text)
SMALL_SHIFT = 500  # the router on the preset's small port + 500, its replicas at + 200 + 10 i from there


def _without_large(settings: Settings) -> None:
    """This home's state without the pair's large server, so that `down` here leaves it running."""
    state = read_state(settings)
    if state:
        state.pop("malformed", None)
        write_state(settings, {**state, "servers": [r for r in state["servers"] if r["role"] != "large"]})


@pytest.fixture(scope="module")
def routed(cpu_pair, tmp_path_factory):
    pair_state = read_state(cpu_pair.settings)
    large = next(r for r in pair_state["servers"] if r["role"] == "large")
    preset = load_preset("cpu-tiny")
    roles = {"large": dataclasses.replace(preset.roles["large"], port=large["port"]),
             "small": dataclasses.replace(preset.roles["small"], port=preset.roles["small"].port + SMALL_SHIFT)}
    preset = dataclasses.replace(preset, roles=roles)
    settings = Settings(home=tmp_path_factory.mktemp("routed-home"), models_override=REAL_MODELS)
    write_state(settings, {"preset": preset.name, "started": pair_state["started"], "host": pair_state["host"],
                           "api_key": False, "servers": [large]})
    try:
        st = stack.up(preset, settings, replicas={"small": 2}, kv_tokens=8192)
        yield st, large
    finally:
        _without_large(settings)
        if read_state(settings):
            stack.down(settings)
    assert is_ours(large) and answers_generation(large["url"], timeout_s=30), \
        "the pair's large server should outlive this module"


def test_status_covers_router_and_replicas(routed):
    st, _ = routed
    assert st["small"]["kind"] == "router" and len(st["small"]["replicas"]) == 2
    assert st["small"]["healthy"] and st["large"]["healthy"] and "replicas" not in st["large"]


def test_up_kept_the_pairs_large_server_and_started_only_the_small_replicas_and_router(routed):
    st, large = routed
    assert st["kept"] == [{"role": "large", "kind": "server", "port": large["port"], "pid": large["pid"]}]
    assert st["large"]["pid"] == large["pid"] and st["large"]["url"] == large["url"]
    assert sorted((s["role"], s["kind"], s["why"]) for s in st["started"]) == \
        [("small", "router", "missing"), ("small", "server", "missing"), ("small", "server", "missing")]


def test_handoffs_through_the_router_reprefill_only_the_other_roles_tokens(routed):
    st, _ = routed
    with Relay(preset="cpu-tiny", large=st["large"]["url"], small=st["small"]["url"]) as r:
        checked = 0
        for seed in SEEDS:
            # no prefetch: the floor exactly (auto's closing send would leave the next turn less)
            res = r.run(QUESTION, max_tokens=MAX_TOKENS, seed=seed, prefetch="off")
            last_end: dict[str, int] = {}
            last_cut: dict[str, int] = {}
            pos = 0
            for seg in res.segments:
                if seg.role in last_end:
                    added = pos - last_end[seg.role]
                    assert seg.reprefilled == added + (0 if last_cut[seg.role] else 1), (seed, seg.role)
                    checked += 1
                pos += len(seg.token_ids)
                if seg.role in ("large", "small"):
                    last_end[seg.role], last_cut[seg.role] = pos, seg.discarded_tokens
            if checked >= 3:
                break
    assert checked >= 1

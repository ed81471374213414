"""Two small replicas behind SGLang's cache-aware router: handoffs keep their prefix cache."""

from __future__ import annotations

import dataclasses

import pytest
from paths import REAL_MODELS

from relaygen_sgl.api import Relay
from relaygen_sgl.core.config import Settings, load_preset
from relaygen_sgl.servers import stack

pytestmark = pytest.mark.integration
QUESTION = "Tom has 3 apples and buys 5 more. Then he gives 2 away. How many apples does he have? Explain step by step."


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    preset = load_preset("cpu-tiny")
    roles = {r: dataclasses.replace(s, port=s.port + 500) for r, s in preset.roles.items()}
    preset = dataclasses.replace(preset, roles=roles)
    settings = Settings(home=tmp_path_factory.mktemp("routed-home"), models_override=REAL_MODELS)
    st = stack.up(preset, settings, replicas={"small": 2}, kv_tokens=8192)
    yield settings, st
    stack.down(settings)


def test_status_covers_router_and_replicas(routed):
    settings, st = routed
    assert st["small"]["kind"] == "router" and len(st["small"]["replicas"]) == 2
    assert st["small"]["healthy"] and st["large"]["healthy"] and "replicas" not in st["large"]


def test_handoffs_through_the_router_reprefill_only_the_other_roles_tokens(routed):
    _, st = routed
    with Relay(preset="cpu-tiny", large=st["large"]["url"], small=st["small"]["url"]) as r:
        checked = 0
        for seed in range(4):
            res = r.run(QUESTION, max_tokens=200, seed=seed)
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

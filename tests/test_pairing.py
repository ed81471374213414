"""The served models checked against a preset, or used to pick family and profile (doubles)."""

from __future__ import annotations

import pytest
from doubles import LARGE, SMALL

from relaygen_sgl.api import Relay
from relaygen_sgl.core.cues import CueProfile
from relaygen_sgl.core.errors import ConfigError


def pair(fake, large_model: str | None = None, small_model: str | None = None):
    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    if large_model:
        fake.model_paths["large.test:1"] = large_model
    if small_model:
        fake.model_paths["small.test:2"] = small_model


def test_a_preset_that_does_not_match_the_served_models_is_refused_naming_both(fake):
    pair(fake)
    with pytest.raises(ConfigError) as err:
        Relay(preset="qwen3-32b-1.7b", large=LARGE, small=SMALL, transport=fake.transport)
    msg = str(err.value)
    assert "smollm2-135m-instruct" in msg and "Qwen/Qwen3-32B" in msg and "Qwen/Qwen3-1.7B" in msg
    assert "\n" not in msg


def test_without_a_preset_the_pair_is_detected_from_what_it_serves(fake):
    pair(fake)
    with Relay(large=LARGE, small=SMALL, transport=fake.transport) as r:
        assert r.preset.name == "cpu-tiny" and r.family.name == "smollm2" and r.profile.name == "cpu-tiny"
    fake.hosts.clear()
    pair(fake, "/srv/models/Qwen3-32B", "/srv/models/Qwen3-1.7B")  # local copies of the published pair
    with Relay(large=LARGE, small=SMALL, transport=fake.transport) as r:
        assert r.preset.name == "qwen3-32b-1.7b" and r.family.name == "qwen3"


def test_an_unknown_pair_gets_its_family_and_asks_for_a_profile(fake):
    pair(fake, "Qwen/Qwen3-14B", "Qwen/Qwen3-4B")  # a same-family pair no preset serves
    with pytest.raises(ConfigError, match="--profile"):
        Relay(large=LARGE, small=SMALL, transport=fake.transport)
    mine = CueProfile(name="mine", models={}, cues=("Therefore",)).validate()
    with Relay(large=LARGE, small=SMALL, profile=mine, transport=fake.transport) as r:
        assert r.preset is None and r.family.name == "qwen3" and r.profile.name == "mine"
    fake.hosts.clear()
    pair(fake, "acme/Mystery-7B", "acme/Mystery-1B")
    with pytest.raises(ConfigError, match="cannot tell the model family"):
        Relay(large=LARGE, small=SMALL, transport=fake.transport)

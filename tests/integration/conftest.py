"""A real cpu-tiny pair (two SGLang servers on the CPU) for the whole session.

It runs on the preset's ports + 100, so the CLI tests can use the preset's own ports."""

from __future__ import annotations

import dataclasses

import pytest
from paths import REAL_MODELS
from shared_pair import Pair, alive, pair_problem

from relaygen_sgl.core.config import Settings, load_preset
from relaygen_sgl.servers import stack

PORT_SHIFT = 100


@pytest.fixture(autouse=True)
def shared_pair_is_up(request):
    """Before every test on the shared pair: both servers alive and answering, else the test
    fails at once, naming the server, instead of timing out on requests to it."""
    if "cpu_pair" in request.fixturenames:
        problem = pair_problem(request.getfixturevalue("cpu_pair"))
        if problem:
            pytest.fail(problem, pytrace=False)
    yield


@pytest.fixture(scope="session")
def cpu_pair(tmp_path_factory) -> Pair:
    if not (REAL_MODELS / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.fail(f"no built model under {REAL_MODELS}: run `relaygen models fetch --preset cpu-tiny` "
                    "(make test does)")
    preset = load_preset("cpu-tiny")
    roles = {r: dataclasses.replace(s, port=s.port + PORT_SHIFT) for r, s in preset.roles.items()}
    preset = dataclasses.replace(preset, roles=roles)
    settings = Settings(home=tmp_path_factory.mktemp("pair-home"), models_override=REAL_MODELS)
    # keyless (`up --no-api-key`; loopback): the tests on the pair talk to it with bare clients;
    # the default, keyed `up` is tests/integration/test_stack_cli_real.py's
    st = stack.up(preset, settings, keyless=True)
    pair = Pair(settings, st["large"]["url"], st["small"]["url"], (st["large"]["pid"], st["small"]["pid"]))
    yield pair
    stack.down(settings)
    assert not [p for p in pair.pids if alive(p)], "down left a server process behind"

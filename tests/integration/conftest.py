"""A real cpu-tiny pair (two SGLang servers on the CPU) for the whole session.

It runs on the preset's ports + 100, so the CLI tests can use the preset's own ports."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from paths import REAL_MODELS

from relaygen_sgl.core.config import Settings, load_preset
from relaygen_sgl.servers import stack

PORT_SHIFT = 100


@dataclass(frozen=True)
class Pair:
    settings: Settings
    large: str
    small: str
    pids: tuple[int, ...]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture(scope="session")
def cpu_pair(tmp_path_factory) -> Pair:
    if not (REAL_MODELS / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.fail(f"no built model under {REAL_MODELS}: run `relaygen models fetch --preset cpu-tiny` "
                    "(make test does)")
    preset = load_preset("cpu-tiny")
    roles = {r: dataclasses.replace(s, port=s.port + PORT_SHIFT) for r, s in preset.roles.items()}
    preset = dataclasses.replace(preset, roles=roles)
    settings = Settings(home=tmp_path_factory.mktemp("pair-home"), models_override=REAL_MODELS)
    st = stack.up(preset, settings)
    pair = Pair(settings, st["large"]["url"], st["small"]["url"], (st["large"]["pid"], st["small"]["pid"]))
    yield pair
    stack.down(settings)
    assert not [p for p in pair.pids if _alive(p)], "down left a server process behind"

"""The shared cpu pair's record and the check made before each test on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from relaygen_sgl.core.config import Settings


@dataclass(frozen=True)
class Pair:
    settings: Settings
    large: str
    small: str
    pids: tuple[int, ...]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def pair_problem(pair: Pair, timeout_s: float = 5.0) -> str | None:
    """Why the shared pair cannot serve the next test (a server process gone, or its HTTP
    server not answering within `timeout_s`), or None when both are up."""
    for role, pid, url in (("large", pair.pids[0], pair.large), ("small", pair.pids[1], pair.small)):
        if not alive(pid):
            return f"the shared cpu pair's {role} server (pid {pid}) is dead: an earlier test left it so"
        try:
            # /model_info answers from the HTTP process; /health would generate a token each time
            status = httpx.get(f"{url}/model_info", timeout=timeout_s).status_code
        except httpx.HTTPError as e:
            return f"the shared cpu pair's {role} server ({url}) does not answer: {type(e).__name__}: {e}"
        if status != 200:
            return f"the shared cpu pair's {role} server ({url}) answers /model_info with {status}"
    return None

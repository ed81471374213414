"""relaygen-sgl: RelayGen (large/small model switching at switch cues) as an SGLang program.

Heavy imports (sglang, transformers) are deferred until first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Relay", "RelayResult", "relay", "stream_relay"]


def __getattr__(name: str) -> Any:
    if name in ("Relay", "relay", "stream_relay"):
        from . import api

        return getattr(api, name)
    if name == "RelayResult":
        from .result import RelayResult

        return RelayResult
    raise AttributeError(name)

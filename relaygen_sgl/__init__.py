"""relaygen-sgl: RelayGen (large/small model switching at switch cues) as an SGLang program.

`connect(...)` gives the routing backend any @sgl.function runs on; `relaygen_sgl.program`
holds the relay as a building block of such programs; `Relay` runs the bundled ones.
Heavy imports (sglang, transformers) are deferred until first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Relay", "RelayResult", "RunSettings", "connect", "relay", "stream_relay"]


def __getattr__(name: str) -> object:
    if name in ("Relay", "connect", "relay", "stream_relay"):
        from relaygen_sgl import api

        return getattr(api, name)
    if name == "RunSettings":
        from relaygen_sgl.core.run_settings import RunSettings

        return RunSettings
    if name == "RelayResult":
        from relaygen_sgl.core.result import RelayResult

        return RelayResult
    raise AttributeError(name)

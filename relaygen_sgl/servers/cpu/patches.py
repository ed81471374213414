"""Which patches of SGLang's CPU compute exist, and how one is applied.

The CPU shim's sitecustomize (relaygen_sgl/servers/cpu/shim) reads this table in every CPU server
process and applies an entry when SGLang imports its module, if the process's environment
sets the entry's variable to its value (the CPU presets set them, presets.toml says why).
Each wrapper keeps what it replaces as `__wrapped__` and hands it every case it leaves alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Patch:
    variable: str
    value: str
    cls: str  # the class in SGLang's module
    attribute: str  # the method replaced
    wrapper: str  # "module:function", called with the original, returns the replacement


PATCHES = {
    "sglang.srt.layers.attention.torch_native_backend": Patch(
        "RELAYGEN_EXTEND_ATTENTION", "new-rows", "TorchNativeAttnBackend", "_run_sdpa_forward_extend",
        "relaygen_sgl.servers.cpu.attention:extend_new_rows"),
    "sglang.srt.layers.quantization.unquant": Patch(
        "RELAYGEN_LINEAR", "few-rows-fastest", "UnquantizedLinearMethod", "apply",
        "relaygen_sgl.servers.cpu.linear:few_rows_fastest"),
}


def wanted(environ: Mapping[str, str]) -> dict[str, Patch]:
    """The patches this environment asks for, by the SGLang module they patch."""
    return {mod: p for mod, p in PATCHES.items() if environ.get(p.variable) == p.value}


def apply(patch: Patch, target: Any) -> None:
    """Replace `target`'s method by the patch's wrapper of it (once)."""
    current = getattr(target, patch.attribute)
    if getattr(current, "__wrapped__", None) is None:
        module, name = patch.wrapper.split(":")
        setattr(target, patch.attribute, getattr(importlib.import_module(module), name)(current))

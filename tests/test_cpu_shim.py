"""The CPU shim's sitecustomize: each patch reaches a fresh server-like interpreter only
when the preset's environment asks for it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from relaygen_sgl.core.config import cpu_shim_dir
from relaygen_sgl.servers.cpu.patches import PATCHES, apply, wanted

PROBE = ("import sglang.srt.layers.attention.torch_native_backend as a, sglang.srt.layers.quantization.unquant as u; "
         "print(hasattr(a.TorchNativeAttnBackend._run_sdpa_forward_extend, '__wrapped__'), "
         "hasattr(u.UnquantizedLinearMethod.apply, '__wrapped__'))")


@pytest.mark.parametrize("attention,linear", [("new-rows", "few-rows-fastest"), ("new-rows", ""),
                                              ("", "few-rows-fastest"), ("", ""), ("other", "other")])
def test_each_patch_only_when_the_preset_asks(attention, linear):
    # a fresh interpreter with the shim on its path, as launcher.server_command starts a CPU server
    env = dict(os.environ, PYTHONPATH=str(cpu_shim_dir()), RELAYGEN_EXTEND_ATTENTION=attention,
               RELAYGEN_LINEAR=linear)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"{attention == 'new-rows'} {linear == 'few-rows-fastest'}"


@pytest.mark.parametrize("module", sorted(PATCHES))
def test_a_patch_is_applied_once_and_keeps_sglangs_method(module):
    patch = PATCHES[module]
    sglangs = getattr(importlib.import_module(module), patch.cls).__dict__[patch.attribute]
    target = type("Target", (), {patch.attribute: sglangs})
    apply(patch, target)
    first = target.__dict__[patch.attribute]
    apply(patch, target)
    assert target.__dict__[patch.attribute] is first and first.__wrapped__ is sglangs


def test_the_environment_picks_the_patches():
    assert wanted({}) == {}
    both = {p.variable: p.value for p in PATCHES.values()}
    assert wanted(both) == PATCHES
    linear = "sglang.srt.layers.quantization.unquant"
    assert wanted(dict(both, RELAYGEN_LINEAR="other")).keys() == PATCHES.keys() - {linear}

from __future__ import annotations

import json
import os
import tomllib

import pytest

from relaygen_sgl.core.config import ROLES, cpu_shim_dir, data_path, load_preset, load_settings, preset_names
from relaygen_sgl.core.cues import available_profiles, load_profile
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.servers.launch import server_command


def test_all_presets_load_keep_the_radix_cache_and_use_lpm():
    names = preset_names()
    assert {"cpu-tiny", "cpu-tiny-pruned", "qwen3-32b-1.7b", "qwen3-32b-1.7b-eagle3", "qwen3-32b-standalone-1.7b",
            "r1-32b-1.5b"} <= set(names)
    for name in names:
        preset = load_preset(name)
        for spec in preset.roles.values():
            assert "--disable-radix-cache" not in spec.args
            assert {"--incremental-streaming-output", "--enable-cache-report",
                    "--enable-custom-logit-processor"} <= set(spec.args), name
            i = spec.args.index("--schedule-policy")
            assert spec.args[i + 1] == "lpm"
        load_profile(preset.profile)


def test_gpu_presets_follow_the_paper_setting():
    q = load_preset("qwen3-32b-1.7b")
    assert q.roles["large"].model == "Qwen/Qwen3-32B" and q.roles["small"].model == "Qwen/Qwen3-1.7B"
    assert q.roles["large"].args[q.roles["large"].args.index("--tp") + 1] == "2"
    assert q.roles["small"].args[q.roles["small"].args.index("--tp") + 1] == "1"
    assert (q.roles["large"].gpus, q.roles["small"].gpus) == (2, 1)
    e = load_preset("qwen3-32b-1.7b-eagle3").roles["large"].args
    assert e[e.index("--speculative-algorithm") + 1] == "EAGLE3"
    assert e[e.index("--speculative-draft-model-path") + 1] == "AngelSlim/Qwen3-32B_eagle3"
    r1 = load_preset("r1-32b-1.5b")
    assert "R1-Distill-Qwen-32B" in r1.roles["large"].model and "1.5B" in r1.roles["small"].model


def test_the_cpu_shim_goes_on_cpu_servers_only():
    settings = load_settings()
    cpu = server_command(load_preset("cpu-tiny"), "large", settings)
    assert "servers/cpu/shim" in cpu.env["PYTHONPATH"] and cpu.env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert "--model-path" in cpu.argv and str(settings.models_dir) in " ".join(cpu.argv)
    gpu = server_command(load_preset("qwen3-32b-1.7b"), "large", settings)
    assert "PYTHONPATH" not in gpu.env


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-tiny-pruned"])
def test_cpu_servers_start_with_the_measured_thread_policy(name):
    """Two CPU servers on 2 cores: one OpenMP thread each, so they use a core each rather than
    fight over both (README, CPU thread policy)."""
    settings = load_settings()
    large = server_command(load_preset(name), "large", settings).env
    small = server_command(load_preset(name), "small", settings).env
    assert large["OMP_NUM_THREADS"] == small["OMP_NUM_THREADS"] == "1"
    assert large["GOMP_SPINCOUNT"] == "10000" and small["OMP_WAIT_POLICY"] == "PASSIVE"  # as measured
    # and the CPU compute patches (relaygen_sgl/cpu_attention.py, cpu_linear.py)
    assert large["RELAYGEN_EXTEND_ATTENTION"] == small["RELAYGEN_EXTEND_ATTENTION"] == "new-rows"
    assert large["RELAYGEN_LINEAR"] == small["RELAYGEN_LINEAR"] == "few-rows-fastest"
    assert str(cpu_shim_dir()) in large["PYTHONPATH"].split(os.pathsep)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of cpu-tiny"):
        load_preset("nope")


def test_published_cue_lists():
    assert len(load_profile("qwen3-32b-1.7b").cues) == 28
    assert len(load_profile("r1-32b-1.5b").cues) == 25
    cands = json.loads(data_path("cue_candidates.json").read_text())["cues"]
    assert len(cands) == 91 and len(set(cands)) == 91
    for name in available_profiles():
        assert set(load_profile(name).cues) <= set(cands)


# presets of a published pair's models that are not the paper's setup: their reports show the pair's
# numbers marked as another setup (jobs/evaluate.py published_for)
NOT_THE_PAPERS = {"qwen3-32b-standalone-1.7b": "STANDALONE draft-model speculation, which the paper did not run"}


def test_published_pairs_list_every_preset_of_their_models():
    def models(name: str) -> tuple[str | None, ...]:
        return tuple(load_preset(name).roles[role].model for role in ROLES)

    pairs = tomllib.loads(data_path("published.toml").read_text(encoding="utf-8"))["pairs"]
    for key, pair in pairs.items():
        listed = set(pair["presets"])
        assert listed <= set(preset_names()), key
        assert {load_preset(name).family for name in listed} <= {pair["family"]}, key
        pair_models = {models(name) for name in listed}
        assert len(pair_models) <= 1, (key, pair_models)  # one pair of models
        same = {name for name in preset_names() if models(name) in pair_models} - set(NOT_THE_PAPERS)
        assert listed == same, (key, sorted(same - listed))


def test_a_profile_file_with_a_bad_cue_is_refused(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"name": "x", "cues": ["Thus", " bad"]}))
    with pytest.raises(ConfigError, match="invalid cue"):
        load_profile(str(p))
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile("no-such-profile")


def test_launch_serve_sh_builds_the_same_command_as_up():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run([str(root / "launch" / "serve.sh"), "small", "cpu-tiny"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sglang.launch_server" in out.stderr and "--port 30001" in out.stderr
    assert "servers/cpu/shim" in out.stderr and "SGLANG_USE_CPU_ENGINE=1" in out.stderr
    # beyond loopback only with a key: the servers run client code (--enable-custom-logit-processor)
    refused = subprocess.run([str(root / "launch" / "serve.sh"), "large", "qwen3-32b-1.7b", "0.0.0.0"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "RELAYGEN_SGLANG_API_KEY" in refused.stderr
    gpu = subprocess.run([str(root / "launch" / "serve.sh"), "large", "qwen3-32b-1.7b", "0.0.0.0"],
                         capture_output=True, text=True, env={**env, "RELAYGEN_SGLANG_API_KEY": "k"}, timeout=60)
    assert "--host 0.0.0.0" in gpu.stderr and "--tp 2" in gpu.stderr and "servers/cpu/shim" not in gpu.stderr
    inside = {**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}  # the first block of the role, inside the user's devices
    for role, devices in (("large", "4,5"), ("small", "6")):
        out = subprocess.run([str(root / "launch" / "serve.sh"), role, "qwen3-32b-1.7b"], capture_output=True,
                             text=True, env=inside, timeout=60)
        assert out.returncode == 0 and f"CUDA_VISIBLE_DEVICES={devices}\n" in out.stderr, out.stderr
    bad = subprocess.run([str(root / "launch" / "serve.sh"), "medium", "cpu-tiny"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("value", [0, -1, "6", 1.5, True])
def test_prefetch_every_must_be_a_positive_integer(monkeypatch, value):
    import relaygen_sgl.core.config as config

    raw = config._raw()
    raw["cpu-tiny"]["prefetch_every"] = value
    monkeypatch.setattr(config, "_raw", lambda: raw)
    with pytest.raises(ConfigError, match="prefetch_every must be an integer >= 1"):
        load_preset("cpu-tiny")


def test_cpu_presets_space_the_prefetch_gpu_presets_send_one_per_64_tokens():
    # CPU: measured (docs/cpu.md, CPU compute patches); GPU: a prefill of up to ~64 new tokens
    # costs a forward pass what one token costs (presets.toml says why)
    assert {n: load_preset(n).prefetch_every for n in preset_names()} == {
        n: 2 if load_preset(n).device == "cpu" else 64 for n in preset_names()}


@pytest.mark.parametrize("key,value", [("prefetch_auto_every", -1), ("prefetch_auto_every", "0"),
                                       ("prefetch_max_load", -2), ("prefetch_max_load", 1.5),
                                       ("prefetch_max_load_speculative", True), ("prefetch_closing_lead", 0),
                                       ("prefetch_closing_lead", "16")])
def test_the_auto_prefetch_keys_are_checked(monkeypatch, key, value):
    import relaygen_sgl.core.config as config

    raw = config._raw()
    raw["cpu-tiny"][key] = value
    monkeypatch.setattr(config, "_raw", lambda: raw)
    with pytest.raises(ConfigError, match=f"preset cpu-tiny: {key} must be an integer"):
        load_preset("cpu-tiny")


def test_auto_prefetch_thresholds_per_preset():
    # CPU: the prompt only, at batch 1 (measured: tail prefetches cost relays there); separate
    # GPUs: while the receiver runs no other turn, never to a speculative one; a shared GPU: never
    for n in preset_names():
        p = load_preset(n)
        expect = ((0, 0, -1) if p.device == "cpu" else (None, -1, -1) if p.share_device else (None, 0, -1))
        assert (p.prefetch_auto_every, p.prefetch_max_load, p.prefetch_max_load_speculative) == expect, n


def test_the_closing_lead_is_preset_data_and_reaches_the_prefetch_rule(monkeypatch):
    import relaygen_sgl.core.config as config
    from relaygen_sgl.runtime.prefetch import PrefetchRule

    assert {load_preset(n).prefetch_closing_lead for n in preset_names()} == {16}
    raw = config._raw()
    raw["cpu-tiny"]["prefetch_closing_lead"] = 5
    monkeypatch.setattr(config, "_raw", lambda: raw)
    assert PrefetchRule.of(load_preset("cpu-tiny")).closing_lead == 5

"""GPUs per server (issue 13 items 4 and 6): presets say how many GPUs one server needs,
`up` hands out disjoint blocks of what is visible (inside the user's CUDA_VISIBLE_DEVICES),
too few is one line, and `up --dry-run` shows the plan without starting or writing anything.
Nothing here runs on a GPU: nvidia-smi is faked or absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
from test_cli import one_line_error, run_cli

from relaygen_sgl.cli import main as cli
from relaygen_sgl.core import config
from relaygen_sgl.core.config import load_preset, load_settings, parallel_size, parallel_sizes, preset_names
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.servers import memory, stack
from relaygen_sgl.servers.gpus import Visible, allocate, devices_for, visible_devices
from relaygen_sgl.servers.launch import dry_run, server_command

QWEN = "qwen3-32b-1.7b"


def blocks(preset: str, counts: dict[str, int], devices: str) -> dict[tuple[str, int], str]:
    got = allocate(load_preset(preset), counts, Visible(tuple(devices.split(",")), f"CUDA_VISIBLE_DEVICES={devices}"))
    return {k: ",".join(v) for k, v in got.items()}


def test_allocation_stays_inside_the_users_cuda_visible_devices():
    visible = visible_devices({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, run=lambda *a, **k: pytest.fail("nvidia-smi"))
    assert visible.devices == ("4", "5", "6", "7")
    got, note = devices_for(load_preset(QWEN), {"large": 1, "small": 1}, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert got == {("large", 0): ("4", "5"), ("small", 0): ("6",)} and note is None
    cmd = server_command(load_preset(QWEN), "small", load_settings(), devices=got[("small", 0)])
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "6"
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}).devices == ()  # set to nothing: nothing visible


def test_replicas_get_disjoint_consecutive_blocks_large_first():
    got = blocks(QWEN, {"large": 2, "small": 3}, "0,1,2,3,4,5,6,7")
    assert got == {("large", 0): "0,1", ("large", 1): "2,3", ("small", 0): "4", ("small", 1): "5", ("small", 2): "6"}
    used = [d for v in got.values() for d in v.split(",")]
    assert len(used) == len(set(used))


def test_too_few_gpus_is_one_line():
    with pytest.raises(ConfigError) as e:
        blocks(QWEN, {"large": 2, "small": 1}, "0,1,2,3")
    assert str(e.value) == (f"preset {QWEN} needs 5 GPUs (large: 2 x 2 replicas, small: 1 x 1), only 4 visible "
                            "(CUDA_VISIBLE_DEVICES=0,1,2,3)")


def test_nvidia_smi_when_cuda_visible_devices_is_unset():
    class Out:
        returncode, stdout = 0, "0\n1\n2\n"

    asked = []
    visible = visible_devices({}, run=lambda argv, **k: asked.append(argv) or Out())
    assert visible.devices == ("0", "1", "2")
    assert asked == [["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]]

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    assert visible_devices({}, run=missing).devices == ()


def test_cpu_presets_need_no_gpu_and_never_ask_nvidia_smi(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nvidia-smi asked for a CPU preset"))
    got, note = devices_for(load_preset("cpu-tiny"), {"large": 2, "small": 1}, environ={})
    assert set(got.values()) == {()} and note is None
    assert "CUDA_VISIBLE_DEVICES" not in server_command(load_preset("cpu-tiny"), "large", load_settings()).env


def test_every_gpu_preset_says_gpus_matching_its_parallel_sizes():
    for name in preset_names():
        preset = load_preset(name)
        for role, spec in preset.roles.items():
            assert "CUDA_VISIBLE_DEVICES" not in spec.env, f"{name}.{role}"
            if preset.device == "cuda":
                assert spec.gpus == parallel_size(spec.args) >= 1, f"{name}.{role}"
            else:
                assert spec.gpus == 0
    assert load_preset(QWEN).roles["large"].gpus == 2 and load_preset(QWEN).roles["small"].gpus == 1
    assert parallel_size(["--tp", "2", "--dp-size=2"]) == 4
    assert parallel_size(["--tp", "4", "--dp", "4", "--enable-dp-attention"]) == 4
    assert parallel_sizes(["--tensor-parallel-size=4", "--dp-size", "2"]) == {"tp": 4, "pp": 1, "dp": 2}
    assert memory.shape(load_preset(QWEN), "large").tp == 2  # the memory plan reads the same spellings


def _with_preset_data(monkeypatch, name: str, edit) -> None:  # type: ignore[no-untyped-def]
    raw = tomllib.loads(config.data_path("presets.toml").read_text())
    edit(raw[name])
    monkeypatch.setattr(config, "_raw", lambda: raw)


def test_a_preset_env_with_cuda_visible_devices_is_refused(monkeypatch):
    _with_preset_data(monkeypatch, QWEN, lambda p: p["large"].update(env={"CUDA_VISIBLE_DEVICES": "0,1"}))
    with pytest.raises(ConfigError, match=r"qwen3-32b-1.7b.large: env sets CUDA_VISIBLE_DEVICES; give `gpus = N`"):
        load_preset(QWEN)


def test_a_presets_cards_are_read_with_it_and_checked(monkeypatch):
    assert load_preset("qwen3-32b-1.7b-1gpu").cards == ("H200",) and load_preset("cpu-tiny").cards == ()
    assert [c.key for c in memory.preset_cards(load_preset(QWEN))] == ["H100-80GB", "A100-80GB", "H200"]
    _with_preset_data(monkeypatch, QWEN, lambda p: p.update(cards="H200"))
    with pytest.raises(ConfigError, match="cards must be a list of card names"):
        load_preset(QWEN)
    _with_preset_data(monkeypatch, QWEN, lambda p: p.update(cards=["H200", "B300"]))
    with pytest.raises(ConfigError, match=r"unknown cards \['B300'\]; known: "):
        memory.preset_cards(load_preset(QWEN))


@pytest.mark.parametrize(("gpus", "match"), [(4, "gpus = 4 but its args use 2"), (0, "a cuda server needs"),
                                             (True, "gpus must be an integer")])
def test_gpus_must_agree_with_the_device_and_tp(monkeypatch, gpus, match):
    _with_preset_data(monkeypatch, QWEN, lambda p: p["large"].update(gpus=gpus))
    with pytest.raises(ConfigError, match=match):
        load_preset(QWEN)


def test_the_speculative_presets_name_loadable_drafts():
    eagle = load_preset("qwen3-32b-1.7b-eagle3").roles["large"].args
    assert eagle[eagle.index("--speculative-draft-model-path") + 1] == "AngelSlim/Qwen3-32B_eagle3"
    sa = load_preset("qwen3-32b-standalone-1.7b")
    args = sa.roles["large"].args
    assert args[args.index("--speculative-algorithm") + 1] == "STANDALONE"
    assert args[args.index("--speculative-draft-model-path") + 1] == "Qwen/Qwen3-1.7B"
    assert sa.family == "qwen3" and sa.profile == QWEN and sa.roles["large"].gpus == 2
    for spec in (eagle, args):  # SGLang takes all three or none (speculative_hook.py)
        assert {"--speculative-num-steps", "--speculative-eagle-topk", "--speculative-num-draft-tokens"} <= set(spec)


def _fake_nvidia_smi(tmp_path, listing: str | None) -> dict[str, str]:
    """PATH with an nvidia-smi that lists these indices (None: fails, as with no driver)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n" if listing is None else f"#!/bin/sh\nprintf '{listing}'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}"}


def test_dry_run_json_on_a_machine_without_gpus_starts_and_writes_nothing(tmp_path):
    env = _fake_nvidia_smi(tmp_path, None)
    settings = load_settings()
    out = subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", "up", "--preset", QWEN, "--replicas-large", "2",
                          "--dry-run", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    servers = plan["servers"]
    large = [s for s in servers if s["role"] == "large" and s["replica"] != "router"]
    assert [s["replica"] for s in large] == [0, 1]
    devs = [set(s["env"]["CUDA_VISIBLE_DEVICES"].split(",")) for s in large]
    assert len(devs[0]) == len(devs[1]) == 2 and not devs[0] & devs[1]
    router = [s for s in servers if s["replica"] == "router"]
    assert [s["role"] for s in router] == ["large"] and "sglang_router.launch_router" in router[0]["argv"]
    assert {"http://127.0.0.1:30200", "http://127.0.0.1:30210"} <= set(router[0]["argv"])
    small = [s for s in servers if s["role"] == "small"]
    assert len(small) == 1 and not set(small[0]["env"]["CUDA_VISIBLE_DEVICES"].split(",")) & (devs[0] | devs[1])
    assert "assumed devices 0..4" in plan["note"]
    assert not settings.state_file.exists() and not settings.run_dir.exists()
    ps = subprocess.run(["pgrep", "-f", "launch_server --model-path Qwen/Qwen3-32B .*--port 302[01]0 "
                                        "|launch_router.*127.0.0.1:30200"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_dry_run_uses_the_gpus_nvidia_smi_lists_and_refuses_when_too_few(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = _fake_nvidia_smi(tmp_path, "0\\n1\\n2\\n3\\n4\\n5\\n")
    plan = json.loads(run_cli("up", "--preset", QWEN, "--replicas-small", "2", "--dry-run", "--json",
                               env_extra=env).stdout)
    assert plan["note"] is None
    assert [s["env"].get("CUDA_VISIBLE_DEVICES") for s in plan["servers"]] == ["0,1", "2", "3", None]
    err = one_line_error(run_cli("up", "--preset", QWEN, "--replicas-large", "3", "--dry-run", env_extra=env))
    assert "needs 7 GPUs (large: 2 x 3 replicas, small: 1 x 1), only 6 visible" in err


def test_dry_run_shell_lines_and_the_api_key_never_printed(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5")
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "sekrit-key-123")
    monkeypatch.setattr(stack, "start_server", lambda *a, **k: pytest.fail("a dry run started a process"))
    assert cli.main(["up", "--preset", "qwen3-32b-standalone-1.7b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sekrit" not in out and "--config '<api-key-config.yaml>'" in out and "0600 file" in out
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=3,4 ") and "--speculative-algorithm STANDALONE" in lines[0]
    assert lines[1].startswith("CUDA_VISIBLE_DEVICES=5 ")
    plan = dry_run(load_preset(QWEN), load_settings())
    assert "sekrit" not in json.dumps(plan) and not (load_settings().run_dir / "auth").exists()


def test_a_real_up_without_gpus_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(stack, "start_server", lambda *a, **k: pytest.fail("started without GPUs"))
    monkeypatch.setattr(stack, "port_in_use", lambda *a: pytest.fail("got past the GPU check"))
    with pytest.raises(ConfigError, match=r"^preset qwen3-32b-1.7b needs 3 GPUs \(large: 2 x 1, small: 1 x 1\), "
                                          r"only 0 visible \(CUDA_VISIBLE_DEVICES=\)$"):
        stack.up(load_preset(QWEN), load_settings())
    assert not load_settings().state_file.exists()

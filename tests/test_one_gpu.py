"""One GPU, two servers (issue 21 item 3): shared-device presets put both servers on the same
device, `up` starts the large one, waits until it answers a generation and only then starts
the small one, and each gets a --mem-fraction-static computed from SGLang 0.5.23's own meaning
of it (weights + KV = fraction x the memory free when that server starts). Nothing here runs on
a GPU: nvidia-smi is faked or absent, the servers are stand-in processes."""

from __future__ import annotations

import json
import os
import time

import pytest
from test_cli import one_line_error, run_cli
from test_gpus import _with_preset_data

from relaygen_sgl.core.config import load_preset, load_settings, preset_names
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.servers import stack
from relaygen_sgl.servers.launch import ServerCommand, launch_plan, shared_fractions
from relaygen_sgl.servers.processes import start_server

BIG = "qwen3-32b-1.7b-1gpu"
SMALL_CARD = "qwen3-8b-0.6b-1gpu"


def _fake_smi(tmp_path, free_mib: int, total_mib: int) -> dict[str, str]:
    """PATH with an nvidia-smi that lists GPU 0 with this much memory free."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\ncase "$*" in *memory.free*) echo "0, GPU-aaaa, {free_mib}, {total_mib}";; '
                   '*) echo 0;; esac\n')
    smi.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def _no_smi(tmp_path) -> dict[str, str]:
    folder = tmp_path / "empty"
    folder.mkdir()
    python_dir = os.path.dirname(os.path.realpath(os.sys.executable))
    return {"PATH": f"{folder}{os.pathsep}{python_dir}{os.pathsep}/usr/bin:/bin"}


def _argv_fraction(server: dict) -> float:
    argv = server["argv"]
    assert argv.count("--mem-fraction-static") == 1
    return float(argv[argv.index("--mem-fraction-static") + 1])


@pytest.mark.parametrize("name", [BIG, SMALL_CARD])
def test_dry_run_json_puts_both_on_device_0_large_first_with_fractions_and_why(name, tmp_path):
    out = run_cli("up", "--preset", name, "--dry-run", "--json",
                   env_extra={"CUDA_VISIBLE_DEVICES": "0", **_no_smi(tmp_path)})
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    large, small = plan["servers"]
    assert plan["order"] == ["large server 0", "small server 0"] and [large["role"], small["role"]] == ["large",
                                                                                                       "small"]
    assert plan["shared_device"] == "0" and plan["sequential"] is True
    assert large["env"]["CUDA_VISIBLE_DEVICES"] == small["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert "starts_after" not in large and small["starts_after"] == ["large server on port 30000 answers (same GPU)"]
    for s in (large, small):
        assert _argv_fraction(s) == s["mem_fraction_static"] and 0 < s["mem_fraction_static"] < 1
        assert "memory free at its start" in s["why"]
    assert large["why"].startswith("starts first") and small["why"].startswith("starts once the large server answers")
    assert "assumed" in plan["note"] and "min_free_gib" in plan["note"]


def test_the_fractions_follow_the_free_memory_nvidia_smi_reports(tmp_path):
    def plan_for(free_mib: int, total_mib: int) -> dict:
        out = run_cli("up", "--preset", BIG, "--dry-run", "--json",
                       env_extra={"CUDA_VISIBLE_DEVICES": "0", **_fake_smi(tmp_path / str(free_mib), free_mib,
                                                                             total_mib)})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    (tmp_path / "81000").mkdir()
    (tmp_path / "143000").mkdir()
    h100, h200 = plan_for(81000, 81559), plan_for(143000, 143771)
    assert "79.1 GiB free (nvidia-smi)" in h100["note"]
    assert [s["mem_fraction_static"] for s in h100["servers"]] < [s["mem_fraction_static"]
                                                                  for s in h200["servers"]]
    (tmp_path / "small").mkdir()
    refused = run_cli("up", "--preset", BIG, "--dry-run", "--json",
                       env_extra={"CUDA_VISIBLE_DEVICES": "0", **_fake_smi(tmp_path / "small", 40000, 49140)})
    assert "needs 77 GiB free on its GPU (large 66 + small 6 + 5 runtime reserve), it has 39.1 GiB free" in \
        one_line_error(refused)


@pytest.mark.parametrize("free", [22.5, 23.4, 44.0, 79.1, 139.8])
def test_shared_fractions_hold_what_was_planned_and_leave_the_reserve(free):
    """SGLang's rule, replayed: server i holds fraction_i x (memory free when it starts); the
    first leaves free - static_1 (an upper bound: its activations not counted)."""
    for name in (BIG, SMALL_CARD):
        preset = load_preset(name)
        if free < preset.min_free_gib:
            with pytest.raises(ConfigError, match="GiB free on its GPU"):
                shared_fractions(preset, free)
            continue
        got = shared_fractions(preset, free)
        left, held = free, {}
        for role in ("large", "small"):
            held[role] = got[role].value * left
            assert held[role] >= preset.roles[role].memory_gib - 0.1  # its weights + planned KV at least
            left -= held[role]
        assert left >= preset.runtime_reserve_gib - 0.01  # what stays free for both servers' activations
        assert left <= preset.runtime_reserve_gib + 0.2  # the spare went to the KV caches


def test_shared_presets_need_memory_and_no_fraction_of_their_own(monkeypatch):
    _with_preset_data(monkeypatch, BIG, lambda p: p["small"].pop("memory_gib"))
    with pytest.raises(ConfigError, match=r"qwen3-32b-1.7b-1gpu.small: share_device needs memory_gib"):
        load_preset(BIG)
    monkeypatch.undo()
    _with_preset_data(monkeypatch, BIG, lambda p: p["large"].update(args=[*p["large"]["args"],
                                                                          "--mem-fraction-static", "0.8"]))
    with pytest.raises(ConfigError, match="the plan computes --mem-fraction-static"):
        load_preset(BIG)


def test_a_shared_preset_runs_one_server_per_role():
    with pytest.raises(ConfigError, match="one server per role"):
        launch_plan(load_preset(BIG), load_settings(), replicas={"large": 2, "small": 1}, assume=True)


def test_every_shared_preset_says_prefetch_off_by_its_share_device_field():
    shared = [n for n in preset_names() if load_preset(n).share_device]
    assert set(shared) >= {BIG, SMALL_CARD}
    for name in shared:  # the runtime reads Preset.share_device to keep prefetch off
        preset = load_preset(name)
        assert preset.device == "cuda" and {s.gpus for s in preset.roles.values()} == {1}


def test_cuda_device_order_is_pci_bus_unless_the_user_set_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    plan = launch_plan(load_preset(BIG), load_settings(), assume=True)
    assert {p.command.env.get("CUDA_DEVICE_ORDER") for p in plan.processes} == {"PCI_BUS_ID"}
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    plan = launch_plan(load_preset(BIG), load_settings(), assume=True)
    assert {p.command.env.get("CUDA_DEVICE_ORDER") for p in plan.processes} == {None}  # theirs is inherited
    cpu = launch_plan(load_preset("cpu-tiny"), load_settings())
    assert all("CUDA_DEVICE_ORDER" not in p.command.env for p in cpu.processes)


def _stand_ins(monkeypatch, healthy_after_s: dict[int, float]) -> list[tuple]:
    """Stand-in server processes; a server answers once `healthy_after_s[port]` has passed since
    its start. Returns the event list: ("start", port, t) and ("answers", port, t)."""
    events: list[tuple] = []
    born: dict[str, tuple[int, float]] = {}

    def fake_start(cmd, log):
        port = int(cmd.argv[cmd.argv.index("--port") + 1])
        proc = start_server(ServerCommand(argv=("sleep", "60"), env={}), log)
        events.append(("start", port, time.monotonic()))
        born[f"http://127.0.0.1:{port}"] = (port, time.monotonic())
        return proc

    def fake_answers(url, timeout_s=30.0, api_key=None):
        port, t0 = born[url]
        ok = time.monotonic() - t0 >= healthy_after_s[port]
        if ok:
            events.append(("answers", port, time.monotonic()))
        return ok

    monkeypatch.setattr(stack, "check_models", lambda preset, settings: None)
    monkeypatch.setattr(stack, "port_in_use", lambda port, host: False)
    monkeypatch.setattr(stack, "start_server", fake_start)
    monkeypatch.setattr(stack, "answers_generation", fake_answers)
    monkeypatch.setattr("relaygen_sgl.servers.processes.answers_generation", fake_answers)  # wait_healthy's
    monkeypatch.setattr(stack, "status", lambda settings: {})
    return events


def test_up_on_one_device_waits_for_the_large_servers_answer_before_starting_the_small(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})  # min_free_gib assumed
    events = _stand_ins(monkeypatch, {30000: 3.0, 30001: 0.0})
    settings = load_settings()
    try:
        out = stack.up(load_preset(BIG), settings)
        kinds = [(e[0], e[1]) for e in events]
        assert kinds[:3] == [("start", 30000), ("answers", 30000), ("start", 30001)], kinds
        first_answer = next(e[2] for e in events if e[:2] == ("answers", 30000))
        small_start = next(e[2] for e in events if e[:2] == ("start", 30001))
        assert small_start >= first_answer
        assert [s["port"] for s in out["started"]] == [30000, 30001]
    finally:
        stack.down(settings)


def test_up_on_separate_gpus_starts_both_before_waiting(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    events = _stand_ins(monkeypatch, {30000: 3.0, 30001: 0.0})
    settings = load_settings()
    try:
        stack.up(load_preset("qwen3-32b-1.7b"), settings)
        assert [(e[0], e[1]) for e in events][:2] == [("start", 30000), ("start", 30001)]
    finally:
        stack.down(settings)


def test_serve_sh_for_the_second_server_on_a_gpu_says_to_start_it_after_the_first(monkeypatch):
    from relaygen_sgl.servers.launch import role_command

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})
    small, note = role_command(load_preset(BIG), "small", load_settings())
    assert small.env["CUDA_VISIBLE_DEVICES"] == "0" and "--mem-fraction-static" in small.argv
    assert "start it once the server on port 30000 answers a generation (same GPU)" in note
    large, note = role_command(load_preset(BIG), "large", load_settings())
    assert "start it once" not in (note or "")

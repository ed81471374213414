"""One GPU, two servers (issue 21 item 3, issue 29 item 2): shared-device presets put both servers
on the same device, `up` starts the large one, waits until it answers a generation and only then
starts the small one, sized from what the large one left. The KV/memory arithmetic
(servers/memory.py) follows SGLang 0.5.23's allocation order; the tests check it against numbers
computed by hand here, and replay SGLang's rule server by server. Nothing here runs on a GPU:
nvidia-smi is faked or absent, the servers are stand-in processes."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from test_cli import one_line_error, run_cli
from test_gpus import _with_preset_data

from relaygen_sgl.core.config import ROLES, load_preset, load_settings, local_model_specs, preset_names
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.servers import memory, stack
from relaygen_sgl.servers.gpus import GpuMemory
from relaygen_sgl.servers.launch import ServerCommand, launch_plan, role_command, size_second
from relaygen_sgl.servers.processes import start_server

H200 = "qwen3-32b-1.7b-1gpu"  # the paper's 36000-token context on a 141 GB card
H100 = "qwen3-32b-1.7b-1gpu-80gb"  # a 20480-token context on an 80 GB card
CARD48 = "qwen3-8b-0.6b-1gpu"
SHARED = (H200, H100, CARD48)
GIB = 2**30
MIB = 2**20


def _fake_smi(tmp_path, free_mib: int, total_mib: int, name: str = "") -> dict[str, str]:
    """PATH with an nvidia-smi that lists GPU 0 with this much memory free."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    row = f"0, GPU-aaaa, {free_mib}, {total_mib}" + (f", {name}" if name else "")
    smi.write_text(f'#!/bin/sh\ncase "$*" in *memory.free*) echo "{row}";; *) echo 0;; esac\n')
    smi.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def _no_smi(tmp_path) -> dict[str, str]:
    folder = tmp_path / "empty"
    folder.mkdir()
    python_dir = os.path.dirname(os.path.realpath(os.sys.executable))
    return {"PATH": f"{folder}{os.pathsep}{python_dir}{os.pathsep}/usr/bin:/bin"}


def _flag(argv, flag: str) -> str:
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------- the arithmetic, by hand
def test_kv_bytes_and_weights_from_the_model_configs():
    """layers x kv_heads x head_dim x 2 (K and V) x dtype bytes; weights from the config's widths,
    within 2% of each model card's parameter count."""
    m = memory.models()
    assert m["Qwen/Qwen3-32B"].kv_bytes(2) == 64 * 8 * 128 * 2 * 2 == 262144  # 256 KiB
    assert m["Qwen/Qwen3-32B"].kv_bytes(2, tp=2) == 64 * 4 * 128 * 2 * 2  # 4 KV heads per rank
    assert m["Qwen/Qwen3-8B"].kv_bytes(2) == 36 * 8 * 128 * 2 * 2 == 147456  # 144 KiB
    assert m["Qwen/Qwen3-1.7B"].kv_bytes(2) == m["Qwen/Qwen3-0.6B"].kv_bytes(2) == 28 * 8 * 128 * 4 == 114688
    assert m["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"].kv_bytes(2) == 28 * 2 * 128 * 2 * 2 == 28672
    assert m["smollm2-135m-instruct"].kv_bytes(4) == 30 * 3 * 64 * 2 * 4 == 46080  # fp32 on the CPU
    assert m["smollm2-135m-instruct-pruned10"].kv_bytes(4) == 10 * 3 * 64 * 2 * 4
    pruned = "smollm2-135m-instruct-pruned10"
    assert m[pruned].layers == local_model_specs()[pruned].keep_layers
    # Qwen3-32B: 64 x (q 5120x8192 + k,v 2 x 5120x1024 + o 8192x5120 + mlp 3 x 5120x25600 + norms)
    # + embed and lm_head 2 x 151936 x 5120 + final norm
    layer = 5120 * 8192 + 2 * 5120 * 1024 + 8192 * 5120 + 3 * 5120 * 25600 + 2 * 5120 + 2 * 128
    assert m["Qwen/Qwen3-32B"].params == 64 * layer + 2 * 151936 * 5120 + 5120 == 32_762_123_264
    assert round(32_762_123_264 * 2 / GIB, 2) == 61.02
    for name, mod in m.items():
        if mod.params_b is not None:
            assert abs(mod.params / 1e9 - mod.params_b) / mod.params_b < 0.02, (name, mod.params, mod.params_b)
    tied = m["Qwen/Qwen3-1.7B"]  # tied embeddings are loaded once: 1.72B, 3.20 GiB
    assert tied.params == 28 * (2048 * 2048 + 2 * 2048 * 1024 + 2048 * 2048 + 3 * 2048 * 6144 + 2 * 2048
                                + 2 * 128) + 151936 * 2048 + 2048 == 1_720_574_976


def test_sglangs_allocations_after_the_pool_by_hand():
    # prefill CUDA graphs SGLang 0.5.23 captures (cuda_graph_hook.py): 50 buckets up to 4096 tokens,
    # 58 up to 8192 (the count an H100 log of SGLang shows for an 8192-token chunk)
    assert memory.prefill_buckets(4096) == 8 + 14 + 8 + 8 + 12 == 50
    assert memory.prefill_buckets(8192) == 58
    cards = memory.cards()
    assert memory.sglang_defaults(cards["H100-80GB"], 1) == (8192, 256)
    assert memory.sglang_defaults(cards["L40S"], 1) == (4096, 32)
    assert memory.sglang_defaults(cards["L4"], 1) == (4096, 48)
    s = memory.shape(load_preset(H100), "large")
    after = memory.after_pool(s, cards["H100-80GB"], 27174)
    assert after.req_to_token == 33 * (20480 + 4) * 4 / GIB  # --max-running-requests 32: 33 rows of int32
    assert after.cuda_graphs == (32 * 2 + 50 * 8) * MIB / GIB  # decode bs 32 x 2 MiB + 50 buckets x 8 MiB
    assert after.activations == 4096 * (2 * 8192 + 2 * 1024 + 3 * 25600 + 2 * 5120) * 2 / GIB
    assert after.attention == 0 and after.slack == 0.5 and after.parallel == 0  # FA3 on Hopper; SGLang's 512 MiB
    assert memory.after_pool(s, cards["A100-80GB"], 27174).attention == 0.5  # FlashInfer's 512 MiB for Qwen3
    # without --max-running-requests, SGLang's rows: clamp(tokens / context x 512, 2048, 4096)
    sep = memory.shape(load_preset("qwen3-32b-1.7b"), "large")
    assert memory.request_rows(sep, 295963) == 4096 and memory.request_rows(sep, 54624) == 2048


def _by_hand(free_mib: float, context: int, attention_gib: float) -> int:
    """The equal-tokens plan for Qwen3-32B + Qwen3-1.7B on one card, from literals only."""
    ctx, reserve = 0.7, 1.0
    w1, w2 = 32_762_123_264 * 2 / GIB, 1_720_574_976 * 2 / GIB
    c1, c2 = 64 * 8 * 128 * 4, 28 * 8 * 128 * 4
    graphs = (32 * 2 + 50 * 8) / 1024
    table = 33 * (context + 4) * 4 / GIB
    after1 = table + attention_gib + graphs + 4096 * (2 * 8192 + 2 * 1024 + 3 * 25600 + 2 * 5120) * 2 / GIB + 0.5
    after2 = table + attention_gib + graphs + 4096 * (2 * 2048 + 2 * 1024 + 3 * 6144 + 2 * 2048) * 2 / GIB + 0.5
    return int((free_mib / 1024 - 2 * ctx - w1 - w2 - reserve - after1 - after2) * GIB // (c1 + c2))


@pytest.mark.parametrize(("name", "card", "context", "attention", "tokens"),
                         [(H100, "H100-80GB", 20480, 0.0, 27174), (H100, "A100-80GB", 20480, 0.5, 25329),
                          (H200, "H200", 36000, 0.0, 200274)])
def test_the_shared_plan_matches_the_hand_computed_numbers(name, card, context, attention, tokens):
    c = memory.cards()[card]
    assert _by_hand(c.total_mib - 560, context, attention) == tokens  # 560 MiB: an idle card's reservation
    plan = memory.plan_shared(load_preset(name), c)
    assert plan.servers["large"].kv_tokens == tokens
    assert plan.servers["small"].kv_tokens >= tokens  # the last server takes what is left: the floors' slack
    assert plan.trajectories == tokens // context


def _replay_sglang(plan: memory.MemoryPlan, preset, card, free: float) -> float:
    """SGLang 0.5.23's own rule, server by server in start order: KV = fraction x (free at its
    start - context) - weights, capped by --max-total-tokens; then what it allocates after the
    pool. Returns what stays free once both are up."""
    for role in ROLES:
        s, mem = memory.shape(preset, role), plan.servers[role]
        pre = free - 0.7
        budget = mem.fraction * pre - s.weights_gib
        assert budget > 0, f"{role}: 'Loaded weights leave no GPU memory for the KV cache'"
        kv = min(int(budget * GIB // s.kv_bytes), mem.kv_tokens)  # --max-total-tokens pins it
        assert kv == mem.kv_tokens, role
        free = free - 0.7 - s.weights_gib - kv * s.kv_bytes / GIB - memory.after_pool(s, card, kv).total
        if role == ROLES[0]:
            assert abs(free - plan.servers[ROLES[1]].free_gib) < 1e-6  # the second sees what the first left
    return free


@pytest.mark.parametrize("name", SHARED)
def test_every_named_card_replays_sglangs_allocation_order_with_the_reserve_left(name):
    preset = load_preset(name)
    cards = memory.preset_cards(preset)
    assert cards
    for card in cards:
        plan = memory.plan_shared(preset, card)
        left = _replay_sglang(plan, preset, card, card.free_gib)
        assert preset.runtime_reserve_gib - 0.01 <= left <= preset.runtime_reserve_gib + 0.2, (card.key, left)
        assert plan.trajectories >= 1, (card.key, plan.verdict)
        sizes = {r: s.kv_tokens for r, s in plan.servers.items()}
        assert abs(sizes["large"] - sizes["small"]) <= 64, sizes  # a trajectory lives on both servers


def test_every_gpu_preset_names_only_cards_it_fits_and_the_rest_are_refused_or_short():
    for name in preset_names():
        preset = load_preset(name)
        if preset.device != "cuda":
            assert not memory.preset_cards(preset)
            continue
        named = {c.key for c in memory.preset_cards(preset)}
        assert named, f"{name} names no cards"
        for card in memory.cards().values():
            try:
                fits = memory.plan_for_card(preset, card).fits
            except ConfigError:
                fits = False
            if card.key in named:
                assert fits, (name, card.key)
    for card in ("H100-80GB", "A100-80GB", "L40S", "RTX4090"):  # the paper budget needs a 141 GB card
        with pytest.raises(ConfigError, match="GiB free on its GPU"):
            memory.plan_for_card(load_preset(H200), memory.cards()[card])
    for card in ("RTX4090", "L4"):  # 24 GB cards hold no 8B + 0.6B pair
        with pytest.raises(ConfigError, match="GiB free on its GPU"):
            memory.plan_for_card(load_preset(CARD48), memory.cards()[card])


@pytest.mark.parametrize("name", SHARED)
def test_memory_gib_is_the_weights_and_one_trajectory(name):
    """memory_gib (core/config requires it on a shared preset) is each role's floor: its weights
    and the KV of one trajectory of the budget, rounded up to 0.1 GiB."""
    preset = load_preset(name)
    for role in ROLES:
        s = memory.shape(preset, role)
        least = s.weights_gib + s.context * s.kv_bytes / GIB
        assert least <= preset.roles[role].memory_gib <= least + 0.1, (role, least)


def test_the_old_plan_over_promised_the_small_server():
    """Issue 29: the fractions 0.858 / 0.549 the old plan gave on an H100 (79.1 GiB free), replayed
    with what the large server allocates after its pool (its context, request table, graphs,
    activations): the small server got far fewer than the 20k tokens the docs claimed."""
    large = memory.shape(load_preset(H200), "large")
    small = memory.shape(load_preset(H200), "small")
    card = memory.cards()["H100-80GB"]
    free = 79.1
    kv1 = int((0.858 * (free - 0.7) - large.weights_gib) * GIB // large.kv_bytes)
    rows = 2048  # SGLang's default request table, no --max-running-requests
    after1 = memory.after_pool(large, card, kv1).total - 33 * 36004 * 4 / GIB + (rows + 1) * 36004 * 4 / GIB
    left = free - 0.7 - large.weights_gib - kv1 * large.kv_bytes / GIB - after1
    kv2 = int((0.549 * (left - 0.7) - small.weights_gib) * GIB // small.kv_bytes)
    assert 9_000 < kv2 < 14_000 and kv2 < 20_000


# ---------------------------------------------------------------- up --dry-run
@pytest.mark.parametrize("name", SHARED)
def test_dry_run_json_puts_both_on_device_0_large_first_with_fractions_kv_and_why(name, tmp_path):
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
    preset = load_preset(name)
    card = memory.preset_cards(preset)[0]
    expect = memory.plan_shared(preset, card)
    for s in (large, small):
        assert float(_flag(s["argv"], "--mem-fraction-static")) == s["mem_fraction_static"] == \
            s["memory"]["mem_fraction_static"] and 0 < s["mem_fraction_static"] < 1
        assert int(_flag(s["argv"], "--max-total-tokens")) == s["memory"]["kv_tokens"] == \
            expect.servers[s["role"]].kv_tokens
        assert s["memory"]["trajectories"] >= 1 and s["memory"]["after_pool_gib"]["total"] > 0
    assert large["why"].startswith("starts first") and "the memory free at its start" in large["why"]
    assert small["why"].startswith("starts once the large server answers")
    assert small["memory"]["free_at_start_gib"] == pytest.approx(large["memory"]["free_at_start_gib"]
                                                                 - large["memory"]["holds_gib"], abs=0.02)
    assert f"an idle {card.key}" in plan["note"] and "estimated" in plan["note"]
    assert plan["memory"]["trajectories"] == expect.trajectories and plan["memory"]["verdict"] == expect.verdict
    assert all(c["trajectories"] >= 1 for c in plan["cards"].values())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_dry_run_shows_kv_tokens_and_trajectories_per_server(name, tmp_path):
    preset = load_preset(name)
    gpus = sum(s.gpus for s in preset.roles.values()) if not preset.share_device else 1
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))), **_no_smi(tmp_path)} if gpus else {}
    out = run_cli("up", "--preset", name, "--dry-run", "--json", env_extra=env)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    for s in plan["servers"]:
        m = s["memory"]
        assert m["kv_tokens"] > 0 and m["trajectories"] == m["kv_tokens"] // m["trajectory_tokens"] >= 1, (name, m)
    assert plan["memory"]["trajectories"] == min(s["memory"]["trajectories"] for s in plan["servers"]) >= 1
    if preset.device == "cpu":  # --max-total-tokens 16384, SmolLM2's 8192-token context: 2 at once
        assert [s["memory"]["kv_tokens"] for s in plan["servers"]] == [16384, 16384]
        assert plan["memory"]["trajectories"] == 2 and "cards" not in plan
        few = json.loads(run_cli("up", "--preset", name, "--dry-run", "--json", "--kv-tokens", "8192").stdout)
        assert few["memory"]["trajectories"] == 1
    else:
        assert set(plan["cards"]) == {c.key for c in memory.preset_cards(preset)}
        assert all(c["trajectories"] >= 1 for c in plan["cards"].values()), plan["cards"]
    lines = run_cli("up", "--preset", name, "--dry-run", env_extra=env).stdout
    assert "# memory (estimated from SGLang 0.5.23's allocation order): " in lines and "# KV cache: " in lines


def test_the_plan_follows_the_free_memory_nvidia_smi_reports(tmp_path):
    def plan_for(name: str, free_mib: int, total_mib: int, gpu: str) -> dict:
        folder = tmp_path / f"{name}-{free_mib}"
        folder.mkdir()
        out = run_cli("up", "--preset", name, "--dry-run", "--json",
                      env_extra={"CUDA_VISIBLE_DEVICES": "0", **_fake_smi(folder, free_mib, total_mib, gpu)})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    h100 = plan_for(H100, 81000, 81559, "NVIDIA H100 80GB HBM3")
    assert "79.1 GiB free (nvidia-smi)" in h100["note"] and h100["memory"]["trajectories"] == 1
    busy = plan_for(H100, 80000, 81559, "NVIDIA H100 80GB HBM3")  # another process holds 1 GiB
    assert busy["servers"][0]["memory"]["kv_tokens"] < h100["servers"][0]["memory"]["kv_tokens"]
    h200 = plan_for(H200, 143000, 143771, "NVIDIA H200")
    assert h200["memory"]["trajectories"] == 5
    (tmp_path / "small").mkdir()
    refused = run_cli("up", "--preset", H200, "--dry-run", "--json",
                      env_extra={"CUDA_VISIBLE_DEVICES": "0", **_fake_smi(tmp_path / "small", 81000, 81559)})
    assert "preset qwen3-32b-1.7b-1gpu needs 83.3 GiB free on its GPU (memory_gib large 69.9 + small 7.1" in \
        one_line_error(refused) and "it has 79.1 GiB free" in one_line_error(refused)


# ---------------------------------------------------------------- presets
def test_shared_presets_need_memory_and_no_fraction_of_their_own(monkeypatch):
    _with_preset_data(monkeypatch, H200, lambda p: p["small"].pop("memory_gib"))
    with pytest.raises(ConfigError, match=r"qwen3-32b-1.7b-1gpu.small: share_device needs memory_gib"):
        load_preset(H200)
    monkeypatch.undo()
    _with_preset_data(monkeypatch, H200, lambda p: p["large"].update(args=[*p["large"]["args"],
                                                                           "--mem-fraction-static", "0.8"]))
    with pytest.raises(ConfigError, match="the plan computes --mem-fraction-static"):
        load_preset(H200)


def test_a_shared_preset_runs_one_server_per_role():
    with pytest.raises(ConfigError, match="one server per role"):
        launch_plan(load_preset(H200), load_settings(), replicas={"large": 2, "small": 1}, assume=True)


def test_every_shared_preset_says_prefetch_off_by_its_share_device_field():
    shared = [n for n in preset_names() if load_preset(n).share_device]
    assert set(shared) == set(SHARED)
    for name in shared:  # the runtime reads Preset.share_device to keep prefetch off
        preset = load_preset(name)
        assert preset.device == "cuda" and {s.gpus for s in preset.roles.values()} == {1}


def test_cuda_device_order_is_pci_bus_unless_the_user_set_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    plan = launch_plan(load_preset(H200), load_settings(), assume=True)
    assert {p.command.env.get("CUDA_DEVICE_ORDER") for p in plan.processes} == {"PCI_BUS_ID"}
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    plan = launch_plan(load_preset(H200), load_settings(), assume=True)
    assert {p.command.env.get("CUDA_DEVICE_ORDER") for p in plan.processes} == {None}  # theirs is inherited
    cpu = launch_plan(load_preset("cpu-tiny"), load_settings())
    assert all("CUDA_DEVICE_ORDER" not in p.command.env for p in cpu.processes)


# ---------------------------------------------------------------- up, and the second server
def _stand_ins(monkeypatch, healthy_after_s: dict[int, float]) -> list[tuple]:
    """Stand-in server processes; a server answers once `healthy_after_s[port]` has passed since
    its start. Returns the event list: ("start", port, t, argv) and ("answers", port, t)."""
    events: list[tuple] = []
    born: dict[str, tuple[int, float]] = {}

    def fake_start(cmd, log):
        port = int(cmd.argv[cmd.argv.index("--port") + 1])
        proc = start_server(ServerCommand(argv=("sleep", "60"), env={}), log)
        events.append(("start", port, time.monotonic(), cmd.argv))
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
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})  # an idle card assumed
    events = _stand_ins(monkeypatch, {30000: 3.0, 30001: 0.0})
    settings = load_settings()
    try:
        out = stack.up(load_preset(H200), settings)
        kinds = [(e[0], e[1]) for e in events]
        assert kinds[:3] == [("start", 30000), ("answers", 30000), ("start", 30001)], kinds
        first_answer = next(e[2] for e in events if e[:2] == ("answers", 30000))
        small_start = next(e[2] for e in events if e[:2] == ("start", 30001))
        assert small_start >= first_answer
        assert [s["port"] for s in out["started"]] == [30000, 30001]
    finally:
        stack.down(settings)


def test_up_sizes_the_small_server_from_what_nvidia_smi_reports_once_the_large_answers(monkeypatch):
    """The large server took 2 GiB more than estimated: the small one gets fewer KV tokens, sized
    from the free memory read after the large server answered, not the estimate."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    name = "NVIDIA H100 80GB HBM3"
    card = memory.measured_card(name, 81559, 81000)
    plan = memory.plan_shared(load_preset(H100), card)
    estimated = plan.servers["small"].free_gib
    smi = {"0": GpuMemory(81000 / 1024, 81559 / 1024, name)}
    events = _stand_ins(monkeypatch, {30000: 0.5, 30001: 0.0})

    def nvidia_smi(*a, **k):
        if any(e[:2] == ("answers", 30000) for e in events):  # the large server is up
            return {"0": GpuMemory(estimated - 2.0, 81559 / 1024, name)}
        return smi

    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", nvidia_smi)
    settings = load_settings()
    try:
        stack.up(load_preset(H100), settings)
    finally:
        stack.down(settings)
    large, small = (e[3] for e in events if e[0] == "start")
    assert int(_flag(large, "--max-total-tokens")) == plan.servers["large"].kv_tokens
    got = int(_flag(small, "--max-total-tokens"))
    s = memory.shape(load_preset(H100), "small")
    assert got == memory.tokens_left(s, card, estimated - 2.0, 1.0) < plan.servers["small"].kv_tokens
    assert float(_flag(small, "--mem-fraction-static")) == math.ceil(
        (s.weights_gib + got * s.kv_bytes / GIB) / (estimated - 2.0 - 0.7) * 1000) / 1000


def test_size_second_never_gives_more_than_the_plan_and_leaves_it_when_nvidia_smi_is_silent(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})
    preset = load_preset(H100)
    plan = launch_plan(preset, load_settings())
    small = plan.processes[1]
    assert size_second(plan, small, preset, found={}) is small
    assert size_second(plan, small, preset, found={"0": GpuMemory(70.0, 79.6)}) is small  # more free than planned
    less = size_second(plan, small, preset, found={"0": GpuMemory(small.memory.free_gib - 1, 79.6)})
    assert less.memory.kv_tokens < small.memory.kv_tokens and "estimated" in less.memory.why
    with pytest.raises(ConfigError, match="the small server would get no KV cache from 3.0 GiB free"):
        size_second(plan, small, preset, found={"0": GpuMemory(3.0, 79.6)})


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
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})
    small, note = role_command(load_preset(H200), "small", load_settings())
    assert small.env["CUDA_VISIBLE_DEVICES"] == "0" and "--mem-fraction-static" in small.argv
    assert "start it once the server on port 30000 answers a generation (same GPU)" in note
    assert int(_flag(small.argv, "--max-total-tokens")) == memory.plan_shared(
        load_preset(H200), memory.preset_cards(load_preset(H200))[0]).servers["small"].kv_tokens
    large, note = role_command(load_preset(H200), "large", load_settings())
    assert "start it once" not in (note or "")


def test_serve_sh_small_after_the_large_is_up_sizes_from_what_is_free_now(monkeypatch):
    """Issue 29: with the large server up, nvidia-smi shows ~9 GiB free; launch/serve.sh small
    sizes the small server from that (it used to plan both servers from it, and refuse)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    name = "NVIDIA H100 80GB HBM3"
    plan = memory.plan_shared(load_preset(H100), memory.measured_card(name, 81559, 81000))
    left = plan.servers["small"].free_gib
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory",
                        lambda *a, **k: {"0": GpuMemory(left, 81559 / 1024, name)})
    cmd, note = role_command(load_preset(H100), "small", load_settings(), listening=lambda port: port == 30000)
    assert int(_flag(cmd.argv, "--max-total-tokens")) == plan.servers["small"].kv_tokens
    assert _flag(cmd.argv, "--mem-fraction-static") == str(plan.servers["small"].fraction)
    assert "1 trajectory of 20,480" in note and f"{left:.1f} GiB free now (nvidia-smi)" in note
    with pytest.raises(ConfigError, match=r"^start the large server first \(launch/serve.sh large "
                                          r"qwen3-32b-1.7b-1gpu-80gb\)"):
        role_command(load_preset(H100), "small", load_settings(), listening=lambda port: False)
    monkeypatch.setattr("relaygen_sgl.servers.processes.port_in_use", lambda port, host: False)
    refused = run_cli("server-command", "small", H100)
    assert one_line_error(refused).startswith("relaygen: start the large server first")


def test_the_docs_table_is_what_the_plan_computes():
    """docs/usage/gpus.md's table of KV tokens and trajectories per preset and card."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "usage" / "gpus.md").read_text()
    rows = [cells for line in text.splitlines() if line.startswith("| `")
            and len(cells := line.split("|")[1:-1]) == 6]
    seen = set()
    for name_cell, card_cell, fractions, tokens, trajectory, at_once in rows:
        names = [n.strip(" `") for n in name_cell.split(",")]
        kv = [int(x.split("(")[0].strip().replace(",", "")) for x in tokens.split(" / ")]
        for name in names:
            preset = load_preset(name)
            if preset.device == "cpu":
                plan = memory.plan_cpu(preset)
            else:
                card = memory.cards()[card_cell.split("(")[0].strip()]
                plan = memory.plan_for_card(preset, card)
                assert fractions.strip() == f"{plan.servers['large'].fraction} / {plan.servers['small'].fraction}"
                seen.add((name, card.key))
            assert [plan.servers[r].kv_tokens for r in ROLES] == kv, (name, card_cell)
            assert plan.servers["large"].trajectory_tokens == int(trajectory.replace(",", ""))
            assert plan.trajectories == int(at_once)
    named = {(n, c.key) for n in preset_names() for c in memory.preset_cards(load_preset(n))}
    assert seen == named  # every preset and card it names, and only those


def test_kv_tokens_caps_both_servers_of_a_shared_preset():
    plan = memory.plan_shared(load_preset(H200), memory.cards()["H200"], kv_tokens=8192)
    assert [s.kv_tokens for s in plan.servers.values()] == [8192, 8192] and plan.trajectories == 0
    assert "no trajectory of the budget fits" in plan.verdict


def test_a_server_without_a_fraction_gets_sglangs_own_default():
    """memory_hook.py: (total - reserved) / total, reserved = 512 + 1.5 x chunk + tp/8 GiB + graphs
    (MiB), at least 10 GiB on a card of more than 60 GiB."""
    preset = load_preset("qwen3-32b-1.7b")
    s = memory.shape(preset, "small")
    bare = memory.Shape(**{**s.__dict__, "fraction": None})
    h100, l40s = memory.cards()["H100-80GB"], memory.cards()["L40S"]
    # H100: chunk 8192, decode graphs to 256: 512 + 12288 + 128 + 256 x 2 + 58 buckets x 8 = 13904 MiB
    assert memory.sglang_fraction(bare, h100) == round((81559 - 13904) / 81559, 3) == 0.83
    # L40S: chunk 4096, decode graphs to 32: 512 + 6144 + 128 + 32 x 2 + 50 x 8 = 7248 MiB
    assert memory.sglang_fraction(bare, l40s) == round((46068 - 7248) / 46068, 3) == 0.843
    chunk = memory.Shape(**{**bare.__dict__, "chunked_prefill": 2048})  # 4560 MiB: the 10 GiB floor holds
    assert memory.sglang_fraction(chunk, h100) == round((81559 - 10240) / 81559, 3) == 0.874
    assert memory.size(bare, h100, "small").fraction == 0.83

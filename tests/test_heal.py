"""`relaygen up` that heals and `relaygen restart` (issue 23 item 1), and servers that run client
code bound beyond loopback only with an API key (issue 21 item 4). The servers are stand-in
processes whose answers the test decides; the real pair is in tests/integration/test_heal_real.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import one_line_error, relaygen, run_cli

from relaygen_sgl.cli import main as cli
from relaygen_sgl.core.config import load_preset, load_settings
from relaygen_sgl.core.errors import ConfigError, LaunchError, StackError
from relaygen_sgl.servers import stack
from relaygen_sgl.servers.launch import ServerCommand, dry_run
from relaygen_sgl.servers.processes import start_server, start_ticks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stand_ins(monkeypatch):
    """Every server `up` starts is a `sleep`; it answers while its URL is in `answering`."""
    answering: set[str] = set()
    started: list[int] = []

    def fake_start(cmd, log):
        port = int(cmd.argv[cmd.argv.index("--port") + 1])
        proc = start_server(ServerCommand(argv=("sleep", "120"), env={}), log)
        started.append(port)
        answering.add(f"http://127.0.0.1:{port}")
        return proc

    def fake_answers(url, timeout_s=30.0, api_key=None):
        return url in answering

    monkeypatch.setattr(stack, "check_models", lambda preset, settings: None)
    monkeypatch.setattr(stack, "port_in_use", lambda port, host: False)
    monkeypatch.setattr(stack, "start_server", fake_start)
    monkeypatch.setattr(stack, "answers_generation", fake_answers)
    monkeypatch.setattr("relaygen_sgl.servers.processes.answers_generation", fake_answers)
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})
    settings = load_settings()
    yield settings, answering, started
    if settings.state_file.exists():
        stack.down(settings)


def _kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while start_ticks(pid) is not None and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # our child: reap it
        except ChildProcessError:
            pass
        time.sleep(0.05)


def _recorded(settings) -> dict[str, dict]:
    return {r["role"]: r for r in json.loads(settings.state_file.read_text())["servers"]}


def test_up_again_keeps_what_answers_and_starts_what_died(stand_ins):
    settings, answering, started = stand_ins
    first = stack.up(load_preset("cpu-tiny"), settings)
    pids = {role: first[role]["pid"] for role in ("large", "small")}
    assert [s["why"] for s in first["started"]] == ["new", "new"] and first["kept"] == []

    again = stack.up(load_preset("cpu-tiny"), settings)  # idempotent: nothing started
    assert again["started"] == [] and [k["pid"] for k in again["kept"]] == [pids["large"], pids["small"]]

    _kill9(pids["small"])
    answering.discard(first["small"]["url"])
    healed = stack.up(load_preset("cpu-tiny"), settings)
    assert [k["pid"] for k in healed["kept"]] == [pids["large"]]
    assert [(s["role"], s["why"]) for s in healed["started"]] == [("small", "was dead")]
    assert healed["large"]["pid"] == pids["large"] and healed["small"]["pid"] != pids["small"]
    rec = _recorded(settings)
    assert rec["small"]["restarts"] == 1 and rec["large"]["restarts"] == 0
    assert rec["large"]["started_at"] < rec["small"]["started_at"]
    st = stack.status(settings)
    assert st["healthy"] and st["small"]["restarts"] == 1 and st["large"]["uptime_s"] >= 0


def test_up_prints_what_it_kept_and_started_and_status_the_uptime_and_restarts(stand_ins, capsys):
    settings, answering, _ = stand_ins
    first = stack.up(load_preset("cpu-tiny"), settings)
    _kill9(first["small"]["pid"])
    answering.discard(first["small"]["url"])
    assert cli.main(["up", "--preset", "cpu-tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"kept large server on port 30000: pid {first['large']['pid']} (healthy)"
    assert out[1].startswith("started small server on port 30001: pid ") and out[1].endswith("(was dead)")
    assert cli.main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("large: http://127.0.0.1:30000 pid ") and " healthy, up " in lines[1]
    assert "restarted" not in lines[1] and lines[2].endswith(", restarted 1x")


def test_another_preset_still_up_is_refused_in_one_line(stand_ins):
    settings, _, _ = stand_ins
    stack.up(load_preset("cpu-tiny"), settings)
    with pytest.raises(StackError, match=r"^servers of preset 'cpu-tiny' are already up; run `relaygen down` first$"):
        stack.up(load_preset("cpu-tiny-pruned"), settings)
    with pytest.raises(StackError, match=r"^servers of preset 'cpu-tiny' are up with --kv-tokens None; run"):
        stack.up(load_preset("cpu-tiny"), settings, kv_tokens=4096)


def test_a_server_alive_but_not_answering_is_left_alone_with_one_line(stand_ins):
    settings, answering, _ = stand_ins
    first = stack.up(load_preset("cpu-tiny"), settings)
    answering.discard(first["large"]["url"])  # hung, or busy past the check
    with pytest.raises(LaunchError, match=r"the large server \(pid \d+, .*\) is running but does not answer a "
                                          r"generation; `relaygen restart large` restarts it"):
        stack.up(load_preset("cpu-tiny"), settings)
    assert start_ticks(first["large"]["pid"]) is not None  # never killed by `up`


def test_restart_one_role_keeps_the_other(stand_ins):
    settings, _, _ = stand_ins
    first = stack.up(load_preset("cpu-tiny"), settings)
    out = stack.restart(settings, "large")
    assert [(s["role"], s["why"]) for s in out["started"]] == [("large", "restart asked")]
    assert out["large"]["pid"] != first["large"]["pid"] and out["small"]["pid"] == first["small"]["pid"]
    assert start_ticks(first["large"]["pid"]) is None  # the old one was stopped
    assert _recorded(settings)["large"]["restarts"] == 1


def test_restart_of_the_first_server_on_a_shared_gpu_restarts_the_second_too(stand_ins, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    settings, _, started = stand_ins
    first = stack.up(load_preset("qwen3-32b-1.7b-1gpu"), settings)
    out = stack.restart(settings, "large")
    assert started == [30000, 30001, 30000, 30001]  # large first again: it sizes its memory at start
    assert out["started"][1]["why"] == "shares its GPU with the server on port 30000, which must start first"
    assert out["small"]["pid"] != first["small"]["pid"]


def test_restart_with_nothing_up_is_one_line():
    assert "nothing is up" in one_line_error(run_cli("restart", "small"))


# ---------------------------------------------------------------- exposure (issue 21 item 4)
def test_up_beyond_loopback_without_a_key_is_refused_before_anything_starts(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "RELAYGEN_SGLANG_API_KEY"}
    # --timeout 1: were the refusal broken, `up` would start real servers, fail their health
    # check within a second and stop them itself, instead of leaving them behind this test
    out = relaygen("up", "--preset", "cpu-tiny", "--host", "0.0.0.0", "--timeout", "1", env_extra=env)
    assert out.returncode == 2
    line = one_line_error(out)
    assert line.startswith("relaygen: --host 0.0.0.0 is reachable from other machines") and \
        "--enable-custom-logit-processor" in line and "RELAYGEN_SGLANG_API_KEY" in line
    assert out.stdout == "" and not load_settings().state_file.exists()
    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    monkeypatch.setattr(stack, "start_server", lambda *a, **k: pytest.fail("started without a key"))
    for host in ("0.0.0.0", "::", "10.1.2.3", "gpu-box.example"):
        with pytest.raises(ConfigError, match="reachable from other machines"):
            stack.up(load_preset("cpu-tiny"), load_settings(), host=host)


def test_loopback_or_a_key_passes_the_exposure_check(monkeypatch):
    from relaygen_sgl.servers.launch import check_exposure

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(load_preset("cpu-tiny"), host, None)
    check_exposure(load_preset("cpu-tiny"), "0.0.0.0", "a-key")
    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    plan = dry_run(load_preset("cpu-tiny"), load_settings(), host="0.0.0.0")  # shown, with the refusal noted
    assert "a real start would refuse: --host 0.0.0.0 is reachable" in plan["note"]


def test_serve_sh_beyond_loopback_needs_the_key():
    env = {k: v for k, v in os.environ.items() if k != "RELAYGEN_SGLANG_API_KEY"}
    out = subprocess.run([str(ROOT / "launch" / "serve.sh"), "large", "cpu-tiny", "0.0.0.0"], capture_output=True,
                         text=True, timeout=120, env={**env, "DRY_RUN": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        line for line in out.stderr.splitlines() if line.startswith("relaygen: --host 0.0.0.0 is reachable")]
    ok = subprocess.run([str(ROOT / "launch" / "serve.sh"), "large", "cpu-tiny", "0.0.0.0"], capture_output=True,
                        text=True, timeout=120, env={**env, "DRY_RUN": "1", "RELAYGEN_SGLANG_API_KEY": "k-123"})
    assert ok.returncode == 0, ok.stderr
    assert "--host 0.0.0.0" in ok.stderr and "k-123" not in ok.stderr


def test_healing_on_a_shared_gpu_keeps_the_fractions_of_the_first_plan(stand_ins, monkeypatch):
    """The large server kept holds ~68 GiB: measured now, the GPU would look too small; the small
    server gets the fraction it had, computed for the memory free before the large one started."""
    from relaygen_sgl.servers.gpus import GpuMemory

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    settings, answering, started = stand_ins
    free = {"0": GpuMemory(79.1, 79.6)}
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: free)
    seen: list[tuple] = []
    real_start = stack.start_server

    def spy(cmd, log):
        seen.append(cmd.argv)
        return real_start(cmd, log)

    monkeypatch.setattr(stack, "start_server", spy)
    first = stack.up(load_preset("qwen3-32b-1.7b-1gpu"), settings)
    free["0"] = GpuMemory(10.2, 79.6)  # what nvidia-smi says with the large server up
    _kill9(first["small"]["pid"])
    answering.discard(first["small"]["url"])
    healed = stack.up(load_preset("qwen3-32b-1.7b-1gpu"), settings)
    assert [k["role"] for k in healed["kept"]] == ["large"] and [s["role"] for s in healed["started"]] == ["small"]
    fraction = [a[a.index("--mem-fraction-static") + 1] for a in seen]
    assert len(fraction) == 3 and fraction[2] == fraction[1] == "0.549"

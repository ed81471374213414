"""`relaygen up/status/down` without servers: state files good and bad, dead and reused
pids, process groups whose leader died, the up/down lock, the port check per host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from relaygen_sgl.core.config import client_url, load_settings
from relaygen_sgl.core.errors import LaunchError, StackError
from relaygen_sgl.core.files import exclusive
from relaygen_sgl.servers import stack
from relaygen_sgl.servers.launch import launch_plan
from relaygen_sgl.servers.processes import port_in_use, start_ticks


def write_state(settings, servers, **extra):
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.state_file.write_text(json.dumps({"preset": "cpu-tiny", "servers": servers, **extra}))


def record(role, pid, ticks, port=39990):
    return {"role": role, "url": f"http://127.0.0.1:{port}", "pid": pid, "log": "/nonexistent.log",
            "port": port, "kind": "server", "start_ticks": ticks}


def dead_pid() -> tuple[int, int]:
    proc = subprocess.Popen(["true"])
    ticks = start_ticks(proc.pid)
    proc.wait()
    return proc.pid, ticks or 1


def gone(pid: int) -> bool:
    return start_ticks(pid) is None


@pytest.mark.parametrize("content", [b"", b"{", b'{"preset": "x", "serv', b"[1, 2]", b'{"servers": 3}',
                                     b"\xff\xfe not utf-8"])
def test_status_never_raises_on_a_corrupt_state_file(content):
    settings = load_settings()
    settings.run_dir.mkdir(parents=True)
    settings.state_file.write_bytes(content)
    st = stack.status(settings)
    assert not st["healthy"] and "corrupt" in st["problem"] and st["large"]["state"] == "unknown"
    with pytest.raises(StackError, match="corrupt"):
        stack.down(settings)
    assert settings.state_file.read_bytes() == content  # left for the user to look at


def test_status_with_nothing_up_a_dead_pid_a_missing_role_and_a_malformed_record():
    settings = load_settings()
    st = stack.status(settings)
    assert st["problem"].startswith("nothing is up") and st["small"]["state"] == "not up"
    pid, ticks = dead_pid()
    write_state(settings, [record("large", pid, ticks), {"role": "small", "url": "http://x:1"}])
    st = stack.status(settings)
    assert st["large"]["state"] == "dead" and not st["large"]["healthy"] and st["large"]["pid"] == pid
    assert st["small"]["state"] == "missing" and st["small"]["url"] is None
    assert "large dead" in st["problem"] and "1 malformed server record" in st["problem"]
    json.dumps(st)  # what `status --json` prints


def test_a_reused_pid_is_never_signalled():
    settings = load_settings()
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ticks = start_ticks(victim.pid)
        write_state(settings, [record("large", victim.pid, ticks + 1)])  # same pid, another process
        assert stack.status(settings)["large"]["state"] == "dead"
        assert stack.down(settings) == []
        assert victim.poll() is None and not settings.state_file.exists()
    finally:
        victim.kill()
        victim.wait()


def test_down_stops_the_group_of_a_dead_leader():
    settings = load_settings()
    # the leader starts a worker in its own process group, then dies (a crashed SGLang server)
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; read _"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = int(leader.stdout.readline())
    ticks = start_ticks(leader.pid)
    assert ticks is not None
    leader.stdin.close()  # the leader exits
    leader.wait()
    leader.stdout.close()
    assert not gone(worker) and os.getpgid(worker) == leader.pid
    write_state(settings, [record("large", leader.pid, ticks)])
    assert "orphaned" in stack.status(settings)["large"]["state"]
    assert stack.down(settings) == [leader.pid]
    deadline = time.monotonic() + 10
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)


def test_up_and_down_take_a_lock():
    settings = load_settings()
    write_state(settings, [])
    with exclusive(settings.run_dir / "stack.lock", "held by the test"):
        with pytest.raises(StackError, match="another relaygen up/down is running"):
            stack.down(settings)
        from relaygen_sgl.core.config import load_preset

        with pytest.raises(StackError, match="another relaygen up/down is running"):
            stack.up(load_preset("cpu-tiny"), settings)
    assert stack.down(settings) == []  # released


def _free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_the_port_check_binds_the_host_the_server_will_bind():
    port = _free_port()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_in_use(port, "127.0.0.1") and port_in_use(port, "0.0.0.0")
        if socket.has_ipv6:
            try:
                assert port_in_use(port, "::")  # dual-stack: the IPv4 listener is in the way
            except LaunchError:
                pytest.skip("no IPv6 on this machine")
    assert not port_in_use(port, "127.0.0.1")
    with pytest.raises(LaunchError, match="cannot use --host"):
        port_in_use(port, "no-such-host.invalid")


def test_client_urls_for_wildcard_and_ipv6_hosts():
    assert client_url("::", 30000) == "http://[::1]:30000"
    assert client_url("0.0.0.0", 1) == "http://127.0.0.1:1"
    assert client_url("fe80::1", 2) == "http://[fe80::1]:2" and client_url("h.example", 3) == "http://h.example:3"


def test_up_checks_the_ports_on_the_host_it_will_bind(monkeypatch):
    from relaygen_sgl.core.config import load_preset

    asked = []
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "k")  # "::" is beyond loopback: a key is required
    monkeypatch.setattr(stack, "check_models", lambda preset, settings: None)
    monkeypatch.setattr(stack, "port_in_use", lambda port, host: asked.append((port, host)) or True)
    with pytest.raises(LaunchError, match="port 30000 for the large server is already in use on ::"):
        stack.up(load_preset("cpu-tiny"), load_settings(), host="::")
    assert asked == [(30000, "::")]


def test_up_gives_each_server_its_own_gpus_and_records_them(monkeypatch):
    from relaygen_sgl.core.config import load_preset
    from relaygen_sgl.servers.launch import ServerCommand
    from relaygen_sgl.servers.processes import start_server

    seen = []

    def fake_start(cmd, log):  # a stand-in process per server/router, started as up starts one
        seen.append(cmd)
        return start_server(ServerCommand(argv=("sleep", "30"), env={}), log)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    monkeypatch.setattr(stack, "check_models", lambda preset, settings: None)
    monkeypatch.setattr(stack, "port_in_use", lambda port, host: False)
    monkeypatch.setattr(stack, "start_server", fake_start)
    monkeypatch.setattr(stack, "wait_healthy", lambda *a: None)
    monkeypatch.setattr(stack, "answers_generation", lambda *a, **k: True)
    settings = load_settings()
    try:
        st = stack.up(load_preset("qwen3-32b-1.7b"), settings, replicas={"large": 2, "small": 1})
        assert [c.env.get("CUDA_VISIBLE_DEVICES") for c in seen] == ["0,1", "2,3", None, "4"]
        assert "sglang_router.launch_router" in seen[2].argv and st["large"]["replicas"]
        recorded = json.loads(settings.state_file.read_text())["servers"]
        assert [r.get("devices") for r in recorded] == ["0,1", "2,3", None, "4"]
    finally:
        stack.down(settings)
    plan = launch_plan(load_preset("cpu-tiny"), settings, replicas={"large": 1, "small": 2})
    assert [(p.role, p.kind, p.replica) for p in plan.processes] == [
        ("large", "server", 0), ("small", "server", 0), ("small", "server", 1), ("small", "router", 2)]

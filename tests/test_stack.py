"""`relaygen up/status/down` without servers: state files good and bad, dead and reused
pids, process groups whose leader died, the up/down lock, the port check per host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


# ---------------------------------------------------------------- leftovers (issue 30 item 5)
# What an SGLang server leaves when it is stopped (it answers SIGTERM by SIGKILLing its own tree,
# so nothing of its own cleanup runs): a file it maps in /dev/shm (its load slots), one it holds
# open, a multiprocessing semaphore (sem.mp-*, mapped under the temporary name glibc made it with),
# a Unix socket in its TMPDIR (its ZMQ IPC names), and its arguments in its log, the key included.
STAND_IN = r'''
import json, mmap, multiprocessing, os, signal, socket, sys, tempfile, time, uuid
signal.signal(signal.SIGTERM, lambda *a: os.killpg(0, signal.SIGKILL))
port, key_file = sys.argv[1], sys.argv[sys.argv.index("--config") + 1]
tag = f"/dev/shm/relaygen-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
fd = os.open(tag + "-mapped.shm", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
mapped = mmap.mmap(fd, 4096)
held = open(tag + "-held.shm", "w")
sem = multiprocessing.get_context("spawn").Semaphore()
sock = socket.socket(socket.AF_UNIX)
path = tempfile.NamedTemporaryFile(delete=False).name
os.unlink(path)
sock.bind(path)
print(f"server_args={{'api_key': {json.load(open(key_file))['api-key']!r}, 'port': {port}}}", flush=True)
open(os.path.join(os.environ["TMPDIR"], "ready"), "w").close()
time.sleep(600)
'''


@pytest.fixture
def shm_stand_ins(monkeypatch, tmp_path):
    """`up` starts STAND_IN for every server; one answers once it has made its files."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    ready: dict[str, str] = {}

    def fake_start(cmd, log):
        from relaygen_sgl.servers.launch import ServerCommand
        from relaygen_sgl.servers.processes import start_server

        port = cmd.argv[cmd.argv.index("--port") + 1]
        ready[f"http://127.0.0.1:{port}"] = os.path.join(cmd.env["TMPDIR"], "ready")
        argv = (sys.executable, str(script), port, "--config", cmd.argv[cmd.argv.index("--config") + 1])
        return start_server(ServerCommand(argv=argv, env=cmd.env, pass_fds=cmd.pass_fds), log)

    def fake_answers(url, timeout_s=30.0, api_key=None):
        return os.path.exists(ready.get(url, "/nonexistent"))

    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    monkeypatch.setattr(stack, "check_models", lambda preset, settings: None)
    monkeypatch.setattr(stack, "port_in_use", lambda port, host: False)
    monkeypatch.setattr(stack, "start_server", fake_start)
    monkeypatch.setattr(stack, "answers_generation", fake_answers)
    monkeypatch.setattr("relaygen_sgl.servers.processes.answers_generation", fake_answers)
    settings = load_settings()
    yield settings
    if settings.state_file.exists():
        stack.down(settings)


def _servers(settings) -> dict[str, dict]:
    return {r["role"]: r for r in json.loads(settings.state_file.read_text())["servers"]}


def test_down_and_restart_remove_the_shm_files_and_sockets_of_their_servers_and_nothing_else(shm_stand_ins):
    from relaygen_sgl.core.config import load_preset
    from relaygen_sgl.core.state import key_path

    settings = shm_stand_ins
    stack.up(load_preset("cpu-tiny"), settings)
    key = json.loads(key_path(settings).read_text())["api-key"]
    first = _servers(settings)
    for rec in first.values():  # recorded once the server answered: mapped, held open, the semaphore
        names = sorted(rec["shm"])
        assert len(names) == 3 and names[0].startswith("relaygen-test-") and names[2].startswith("sem.mp-"), names
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
        assert [e.is_socket() for e in Path(rec["tmp_dir"]).iterdir() if e.name != "ready"] == [True]
        text = Path(rec["log"]).read_text()  # its arguments logged, the key scrubbed once it answered
        assert "'api_key': '" + "*" * len(key) + "'" in text and key not in text

    stack.restart(settings, "large")  # the old large server's files go with it
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in first["large"]["shm"])
    assert not os.path.exists(first["large"]["tmp_dir"])
    now = _servers(settings)
    assert now["large"]["pid"] != first["large"]["pid"] and all(os.path.exists(f"/dev/shm/{n}")
                                                                 for n in now["large"]["shm"])

    os.killpg(now["small"]["pid"], signal.SIGKILL)  # the small server crashes: its files stay behind ...
    deadline = time.monotonic() + 10
    while start_ticks(now["small"]["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(os.path.exists(f"/dev/shm/{n}") for n in now["small"]["shm"])
    # ... beside two names recorded for it that are no longer its own: one another live process maps,
    # one made again by someone else (another inode); both must survive `down`
    foreign = subprocess.Popen([sys.executable, "-c", "import mmap, os, sys, time; "
                                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, 4096); "
                                "m = mmap.mmap(fd, 4096); print(os.fstat(fd).st_ino, flush=True); time.sleep(60)",
                                f"/dev/shm/relaygen-test-foreign-{os.getpid()}"], stdout=subprocess.PIPE, text=True)
    remade = Path(f"/dev/shm/relaygen-test-remade-{os.getpid()}")
    try:
        foreign_ino = int(foreign.stdout.readline())
        remade.write_text("")
        state = json.loads(settings.state_file.read_text())
        for rec in state["servers"]:
            if rec["role"] == "small":
                rec["shm"][f"relaygen-test-foreign-{os.getpid()}"] = foreign_ino
                rec["shm"][remade.name] = remade.stat().st_ino + 1
        settings.state_file.write_text(json.dumps(state))
        stack.down(settings)
        for rec in now.values():
            assert not [n for n in rec["shm"] if os.path.exists(f"/dev/shm/{n}")], rec["shm"]
            assert not os.path.exists(rec["tmp_dir"])
        assert os.path.exists(f"/dev/shm/relaygen-test-foreign-{os.getpid()}") and remade.exists()
        assert not key_path(settings).exists()
    finally:
        foreign.kill()
        foreign.wait()
        Path(f"/dev/shm/relaygen-test-foreign-{os.getpid()}").unlink(missing_ok=True)
        remade.unlink(missing_ok=True)


# ---------------------------------------------------------------- replicas with a key (issue 30 item 1)
FAKE_WORKER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, key, seen = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Worker(BaseHTTPRequestHandler):
    def handle_one(self, body):
        auth = self.headers.get("Authorization")
        with open(seen, "a") as f:
            f.write(f"{self.command} {self.path} {auth}\n")
        if not self.path.startswith("/health") and auth != f"Bearer {key}":  # SGLang's rule (utils/auth.py)
            self.send_response(401)
            self.end_headers()
            return
        out = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        self.handle_one({"model_path": "m", "tokenizer_path": "m", "is_generation": True})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.handle_one({"text": "ok", "meta_info": {"finish_reason": {"type": "length"}}})

    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Worker).serve_forever()
'''


def test_a_keyed_router_requires_the_key_and_passes_it_to_its_workers(tmp_path):
    """sglang-router as `up` starts it for replicas with a key (router_command, through `relaygen
    with-key`): 401 without the key, the workers asked with it, the key on no command line."""
    import httpx

    from relaygen_sgl.core.state import write_key
    from relaygen_sgl.servers.launch import router_command

    settings = load_settings()
    key = "router-key-" + os.urandom(6).hex()
    path = write_key(settings, key)
    ports = [_free_port() for _ in range(3)]
    script, seen = tmp_path / "worker.py", tmp_path / "seen.txt"
    script.write_text(FAKE_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(p), key, str(seen)]) for p in ports[1:]]
    cmd = router_command([f"http://127.0.0.1:{p}" for p in ports[1:]], ports[0], key_file=str(path))
    assert "with-key" in cmd.argv and "sglang_router.launch_router" in cmd.argv and key not in " ".join(cmd.argv)
    log = (tmp_path / "router.log").open("wb")
    router = subprocess.Popen(cmd.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(router)
    try:
        url = f"http://127.0.0.1:{ports[0]}/generate"
        deadline, ok = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                ok = httpx.post(url, json={"text": "hi"}, headers={"Authorization": f"Bearer {key}"}, timeout=5)
                if ok.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert ok is not None and ok.status_code == 200, (tmp_path / "router.log").read_text()[-2000:]
        assert httpx.post(url, json={"text": "hi"}, timeout=5).status_code == 401
        wrong = httpx.post(url, json={"text": "hi"}, headers={"Authorization": "Bearer wrong"}, timeout=5)
        assert wrong.status_code == 401
        asked = seen.read_text().splitlines()
        assert f"POST /generate Bearer {key}" in asked and any(a.startswith("GET /model_info Bearer") for a in asked)
        assert key not in (tmp_path / "router.log").read_text()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        log.close()

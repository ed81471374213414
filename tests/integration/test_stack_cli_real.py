"""One real cpu-tiny pair driven through the CLI, step by step (issue 31: one start for what
three modules started five times): exposure beyond loopback only with a key (issue 21 item 4);
a default `relaygen up` with no key in the environment whose servers require a random key that
every client finds and no `ps`, log, status or readable file shows (issue 30 item 1); a small
server killed with -9 while runs and batches start degraded or refuse, then `relaygen up` that
heals it and keeps the large server and its radix cache (issue 23 item 1); `relaygen down`
that leaves none of its servers' files in /dev/shm, nor their sockets and key (issue 30 item 5).

The pair runs on the preset's own ports with a private RELAYGEN_HOME (the module fixture, which
runs `relaygen down` at the end whatever happened). The tests run in file order and each uses
what the ones before it left: each first checks that its precondition holds and fails at once,
saying which step did not do its part, rather than timing out or failing later with a misleading
message."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from paths import REAL_MODELS
from test_cli import one_line_error

from relaygen_sgl.api import Relay
from relaygen_sgl.core.config import API_KEY_ENV, KEY_FILE
from relaygen_sgl.servers.processes import start_ticks

pytestmark = pytest.mark.integration

PORTS = {"large": 30000, "small": 30001}  # the preset's own
QUESTION = "Tom has 3 apples and buys 5 more. Then he gives 2 away. How many apples does he have? Explain step by step."
SHORT = "What is 2 + 3? Answer briefly."
# the stack's KV pools: smaller than cpu-tiny's 8192-token context, so the pool is what binds
# (every run here asks a few tokens; the pool check asks more than the pool holds)
KV_TOKENS = 2048
ESSAY = "Write a long essay on the history of mathematics, from Babylon to the twentieth century."
BODY = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}


@dataclass
class Stack:
    """The pair and what each step found, for the steps after it."""
    home: Path
    up_ok: bool = False  # the default `relaygen up` (no key in the environment) started both servers
    pids: dict[str, int] = field(default_factory=dict)  # by role, as `up` started them
    before: Any = field(default=None, repr=False)  # the relay run before the kill (a RelayResult)
    killed: bool = False  # the small server's process group is gone
    healed: bool = False  # `up` again: large kept, small started
    down_ok: bool = False  # the last step ran `relaygen down`
    shm: dict[str, int] = field(default_factory=dict)  # every server's /dev/shm files seen (name: inode)
    tmp_dirs: set[str] = field(default_factory=set)  # every server's private TMPDIR
    killed_files: dict[str, int] = field(default_factory=dict)  # the killed small server's /dev/shm files

    @property
    def key_file(self) -> Path:
        return self.home / "run" / KEY_FILE

    @property
    def key(self) -> str:
        """The key `up` made (the test reads it as the servers' user may)."""
        if not self.key_file.exists():
            pytest.fail(f"no key file at {self.key_file}: the default `up` did not make one")
        return json.loads(self.key_file.read_text())["api-key"]

    def env(self) -> dict[str, str]:
        """The CLI's environment: the private home, the built models, and no key at all."""
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        env.update(RELAYGEN_HOME=str(self.home), RELAYGEN_MODELS=str(REAL_MODELS))
        return env

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env())

    def note_files(self) -> None:
        """What each server now holds in /dev/shm, and its TMPDIR, for the check after `down`."""
        for pid in self.pids.values():
            self.shm.update(shm_files(pid))
        for rec in json.loads((self.home / "run" / "stack.json").read_text())["servers"]:
            if rec.get("tmp_dir"):
                self.tmp_dirs.add(rec["tmp_dir"])

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        return json.loads(out.stdout)

    # the preconditions, each a clear failure naming the step that did not do its part
    def need_up(self) -> None:
        if not self.up_ok:
            pytest.fail("the pair is not up: the default `relaygen up` step did not run or failed")

    def need_large_alive(self) -> None:
        self.need_up()
        if not alive(self.pids["large"]):
            pytest.fail(f"the large server (pid {self.pids['large']}) should still run here: it died in an "
                        "earlier step")

    def need_small_dead(self) -> None:
        self.need_large_alive()
        if not self.killed or alive(self.pids["small"]):
            pytest.fail("the small server should be dead here: the kill step did not run or failed")

    def need_healed(self) -> None:
        self.need_large_alive()
        if not self.healed:
            pytest.fail("the pair should be healed here: the `relaygen up` heal step did not run or failed")


def alive(pid: int) -> bool:
    return start_ticks(pid) is not None  # None: gone, or a zombie


def shm_files(pgid: int) -> dict[str, int]:
    """/dev/shm files (name: inode) the processes of group `pgid` map or hold open, read from
    /proc (a POSIX semaphore shows in the maps under glibc's temporary name: matched by inode)."""
    inodes: set[int] = set()
    for entry in os.scandir("/proc"):
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != pgid:
                continue
            for line in Path(f"/proc/{entry.name}/maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                    inodes.add(int(parts[4]))
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path).startswith("/dev/shm/"):
                    inodes.add(os.stat(fd.path).st_ino)
        except OSError:
            continue
    return {e.name: e.inode() for e in os.scandir("/dev/shm") if e.inode() in inodes}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The private home and key; `relaygen down` at the end whatever happened, and no server left."""
    if not (REAL_MODELS / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.fail(f"no built model under {REAL_MODELS}: run `relaygen models fetch --preset cpu-tiny`")
    st = Stack(home=tmp_path_factory.mktemp("stack-home"))
    yield st
    down = st.cli("down")
    if st.pids and not st.down_ok:
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 30
        while any(alive(p) for p in st.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in st.pids.values() if alive(p)], "down left a server process behind"


@pytest.fixture
def relay(stack, monkeypatch):
    """An in-process Relay on the pair as a user makes one: the home in its environment, no key
    given anywhere (connect() finds the home's)."""
    monkeypatch.setenv("RELAYGEN_HOME", str(stack.home))
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def make() -> Relay:
        return Relay(preset="cpu-tiny")
    return make


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


# --- a key by default (issue 30 item 1) --------------------------------------------------------

def test_up_beyond_loopback_without_a_key_is_refused_in_one_line(stack):
    """Beyond loopback the remote clients need a key they can be given: $RELAYGEN_SGLANG_API_KEY."""
    refused = stack.cli("up", "--preset", "cpu-tiny", "--host", "0.0.0.0")
    assert refused.returncode == 2 and "reachable from other machines" in one_line_error(refused)
    assert "nothing is up" in one_line_error(stack.cli("status", "--json"))  # nothing started


def test_a_default_up_with_no_key_in_the_environment(stack):
    up = stack.cli("up", "--preset", "cpu-tiny", "--kv-tokens", str(KV_TOKENS), timeout=600)
    st = stack.status() if up.returncode == 0 else {}
    stack.pids = {role: st[role]["pid"] for role in PORTS if st.get(role, {}).get("pid")}
    assert up.returncode == 0, up.stderr[-2000:]
    assert not warning_lines(up.stderr), up.stderr
    assert st["healthy"] and {role: st[role]["url"] for role in PORTS} == \
        {role: f"http://127.0.0.1:{port}" for role, port in PORTS.items()}
    stack.note_files()
    stack.up_ok = True
    assert st.get("api_key") is True  # what `up` recorded: the servers require a key


def test_keyless_and_wrong_key_requests_get_401_the_key_200_on_both_ports(stack):
    stack.need_up()
    for port in PORTS.values():
        url = f"http://127.0.0.1:{port}/generate"
        assert httpx.post(url, json=BODY, timeout=60).status_code == 401
        assert httpx.post(url, json=BODY, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        ok = httpx.post(url, json=BODY, headers={"Authorization": f"Bearer {stack.key}"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_no_key_in_ps_status_a_log_or_a_file_others_can_read(stack):
    stack.need_up()
    key = stack.key
    assert stat.S_IMODE(stack.key_file.stat().st_mode) == 0o600
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
    assert key not in ps and "--config " + str(stack.key_file) in ps  # the servers name the file, not the key
    for pid in stack.pids.values():
        assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    status = stack.cli("status", "--json")
    assert status.returncode == 0 and key not in status.stdout + status.stderr
    logs = list((stack.home / "run" / "logs").glob("*.log"))
    assert len(logs) == 2 and all("server_args=" in log.read_text() for log in logs)  # SGLang logs its arguments
    for log in logs:  # ... its key scrubbed once it answered
        assert key not in log.read_text() and "'api_key': '" + "*" * len(key) + "'" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    readable = [p for p in [*stack.home.rglob("*"), *(Path(d) for d in stack.tmp_dirs)]
                if p.is_file() and p.stat().st_mode & 0o044]
    assert not [p for p in readable if key.encode() in p.read_bytes()]
    assert all(stat.S_IMODE(os.stat(d).st_mode) == 0o700 for d in stack.tmp_dirs)


# --- a relay, then the small server killed ------------------------------------------------------

# a bench run the size of a smoke test: each part once (the CLI's `bench --quick` takes ~10 min)
TINY_BENCH = ("import dataclasses, sys; from relaygen_sgl.bench import runner; "
              "off = {'pressure': 0} if 'pressure' in {f.name for f in dataclasses.fields(runner.BenchConfig)} "
              "else {}; "
              "runner.BenchConfig.quick = classmethod(lambda cls, preset: cls(preset=preset, questions=1, reps=1, "
              "max_tokens=8, load_levels=(1,), load_max_tokens=8, dataset='amc23', handoff_questions=1, "
              "load_rounds=1, floor_trials=1, kind='quick', **off)); "
              "from relaygen_sgl.cli.main import main; sys.exit(main(sys.argv[1:]))")


def test_run_eval_bench_and_serve_find_the_key_with_no_user_action(stack, tmp_path):
    """Before the relay run the heal test compares with: the bench flushes the servers' caches."""
    stack.need_up()
    run = stack.cli("run", SHORT, "--max-tokens", "8", "--json", timeout=300)
    assert run.returncode == 0 and orjson.loads(run.stdout)["stats"]["large_tokens"] > 0, run.stderr[-2000:]
    ev = stack.cli("eval", "--dataset", "amc23", "--limit", "1", "--k", "1", "--max-tokens", "8",
                   "--out", str(tmp_path / "eval"), "--no-progress", timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    bench = subprocess.run([sys.executable, "-c", TINY_BENCH, "bench", "--quick", "--out", str(tmp_path / "bench")],
                           capture_output=True, text=True, timeout=600, env=stack.env())
    assert bench.returncode == 0 and (tmp_path / "bench" / "bench.json").exists(), bench.stderr[-2000:]
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "relaygen_sgl.cli", "serve", "--port", str(port)],
                             stdout=log, stderr=subprocess.STDOUT, env=stack.env())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and serve.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
            "model": "relaygen", "messages": [{"role": "user", "content": SHORT}], "max_tokens": 8})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text
    finally:
        serve.terminate()
        serve.wait(30)
        log.close()
    assert stack.key not in (tmp_path / "serve.log").read_text() + run.stderr + ev.stderr + bench.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_relay_run_before_the_kill(stack, relay):
    """connect() (through Relay) with no key given: it finds the home's."""
    stack.need_up()
    with relay() as r:
        res = r.run(QUESTION, max_tokens=12, temperature=0)
    assert any(s.role == "large" for s in res.segments), [s.role for s in res.segments]
    stack.before = res


def prefills(stack) -> int:
    """Prefill batches the stack's servers have run (SGLang logs each at INFO)."""
    return sum(log.read_text().count("Prefill batch") for log in (stack.home / "run" / "logs").glob("*.log"))


def test_a_budget_past_the_kv_pool_is_refused_in_one_line_before_any_request(stack):
    """`up --kv-tokens 2048`, then a run asking 4000 tokens: the small pool cannot hold it."""
    stack.need_up()
    before = prefills(stack)
    t0 = time.monotonic()
    run = stack.cli("run", ESSAY, "--max-tokens", "4000", timeout=120)
    took = time.monotonic() - t0
    line = one_line_error(run)
    assert run.returncode == 2 and "KV pool holds 2048 tokens" in line, run.stderr[-2000:]
    fits = int(re.search(r"the largest budget that fits is max_tokens=(\d+)", line)[1])
    assert 1900 < fits < 2048 and took < 30, (line, took)
    assert prefills(stack) == before  # no request reached a server


def test_kill_9_of_the_small_servers_process_group(stack):
    stack.need_large_alive()
    pid = stack.pids["small"]
    stack.note_files()  # a server killed so leaves its files behind: the heal removes them
    stack.killed_files = shm_files(pid)
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
    st = stack.status()
    assert st["small"]["state"].startswith("dead") and st["large"]["state"] == "healthy", st
    stack.killed = True


# --- the small server dead when a run or batch starts --------------------------------------------

def test_run_with_the_small_server_dead_starts_degraded_with_one_warning_or_refuses(stack):
    stack.need_small_dead()
    t0 = time.monotonic()
    ok = stack.cli("run", SHORT, "--preset", "cpu-tiny", "--on-small-failure", "large", "--max-tokens", "12",
                   "--json", timeout=600)
    took = time.monotonic() - t0
    assert ok.returncode == 0, ok.stderr[-2000:]
    # one warning; any other line is a note about the run itself (e.g. the answer reserve)
    assert len(warning_lines(ok.stderr)) == 1, ok.stderr
    assert all(line.startswith(("relaygen: warning:", "relaygen: note:")) for line in ok.stderr.splitlines()), ok.stderr
    assert "small server" in ok.stderr and "degraded" in ok.stderr and "Traceback" not in ok.stderr
    rec = orjson.loads(ok.stdout)
    assert rec["degraded"]["role"] == "small" and rec["degraded"]["from_token"] == 0
    assert {s["role"] for s in rec["segments"]} <= {"large", "inserted"} and rec["stats"]["large_tokens"] > 0
    print(f"\nrun, small server dead: degraded in {took:.1f} s; stderr: {ok.stderr.strip()}")

    refused = stack.cli("run", SHORT, "--preset", "cpu-tiny", "--on-small-failure", "fail", "--max-tokens", "12")
    assert refused.returncode != 0 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "small server" in refused.stderr and "--on-small-failure large" in refused.stderr
    print(f"run --on-small-failure fail: exit {refused.returncode}; stderr: {refused.stderr.strip()}")


def test_batch_with_the_small_server_dead_starts_degraded_with_one_warning_or_refuses(stack, tmp_path):
    stack.need_small_dead()
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}? Answer briefly."}) + "\n"
                           for i in range(3)))
    ok = stack.cli("batch", "relay", str(src), "-o", str(out), "--preset", "cpu-tiny", "--on-small-failure", "large",
                   "--max-tokens", "8", "--concurrency", "2", "--no-progress", timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(warning_lines(ok.stderr)) == 1 and "degraded" in warning_lines(ok.stderr)[0], ok.stderr
    assert "Traceback" not in ok.stderr and "3 ok, 0 error(s)" in ok.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(recs) == 3 and all(r["status"] == "ok" and r["degraded"]["from_token"] == 0 for r in recs)
    assert all(s["role"] in ("large", "inserted") for r in recs for s in r["segments"])

    out2 = tmp_path / "out2.jsonl"
    refused = stack.cli("batch", "relay", str(src), "-o", str(out2), "--preset", "cpu-tiny",
                        "--on-small-failure", "fail", "--max-tokens", "8", "--no-progress")
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "small server" in refused.stderr and not (out2.exists() and out2.read_bytes())


# --- `relaygen up` heals --------------------------------------------------------------------------

def test_up_again_keeps_the_large_server_and_starts_the_dead_small_one(stack):
    stack.need_small_dead()
    large_pid, small_pid = stack.pids["large"], stack.pids["small"]
    key = stack.key
    healed = stack.cli("up", "--preset", "cpu-tiny", "--kv-tokens", str(KV_TOKENS), timeout=600)
    assert healed.returncode == 0, healed.stderr[-2000:]
    assert key not in healed.stdout + healed.stderr and stack.key == key  # the servers kept hold the key
    lines = healed.stdout.splitlines()
    assert lines[0] == f"kept large server on port 30000: pid {large_pid} (healthy)"
    assert lines[1].startswith("started small server on port 30001: pid ") and lines[1].endswith("(was dead)")
    st = stack.status()
    stack.pids["small"] = st["small"]["pid"]  # the fixture's teardown checks that `down` stops it
    stack.note_files()
    assert stack.killed_files and not [n for n, ino in stack.killed_files.items()
                                       if os.path.exists(f"/dev/shm/{n}") and os.stat(f"/dev/shm/{n}").st_ino == ino]
    assert st["healthy"] and st["large"]["pid"] == large_pid and st["small"]["pid"] != small_pid
    assert st["small"]["restarts"] == 1 and st["large"]["restarts"] == 0
    text = stack.cli("status").stdout
    assert "restarted 1x" in text.splitlines()[2] and "restarted" not in text.splitlines()[1]
    stack.healed = True


def test_the_large_servers_radix_cache_survived_the_heal(stack, relay):
    stack.need_healed()
    if stack.before is None:
        pytest.fail("no relay run before the kill to compare with: that step did not run or failed")
    with relay() as r:
        after = r.run(QUESTION, max_tokens=12, temperature=0)
    large0 = next(s for s in after.segments if s.role == "large")
    first0 = next(s for s in stack.before.segments if s.role == "large")
    assert large0.prompt_tokens == first0.prompt_tokens
    # only the prompt's last token is prefilled again
    assert large0.reprefilled == 1, (large0.prompt_tokens, large0.cached_tokens)
    small0 = next((s for s in after.segments if s.role == "small"), None)
    if small0 is not None:  # the restarted small server starts with an empty cache
        assert small0.cached_tokens < small0.prompt_tokens - 1


# --- `relaygen down` leaves nothing behind (issue 30 item 5) ------------------------------------

def test_down_leaves_none_of_its_servers_files_in_dev_shm_nor_their_sockets_and_key(stack):
    stack.need_up()
    stack.note_files()
    assert any(n.startswith("sglang_loads_") for n in stack.shm) and any(n.startswith("sem.") for n in stack.shm), \
        stack.shm  # what SGLang 0.5.23 makes: its load slots and multiprocessing semaphores
    live = [d for d in stack.tmp_dirs if os.path.exists(d)]  # the killed server's went with the heal
    sockets = [e for d in live for e in Path(d).iterdir() if e.is_socket()]  # SGLang's IPC names
    down = stack.cli("down")
    assert down.returncode == 0, down.stderr
    stack.down_ok = True
    left = {n: ino for n, ino in stack.shm.items() if os.path.exists(f"/dev/shm/{n}")
            and os.stat(f"/dev/shm/{n}").st_ino == ino}
    assert not left, f"left in /dev/shm: {sorted(left)}"
    assert len(live) == 2 and len(sockets) >= 2 * 3, (live, sockets)
    assert not [d for d in stack.tmp_dirs if os.path.exists(d)] and not stack.key_file.exists()
    assert not [p for p in stack.pids.values() if alive(p)]

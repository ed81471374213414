"""`relaygen up` that heals and `relaygen restart` (issue 23 item 1), and servers that run client
code bound beyond loopback only with an API key (issue 21 item 4). The servers are stand-in
processes whose answers the test decides; the real pair is in tests/integration/test_heal_real.py."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
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


class Started(list):
    """The ports started, in order; `commands` what `up` asked to run, `keys` the keys its health
    checks sent."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[ServerCommand] = []
        self.keys: list[str | None] = []
        self.pids: list[int] = []


@pytest.fixture
def stand_ins(monkeypatch):
    """Every server `up` starts is a `sleep` (holding what the server would inherit: the key file's
    locked descriptor); it answers while its URL is in `answering`."""
    answering: set[str] = set()
    started = Started()

    def fake_start(cmd, log):
        port = int(cmd.argv[cmd.argv.index("--port") + 1])
        proc = start_server(ServerCommand(argv=("sleep", "120"), env={}, pass_fds=cmd.pass_fds), log)
        started.append(port)
        started.commands.append(cmd)
        started.pids.append(proc.pid)
        answering.add(f"http://127.0.0.1:{port}")
        return proc

    def fake_answers(url, timeout_s=30.0, api_key=None):
        started.keys.append(api_key)
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
    first = stack.up(load_preset("qwen3-32b-1.7b-1gpu-80gb"), settings)
    free["0"] = GpuMemory(10.2, 79.6)  # what nvidia-smi says with the large server up
    _kill9(first["small"]["pid"])
    answering.discard(first["small"]["url"])
    healed = stack.up(load_preset("qwen3-32b-1.7b-1gpu-80gb"), settings)
    assert [k["role"] for k in healed["kept"]] == ["large"] and [s["role"] for s in healed["started"]] == ["small"]
    fraction = [a[a.index("--mem-fraction-static") + 1] for a in seen]
    assert len(fraction) == 3 and fraction[2] == fraction[1] == "0.685"


# ---------------------------------------------------------------- a key by default (issue 30 item 1)
def _home_files_others_can_read(settings) -> list[Path]:
    return [p for p in settings.home.rglob("*") if p.is_file() and p.stat().st_mode & 0o044]


def test_up_requires_a_random_key_by_default_that_every_client_finds_and_down_removes(stand_ins, monkeypatch):
    from relaygen_sgl.core.config import sglang_api_key
    from relaygen_sgl.core.state import key_in_use, key_path

    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    settings, answering, started = stand_ins
    first = stack.up(load_preset("cpu-tiny"), settings)
    path = key_path(settings)
    key = json.loads(path.read_text())["api-key"]
    assert len(key) >= 32 and (path.stat().st_mode & 0o777) == 0o600
    assert first["api_key"] is True and sglang_api_key() == key  # the one lookup every client makes
    for cmd in started.commands:  # the file, never the key, on the command line; the lock inherited
        assert cmd.argv[-2:] == ("--config", str(path)) and key not in " ".join(cmd.argv) and cmd.pass_fds
    assert set(started.keys) == {key}  # each health check sent it
    assert key_in_use(settings)  # the servers hold the file's lock while they run
    shown = json.dumps(stack.status(settings)) + settings.state_file.read_text()
    assert key not in shown and not [p for p in _home_files_others_can_read(settings) if key in p.read_text()]
    again = stack.up(load_preset("cpu-tiny"), settings)  # nothing to start: the same key
    assert again["started"] == [] and json.loads(path.read_text())["api-key"] == key
    stack.restart(settings, "small")
    assert json.loads(path.read_text())["api-key"] == key and started.commands[-1].argv[-1] == str(path)
    stack.down(settings)
    assert not path.exists() and not key_in_use(settings)


def test_no_api_key_starts_keyless_with_a_warning_and_loopback_only(stand_ins, monkeypatch, capsys):
    from relaygen_sgl.core.state import key_path

    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    settings, answering, started = stand_ins
    assert cli.main(["up", "--preset", "cpu-tiny", "--no-api-key"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "without an API key (--no-api-key)" in warning[0] and "run code" in warning[0]
    assert not key_path(settings).exists() and all("--config" not in c.argv for c in started.commands)
    assert _recorded(settings)["large"]["port"] == 30000 and not json.loads(settings.state_file.read_text())["api_key"]
    _kill9(_recorded(settings)["small"]["pid"])
    answering.discard("http://127.0.0.1:30001")
    healed = stack.up(load_preset("cpu-tiny"), settings)  # a heal keeps the servers' setting
    assert [s["role"] for s in healed["started"]] == ["small"] and "--config" not in started.commands[-1].argv
    assert healed["api_key"] is False and not key_path(settings).exists()
    stack.down(settings)
    with pytest.raises(ConfigError, match="--host 0.0.0.0 is reachable from other machines"):
        stack.up(load_preset("cpu-tiny"), settings, host="0.0.0.0", keyless=True)
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "k-123")
    with pytest.raises(ConfigError, match="--no-api-key and .RELAYGEN_SGLANG_API_KEY ask for opposite things"):
        stack.up(load_preset("cpu-tiny"), settings, keyless=True)
    assert started == [30000, 30001, 30001]


def test_a_key_in_the_environment_is_the_servers_key_and_another_one_later_is_refused(stand_ins, monkeypatch):
    from relaygen_sgl.core.state import key_path

    settings, _, started = stand_ins
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "chosen-key-1")
    stack.up(load_preset("cpu-tiny"), settings)
    assert json.loads(key_path(settings).read_text()) == {"api-key": "chosen-key-1"}
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "another-key-2")
    with pytest.raises(StackError, match=r"run with the API key in .*sglang-api-key.yaml, not \$RELAYGEN_SGLANG"):
        stack.up(load_preset("cpu-tiny"), settings)
    assert set(started.keys) == {"chosen-key-1"}


def _sglang_api_key(cmd: ServerCommand) -> str:
    """The --api-key SGLang 0.5.23 parses from a server's --config file: each key of it becomes
    `--KEY VALUE` before argparse (utils/server_args_config_parser.py _add_scalar_arg)."""
    config = json.loads(Path(cmd.argv[cmd.argv.index("--config") + 1]).read_text())
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--api-key")
    return parser.parse_args([arg for k, v in config.items() for arg in (f"--{k}", str(v))]).api_key


def test_up_right_after_down_gives_its_servers_a_key_sglang_parses_and_keeps_the_file(stand_ins, monkeypatch):
    """`up` after `down` makes a new random key. One url-safe key in 64 began with '-', which
    SGLang's argument parser takes for an option (`--api-key: expected one argument`): the
    servers exited and the failed `up` removed the key file. Here the random bytes are such a key's."""
    from relaygen_sgl.core.state import key_in_use, key_path, read_key

    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    settings, _, started = stand_ins
    stack.up(load_preset("cpu-tiny"), settings)
    stack.down(settings)
    monkeypatch.setattr(secrets, "token_bytes", lambda n=None: b"\xfb" * (n or 32))  # url-safe: "-" first
    stack.up(load_preset("cpu-tiny"), settings)
    key = read_key(settings)
    assert key and [_sglang_api_key(cmd) for cmd in started.commands[-2:]] == [key, key]
    assert key_path(settings).exists() and key_in_use(settings)  # held by the servers while they run
    stack.down(settings)
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "-chosen")
    with pytest.raises(ConfigError, match=r"RELAYGEN_SGLANG_API_KEY must .* not begin with '-'"):
        stack.up(load_preset("cpu-tiny"), settings)


def test_a_failed_up_stops_what_it_started_removes_the_key_file_and_shows_no_key(stand_ins, monkeypatch):
    """Issue 30 item 5: SGLang logs its arguments, the key included; the lines a failure quotes
    show <redacted>, the log is scrubbed, and the key file goes with the servers."""
    from relaygen_sgl.core.state import key_in_use, key_path
    from relaygen_sgl.servers.processes import tail

    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY", raising=False)
    settings, _, started = stand_ins

    def dies(url, proc, log, timeout, role, api_key):
        with open(log, "a") as f:
            f.write(f"server_args={{'api_key': '{api_key}', 'port': 30000}}\nRuntimeError: boom\n")
        raise LaunchError(f"the {role} server exited with code 1 during start-up; last lines of {log}:\n{tail(log)}")

    monkeypatch.setattr(stack, "wait_healthy", dies)
    with pytest.raises(LaunchError) as failed:
        stack.up(load_preset("cpu-tiny"), settings)
    assert "'api_key': '<redacted>'" in str(failed.value) and "RuntimeError: boom" in str(failed.value)
    log = next((settings.run_dir / "logs").glob("*large*"))
    assert "'api_key': '****" in log.read_text()
    assert not key_path(settings).exists() and not key_in_use(settings) and not settings.state_file.exists()
    assert started == [30000, 30001]
    assert all(start_ticks(p) is None for p in started.pids)


def test_serve_sh_requires_the_homes_key_and_removes_its_files_when_the_server_exits(tmp_path):
    """launch/serve.sh as `up`: the home's key file (0600, its lock inherited by the server, which
    reads it with --config and finds it in use), a private TMPDIR; both gone once the server exits.
    The server here is a stand-in: $PYTHON runs relaygen's helper for real and checks the rest."""
    from relaygen_sgl.core.config import KEY_FILE

    home = tmp_path / "home"
    fake = tmp_path / "python"
    # the helper's argv names the interpreter it ran in: this script takes its place
    fake.write_text(f"""#!/bin/bash
if [ "$2" = relaygen_sgl.cli ]; then
  out=$({sys.executable} "$@") || exit $?
  printf '%s\\n' "$out" | awk -v me="$0" '!done && !/^export /{{print me; done=1; next}} {{print}}'
  exit 0
fi
[ "$2" = sglang.launch_server ] || exit 99
exec {sys.executable} - "$@" <<'PY'
import fcntl, json, os, sys
if "--config" not in sys.argv:
    print(json.dumps({{"argv": sys.argv}}))
    sys.exit(0)
cfg = sys.argv[sys.argv.index("--config") + 1]
fd = os.open(cfg, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    in_use = False
except BlockingIOError:
    in_use = True
print(json.dumps({{"cfg": cfg, "mode": os.stat(cfg).st_mode & 0o777, "key": json.load(open(cfg))["api-key"],
                  "in_use": in_use, "tmp": os.environ["TMPDIR"], "argv": sys.argv}}))
PY
""")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RELAYGEN_SGLANG_API_KEY"}
    env.update(PYTHON=str(fake), RELAYGEN_HOME=str(home))
    out = subprocess.run([str(ROOT / "launch" / "serve.sh"), "small", "cpu-tiny"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["cfg"] == str(home / "run" / KEY_FILE) and seen["mode"] == 0o600 and seen["in_use"]
    assert len(seen["key"]) >= 32 and seen["key"] not in " ".join(seen["argv"]) + out.stderr
    assert os.path.basename(seen["tmp"]).startswith("relaygen-small-")
    assert not os.path.exists(seen["tmp"]) and not os.path.exists(seen["cfg"])
    keyless = subprocess.run([str(ROOT / "launch" / "serve.sh"), "small", "cpu-tiny", "--no-api-key"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert keyless.returncode == 0 and "--config" not in json.loads(keyless.stdout)["argv"]
    assert "relaygen: warning: the SGLang servers take requests without an API key" in keyless.stderr

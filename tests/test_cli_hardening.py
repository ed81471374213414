"""Bad input and failures at the command line: one clear line, a non-zero exit, no
traceback, and no finished work lost (issue 14, with the API key and wheel pin items)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import orjson
import pytest
from test_cli import one_line_error, run_cli

from relaygen_sgl.cli import commands
from relaygen_sgl.cli import main as cli
from relaygen_sgl.core.config import load_settings
from relaygen_sgl.core.errors import ConfigError, RelayGenError
from relaygen_sgl.jobs import batch
from relaygen_sgl.jobs.output import check_output, claim_output

PROMPTS = b'{"id": "p0", "question": "What is 2 + 3?"}\n{"id": "p1", "question": "And 4 + 4?"}\n'
NOWHERE = ("--large", "http://127.0.0.1:9", "--small", "http://127.0.0.1:9")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(PROMPTS)
    return path


# ---------------------------------------------------------------- batch output
def test_batch_output_that_is_the_prompts_file_is_refused_untouched(prompts, tmp_path):
    proc = run_cli("batch", "relay", str(prompts), "-o", str(prompts), *NOWHERE)
    assert proc.returncode == 2 and "is the prompts file" in one_line_error(proc)
    assert prompts.read_bytes() == PROMPTS
    os.link(prompts, tmp_path / "same-inode.jsonl")
    os.symlink(prompts, tmp_path / "link.jsonl")
    for other in ("same-inode.jsonl", "link.jsonl"):
        with pytest.raises(ConfigError, match="is the prompts file"):
            check_output(prompts, tmp_path / other)
    assert prompts.read_bytes() == PROMPTS


def test_batch_output_holding_something_else_is_refused_untouched(prompts, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_bytes(b"# Notes\n\nNot run records.\n")
    proc = run_cli("batch", "relay", str(prompts), "-o", str(readme), *NOWHERE)
    assert proc.returncode == 2 and "not a file of run records (line 1" in one_line_error(proc)
    assert readme.read_bytes() == b"# Notes\n\nNot run records.\n"
    proc = run_cli("batch", "relay", str(prompts), "-o", str(tmp_path), *NOWHERE)
    assert proc.returncode == 2 and "is a directory" in one_line_error(proc)
    other = tmp_path / "other.jsonl"  # JSON objects, but not run records (no status)
    other.write_bytes(PROMPTS)
    with pytest.raises(ConfigError, match="line 1: no 'status'"):
        check_output(prompts, other)
    runs = tmp_path / "runs.jsonl"  # run records and the torn last line of a killed run are fine
    runs.write_bytes(b'{"id": "p0", "status": "ok"}\n\n{"id": "p1", "sta')
    check_output(prompts, runs)
    runs.write_bytes(b'{"id": "p0", "sta\n{"id": "p1", "status": "ok"}\n')  # torn, then more: not ours
    with pytest.raises(ConfigError, match="line 1: not valid JSON"):
        check_output(prompts, runs)


def test_a_second_batch_on_the_same_output_is_refused(prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    with claim_output(prompts, out):
        proc = run_cli("batch", "relay", str(prompts), "-o", str(out), *NOWHERE)
        assert "another relaygen batch is writing" in one_line_error(proc)
        with pytest.raises(RelayGenError, match="another relaygen batch"):
            with claim_output(prompts, out):
                pass
    assert not out.exists() and not (tmp_path / "out.jsonl.lock").exists()
    with claim_output(prompts, out):  # released
        pass


class StubRelay:
    """What cmd_batch needs of a Relay, answering from `results` by question."""

    def __init__(self, results):
        self.results = results

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def run_program(self, func, arguments, settings=None):
        return self.results[arguments["question"]]


def write_program(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sglang as sgl\n\n\n@sgl.function\ndef prog(s, question):\n    s += question\n")
    return prog


def test_a_result_json_cannot_hold_becomes_an_error_record(prompts, tmp_path, monkeypatch, capsys):
    results = {"What is 2 + 3?": {"answer": 5}, "And 4 + 4?": {"answer": {8}}}  # a set: not JSON
    monkeypatch.setattr(commands, "open_relay", lambda args: StubRelay(results))
    out = tmp_path / "out.jsonl"
    rc = cli.main(["batch", str(write_program(tmp_path)), str(prompts), "-o", str(out), "--no-progress", *NOWHERE])
    recs = {r["id"]: r for r in map(orjson.loads, out.read_bytes().splitlines())}
    assert rc == 1 and recs["p0"]["status"] == "ok" and recs["p0"]["answer"] == 5
    assert recs["p1"]["status"] == "error" and recs["p1"]["error"].startswith("result not JSON-serializable")
    err = capsys.readouterr().err
    assert "1 ok, 1 error(s)" in err and "Traceback" not in err  # ok + errors == the 2 attempted


def test_a_failing_write_stops_the_batch_with_one_line(prompts, tmp_path, monkeypatch, capsys):
    import errno

    results = {"What is 2 + 3?": {"answer": 5}, "And 4 + 4?": {"answer": 8}}
    monkeypatch.setattr(commands, "open_relay", lambda args: StubRelay(results))
    real = batch.ResultWriter.write_result
    calls = []

    def disk_full_after_one(self, rec, extra=None):
        calls.append(rec["id"])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rec, extra)

    monkeypatch.setattr(batch.ResultWriter, "write_result", disk_full_after_one)
    out = tmp_path / "out.jsonl"
    rc = cli.main(["batch", str(write_program(tmp_path)), str(prompts), "-o", str(out), "--no-progress",
                   "--concurrency", "1", *NOWHERE])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relaygen:")]
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert "stopped after 1 ok and 1 error(s)" in err[0]
    assert [orjson.loads(line)["id"] for line in out.read_bytes().splitlines()] == [calls[0]]  # kept


# ---------------------------------------------------------------- run arguments
def test_a_url_without_a_scheme_is_one_line():
    proc = run_cli("run", "hi", "--large", "localhost:30000", "--small", "localhost:30001")
    assert proc.returncode == 2 and "invalid server URL 'localhost:30000'" in one_line_error(proc)


def test_a_seed_out_of_sglangs_range_and_an_empty_question_are_refused():
    proc = run_cli("run", "hi", "--seed", str(2**70), *NOWHERE)
    assert proc.returncode == 2 and "--seed" in one_line_error(proc)
    assert run_cli("run", "hi", "--seed", str(2**63), *NOWHERE).returncode == 2
    proc = run_cli("run", "", *NOWHERE)
    assert proc.returncode == 2 and "the question is empty" in one_line_error(proc)


def test_a_profile_that_is_a_json_array_is_one_line(tmp_path):
    bad = tmp_path / "array.json"
    bad.write_text(json.dumps(["Thus", "So"]))
    proc = run_cli("run", "hi", "--profile", str(bad), *NOWHERE)
    assert proc.returncode == 2 and "expected a JSON object" in one_line_error(proc)


def test_an_unknown_model_name_lists_the_valid_ones():
    proc = run_cli("models", "fetch", "--name", "nope")
    err = one_line_error(proc)
    assert proc.returncode == 2 and "unknown local model 'nope'" in err and "smollm2-135m-instruct" in err


def test_an_argument_that_is_not_utf8_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", "run", b"caf\xe9"], capture_output=True,
                          timeout=60)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode(errors="replace"))
    assert proc.returncode == 2 and "not valid UTF-8" in one_line_error(proc)


# ---------------------------------------------------------------- status, up, down
def test_status_and_down_with_a_corrupt_state_file():
    settings = load_settings()
    settings.run_dir.mkdir(parents=True)
    settings.state_file.write_text('{"preset": "cpu-tiny", "servers": [{"role": "lar')
    proc = run_cli("status")
    assert proc.returncode == 1 and "corrupt" in one_line_error(proc) and "large: - pid - unknown" in proc.stdout
    proc = run_cli("status", "--json")
    assert proc.returncode == 1 and "corrupt" in json.loads(proc.stdout)["problem"]
    assert "corrupt" in one_line_error(run_cli("down"))


def test_status_with_a_dead_server():
    settings = load_settings()
    settings.run_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    settings.state_file.write_text(json.dumps({"preset": "cpu-tiny", "servers": [
        {"role": "large", "url": "http://127.0.0.1:9", "pid": dead.pid, "log": "x.log", "port": 9,
         "start_ticks": 1}]}))
    proc = run_cli("status")
    assert proc.returncode == 1 and "large dead" in one_line_error(proc)
    assert "large: http://127.0.0.1:9 pid" in proc.stdout and "small: - pid - missing" in proc.stdout


def test_up_and_down_refuse_while_another_runs():
    from relaygen_sgl.core.files import exclusive

    settings = load_settings()
    with exclusive(settings.run_dir / "stack.lock", "held by the test"):
        assert "another relaygen up/down is running" in one_line_error(run_cli("down"))
        assert "another relaygen up/down is running" in one_line_error(run_cli("up", "--preset", "cpu-tiny"))


# ---------------------------------------------------------------- last resort
def test_an_unexpected_exception_is_one_line_and_a_log(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(commands, "cmd_status", broken)
    assert cli.main(["status"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("relaygen: internal error: RuntimeError: boom second line (details in ")
    log = err[0].split("(details in ")[1].rstrip(")")
    assert log.startswith(str(load_settings().home / "logs"))
    text = open(log).read()
    assert "Traceback" in text and "RuntimeError: boom" in text

    def empty(args):
        raise RelayGenError()

    monkeypatch.setattr(commands, "cmd_status", empty)
    assert cli.main(["status"]) == 1 and capsys.readouterr().err == "relaygen: RelayGenError\n"


def test_an_internal_error_report_shows_no_secret_and_its_log_is_private(monkeypatch, capsys):
    """Issue 30 item 5: serve's --api-key value, the keys in the environment and the servers' key
    (the home's key file) show as <redacted> in the line and in the log, which is 0600."""
    import stat

    from relaygen_sgl.core.state import write_key

    write_key(load_settings(), "home-key-333")
    monkeypatch.setenv("RELAYGEN_API_KEY", "serve-env-key-222")

    def broken(args):
        raise RuntimeError("failed with home-key-333 and flag-key-111 and serve-env-key-222")

    monkeypatch.setattr(commands, "cmd_serve", broken)
    assert cli.main(["serve", "--api-key", "flag-key-111", *NOWHERE]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    log = err.split("(details in ")[1].strip().rstrip(")")
    text = open(log).read()
    assert "serve --api-key <redacted>" in text and "Traceback" in text
    for secret in ("flag-key-111", "serve-env-key-222", "home-key-333"):
        assert secret not in err and secret not in text
    assert err.count("<redacted>") == 3 and stat.S_IMODE(os.stat(log).st_mode) == 0o600
    monkeypatch.setattr(commands, "cmd_serve", lambda args: 1 / 0)
    assert cli.main(["serve", "--api-key=flag-key-111", *NOWHERE]) == cli.EXIT_INTERNAL
    log = capsys.readouterr().err.split("(details in ")[1].strip().rstrip(")")
    assert "--api-key=<redacted>" in open(log).read()


# ---------------------------------------------------------------- SGLang API key
def test_the_sglang_api_key_reaches_servers_and_clients_but_no_command_line(monkeypatch, tmp_path):
    import stat

    import httpx

    from relaygen_sgl.client.http import ClientConfig, EngineClient
    from relaygen_sgl.core.config import load_preset, sglang_api_key
    from relaygen_sgl.servers import launch, processes

    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "s3cret-key")
    shown = subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", "server-command", "small", "cpu-tiny"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "s3cret-key" not in shown.stdout + shown.stderr
    argv = shown.stdout.splitlines()
    config = argv[argv.index("--config") + 1]
    assert config == str(load_settings().run_dir / "sglang-api-key.yaml") and "--api-key" not in argv
    # SGLang's --config reader (YAML) takes the file as the flag; it is JSON, read by the clients too
    assert json.loads(open(config).read()) == {"api-key": "s3cret-key"}
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert sglang_api_key() == "s3cret-key"
    monkeypatch.delenv("RELAYGEN_SGLANG_API_KEY")
    assert sglang_api_key() == "s3cret-key"  # from the file, with nothing in the environment
    cmd = launch.server_command(load_preset("cpu-tiny"), "large", load_settings(), key_file=config)
    assert cmd.argv[-2:] == ("--config", config)
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "s3cret-key")

    seen = []
    transport = httpx.MockTransport(lambda req: seen.append(req.headers.get("authorization"))
                                    or httpx.Response(200, json={}))
    EngineClient("http://x.test:1", ClientConfig(api_key="from-config"), transport).get_json("/model_info")
    EngineClient("http://x.test:1", ClientConfig(api_key="from-config"), transport, api_key="own").get_json("/a")
    assert seen == ["Bearer from-config", "Bearer own"]

    keys = []
    monkeypatch.setattr(processes, "EngineClient", lambda url, config, api_key=None: keys.append(api_key)
                        or EngineClient(url, config, httpx.MockTransport(lambda r: httpx.Response(500))))
    assert processes.answers_generation("http://x.test:1", timeout_s=1) is False and keys == ["s3cret-key"]

    import relaygen_sgl.api as api

    made = []
    monkeypatch.setattr(api, "Relay", lambda **kw: made.append(kw["client"]) or SimpleNamespace(small_down=None))
    commands.open_relay(cli.build_parser().parse_args(["run", "hi", *NOWHERE]))
    assert made[0].api_key == "s3cret-key" and "s3cret" not in repr(made[0])
    monkeypatch.setenv("RELAYGEN_SGLANG_API_KEY", "two words")
    with pytest.raises(ConfigError, match="printable ASCII"):
        sglang_api_key()

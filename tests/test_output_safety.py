"""Output safety of the jobs that write records (issue 30 item 4): one writer per output, the
lock taken where the records are written; a resume with other settings refused in one line
naming the setting, `--fresh` to start over; replaces with unique temporary names, fsynced.
The CLI runs in-process on the SGLang doubles."""

from __future__ import annotations

import os
import stat
import threading

import orjson
import pytest
from doubles import LARGE, SMALL
from test_cli import one_line_error, run_cli

from relaygen_sgl.api import Relay
from relaygen_sgl.cli import commands
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.cues import CueProfile

TEXT = "First we add 2 and 3 to get 5. Therefore the sum is 5. Thus, the answer is 5.</think>\n\n\\boxed{5}"
EVAL = ("eval", "--dataset", "amc23", "--limit", "2", "--k", "2", "--no-progress")


@pytest.fixture
def relays(fake, monkeypatch):
    """`open_relay` on the doubles; the Relays it opened, in order."""
    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    opened: list[Relay] = []

    def open_relay(args):
        profile = CueProfile(name="t", models={}, cues=("Therefore", "Thus,")).validate()
        relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, profile=profile, family="qwen3",
                      client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport)
        tape = relay.tokenizer.encode(TEXT * 40) + [fake.eos_id]
        for host in fake.hosts.values():
            host.tape = list(tape)
        opened.append(relay)
        return relay

    monkeypatch.setattr(commands, "open_relay", open_relay)
    return opened


def lines(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# ---------------------------------------------------------------- two writers
def test_two_evals_on_one_folder_the_second_refuses_and_the_firsts_records_are_all_there(relays, tmp_path):
    out = tmp_path / "eval"
    inside, go_on = threading.Event(), threading.Event()
    first: dict = {}

    def gate(run):
        def gated(*args, **kwargs):
            inside.set()  # the first eval is writing its records: hold it there
            assert go_on.wait(60)
            return run(*args, **kwargs)
        return gated

    def first_eval():
        from relaygen_sgl.cli.main import build_parser

        args = build_parser().parse_args([*EVAL, "--max-tokens", "24", "--out", str(out)])
        real = commands.open_relay

        def open_gated(a):
            relay = real(a)
            relay.run = gate(relay.run)
            return relay

        commands.open_relay = open_gated
        try:
            first["rc"] = args.func(args)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            first["error"] = e
        finally:
            commands.open_relay = real
            inside.set()

    thread = threading.Thread(target=first_eval)
    thread.start()
    try:
        assert inside.wait(60)
        second = run_cli(*EVAL, "--max-tokens", "24", "--out", str(out))
    finally:
        go_on.set()
        thread.join(120)
    line = one_line_error(second)
    assert "another relaygen eval is writing" in line and str(out) in line, line
    assert len(relays) == 1  # refused before a server was asked
    assert first.get("rc") == 0, first
    recs = lines(out / "relay.jsonl")
    assert sorted(r["id"] for r in recs) == [f"amc23-{p}#{j}" for p in (0, 1) for j in (0, 1)]
    assert all(r["status"] == "ok" for r in recs)
    assert not any(p.name.endswith(".lock") for p in out.iterdir())  # released


def test_an_eval_waits_for_no_batch_writing_its_method_file(relays, tmp_path):
    """The record file's own lock is taken by the batch runner that writes it, whoever calls it."""
    from relaygen_sgl.jobs.output import claim_output

    out = tmp_path / "eval"
    out.mkdir()
    with claim_output(None, out / "relay.jsonl", job="batch"):
        proc = run_cli(*EVAL, "--max-tokens", "24", "--out", str(out))
    assert "another relaygen batch is writing" in one_line_error(proc)
    assert not (out / "relay.jsonl").exists()


# ---------------------------------------------------------------- a resume with other settings
def test_a_resume_with_another_max_tokens_is_refused_in_one_line_naming_it(relays, tmp_path):
    out = tmp_path / "eval"
    assert run_cli(*EVAL, "--max-tokens", "24", "--out", str(out)).returncode == 0
    before = (out / "relay.jsonl").read_bytes()
    proc = run_cli(*EVAL, "--max-tokens", "32", "--out", str(out))
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert line == (f"relaygen: {out / 'relay.jsonl'} was written with max_tokens=24; this run has max_tokens=32 "
                    "(use --fresh to start over)")
    assert (out / "relay.jsonl").read_bytes() == before  # untouched
    # the same settings resume; --fresh starts over with the new ones
    assert run_cli(*EVAL, "--max-tokens", "24", "--out", str(out)).returncode == 0
    assert (out / "relay.jsonl").read_bytes() == before  # every id was done
    assert run_cli(*EVAL, "--max-tokens", "32", "--out", str(out), "--fresh").returncode == 0
    assert all(r["stats"]["large_tokens"] + r["stats"]["small_tokens"] <= 32 for r in lines(out / "relay.jsonl"))
    assert run_cli(*EVAL, "--max-tokens", "32", "--out", str(out)).returncode == 0


def test_a_batch_rerun_with_another_program_or_seed_is_refused(relays, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"id": "a", "question": "What is 2 + 3?"}\n{"id": "b", "question": "And 4 + 4?"}\n')
    out = tmp_path / "out.jsonl"
    base = ("batch", "relay", str(prompts), "-o", str(out), "--max-tokens", "16", "--no-progress")
    assert run_cli(*base).returncode == 0
    before = out.read_bytes()
    proc = run_cli("batch", "single-large", *base[2:])
    assert one_line_error(proc) == (f"relaygen: {out} was written with program=relay, method=relay; this run has "
                                    "program=single-large, method=single-large (use --fresh to start over)")
    assert "seed=unset" in one_line_error(run_cli(*base, "--seed", "3"))
    assert out.read_bytes() == before
    assert run_cli(*base, "--prefetch", "off").returncode == 0  # never changes a token: not a setting of the output
    assert run_cli(*base, "--seed", "3", "--fresh").returncode == 0
    assert sorted(r["id"] for r in lines(out)) == ["a", "b"]


def test_an_output_from_before_the_settings_file_is_resumed_and_adopted(relays, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"id": "a", "question": "What is 2 + 3?"}\n{"id": "b", "question": "And 4 + 4?"}\n')
    out = tmp_path / "out.jsonl"
    old = {"id": "a", "status": "ok", "error": None, "text": "from an older relaygen"}
    out.write_bytes(orjson.dumps(old) + b"\n")
    base = ("batch", "relay", str(prompts), "-o", str(out), "--max-tokens", "16", "--no-progress")
    assert run_cli(*base).returncode == 0
    assert lines(out)[0] == old and [r["id"] for r in lines(out)] == ["a", "b"]
    assert "max_tokens=16" in one_line_error(run_cli(*base[:-2], "24", "--no-progress"))


# ---------------------------------------------------------------- replaces: unique names, fsynced
def test_stack_json_is_replaced_under_a_unique_name_and_fsynced(monkeypatch, tmp_path):
    from relaygen_sgl.core import state
    from relaygen_sgl.core.config import load_settings

    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.state_file.with_suffix(".tmp").mkdir()  # the old fixed temporary name, taken
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real(fd))
    state.write_state(settings, {"servers": [], "preset": "cpu-tiny"})
    assert state.read_state(settings)["preset"] == "cpu-tiny"
    assert synced == ["file", "dir"]
    assert sorted(p.name for p in settings.run_dir.iterdir()) == sorted([settings.state_file.name, "stack.tmp"])


def test_a_settings_file_that_cannot_be_read_is_one_line_and_fresh_starts_over(tmp_path):
    from relaygen_sgl.core.errors import ConfigError
    from relaygen_sgl.jobs.batch import Prompt, run_batch
    from relaygen_sgl.jobs.output import read_settings, settings_path

    out = tmp_path / "out.jsonl"
    prompts = [Prompt("a", "q", 1)]
    run_batch(prompts, out, lambda p: {"text": "x"}, progress=False, header={"max_tokens": 8})
    settings_path(out).write_bytes(b'{"max_tokens": 8')  # edited by hand, torn
    with pytest.raises(ConfigError, match=r"^cannot read the settings .*out\.jsonl was written with .*; use --fresh"):
        run_batch(prompts, out, lambda p: {"text": "y"}, progress=False, header={"max_tokens": 8})
    assert [r["text"] for r in lines(out)] == ["x"]
    run_batch(prompts, out, lambda p: {"text": "y"}, progress=False, header={"max_tokens": 8}, fresh=True)
    assert [r["text"] for r in lines(out)] == ["y"] and read_settings(out) == {"max_tokens": 8}

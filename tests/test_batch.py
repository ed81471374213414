"""Batch runs against the wire-format double: records, errors, bad lines, resume."""

from __future__ import annotations

import os

import orjson
import pytest
from doubles import LARGE, SMALL

from relaygen_sgl.api import Relay
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.jobs.batch import Prompt, ResultWriter, parse_prompts, read_prompts, run_batch

FILLER = "Let me think. Therefore it is 5. Now, check: 2 + 3 = 5. "


@pytest.fixture
def relay(fake):
    tok_ids = None
    for url in (LARGE, SMALL):
        fake.add_host(url, [])
    r = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3",
              client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport)
    tok_ids = r.tokenizer.encode(FILLER * 40)
    for host in fake.hosts.values():
        host.tape = tok_ids  # a prompt-agnostic "model": the next token depends on the position only
        host.max_input = 400
    return r


def write_prompts(path, n=8, long_id="p3", malformed_at=5):
    lines = []
    for i in range(n):
        q = "What is 2 + 3?" if f"p{i}" != long_id else "word " * 600
        lines.append(orjson.dumps({"id": f"p{i}", "question": q, "source": "test"}).decode())
        if i == malformed_at:
            lines.append('{"id": "broken", "question": ')
    path.write_text("\n".join(lines) + "\n")


def records(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def run_one_with(relay):
    return lambda p: relay.run(p.question, "relay", max_tokens=40).to_dict(token_ids=False)


def test_bad_line_and_failing_prompt_give_seven_records_and_one_error(relay, tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_prompts(src)
    report = read_prompts(src)
    assert len(report.prompts) == 8 and len(report.problems) == 1 and "prompts.jsonl:7" in report.problems[0]
    summary = run_batch(report.prompts, out, run_one_with(relay), concurrency=3, progress=False)
    recs = records(out)
    assert summary.ok == 7 and summary.errors == 1 and len(recs) == 8
    err = [r for r in recs if r["status"] == "error"]
    assert err[0]["id"] == "p3" and "longer than the context" in err[0]["error"]
    assert all(r["source"] == "test" for r in recs)  # other input fields are carried through
    ok = [r for r in recs if r["status"] == "ok"]
    assert all(r["segments"] and r["stats"]["large_tokens"] > 0 for r in ok)


def test_a_rerun_after_a_kill_gives_each_id_once_and_retries_errors(relay, tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_prompts(src, long_id="none")
    prompts = read_prompts(src).prompts
    run_batch(prompts[:3], out, run_one_with(relay), progress=False)
    # a killed run: an error record and a torn last line
    with out.open("ab") as f:
        f.write(orjson.dumps({"id": "p4", "status": "error", "error": "server died"}) + b"\n")
        f.write(b'{"id": "p5", "status": "o')
    summary = run_batch(prompts, out, run_one_with(relay), progress=False)
    recs = records(out)
    assert summary.skipped_done == 3 and summary.ok == 5
    assert sorted(r["id"] for r in recs) == sorted(p.id for p in prompts)
    assert all(r["status"] == "ok" for r in recs)


def test_input_problems_are_reported_by_line():
    report = parse_prompts(['{"id": 1, "question": "a"}', '{"question": "b"}', '{"id": 1, "question": "c"}',
                            '{"id": 2, "question": "  "}', "[1]", ""], "in.jsonl")
    assert [p.id for p in report.prompts] == ["1"]
    assert [p.split(":")[1] for p in report.problems] == ["2", "3", "4", "5"]
    assert report.problems == ["in.jsonl:2: missing id; skipped", "in.jsonl:3: duplicate id '1'; skipped",
                               "in.jsonl:4: id '2' has a missing or empty question; skipped",
                               "in.jsonl:5: not a JSON object; skipped"]
    bad = parse_prompts(['{"id": "a", "question": "q"}', '{"id": "b", "question": '], "p.jsonl").problems
    assert len(bad) == 1 and bad[0].startswith("p.jsonl:2: not valid JSON (") and bad[0].endswith("); skipped")


def test_a_rerun_keeps_ok_records_as_they_were_and_runs_the_rest(tmp_path):
    out = tmp_path / "out.jsonl"
    kept = {"id": "a", "status": "ok", "error": None, "text": "from the first run", "source": "s"}
    out.write_bytes(orjson.dumps(kept) + b"\n"
                    + orjson.dumps({"id": "b", "status": "error", "error": "server died"}) + b"\n"
                    + b'{"id": "c", "status": "o')  # torn by a kill
    prompts = [Prompt(pid, f"question {pid}", 0, {"source": "s"}) for pid in ("a", "b", "c")]
    ran: list[str] = []

    def run_one(p: Prompt) -> dict:
        ran.append(p.id)
        return {"text": f"answer to {p.question}"}

    summary = run_batch(prompts, out, run_one, concurrency=2, progress=False)
    assert summary.skipped_done == 1 and summary.ok == 2 and sorted(ran) == ["b", "c"]
    recs = records(out)
    assert recs[0] == kept  # the earlier ok record, untouched
    assert sorted(r["id"] for r in recs) == ["a", "b", "c"] and all(r["status"] == "ok" for r in recs)
    assert {r["id"]: r["text"] for r in recs[1:]} == {"b": "answer to question b", "c": "answer to question c"}


def test_the_result_writer_drops_writes_after_close(tmp_path):
    writer = ResultWriter(tmp_path / "deep" / "out.jsonl")
    assert writer.done == set()
    writer.write({"id": "a", "status": "ok"})
    writer.close()
    writer.write({"id": "late", "status": "ok"})  # an interrupted batch: in-flight results are dropped
    assert records(tmp_path / "deep" / "out.jsonl") == [{"id": "a", "status": "ok"}]
    with ResultWriter(tmp_path / "deep" / "out.jsonl") as again:
        assert again.done == {"a"}


def test_missing_prompts_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_prompts(tmp_path / "nope.jsonl")


def test_results_json_cannot_hold_become_error_records_and_every_result_is_counted(tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = [Prompt(f"p{i}", f"q{i}", i, {"source": "s"}) for i in range(6)]

    def run_one(p: Prompt) -> dict:
        odd = int(p.id[1:]) % 2
        return {"value": {1, 2} if odd else 1, "id": "not-mine"}  # a set, and a program's own id

    summary = run_batch(prompts, out, run_one, concurrency=3, progress=False)
    assert summary.ok + summary.errors == summary.attempted == len(prompts)
    assert (summary.ok, summary.errors) == (3, 3)
    recs = {r["id"]: r for r in records(out)}
    assert sorted(recs) == [p.id for p in prompts]  # each filed under its own prompt
    assert recs["p1"]["status"] == "error" and recs["p1"]["error"].startswith("result not JSON-serializable")
    assert recs["p1"]["source"] == "s" and recs["p0"]["value"] == 1


def test_a_full_disk_stops_the_run_with_one_error_and_counts_what_came_back():
    from pathlib import Path

    from relaygen_sgl.jobs.batch import BatchWriteError

    prompts = [Prompt(f"p{i}", f"q{i}", i) for i in range(4)]
    with pytest.raises(BatchWriteError, match="cannot write /dev/full: No space left on device") as info:
        run_batch(prompts, Path("/dev/full"), lambda p: {"text": "x" * 10000}, concurrency=1, progress=False)
    s = info.value.summary
    assert s.write_error and s.attempted >= 1 and s.ok + s.errors == s.attempted and s.errors >= 1


def test_a_results_file_of_something_else_is_refused_untouched(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_bytes(b"keep me\n")
    with pytest.raises(ConfigError, match="not a file of run records"):
        run_batch([Prompt("a", "q", 1)], out, lambda p: {}, progress=False)
    assert out.read_bytes() == b"keep me\n"


def test_a_batch_holds_its_output_and_ties_it_to_the_settings_it_was_written_with(tmp_path):
    from relaygen_sgl.core.errors import RelayGenError
    from relaygen_sgl.jobs.output import read_settings

    out = tmp_path / "out.jsonl"
    prompts = [Prompt("a", "q", 1), Prompt("b", "q", 2)]
    second: list[str] = []

    def run_one(p: Prompt) -> dict:
        if not second:  # another batch on the same output, while this one writes it
            try:
                run_batch(prompts, out, lambda p: {"text": "theirs"}, progress=False)
                second.append("ran")
            except RelayGenError as e:
                second.append(str(e))
        return {"text": f"ours {p.id}"}

    header = {"program": "relay", "max_tokens": 8}
    assert run_batch(prompts, out, run_one, concurrency=1, progress=False, header=header).ok == 2
    assert second[0].startswith(f"another relaygen batch is writing {out} (pid {os.getpid()}, ")
    assert [r["text"] for r in records(out)] == ["ours a", "ours b"]
    assert read_settings(out) == header and not (tmp_path / "out.jsonl.lock").exists()
    with pytest.raises(ConfigError, match=r"max_tokens=8; this run has max_tokens=9 \(use --fresh to start over\)$"):
        run_batch(prompts, out, run_one, progress=False, header={**header, "max_tokens": 9})
    again = run_batch(prompts, out, run_one, progress=False, header={**header, "max_tokens": 9}, fresh=True)
    assert (again.ok, again.skipped_done) == (2, 0) and read_settings(out)["max_tokens"] == 9
    assert len(records(out)) == 2


def test_the_default_budget_is_recorded_where_it_is_the_runs_budget(tmp_path):
    from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, RunSettings
    from relaygen_sgl.jobs.output import settings_header, settings_path

    given = settings_header(RunSettings(max_tokens=64, default_max_tokens=9))
    assert given["max_tokens"] == 64 and "default_max_tokens" not in given  # no run's budget then
    default = settings_header(RunSettings(default_max_tokens=9), program="relay")
    assert default["max_tokens"] is None and default["default_max_tokens"] == 9
    out = tmp_path / "out.jsonl"
    prompts = [Prompt("a", "q", 1)]
    header = settings_header(RunSettings(), program="relay")
    assert run_batch(prompts, out, lambda p: {"text": "x"}, progress=False, header=header).ok == 1
    # an output whose settings were written before the default was a setting ran on DEFAULT_BUDGET
    old = {k: v for k, v in orjson.loads(settings_path(out).read_bytes()).items() if k != "default_max_tokens"}
    settings_path(out).write_bytes(orjson.dumps(old))
    assert run_batch(prompts, out, lambda p: {"text": "x"}, progress=False, header=header).skipped_done == 1
    other = settings_header(RunSettings(default_max_tokens=DEFAULT_BUDGET // 2), program="relay")
    with pytest.raises(ConfigError, match=f"default_max_tokens={DEFAULT_BUDGET}; this run has "
                                          f"default_max_tokens={DEFAULT_BUDGET // 2}"):
        run_batch(prompts, out, lambda p: {"text": "x"}, progress=False, header=other)

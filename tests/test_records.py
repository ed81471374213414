"""records: the one JSONL reader and writer (tolerant reads, atomic rewrites, whole-line appends)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest

from relaygen_sgl.core import records
from relaygen_sgl.core.errors import ConfigError


def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else orjson.dumps(x)) + b"\n" for x in lines))
    return path


def test_dumps_is_one_line_and_refuses_what_json_cannot_hold():
    assert records.dumps({"id": "a", "text": "x\ny"}) == b'{"id":"a","text":"x\\ny"}\n'
    assert records.dumps({"v": np.arange(3)}) == b'{"v":[0,1,2]}\n'
    with pytest.raises(TypeError):
        records.dumps({"id": "a", "obj": object()})


def test_a_torn_last_line_is_skipped_and_reported(tmp_path):
    p = tmp_path / "runs.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "sta')
    warnings: list[str] = []
    assert records.read_records(p, warn=warnings.append) == [{"id": "a"}, {"id": "b"}]
    assert len(warnings) == 1 and warnings[0].startswith("line 3: not valid JSON (")
    assert records.read_records(p) == [{"id": "a"}, {"id": "b"}]  # no callback: skipped quietly


def test_lines_that_are_not_objects_are_warned_with_their_numbers(tmp_path):
    p = write_lines(tmp_path / "mixed.jsonl", [{"id": 1}, "[1, 2]", "", "  ", '"text"', "{nope", {"id": 2}])
    p.write_bytes(p.read_bytes() + b'{"id": "\xff"}\n')  # invalid UTF-8: a warning, not an exception
    warnings: list[str] = []
    got = records.read_objects(p, warn=warnings.append)
    assert got == [(1, {"id": 1}), (7, {"id": 2})]  # blank lines are not reported but still counted
    assert warnings[0] == "line 2: expected a JSON object, got list; skipped"
    assert warnings[1] == "line 5: expected a JSON object, got str; skipped"
    assert warnings[2].startswith("line 6: not valid JSON (") and warnings[2].endswith("); skipped")
    assert warnings[3].startswith("line 8: not valid JSON (")
    assert len(warnings) == 4 and all("\n" not in w for w in warnings)


def test_iter_objects_takes_text_or_bytes():
    assert list(records.iter_objects(['{"a": 1}\n', b'{"b": 2}'])) == [(1, {"a": 1}), (2, {"b": 2})]


def test_a_file_that_cannot_be_read_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        records.read_records(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="is a directory"):
        records.read_objects(tmp_path)


def test_latest_by_id_keeps_the_last_record_of_each_id_and_filters_status(tmp_path):
    p = write_lines(tmp_path / "runs.jsonl", [
        {"id": "a", "status": "error", "n": 1},
        {"id": 7, "status": "ok", "n": 2},
        {"id": "a", "status": "ok", "n": 3},
        {"status": "ok", "n": 4},  # no id: not addressable
        {"id": "b", "status": "ok", "n": 5},
        {"id": "b", "status": "error", "n": 6},
        '{"id": "a", "status": "ok", "n": 7',  # torn
    ])
    latest = records.latest_by_id(p)
    assert {k: v["n"] for k, v in latest.items()} == {"a": 3, "7": 2, "b": 6}  # ids as text
    ok = records.latest_by_id(p, status="ok")
    assert {k: v["n"] for k, v in ok.items()} == {"a": 3, "7": 2, "b": 5}
    assert records.latest_by_id(tmp_path / "missing.jsonl") == {}


def test_rewrite_replaces_the_file_atomically(tmp_path):
    p = write_lines(tmp_path / "runs.jsonl", [{"id": "old"}])
    inode = p.stat().st_ino
    records.rewrite(p, [{"id": "a"}, {"id": "b"}])
    assert records.read_records(p) == [{"id": "a"}, {"id": "b"}]
    # a new file renamed over the old one, not the old one truncated and rewritten in place
    assert p.stat().st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["runs.jsonl"]  # no temporary left behind

    before = p.read_bytes()
    with pytest.raises(TypeError):
        records.rewrite(p, [{"id": "c"}, {"id": "d", "bad": object()}])
    assert p.read_bytes() == before  # a failed rewrite leaves the old content whole
    assert sorted(os.listdir(tmp_path)) == ["runs.jsonl"]


def test_drop_ids_removes_those_records_and_torn_lines(tmp_path):
    p = write_lines(tmp_path / "cache.jsonl", [{"id": "a", "n": 1}, {"id": 7}, {"id": "b"}, {"id": "a", "n": 2},
                                               '{"id": "c", "n"'])
    records.drop_ids(p, {"a", "7"})
    assert p.read_bytes() == b'{"id":"b"}\n'


def test_record_writer_appends_whole_flushed_lines_from_many_threads(tmp_path):
    p = write_lines(tmp_path / "out.jsonl", [{"id": "earlier"}])
    writer = records.RecordWriter(p)
    assert writer.write({"id": "first"})
    assert p.read_bytes().endswith(b'{"id":"first"}\n')  # on disk before close: a kill loses nothing written

    big = "x" * 50_000  # long lines, so a write split by another thread's would show
    threads_n, per_thread = 8, 25

    def work(t: int) -> None:
        for i in range(per_thread):
            assert writer.write({"id": f"{t}-{i}", "text": big})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()

    lines = p.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends in a newline
    recs = [orjson.loads(line) for line in lines[:-1]]  # every line whole JSON
    assert [r["id"] for r in recs[:2]] == ["earlier", "first"]  # appended, not truncated
    assert sorted(r["id"] for r in recs[2:]) == sorted(f"{t}-{i}" for t in range(threads_n) for i in range(per_thread))
    assert all(r["text"] == big for r in recs[2:])


def test_record_writer_refuses_writes_after_close(tmp_path):
    p = tmp_path / "new" / "dir" / "out.jsonl"  # parent folders are made
    with records.RecordWriter(p) as writer:
        assert writer.write({"id": "a"})
    assert writer.write({"id": "late"}) is False
    writer.close()  # twice is fine
    assert p.read_bytes() == b'{"id":"a"}\n'


def test_record_writer_that_cannot_open_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot write"):
        records.RecordWriter(tmp_path)  # a directory


def test_a_rewrite_takes_a_unique_temporary_name_and_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    import stat

    p = write_lines(tmp_path / "runs.jsonl", [{"id": "old"}])
    (tmp_path / "runs.jsonl.tmp").mkdir()  # the name a fixed temporary would take, in use
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real_fsync(fd))
    records.rewrite(p, [{"id": "a"}])
    assert records.read_records(p) == [{"id": "a"}]
    assert synced == ["file", "dir"]  # the data before the rename, the rename itself after it

    def power_cut(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError):
        records.rewrite(p, [{"id": "b"}])
    assert records.read_records(p) == [{"id": "a"}]
    assert sorted(os.listdir(tmp_path)) == ["runs.jsonl", "runs.jsonl.tmp"]  # no temporary of ours left

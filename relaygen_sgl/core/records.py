"""JSONL in and out: the one reader and the one writer of every records file.

Run records (batch, eval, calibration caches), prompts, bundled data sets and the files
`show` reads are all JSON objects one per line. Reading is tolerant: a torn last line from
a killed run, a line that is not JSON or not an object is skipped and reported through
`warn` as "line N: why", never raised. Writing appends whole lines under a lock, flushed
as produced, so a killed run leaves only whole lines behind; a rewrite replaces the file
atomically and durably (files.write_atomic).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from relaygen_sgl.core import files
from relaygen_sgl.core.errors import ConfigError

Record = dict[str, Any]
Warn = Callable[[str], None]


def dumps(record: Record) -> bytes:
    """One line, newline included. Raises TypeError for a value JSON cannot hold."""
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a JSONL file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


def iter_objects(lines: Iterable[bytes | str], warn: Warn | None = None) -> Iterator[tuple[int, Record]]:
    """(line number, object) for each line that holds a JSON object; blank lines are ignored."""
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            if warn:
                warn(f"line {no}: not valid JSON ({str(e).splitlines()[0]}); skipped")
            continue
        if not isinstance(obj, dict):
            if warn:
                warn(f"line {no}: expected a JSON object, got {type(obj).__name__}; skipped")
            continue
        yield no, obj


def read_objects(path: Path | str, warn: Warn | None = None) -> list[tuple[int, Record]]:
    """Every JSON object of a file with its line number. Raises ConfigError when the file
    cannot be read at all."""
    return list(iter_objects(_read_bytes(Path(path)).splitlines(), warn))


def read_records(path: Path | str, warn: Warn | None = None) -> list[Record]:
    return [obj for _, obj in read_objects(path, warn)]


def latest_by_id(path: Path | str, status: str | None = None) -> dict[str, Record]:
    """The last record of each id (optionally only those with this status); a missing file
    holds none."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, Record] = {}
    for _, rec in read_objects(p):
        if "id" in rec and (status is None or rec.get("status") == status):
            out[str(rec["id"])] = rec
    return out


def rewrite(path: Path | str, records: Iterable[Record]) -> None:
    """Replace a file's content atomically and durably (a crash or a power loss leaves the old
    or the new file). OSError, or TypeError for a record JSON cannot hold, leaves it as it was."""
    files.write_atomic(Path(path), (dumps(r) for r in records))


def drop_ids(path: Path | str, ids: set[str]) -> None:
    """Remove the records of these ids (and any torn line) from a file."""
    rewrite(path, [r for r in read_records(path) if str(r.get("id")) not in ids])


class RecordWriter:
    """Appends whole lines under a lock, each flushed at once; thread-safe."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("ab")
        except OSError as e:
            raise ConfigError(f"cannot write {self.path}: {e.strerror or e}") from e

    def write(self, record: Record) -> bool:
        """False once the writer is closed (an interrupted run drops late results)."""
        line = dumps(record)
        with self._lock:
            if self._f.closed:
                return False
            self._f.write(line)
            self._f.flush()
            return True

    def close(self) -> None:
        """Flush, fsync the file and its folder (the name of a file this writer created), close."""
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                files.fsync_dir(self.path.parent)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def not_a_record(line: bytes) -> str | None:
    """Why a non-blank line is not a run record, or None when it is one."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not valid JSON"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    missing = [k for k in ("id", "status") if k not in obj]
    return f"no {' or '.join(repr(k) for k in missing)}" if missing else None


def check_records_file(path: Path) -> None:
    """ConfigError unless `path` is absent, empty or holds run records only (a torn last
    line allowed). Reads, never writes."""
    if path.is_dir():
        raise ConfigError(f"the output {path} is a directory; give a JSONL file with -o")
    if not path.is_file():  # absent, or a device or pipe (/dev/stdout): nothing to read
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the output {path}: {e.strerror or e}") from None
    lines = [(no, line) for no, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    for i, (no, line) in enumerate(lines):
        why = not_a_record(line)
        if why is None:
            continue
        if i == len(lines) - 1 and why == "not valid JSON" and not data.endswith(b"\n"):
            break  # the torn last line of a killed run: the rerun drops it and redoes that id
        raise ConfigError(f"the output {path} is not a file of run records (line {no}: {why}); "
                          "refusing to append to it: give another -o")

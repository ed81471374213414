"""The output file of a batch: checked before anything is written to it, and held by one
batch at a time.

A batch appends run records to its output and, on a rerun, rewrites it without the error
records. So an output that is the prompts file itself, or a file that holds anything but
run records (a README, another tool's data), is refused before it is touched: exit 2, the
file byte-identical. A run record is a JSON object with "id" and "status"; a blank line
or a torn last line (a killed run) is tolerated.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import orjson

from .errors import ConfigError, RelayGenError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # a symlink loop, a vanished file
        return False


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


def check_output(prompts: Path, out: Path) -> None:
    """Everything that can be said about `out` before a batch starts (see the module doc)."""
    if _same_file(prompts, out):
        raise ConfigError(f"the output {out} is the prompts file; give another -o")
    check_records_file(out)


@contextlib.contextmanager
def claim_output(prompts: Path, out: Path) -> Iterator[None]:
    """Check `out` and hold an exclusive lock on it (OUT.lock beside it) for the block: a
    second batch on the same output is refused at once. The lock file is removed on exit."""
    check_output(prompts, out)  # before the lock file is created beside it
    if out.exists() and not out.is_file():  # a device or a pipe: nothing a rerun would rewrite
        yield
        return
    lock = out.with_name(out.name + ".lock")
    busy = f"another relaygen batch is writing {out} (lock {lock}); wait for it or give another -o"
    fd = None
    for _ in range(5):  # the lock file can be removed by its holder between open and flock
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RelayGenError(busy) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = None
    if fd is None:
        raise RelayGenError(busy)
    try:
        check_output(prompts, out)  # again, now that no other batch can be changing it
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)

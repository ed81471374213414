"""The processes `relaygen up` starts: who they are (pid plus start time, so a reused pid is
never taken for ours), how they are stopped (the whole process group, even when its
leader already died), and the lock that keeps two `up`/`down` from running at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import StackError


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat[stat.rindex(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of stat); None when it
    is gone or a zombie."""
    fields = _stat_fields(pid)
    if not fields or fields[0] == "Z" or len(fields) < 20:
        return None
    return int(fields[19])


def is_ours(rec: dict[str, Any]) -> bool:
    """The recorded pid is alive and still the process `up` started. The start time decides:
    a pid can be reused, and the router renames itself (setproctitle), so its command line
    no longer says what it is."""
    ticks = start_ticks(rec["pid"])
    return ticks is not None and ticks == rec.get("start_ticks")


def _members(pgid: int, since: int | None = None) -> list[int]:
    """Live (not zombie) processes of process group and session `pgid`, started at or after
    `since` (clock ticks since boot) when given."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if (fields and len(fields) > 19 and fields[0] != "Z" and fields[2] == str(pgid) and fields[3] == str(pgid)
                and (since is None or int(fields[19]) >= since)):
            found.append(int(entry.name))
    return found


def orphans(rec: dict[str, Any]) -> list[int]:
    """Live members of the process group (and session) `up` started as `rec`, once its
    leader has died: workers a crashed SGLang server left behind. Members must have started
    no earlier than the leader; while any member lives the kernel does not hand the group's
    id out as a new pid, so a group found this way is ours."""
    pgid, since = rec["pid"], rec.get("start_ticks")
    if since is None or start_ticks(pgid) is not None:  # unknown start, or the leader's pid is in use
        return []
    return _members(pgid, since)


def _group_alive(pgid: int) -> bool:
    """Any member not yet a zombie (a zombie waits for its parent, maybe forever in a container)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(_members(pgid))


def stop_group(pgid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout_s`; works without a leader."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:  # reap it if it is our child (up failed part way)
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def exclusive(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created) for the block; StackError(busy) at once if
    another process holds it. The lock goes with the process, however it ends."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StackError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(busy) from None
        yield
    finally:
        os.close(fd)

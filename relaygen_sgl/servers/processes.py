"""The processes `relaygen up` starts: who they are (pid plus start time, so a reused pid is
never taken for ours), how they are stopped (the whole process group, even when its
leader already died), how one is started and how its health is awaited, and what they leave
behind: SGLang's /dev/shm files (found through the group's memory maps and open files, by
inode) and its IPC sockets (in a private TMPDIR each server gets), removed once it stopped."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from relaygen_sgl.client.http import ClientConfig, EngineClient
from relaygen_sgl.core.config import LOOPBACK, sglang_api_key
from relaygen_sgl.core.errors import LaunchError
from relaygen_sgl.servers.launch import ServerCommand


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


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could not listen on host:port because something already does:
    the check binds the address the server will bind (IPv4 or IPv6), with SO_REUSEADDR as
    uvicorn sets it. A host this machine cannot bind is a LaunchError."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(f"cannot use --host {host!r}: {getattr(e, 'strerror', None) or e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise LaunchError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return False


def start_server(cmd: ServerCommand, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # 0600: SGLang logs its resolved arguments, an --api-key included (scrub_log removes it)
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    try:
        # A session of its own, so `down` can stop the server with all its children. cmd.pass_fds:
        # the key file's locked descriptor, held as long as the server lives (core.state).
        return subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=cmd.pass_fds)
    finally:
        log.close()


def private_tmp(name: str) -> str:
    """A fresh 0700 folder in the system's temporary folder, for one server's TMPDIR: SGLang makes
    its IPC sockets there (tempfile), so they are private and go with the folder."""
    return tempfile.mkdtemp(prefix=f"relaygen-{name}-")


SHM = Path("/dev/shm")


def _shm_inodes(pid: int) -> set[int]:
    """Inodes of the /dev/shm files process `pid` maps or holds open (a POSIX semaphore is
    mapped under the temporary name glibc created it with, now deleted: its inode is the
    sem.* file's)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(f"{SHM}/") and parts[4].isdigit():
                    found.add(int(parts[4]))
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(fd.path).startswith(f"{SHM}/"):
                    found.add(os.stat(fd.path).st_ino)
    return found


def _shm_entries() -> dict[str, int]:
    """/dev/shm's files, name: inode."""
    try:
        return {e.name: e.inode() for e in os.scandir(SHM) if e.is_file(follow_symlinks=False)}
    except OSError:
        return {}


def owned_shm(pgid: int) -> dict[str, int]:
    """The /dev/shm files (name: inode) the live members of process group `pgid` map or hold open:
    an SGLang server's load slots (sglang_loads_*) and multiprocessing semaphores (sem.mp-*)."""
    inodes: set[int] = set()
    for pid in _members(pgid):
        inodes |= _shm_inodes(pid)
    return {name: ino for name, ino in _shm_entries().items() if ino in inodes}


def _in_use(inodes: set[int]) -> set[int]:
    """Which of `inodes` a live process (any) maps or holds open."""
    used: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            used |= _shm_inodes(int(entry.name)) & inodes
    return used


def remove_leftovers(shm: dict[str, int] | None, tmp_dir: str | None) -> None:
    """After a server's process group is gone: its /dev/shm files, each only while the name still
    holds the inode it had and no live process uses it, and its private TMPDIR."""
    if shm:
        current = _shm_entries()
        mine = {name: ino for name, ino in shm.items() if current.get(name) == ino}
        used = _in_use(set(mine.values()))
        for name, ino in mine.items():
            if ino not in used:
                with contextlib.suppress(FileNotFoundError):
                    (SHM / name).unlink()
    if tmp_dir and Path(tmp_dir).name.startswith("relaygen-"):
        shutil.rmtree(tmp_dir, ignore_errors=True)


def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    """Until every member of the group has exited (killed ones release their maps only then)."""
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)
        time.sleep(0.1)


def scrub_log(path: Path, secrets: Iterable[str | None]) -> None:
    """Overwrite each secret in the log with as many '*', in place: the server appends to the
    file meanwhile, and a same-length write before its end never moves what it writes."""
    found = [s.encode() for s in secrets if s]
    if not found:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            for secret in found:
                at = data.find(secret)
                while at >= 0:
                    os.pwrite(fd, b"*" * len(secret), at)
                    at = data.find(secret, at + len(secret))
        finally:
            os.close(fd)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


def answers_generation(url: str, timeout_s: float = 30.0, api_key: str | None = None) -> bool:
    """True once the server completes a real one-token generation (EngineClient.health);
    sends $RELAYGEN_SGLANG_API_KEY unless given a key."""
    with EngineClient(url, ClientConfig(retries=0), api_key=api_key or sglang_api_key()) as engine:
        return engine.health(timeout_s)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, role: str,
                 api_key: str | None = None) -> None:
    """Until the server answers a generation (sent with `api_key`, else sglang_api_key()'s);
    LaunchError with its log's last lines when it exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"the {role} server exited with code {proc.returncode} during start-up; "
                              f"last lines of {log_path}:\n{tail(log_path)}")
        if answers_generation(url, timeout_s=10, api_key=api_key):
            return
        time.sleep(2)
    raise LaunchError(f"the {role} server at {url} did not answer a generation within {timeout_s:.0f}s; "
                      f"last lines of {log_path}:\n{tail(log_path)}")

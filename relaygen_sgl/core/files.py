"""Files that more than one command writes: the exclusive lock (one `up`/`down`, one writer
per output), the atomic replace every whole-file write goes through, and the check that an
output can be written before any work starts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from relaygen_sgl.core.errors import RelayGenError


@contextlib.contextmanager
def exclusive(path: Path, busy: str | Callable[[], str], error: type[RelayGenError] = RelayGenError,
              remove: bool = False, owner: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created) for the block; `error(busy)` at once when
    another holder has it (another process, or another open of it in this one; `busy` may be
    a function, called then, e.g. to name the holder from `lock_owner`). The lock goes with the
    process, however it ends. `owner` is written into the lock file while it is held. With
    `remove` the lock file is deleted on exit, so an open can race its deletion by the previous
    holder: the lock counts only when the locked file is still the one at `path`."""
    def refuse() -> RelayGenError:
        return error(busy() if callable(busy) else busy)

    fd = None
    for _ in range(5):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise error(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise refuse() from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = None
    if fd is None:
        raise refuse()
    if owner is not None:
        with contextlib.suppress(OSError):  # a courtesy to whoever is refused
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


@contextlib.contextmanager
def held(lock: Path, what: Path, job: str) -> Iterator[None]:
    """Hold `lock` while this process's `job` (batch, eval, calibrate, bench) writes `what`, a
    file or a folder: another writer is refused at once, in one line that names the job that
    holds it, its pid and the lock. The lock file is removed on exit."""
    with exclusive(lock, lambda: _busy(lock, what), remove=True, owner=f"{job} {os.getpid()}"):
        yield


def check_not_held(lock: Path, what: Path) -> None:
    """`held`'s refusal now, before any work starts, when another writer holds `lock`."""
    check_free(lock, lambda: _busy(lock, what))


def _busy(lock: Path, what: Path) -> str:
    job, _, pid = lock_owner(lock).partition(" ")
    holder = f"another relaygen {job}" if job.isidentifier() else "another relaygen run"
    where = f"pid {pid}, lock {lock}" if pid.isdigit() else f"lock {lock}"
    return f"{holder} is writing {what} ({where}); wait for it to finish or write elsewhere"


def check_free(path: Path, busy: Callable[[], str], error: type[RelayGenError] = RelayGenError) -> None:
    """`error(busy())` when another holder has the lock at `path` now: a check before any work
    starts, not a claim (`exclusive` takes the lock where the work is done)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no lock file: nobody holds it (one that cannot be opened: the claim says why)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise error(busy()) from None
    finally:
        os.close(fd)  # and with it the lock just taken


def lock_owner(path: Path) -> str:
    """What the holder of the lock at `path` wrote into it ("" when nothing can be read)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` durable (a rename, a new file): a no-op where a folder
    cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on leaving the block it is fsynced
    and renamed over `path`, and the folder fsynced, so a crash or a power loss leaves the old
    content or the new, never an empty or half file. The name is unique (two writers never
    share it; a stale one is never reused), hidden, and ends in `path`'s suffix (for writers
    that go by it). An exception in the block leaves `path` as it was and no temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Replace `path`'s content with `data` (bytes, or chunks of it) through `replacing`."""
    with replacing(path) as tmp, tmp.open("wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            for chunk in data:
                f.write(chunk)


def check_writable(path: Path, what: str, error: type[RelayGenError] = RelayGenError) -> None:
    """Fail with one line now, before any generation, if `path` cannot be written."""
    if path.is_dir():
        raise error(f"cannot write the {what} {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"permission denied: {path}")
        fd, tmp = tempfile.mkstemp(prefix=".relaygen-check-", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise error(f"cannot write the {what} {path}: {e.strerror or e}") from e

"""Files that more than one command writes: the exclusive lock (one `up`/`down`, one batch
per output) and the check that an output can be written before any work starts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from relaygen_sgl.core.errors import RelayGenError


@contextlib.contextmanager
def exclusive(path: Path, busy: str, error: type[RelayGenError] = RelayGenError,
              remove: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created) for the block; `error(busy)` at once when
    another process holds it. The lock goes with the process, however it ends. With `remove`
    the lock file is deleted on exit, so an open can race its deletion by the previous
    holder: the lock counts only when the locked file is still the one at `path`."""
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
            raise error(busy) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = None
    if fd is None:
        raise error(busy)
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


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

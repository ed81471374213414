"""The output file of a batch: checked before anything is written to it, and held by one
batch at a time.

A batch appends run records to its output and, on a rerun, rewrites it without the error
records. So an output that is the prompts file itself, or a file that holds anything but
run records (a README, another tool's data; records.check_records_file), is refused before
it is touched: exit 2, the file byte-identical.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from relaygen_sgl.core import files
from relaygen_sgl.core.errors import ConfigError
from relaygen_sgl.core.records import check_records_file


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # a symlink loop, a vanished file
        return False


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
    with files.exclusive(lock, busy, remove=True):
        check_output(prompts, out)  # again, now that no other batch can be changing it
        yield

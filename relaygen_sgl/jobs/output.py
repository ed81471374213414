"""The output of a job that writes records (batch, eval, calibrate): checked before anything
is written to it, held by one writer at a time, and tied to the settings it was written with.

Checked: an output that is the prompts file itself, or a file that holds anything but run
records (a README, another tool's data; records.check_records_file), is refused before it is
touched: exit 2, the file byte-identical.

Held: `claim_output` takes an exclusive lock (OUT.lock beside it, files.held) where the
records are written: `batch.run_batch` claims the file it writes whoever calls it, and a job
that writes more than one file holds them for its whole run (eval its folder, calibrate its
two caches). A second writer is refused at once, in one line naming the job that holds it.

Settings: what an output's records depend on (`settings_header`: the program or method, the
data set, the preset and profile, the run settings) is kept beside them in OUT.settings.json,
a sidecar, so that every reader of the records (`show`, jq, pandas) still reads run records
only. A resume with other settings is refused in one line naming each setting that differs;
`--fresh` starts over: the records go first, then the new settings are written, so a crash
between leaves nothing to mix. An output from before the sidecar is resumed and adopted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from relaygen_sgl.core import files
from relaygen_sgl.core.errors import ConfigError, RelayGenError
from relaygen_sgl.core.records import check_records_file, latest_by_id
from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, RunSettings

FRESH = "--fresh"  # the one spelling of "start over" in batch, eval and calibrate
# Run settings that never change a record: prefetch never changes a token, a deadline says
# when a run stops, not what it writes; the profile is the relay's, named by the caller.
UNRECORDED = frozenset({"prefetch", "deadline_s", "profile"})


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # a symlink loop, a vanished file
        return False


def _plain(out: Path) -> bool:
    """A regular file, or none yet: not a device or a pipe (-o /dev/stdout), which has no
    lock, no settings and nothing a rerun would rewrite."""
    return out.is_file() or not out.exists()


def _check(prompts: Path | None, out: Path) -> None:
    if prompts is not None and _same_file(prompts, out):
        raise ConfigError(f"the output {out} is the prompts file; give another -o")
    check_records_file(out)


def check_output(prompts: Path | None, out: Path) -> None:
    """Everything that can be said about `out` before a run starts (see the module doc), and
    whether another writer holds it now."""
    _check(prompts, out)
    if _plain(out):
        files.check_not_held(lock_path(out), out)


# ---------------------------------------------------------------- the settings an output was written with
def settings_header(settings: RunSettings, **context: Any) -> dict[str, Any]:
    """What the records of a run depend on: `context` (the job, the program or data set, the
    preset and profile), then the run settings but the UNRECORDED ones."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in UNRECORDED}
    if settings.max_tokens is not None:  # the default budget is then no run's budget
        del values["default_max_tokens"]
    return {**context, **values}


def _normal(header: dict[str, Any]) -> dict[str, Any]:
    """As it reads back from the file (a tuple is a list there)."""
    return orjson.loads(orjson.dumps(header))


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    return value if isinstance(value, str) and value else orjson.dumps(value).decode()


def refuse_other_settings(what: Path | str, written: dict[str, Any], now: dict[str, Any]) -> None:
    """ConfigError, one line naming each setting that differs, unless `written` == `now` (a
    setting absent from one side counts as unset)."""
    differ = [k for k in dict.fromkeys([*now, *written]) if written.get(k) != now.get(k)]
    if differ:
        def pairs(values: dict[str, Any]) -> str:
            return ", ".join(f"{k}={_shown(values.get(k))}" for k in differ)

        raise ConfigError(f"{what} was written with {pairs(written)}; this run has {pairs(now)} "
                          f"(use {FRESH} to start over)")


def read_settings(out: Path) -> dict[str, Any] | None:
    """The settings `out` was written with; None when none were kept."""
    path = settings_path(out)
    try:
        written = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ConfigError(f"cannot read the settings {out} was written with ({path}: {why}); "
                          f"use {FRESH} to start over") from None
    if not isinstance(written, dict):
        raise ConfigError(f"{path} holds no settings (a JSON {type(written).__name__}); use {FRESH} to start over")
    if "max_tokens" in written and written["max_tokens"] is None and "default_max_tokens" not in written:
        written["default_max_tokens"] = DEFAULT_BUDGET  # written before the default was a setting: it was this
    return written


def check_settings(out: Path, header: dict[str, Any]) -> None:
    """Refuse (refuse_other_settings) when `out` holds finished records written with other
    settings than `header`. Nothing to mix (no ok record), or no settings kept (an output from
    before them), passes. Reads, never writes."""
    if not _plain(out) or not latest_by_id(out, status="ok"):
        return
    written = read_settings(out)
    if written is not None:
        refuse_other_settings(out, written, _normal(header))


# ---------------------------------------------------------------- the claim
@dataclass(frozen=True)
class Claim:
    """An output this process holds (claim_output): its lock taken, its content checked.
    What `batch.run_batch` writes to."""

    path: Path

    def start(self, header: dict[str, Any] | None = None, fresh: bool = False) -> None:
        """Before the first record: with `fresh` the records (and their settings) are discarded;
        then other settings than `header` are refused (check_settings) and `header` is kept."""
        if not _plain(self.path):
            return
        side = settings_path(self.path)
        try:
            if fresh:
                files.write_atomic(self.path, b"")
                side.unlink(missing_ok=True)
            if header is None:
                return
            header = _normal(header)
            check_settings(self.path, header)
            with contextlib.suppress(ConfigError):  # kept already (an unreadable one is replaced)
                if read_settings(self.path) == header:
                    return
            files.write_atomic(side, orjson.dumps(header, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            raise RelayGenError(f"cannot write {e.filename or self.path}: {e.strerror or e}") from None


@contextlib.contextmanager
def claim_output(prompts: Path | None, out: Path, *, job: str = "batch") -> Iterator[Claim]:
    """Check `out` and hold it (OUT.lock beside it, files.held) for the block: another writer
    is refused at once. `job` names this one in the lock for whoever is refused."""
    _check(prompts, out)  # before the lock file is created beside it
    if not _plain(out):
        yield Claim(out)
        return
    with files.held(lock_path(out), out, job):
        _check(prompts, out)  # again, now that no other writer can be changing it
        yield Claim(out)


@contextlib.contextmanager
def claim_folder(folder: Path, job: str) -> Iterator[None]:
    """Hold `folder` (FOLDER/<job>.lock) for a job that writes several files in it: a second
    such job on the same folder is refused at once."""
    with files.held(folder / f"{job}.lock", folder, job):
        yield

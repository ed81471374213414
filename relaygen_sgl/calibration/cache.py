"""The calibration caches: the large model's trajectories and the small model's margins,
one JSON line per trajectory id, read and written through `records` (the lines are appended
by `batch.run_batch` as each trajectory finishes; ok records are kept on a rerun, error
records retried).

A trajectory record holds the prompt and every completion token with `segments` marking
which roles wrote them; a margin record holds one margin per completion token and the
digest of the trajectory it scored, so margins whose trajectory changed are scored again.
Each record carries the settings that made it (`config`); a cache made with other settings
is refused in one line naming them (jobs.output.refuse_other_settings; `--fresh` starts over).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from relaygen_sgl.calibration.cue_stats import ScoredTrajectory
from relaygen_sgl.core.config import ROLES
from relaygen_sgl.core.records import Record, drop_ids, latest_by_id
from relaygen_sgl.jobs.output import refuse_other_settings


def ok_records(path: Path) -> dict[str, Record]:
    """The ok records of a cache file by id (the last one wins); a missing file holds none."""
    return latest_by_id(path, status="ok")


def error_messages(path: Path) -> dict[str, str]:
    """The error message of each id whose last error record is in the file."""
    return {k: str(rec.get("error")) for k, rec in latest_by_id(path, status="error").items()}


def check_cache_config(path: Path, key: str, expected: dict[str, Any]) -> None:
    """A cache made with other settings is refused (ConfigError, one line naming each setting
    that differs), not silently mixed in."""
    for rec in ok_records(path).values():
        got = rec.get(key)
        refuse_other_settings(path, got if isinstance(got, dict) else {}, expected)


# ---------------------------------------------------------------- trajectories
def trajectory_record(result: Any, problem_id: str, sample: int, config: dict[str, Any]) -> Record:
    """The cache record of one `Relay.run` result (a result.RelayResult)."""
    segments = [[s.role, len(s.token_ids)] for s in result.segments]
    return {"problem_id": problem_id, "sample": sample, "seed": sample, "prompt_ids": list(result.prompt_ids),
            # Every completion token in order (text the program inserted included: the large model
            # saw it, so the small model is teacher-forced on it too); `segments` marks which are
            # model tokens, and only those enter the statistics.
            "completion_ids": list(result.token_ids), "segments": segments,
            "n_model_tokens": sum(n for r, n in segments if r in ROLES), "text": result.text,
            "finish": result.stats.finish, "stats": asdict(result.stats), "config": config}


def model_mask(record: Record) -> list[bool]:
    """Per completion token: True when a model wrote it."""
    mask: list[bool] = []
    for role, n in record["segments"]:
        mask.extend([role in ROLES] * int(n))
    return mask


def digest(record: Record) -> str:
    """Identifies a trajectory's tokens (prompt and completion)."""
    ids = orjson.dumps([record["prompt_ids"], record["completion_ids"]])
    return hashlib.blake2b(ids, digest_size=12).hexdigest()


# ---------------------------------------------------------------- margins
def margin_record(margins: Sequence[float], trajectory_digest: str, config: dict[str, Any]) -> Record:
    return {"n": len(margins), "margins": [round(m, 6) for m in margins], "digest": trajectory_digest,
            "config": config}


def drop_stale_margins(path: Path, digests: dict[str, str]) -> set[str]:
    """Remove the margin records whose trajectory changed since (their digest differs from
    `digests`, the current trajectories'); returns their ids."""
    stale = {k for k, rec in ok_records(path).items() if k in digests and rec.get("digest") != digests[k]}
    if stale:
        drop_ids(path, stale)
    return stale


def pair_scored(ids: Iterable[str], trajectories: dict[str, Record], margins: dict[str, Record],
                digests: dict[str, str]) -> tuple[list[ScoredTrajectory], dict[str, str]]:
    """Each id's trajectory with its margins, in `ids` order; ids lacking either are left out,
    and those whose margins do not fit their trajectory are returned as failures."""
    scored: list[ScoredTrajectory] = []
    failed: dict[str, str] = {}
    for k in ids:
        if k in trajectories and k in margins:
            rec, m = trajectories[k], margins[k]
            if len(m["margins"]) != len(rec["completion_ids"]) or m.get("digest") != digests[k]:
                failed[k] = "scoring: cached margins do not match the trajectory"
                continue
            scored.append(ScoredTrajectory(k, rec["completion_ids"], m["margins"], model_mask(rec)))
    return scored, failed

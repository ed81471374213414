"""`relaygen calibrate`: choose a model pair's switch cues by probability-margin calibration.

RelayGen's calibration (arXiv 2602.06454; /work/shared/notes/relaygen-method.md):

1. The LARGE model writes trajectories for the calibration problems (AMC 2023 x 4 samples
   in the paper), here through the large server with the relay's own template, budget and
   sampling (`Relay.run(question, "single-large", seed=j)`).
2. The SMALL model scores each trajectory teacher-forced: for every completion token, the
   margin p(top1) - p(top2) of the small model's next-token distribution that predicts it.
3. For each candidate cue, its post-cue region is the tokens after the cue up to and
   including the first token whose text contains ".", "!", "?" or "\\n". delta = mean
   margin inside the cue's regions - mean margin of every other token.
4. Cues with delta > threshold (and enough occurrences) are kept, best first, at most 32
   (SGLang's stop_regex limit).

Everything slow is cached next to the output and resumable: the trajectories
(`<out stem>.trajectories.jsonl`, or `--cache PATH`) and the margins
(`<trajectories stem>.margins.jsonl`), one JSON line per trajectory, written as each
finishes (`batch.run_batch`: ids already done are skipped on a rerun, error records retried).
The statistics (`token_pieces`, `cue_regions`, `cue_statistics`, `select_cues`) are pure
functions over token ids, margins and a decode function, so they are tested without servers.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .config import data_path
from .cue_stats import (  # noqa: F401  (re-exported: the statistics live in cue_stats)
    DEFAULT_MIN_COUNT,
    DEFAULT_THRESHOLD,
    REGION_END_CHARS,
    STDERR_FORMULA,
    CalibrationStats,
    CueStat,
    Decode,
    ScoredTrajectory,
    cue_regions,
    cue_statistics,
    select_cues,
    token_pieces,
)
from .cues import MAX_STOP_REGEXES, CueProfile
from .errors import CalibrationError, ConfigError, EngineError

DEFAULT_SAMPLES = 4
TOP_LOGPROBS = 2
MODEL_ROLES = ("large", "small")



# ---------------------------------------------------------------- settings and files
@dataclass(frozen=True)
class CalibrationSettings:
    data: str
    samples: int = DEFAULT_SAMPLES
    limit: int | None = None
    max_tokens: int = 32768
    threshold: float = DEFAULT_THRESHOLD
    min_count: int = DEFAULT_MIN_COUNT
    max_cues: int = MAX_STOP_REGEXES
    concurrency: int = 4
    name: str | None = None  # profile name; default: the output file's stem


@dataclass(frozen=True)
class CalibrationPaths:
    out: Path
    trajectories: Path
    margins: Path
    delta_png: Path
    trace_png: Path

    @classmethod
    def for_output(cls, out: str | Path, cache: str | Path | None = None) -> CalibrationPaths:
        out = Path(out).expanduser()
        base = out.with_suffix("") if out.suffix == ".json" else out
        traj = Path(cache).expanduser() if cache else base.with_name(base.name + ".trajectories.jsonl")
        tbase = traj.with_suffix("") if traj.suffix == ".jsonl" else traj
        if tbase.name.endswith(".trajectories"):
            tbase = tbase.with_name(tbase.name[: -len(".trajectories")])
        return cls(out=out, trajectories=traj, margins=tbase.with_name(tbase.name + ".margins.jsonl"),
                   delta_png=base.with_name(base.name + ".delta.png"),
                   trace_png=base.with_name(base.name + ".trace.png"))


def check_writable(path: Path, what: str) -> None:
    """Fail with one line now, before any generation, if `path` cannot be written."""
    if path.is_dir():
        raise CalibrationError(f"cannot write the {what} {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"permission denied: {path}")
        fd, tmp = tempfile.mkstemp(prefix=".relaygen-calibrate-", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CalibrationError(f"cannot write the {what} {path}: {e.strerror or e}") from e


def load_candidates(path: Path | None = None) -> tuple[str, ...]:
    path = path or data_path("cue_candidates.json")
    try:
        cues = tuple(orjson.loads(path.read_bytes())["cues"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read the candidate cues {path}: {e}") from e
    if not cues:
        raise ConfigError(f"{path} lists no candidate cues")
    return cues


def read_ok_records(path: Path) -> dict[str, dict[str, Any]]:
    """The ok records of a cache file by id (the last one wins); torn lines are skipped."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_bytes().splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("status") == "ok" and "id" in rec:
            out[str(rec["id"])] = rec
    return out


def read_errors(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("status") == "error":
                out[str(rec.get("id"))] = str(rec.get("error"))
    return out


def check_cache_config(path: Path, key: str, expected: dict[str, Any]) -> None:
    """A cache made with other settings is refused, not silently mixed in."""
    for rec in read_ok_records(path).values():
        got = rec.get(key)
        if got != expected:
            diff = ", ".join(f"{k} {(got or {}).get(k)!r} there vs {v!r} now" for k, v in expected.items()
                             if (got or {}).get(k) != v)
            raise CalibrationError(f"the cache {path} was made with other settings ({diff}); "
                                   "pass another --cache or remove it")


# ---------------------------------------------------------------- scoring with the small model
# Alignment of SGLang 0.5.23's input logprobs (read in .venv/.../sglang/srt):
#   managers/schedule_batch.py:3030-3031  logprob_token_ids = req.origin_input_ids[global_start_idx + 1 :
#       global_end_idx + 1]: the hidden state at input position p (p >= logprob_start_len) is scored
#       against token p + 1, i.e. the distribution computed at p is the one that PREDICTS token p + 1.
#   managers/scheduler_components/logprob_result_processor.py:38 (input_token_logprobs_val =
#       [None] + input_token_logprobs[:-1]), :66 (input_top_logprobs_val = [None]) and :80 (.pop()):
#       a None is put first and the last distribution (the one that samples the new token) dropped,
#       so entry k belongs to input token logprob_start_len + k and holds the distribution that
#       predicts it; entry 0 (the token at logprob_start_len itself) is None whatever the start.
#       The list has len(input_ids) - logprob_start_len entries.
#   managers/scheduler_components/logprob_result_processor.py:50: input_token_logprobs_idx =
#       origin_input_ids[logprob_start_len:], the same alignment (checked below when present).
#   managers/tokenizer_manager.py:3118-3136, :2938: each top entry becomes a list of
#       (logprob, token_id, text-or-None) tuples, an empty row becomes None; sent as meta_info["input_top_logprobs"].
#   managers/schedule_batch.py:1774-1775: with return_logprob, the radix-cache prefix match is capped at
#       logprob_start_len, so a cached prompt never drops entries.
#   managers/scheduler.py:3275-3276: logprob_start_len > len(input_ids) aborts the request.
# With logprob_start_len = len(prompt_ids) - 1, entry 0 is the last prompt token (None) and entry
# j + 1 predicts completion token j: exactly the teacher-forced distribution the relay's small
# model would sample that token from.
def score_request(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[list[int], dict, dict]:
    if not prompt_ids:
        raise CalibrationError("a trajectory has an empty prompt; cannot score it")
    sampling = {"max_new_tokens": 1, "temperature": 0}
    extra = {"return_logprob": True, "top_logprobs_num": TOP_LOGPROBS, "logprob_start_len": len(prompt_ids) - 1}
    return [*prompt_ids, *completion_ids], sampling, extra


def margins_from_meta(meta: dict[str, Any], input_ids: Sequence[int], start: int) -> list[float]:
    """Top-2 margin p1 - p2 for each input token start+1 .. len-1, from /generate's meta_info
    (see the alignment above). Raises CalibrationError when the answer does not fit."""
    top = meta.get("input_top_logprobs")
    want = len(input_ids) - start
    if not isinstance(top, list) or not top:
        raise CalibrationError("no input_top_logprobs in the answer")
    if len(top) != want:
        raise CalibrationError(f"input_top_logprobs has {len(top)} entries, expected {want} "
                               f"(input {len(input_ids)} tokens from logprob_start_len {start})")
    tokens = meta.get("input_token_logprobs")
    if isinstance(tokens, list) and len(tokens) == want:
        for k in (0, want - 1):  # both ends: a shifted alignment would show here
            entry = tokens[k]
            if entry is not None and len(entry) > 1 and entry[1] is not None and int(entry[1]) != input_ids[start + k]:
                raise CalibrationError(f"input_token_logprobs[{k}] is token {entry[1]}, expected "
                                       f"{input_ids[start + k]}: unexpected logprob alignment")
    out = []
    for k in range(1, want):
        row = top[k]
        if not row:
            raise CalibrationError(f"input_top_logprobs[{k}] is empty")
        lps = sorted((float(e[0]) for e in row), reverse=True)
        p1 = math.exp(lps[0])
        p2 = math.exp(lps[1]) if len(lps) > 1 else 0.0
        out.append(p1 - p2)
    return out


def completion_margins(meta: dict[str, Any], prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    ids, _, extra = score_request(prompt_ids, completion_ids)
    margins = margins_from_meta(meta, ids, extra["logprob_start_len"])
    assert len(margins) == len(completion_ids)
    return margins


def score_trajectory(engine: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    ids, sampling, extra = score_request(prompt_ids, completion_ids)
    gen = engine.generate(ids, sampling, extra=extra)
    return completion_margins(gen.meta, prompt_ids, completion_ids)


def probe_logprobs(engine: Any, probe_ids: Sequence[int]) -> None:
    """One short teacher-forced request up front: a small server that cannot return input
    top-logprobs fails here with one line, before any trajectory is generated."""
    if len(probe_ids) < 3:
        raise CalibrationError("the logprob probe needs at least 3 tokens")
    url = getattr(engine, "url", "the small server")
    try:
        score_trajectory(engine, probe_ids[:1], probe_ids[1:])
    except EngineError as e:
        raise CalibrationError(f"the small server {url} refused a teacher-forced logprob request "
                               f"(return_logprob, top_logprobs_num, logprob_start_len): {e}") from e
    except CalibrationError as e:
        raise CalibrationError(f"the small server {url} does not return input logprobs as calibration "
                               f"needs them: {e}") from e


# ---------------------------------------------------------------- tokens <-> text
@dataclass
class CalibrationReport:
    profile: CueProfile
    stats: CalibrationStats
    paths: CalibrationPaths
    trajectories: int
    failed: dict[str, str]
    interrupted: bool = False
    figures: list[str] = field(default_factory=list)


def _model_mask(record: dict[str, Any]) -> list[bool]:
    mask: list[bool] = []
    for role, n in record["segments"]:
        mask.extend([role in MODEL_ROLES] * int(n))
    return mask


def _digest(record: dict[str, Any]) -> str:
    ids = orjson.dumps([record["prompt_ids"], record["completion_ids"]])
    return hashlib.blake2b(ids, digest_size=12).hexdigest()


def _drop_records(path: Path, ids: set[str]) -> None:
    kept = []
    for line in path.read_bytes().splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not (isinstance(rec, dict) and str(rec.get("id")) in ids):
            kept.append(line + b"\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    tmp.replace(path)


def _trajectory_record(result: Any, problem_id: str, sample: int, config: dict[str, Any]) -> dict[str, Any]:
    segments = [[s.role, len(s.token_ids)] for s in result.segments]
    return {"problem_id": problem_id, "sample": sample, "seed": sample, "prompt_ids": list(result.prompt_ids),
            # Every completion token in order (text the program inserted included: the large model
            # saw it, so the small model is teacher-forced on it too); `segments` marks which are
            # model tokens, and only those enter the statistics.
            "completion_ids": list(result.token_ids), "segments": segments,
            "n_model_tokens": sum(n for r, n in segments if r in MODEL_ROLES), "text": result.text,
            "finish": result.stats.finish, "stats": asdict(result.stats), "config": config}


def run_calibration(relay: Any, problems: Sequence[Any], settings: CalibrationSettings, paths: CalibrationPaths,
                    *, candidates: Sequence[str] | None = None, progress: bool = True,
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> CalibrationReport:
    """Generate (cached), score (cached), compute the statistics, write the profile and figures.
    `relay` is an open api.Relay (its constructor already checked both servers' vocabularies)."""
    from .batch import Prompt, run_batch

    if not problems:
        raise CalibrationError(f"data set {settings.data} holds no problems")
    candidates = tuple(candidates or load_candidates())
    for path, what in ((paths.out, "profile"), (paths.trajectories, "trajectory cache"),
                       (paths.margins, "margin cache"), (paths.delta_png, "figure"), (paths.trace_png, "figure")):
        check_writable(path, what)
    info = {role: relay.engines[role].model_info() for role in MODEL_ROLES}
    models = {role: {"url": relay.urls[role], "model_path": info[role].get("model_path"),
                     "tokenizer_path": info[role].get("tokenizer_path")} for role in MODEL_ROLES}
    plan = relay.plan("single-large", max_tokens=settings.max_tokens)
    gen_config = {"large_model": models["large"]["model_path"], "max_tokens": settings.max_tokens,
                  "family": relay.family.name, "sampling": dict(plan.sampling)}
    score_config = {"small_model": models["small"]["model_path"], "top_logprobs_num": TOP_LOGPROBS}
    check_cache_config(paths.trajectories, "config", gen_config)
    check_cache_config(paths.margins, "config", score_config)
    probe_logprobs(relay.engines["small"], relay.tokenizer.encode(plan.render(problems[0].question))[:48])

    # 1. trajectories, large model. The program is loaded once here: programs._load_module
    # registers a module in sys.modules before executing it, so worker threads loading it
    # at the same time can see it half-initialized ("has no attribute 'single'").
    from .programs import load_program

    load_program("single-large")
    meta = {f"{p.id}#{j}": (p, j) for p in problems for j in range(settings.samples)}
    prompts = [Prompt(id=k, question=p.question, line=0) for k, (p, _) in meta.items()]

    def generate_one(pr: Prompt) -> dict[str, Any]:
        problem, j = meta[pr.id]
        result = relay.run(pr.question, "single-large", max_tokens=settings.max_tokens, seed=j)
        return _trajectory_record(result, problem.id, j, gen_config)

    log(f"calibrate: {len(prompts)} trajectories ({len(problems)} problems x {settings.samples} samples) "
        f"-> {paths.trajectories}")
    summary = run_batch(prompts, paths.trajectories, generate_one, concurrency=settings.concurrency,
                        progress=progress)
    if summary.interrupted:
        raise KeyboardInterrupt
    trajectories = {k: v for k, v in read_ok_records(paths.trajectories).items() if k in meta}
    failed = {k: f"generation: {v}" for k, v in read_errors(paths.trajectories).items() if k in meta}

    # 2. margins, small model, teacher-forced; a margin record whose trajectory changed since
    # (its digest differs) is dropped and scored again
    small = relay.engines["small"]
    digests = {k: _digest(rec) for k, rec in trajectories.items()}
    stale = {k for k, rec in read_ok_records(paths.margins).items() if k in digests and rec.get("digest") != digests[k]}
    if stale:
        log(f"calibrate: {len(stale)} cached margin records belong to other trajectories; scoring them again")
        _drop_records(paths.margins, stale)
    to_score = [Prompt(id=k, question="", line=0) for k in meta if k in trajectories]

    def score_one(pr: Prompt) -> dict[str, Any]:
        rec = trajectories[pr.id]
        margins = score_trajectory(small, rec["prompt_ids"], rec["completion_ids"])
        return {"n": len(margins), "margins": [round(m, 6) for m in margins], "digest": digests[pr.id],
                "config": score_config}

    log(f"calibrate: scoring {len(to_score)} trajectories with the small model -> {paths.margins}")
    summary = run_batch(to_score, paths.margins, score_one, concurrency=settings.concurrency, progress=progress)
    if summary.interrupted:
        raise KeyboardInterrupt
    margins = read_ok_records(paths.margins)
    failed.update({k: f"scoring: {v}" for k, v in read_errors(paths.margins).items() if k in trajectories})

    scored: list[ScoredTrajectory] = []
    for k in meta:
        if k in trajectories and k in margins:
            rec, m = trajectories[k], margins[k]
            if len(m["margins"]) != len(rec["completion_ids"]) or m.get("digest") != digests[k]:
                failed[k] = "scoring: cached margins do not match the trajectory"
                continue
            scored.append(ScoredTrajectory(k, rec["completion_ids"], m["margins"], _model_mask(rec)))
    if not scored:
        first = next(iter(failed.values()), "nothing was generated")
        raise CalibrationError(f"no trajectory could be generated and scored ({len(failed)} failed; first: {first})")

    # 3-4. statistics and selection
    stats = cue_statistics(scored, candidates, relay.tokenizer.decode)
    chosen = select_cues(stats, settings.threshold, settings.min_count, settings.max_cues)
    if not chosen:
        best = sorted((s for s in stats.cues.values() if s.delta is not None), key=lambda s: -s.delta)[:3]
        hint = ", ".join(f"{s.cue!r} delta {s.delta:+.4f} x{s.occurrences}" for s in best) or "no cue occurred"
        raise CalibrationError(f"no candidate cue has delta > {settings.threshold} and at least "
                               f"{settings.min_count} occurrences in {len(scored)} trajectories (best: {hint}); "
                               "lower --threshold/--min-count or add samples")
    n_tokens = sum(len(t.completion_ids) for t in scored)
    provenance = {
        "method": "RelayGen probability-margin calibration (arXiv 2602.06454): large-model trajectories "
                  "scored teacher-forced by the small model; cues kept when delta > threshold",
        "preset": relay.preset.name, "family": relay.family.name, "models": models,
        "data": settings.data, "problems": len(problems), "samples": settings.samples, "limit": settings.limit,
        "max_tokens": settings.max_tokens, "sampling": dict(plan.sampling), "threshold": settings.threshold,
        "min_count": settings.min_count, "max_cues": settings.max_cues, "candidates": len(candidates),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "trajectories": len(scored), "tokens": n_tokens, "model_tokens": stats.n_tokens,
        "failed": len(failed), "cache": {"trajectories": str(paths.trajectories), "margins": str(paths.margins)},
    }
    profile = CueProfile(
        name=settings.name or paths.out.stem,
        models={role: str(models[role]["model_path"]) for role in MODEL_ROLES},
        cues=tuple(chosen), think_end=relay.family.think_end, provenance=provenance, stats=stats.to_dict(),
    )
    try:
        profile.validate()
    except ConfigError as e:
        raise CalibrationError(f"the selected cues do not form a valid profile: {e}") from e

    # 5. the profile, written whole
    tmp = paths.out.with_name(paths.out.name + ".tmp")
    try:
        tmp.write_bytes(orjson.dumps(profile.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        tmp.replace(paths.out)
    except OSError as e:
        raise CalibrationError(f"cannot write the profile {paths.out}: {e.strerror or e}") from e

    # 6. figures
    from .calibration_plots import plot_deltas, plot_trace

    plot_deltas(stats, paths.delta_png, title=f"{profile.name}: {len(scored)} trajectories, {settings.data}")
    best = max(scored, key=lambda t: sum(b - a for c, sp in stats.regions.get(t.id, {}).items()
                                          if stats.cues[c].selected for a, b in sp))
    sel_regions = {c: sp for c, sp in stats.regions.get(best.id, {}).items() if stats.cues[c].selected}
    plot_trace(best.margins, sel_regions, paths.trace_png, title=f"{best.id}: small-model margin",
               scored=best.scored)
    return CalibrationReport(profile, stats, paths, len(scored), failed,
                             figures=[str(paths.delta_png), str(paths.trace_png)])

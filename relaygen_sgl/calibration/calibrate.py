"""`relaygen calibrate`: choose a model pair's switch cues by probability-margin calibration.

RelayGen's calibration (arXiv 2602.06454; /work/shared/notes/relaygen-method.md):

1. The LARGE model writes trajectories for the calibration problems (AMC 2023 x 4 samples
   in the paper), here through the large server with the relay's own template, budget and
   sampling (`Relay.run(question, "single-large", seed=j)`).
2. The SMALL model scores each trajectory teacher-forced: for every completion token, the
   margin p(top1) - p(top2) of the small model's next-token distribution that predicts it
   (`calibration_scoring`).
3. For each candidate cue, its post-cue region is the tokens after the cue up to and
   including the first token whose text contains ".", "!", "?" or "\\n". delta = mean
   margin inside the cue's regions - mean margin of every other token (`cue_stats`).
4. Cues with delta > threshold (and enough occurrences) are kept, best first, at most 32
   (SGLang's stop_regex limit).

This module runs those steps and writes the profile and its figures (`calibration_plots`).
Everything slow is cached next to the output and resumable (`calibration_cache`): the
trajectories (`<out stem>.trajectories.jsonl`, or `--cache PATH`) and the margins
(`<trajectories stem>.margins.jsonl`), one JSON line per trajectory, written as each
finishes (`batch.run_batch`: ids already done are skipped on a rerun, error records retried).
A run holds both caches (jobs.output.claim_output: a second calibration on them is refused);
a cache made with other settings is refused in one line, and `fresh` empties both first.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from relaygen_sgl.calibration.cache import (
    check_cache_config,
    digest,
    drop_stale_margins,
    error_messages,
    margin_record,
    ok_records,
    pair_scored,
    trajectory_record,
)
from relaygen_sgl.calibration.cue_stats import (
    DEFAULT_MIN_COUNT,
    DEFAULT_THRESHOLD,
    CalibrationStats,
    ScoredTrajectory,
    cue_statistics,
    select_cues,
)
from relaygen_sgl.calibration.scoring import TOP_LOGPROBS, probe_logprobs, score_trajectory
from relaygen_sgl.core import files
from relaygen_sgl.core.config import ROLES, data_path
from relaygen_sgl.core.cues import MAX_STOP_REGEXES, CueProfile
from relaygen_sgl.core.errors import CalibrationError, ConfigError
from relaygen_sgl.jobs.output import Claim, claim_output

DEFAULT_SAMPLES = 4
PROBE_TOKENS = 48  # the logprob probe scores the first tokens of the first prompt


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
    files.check_writable(path, what, CalibrationError)


def load_candidates(path: Path | None = None) -> tuple[str, ...]:
    path = path or data_path("cue_candidates.json")
    try:
        cues = tuple(orjson.loads(path.read_bytes())["cues"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read the candidate cues {path}: {e}") from e
    if not cues:
        raise ConfigError(f"{path} lists no candidate cues")
    return cues


@dataclass
class CalibrationReport:
    profile: CueProfile
    stats: CalibrationStats
    paths: CalibrationPaths
    trajectories: int
    failed: dict[str, str]
    interrupted: bool = False
    figures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the run
def run_calibration(relay: Any, problems: Sequence[Any], settings: CalibrationSettings, paths: CalibrationPaths,
                    *, candidates: Sequence[str] | None = None, progress: bool = True,
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                    fresh: bool = False) -> CalibrationReport:
    """Generate (cached), score (cached), compute the statistics, write the profile and figures.
    `relay` is an open api.Relay (its constructor already checked both servers' vocabularies).
    `fresh`: both caches are emptied first, so nothing cached is used."""
    if not problems:
        raise CalibrationError(f"data set {settings.data} holds no problems")
    candidates = tuple(candidates or load_candidates())
    with _claim_caches(paths, fresh) as caches:
        setup = _prepare(relay, problems[0], settings, paths)
        meta, trajectories, failed = _generate(relay, problems, settings, paths, caches[0], setup.gen_config,
                                               progress, log)
        scored, score_failed = _score(relay.engines["small"], meta, trajectories, settings, paths, caches[1],
                                      setup.score_config, progress, log)
        failed.update(score_failed)
        if not scored:
            first = next(iter(failed.values()), "nothing was generated")
            raise CalibrationError(f"no trajectory could be generated and scored ({len(failed)} failed; "
                                   f"first: {first})")
        # 3-4. statistics and selection
        stats = cue_statistics(scored, candidates, relay.tokenizer.decode)
        chosen = _choose(stats, settings, len(scored))
        profile = _build_profile(relay, setup, settings, paths, chosen, stats, scored,
                                 problems=len(problems), candidates=len(candidates), failed=len(failed))
        # 5. the profile, written whole; 6. figures
        _write_profile(profile, paths.out)
        _write_figures(profile, stats, scored, paths, settings.data)
    return CalibrationReport(profile, stats, paths, len(scored), failed,
                             figures=[str(paths.delta_png), str(paths.trace_png)])


@contextlib.contextmanager
def _claim_caches(paths: CalibrationPaths, fresh: bool) -> Iterator[tuple[Claim, Claim]]:
    """Both caches held for the run (the margins are rewritten before they are appended to);
    with `fresh`, emptied."""
    with claim_output(None, paths.trajectories, job="calibrate") as trajectories, \
            claim_output(None, paths.margins, job="calibrate") as margins:
        if fresh:
            trajectories.start(fresh=True)
            margins.start(fresh=True)
        yield trajectories, margins


@dataclass(frozen=True)
class _Setup:
    """What the steps of one run share: each role's server and model, the large model's
    generation plan, and the config each cache is keyed by."""
    models: dict[str, dict[str, Any]]
    plan: Any
    gen_config: dict[str, Any]
    score_config: dict[str, Any]


def _prepare(relay: Any, first: Any, settings: CalibrationSettings, paths: CalibrationPaths) -> _Setup:
    """Everything that can fail fast does so before the slow part: an output that cannot be
    written, a cache written for other models or settings, a small server that returns no
    logprobs (probed on the first tokens of the first problem's prompt)."""
    for path, what in ((paths.out, "profile"), (paths.trajectories, "trajectory cache"),
                       (paths.margins, "margin cache"), (paths.delta_png, "figure"), (paths.trace_png, "figure")):
        check_writable(path, what)
    info = {role: relay.engines[role].model_info() for role in ROLES}
    models = {role: {"url": relay.urls[role], "model_path": info[role].get("model_path"),
                     "tokenizer_path": info[role].get("tokenizer_path")} for role in ROLES}
    plan = relay.plan("single-large", max_tokens=settings.max_tokens)
    gen_config = {"large_model": models["large"]["model_path"], "max_tokens": settings.max_tokens,
                  "family": relay.family.name, "sampling": dict(plan.sampling)}
    score_config = {"small_model": models["small"]["model_path"], "top_logprobs_num": TOP_LOGPROBS}
    check_cache_config(paths.trajectories, "config", gen_config)
    check_cache_config(paths.margins, "config", score_config)
    probe_logprobs(relay.engines["small"], relay.tokenizer.encode(plan.render(first.question))[:PROBE_TOKENS])
    return _Setup(models, plan, gen_config, score_config)


def _generate(relay: Any, problems: Sequence[Any], settings: CalibrationSettings, paths: CalibrationPaths,
              cache: Claim, gen_config: dict[str, Any], progress: bool, log: Callable[[str], None],
              ) -> tuple[dict[str, tuple[Any, int]], dict[str, dict[str, Any]], dict[str, str]]:
    """Step 1: `samples` trajectories per problem by the large model, cached. Returns the
    sample ids ("<problem id>#<j>" -> (problem, j)), this run's trajectory records by id, and
    why each failed one failed."""
    from relaygen_sgl.jobs.batch import Prompt, run_batch

    # The program is loaded once here: programs._load_module registers a module in
    # sys.modules before executing it, so worker threads loading it at the same time can
    # see it half-initialized ("has no attribute 'single'").
    from relaygen_sgl.loader import load_program

    load_program("single-large")
    meta = {f"{p.id}#{j}": (p, j) for p in problems for j in range(settings.samples)}
    prompts = [Prompt(id=k, question=p.question, line=0) for k, (p, _) in meta.items()]

    def generate_one(pr: Prompt) -> dict[str, Any]:
        problem, j = meta[pr.id]
        result = relay.run(pr.question, "single-large", max_tokens=settings.max_tokens, seed=j)
        return trajectory_record(result, problem.id, j, gen_config)

    log(f"calibrate: {len(prompts)} trajectories ({len(problems)} problems x {settings.samples} samples) "
        f"-> {paths.trajectories}")
    if run_batch(prompts, cache, generate_one, concurrency=settings.concurrency, progress=progress).interrupted:
        raise KeyboardInterrupt
    trajectories = {k: v for k, v in ok_records(paths.trajectories).items() if k in meta}
    failed = {k: f"generation: {v}" for k, v in error_messages(paths.trajectories).items() if k in meta}
    return meta, trajectories, failed


def _score(small: Any, meta: dict[str, tuple[Any, int]], trajectories: dict[str, dict[str, Any]],
           settings: CalibrationSettings, paths: CalibrationPaths, cache: Claim, score_config: dict[str, Any],
           progress: bool, log: Callable[[str], None]) -> tuple[list[ScoredTrajectory], dict[str, str]]:
    """Step 2: the small model's margins over each trajectory, teacher-forced, cached. A margin
    record whose trajectory changed since (its digest differs) is dropped and scored again.
    Returns the trajectories paired with their margins, and why each failed one failed."""
    from relaygen_sgl.jobs.batch import Prompt, run_batch

    digests = {k: digest(rec) for k, rec in trajectories.items()}
    stale = drop_stale_margins(paths.margins, digests)
    if stale:
        log(f"calibrate: {len(stale)} cached margin records belong to other trajectories; scoring them again")
    to_score = [Prompt(id=k, question="", line=0) for k in meta if k in trajectories]

    def score_one(pr: Prompt) -> dict[str, Any]:
        rec = trajectories[pr.id]
        return margin_record(score_trajectory(small, rec["prompt_ids"], rec["completion_ids"]), digests[pr.id],
                             score_config)

    log(f"calibrate: scoring {len(to_score)} trajectories with the small model -> {paths.margins}")
    if run_batch(to_score, cache, score_one, concurrency=settings.concurrency, progress=progress).interrupted:
        raise KeyboardInterrupt
    failed = {k: f"scoring: {v}" for k, v in error_messages(paths.margins).items() if k in trajectories}
    scored, mismatched = pair_scored(meta, trajectories, ok_records(paths.margins), digests)
    failed.update(mismatched)
    return scored, failed


def _choose(stats: CalibrationStats, settings: CalibrationSettings, n_scored: int) -> list[str]:
    """Steps 3-4: the cues kept, best first; none kept is an error that names the best three."""
    chosen = select_cues(stats, settings.threshold, settings.min_count, settings.max_cues)
    if not chosen:
        best = sorted((s for s in stats.cues.values() if s.delta is not None), key=lambda s: -s.delta)[:3]
        hint = ", ".join(f"{s.cue!r} delta {s.delta:+.4f} x{s.occurrences}" for s in best) or "no cue occurred"
        raise CalibrationError(f"no candidate cue has delta > {settings.threshold} and at least "
                               f"{settings.min_count} occurrences in {n_scored} trajectories (best: {hint}); "
                               "lower --threshold/--min-count or add samples")
    return chosen


def _build_profile(relay: Any, setup: _Setup, settings: CalibrationSettings, paths: CalibrationPaths,
                   chosen: Sequence[str], stats: CalibrationStats, scored: Sequence[ScoredTrajectory], *,
                   problems: int, candidates: int, failed: int) -> CueProfile:
    """The profile with its provenance (how it was made, from what), checked as a whole."""
    provenance = {
        "method": "RelayGen probability-margin calibration (arXiv 2602.06454): large-model trajectories "
                  "scored teacher-forced by the small model; cues kept when delta > threshold",
        "preset": relay.preset.name if relay.preset else None, "family": relay.family.name, "models": setup.models,
        "data": settings.data, "problems": problems, "samples": settings.samples, "limit": settings.limit,
        "max_tokens": settings.max_tokens, "sampling": dict(setup.plan.sampling), "threshold": settings.threshold,
        "min_count": settings.min_count, "max_cues": settings.max_cues, "candidates": candidates,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "trajectories": len(scored), "tokens": sum(len(t.completion_ids) for t in scored),
        "model_tokens": stats.n_tokens, "failed": failed,
        "cache": {"trajectories": str(paths.trajectories), "margins": str(paths.margins)},
    }
    profile = CueProfile(
        name=settings.name or paths.out.stem,
        models={role: str(setup.models[role]["model_path"]) for role in ROLES},
        cues=tuple(chosen), provenance=provenance, stats=stats.to_dict(),
    )
    try:
        profile.validate()
    except ConfigError as e:
        raise CalibrationError(f"the selected cues do not form a valid profile: {e}") from e
    return profile


def _write_profile(profile: CueProfile, path: Path) -> None:
    """One JSON document (not JSONL), replaced atomically (files.write_atomic)."""
    try:
        files.write_atomic(path, orjson.dumps(profile.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    except OSError as e:
        raise CalibrationError(f"cannot write the profile {path}: {e.strerror or e}") from e


def _write_figures(profile: CueProfile, stats: CalibrationStats, scored: Sequence[ScoredTrajectory],
                   paths: CalibrationPaths, data: str) -> None:
    """The per-cue deltas, and the margin trace of the trajectory with the most tokens in the
    selected cues' regions."""
    from relaygen_sgl.calibration.plots import plot_deltas, plot_trace

    with files.replacing(paths.delta_png) as tmp:
        plot_deltas(stats, tmp, title=f"{profile.name}: {len(scored)} trajectories, {data}")
    best = max(scored, key=lambda t: sum(b - a for c, sp in stats.regions.get(t.id, {}).items()
                                          if stats.cues[c].selected for a, b in sp))
    sel_regions = {c: sp for c, sp in stats.regions.get(best.id, {}).items() if stats.cues[c].selected}
    with files.replacing(paths.trace_png) as tmp:
        plot_trace(best.margins, sel_regions, tmp, title=f"{best.id}: small-model margin", scored=best.scored)

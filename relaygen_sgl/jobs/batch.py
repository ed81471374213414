"""Batch runs: a program over a prompts file, results as JSONL written as each finishes.

One writer per output: the run holds its output (jobs.output.claim_output) from the
rewrite that drops old error records to the last record. Resumable with the same settings
(ids already done are skipped; earlier error records are retried and replaced; other
settings are refused, `fresh` starts over), one failing prompt becomes an error record,
bad input lines are reported with their line number and skipped, and an interrupt leaves
a valid file: every line is written whole under a lock and flushed at once. A result JSON cannot hold becomes an
error record; a write that fails (disk full) stops the run with BatchWriteError, what was
written before it kept. Every result that comes back is counted: ok + errors == attempted.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaygen_sgl.core import files, records
from relaygen_sgl.core.errors import ConfigError, RelayAborted, RelayGenError
from relaygen_sgl.jobs.output import Claim, check_records_file, claim_output

RESULT_KEYS = {"id", "status", "error", "method", "text", "reasoning", "answer", "segments", "stats",
               "prompt_ids", "degraded"}


@dataclass(frozen=True)
class Prompt:
    id: str
    question: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputReport:
    prompts: list[Prompt]
    problems: list[str]  # one line each: "prompts.jsonl:3: ..."


def _problem(origin: str, problems: list[str]) -> records.Warn:
    """records' "line N: why" as "origin:N: why", the file:line form the CLI prints and
    the wording batch has always used."""
    def warn(message: str) -> None:
        where, _, why = message.partition(": ")
        if why.startswith("expected a JSON object"):
            why = "not a JSON object; skipped"
        problems.append(f"{origin}:{where.removeprefix('line ')}: {why}")
    return warn


def parse_prompts(lines: Iterable[str | bytes], origin: str) -> InputReport:
    prompts: list[Prompt] = []
    problems: list[str] = []
    seen: set[str] = set()
    for no, obj in records.iter_objects(lines, _problem(origin, problems)):
        pid, question = obj.get("id"), obj.get("question")
        if pid is None or (not isinstance(pid, (str, int))) or str(pid) == "":
            problems.append(f"{origin}:{no}: missing id; skipped")
            continue
        pid = str(pid)
        if not isinstance(question, str) or not question.strip():
            problems.append(f"{origin}:{no}: id {pid!r} has a missing or empty question; skipped")
            continue
        if pid in seen:
            problems.append(f"{origin}:{no}: duplicate id {pid!r}; skipped")
            continue
        seen.add(pid)
        extra = {k: v for k, v in obj.items() if k not in ("id", "question")}
        prompts.append(Prompt(pid, question, no, extra))
    return InputReport(prompts, problems)


def read_prompts(path: Path) -> InputReport:
    try:
        with path.open(encoding="utf-8") as f:
            return parse_prompts(f, path.name)
    except FileNotFoundError:
        raise ConfigError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def _carry(record: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        record[f"input_{key}" if key in RESULT_KEYS else key] = value
    return record


class ResultWriter(records.RecordWriter):
    """The results file of a run: the ok records of an earlier run are kept (their ids are
    `done`), error records and torn lines are dropped so those prompts run again. A file
    that holds anything but run records is refused untouched (ConfigError)."""

    def __init__(self, path: Path) -> None:
        check_records_file(path)
        kept = records.latest_by_id(path, status="ok")
        self.done: set[str] = set(kept)
        if path.is_file():
            try:
                records.rewrite(path, kept.values())
            except OSError as e:  # the old file is still whole: rewrite replaces it atomically
                raise RelayGenError(f"cannot rewrite {path}: {e.strerror or e}") from None
        super().__init__(path)
        self.failed: str | None = None

    def write_result(self, rec: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one result and return the record written: a result JSON cannot hold is
        replaced by an error record saying so (with the prompt's `extra` input fields).
        OSError when the write fails; after that the writer writes nothing more (a torn line
        stays the last one, which a rerun drops)."""
        try:
            line = records.dumps(rec)
        except TypeError as e:
            rec = _carry({"id": rec.get("id"), "status": "error", "error": f"result not JSON-serializable: {e}"},
                         extra or {})
            line = records.dumps(rec)
        with self._lock:
            if self.failed is not None:
                raise OSError(self.failed)
            if self._f.closed:
                return rec
            try:
                self._f.write(line)
                self._f.flush()
            except OSError as e:
                self.failed = e.strerror or str(e)
                raise
        return rec

    def close(self) -> None:
        """Flush, fsync the file and its folder, and close; a failure is kept in `failed`, never
        raised. A device or a pipe (-o /dev/stdout) cannot fsync, and needs not."""
        with self._lock:
            if self._f.closed:
                return
            try:
                self._f.flush()
                if self.path.is_file():
                    os.fsync(self._f.fileno())
                    files.fsync_dir(self.path.parent)
            except OSError as e:  # the buffer could not be flushed: the disk is still full
                self.failed = self.failed or e.strerror or str(e)
            finally:
                try:
                    self._f.close()
                except OSError:
                    pass


class BatchWriteError(RelayGenError):
    """The results file could not be written: the run stopped; `summary` counts what was done."""

    def __init__(self, message: str, summary: BatchSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class BatchSummary:
    total: int
    skipped_done: int
    ok: int = 0
    errors: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    input_problems: list[str] = field(default_factory=list)
    attempted: int = 0  # results that came back; == ok + errors
    write_error: str | None = None


RunOne = Callable[[Prompt], dict[str, Any]]  # returns the result dict; raises RelayGenError


def run_prompt(run_one: RunOne, prompt: Prompt) -> dict[str, Any]:
    try:
        rec = {"id": prompt.id, "status": "ok", "error": None, **run_one(prompt)}
    except RelayAborted as e:
        partial = e.partial.to_dict(token_ids=False) if e.partial is not None else {}
        rec = {**partial, "id": prompt.id, "status": "error", "error": str(e)}
    except RelayGenError as e:
        rec = {"id": prompt.id, "status": "error", "error": str(e)}
    except Exception as e:  # a bug must not end the batch either; the record says what it was
        rec = {"id": prompt.id, "status": "error", "error": f"{type(e).__name__}: {e}"}
    rec["id"] = prompt.id  # a program's own "id" must not file the result under another prompt
    return _carry(rec, prompt.extra)


def _tokens(rec: dict[str, Any]) -> int:
    stats = rec.get("stats")
    try:
        return int(stats.get("large_tokens", 0)) + int(stats.get("small_tokens", 0))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):  # a program's own "stats"
        return 0


def run_batch(prompts: list[Prompt], out: Path | Claim, run_one: RunOne, *, concurrency: int = 4,
              progress: bool = True, input_problems: list[str] | None = None,
              header: dict[str, Any] | None = None, fresh: bool = False, job: str = "batch",
              waiting: Callable[[], int] | None = None) -> BatchSummary:
    """Run `run_one` over the prompts not done yet in `out`, each record written as it comes.
    `out` is held for the run (claim_output, in `job`'s name) unless the caller holds it
    already (a Claim). `header`: the settings the records depend on (output.settings_header),
    an output written with others refused; `fresh`: its records discarded first. `waiting`:
    how many runs wait for room in the KV pools now (shown on the progress bar)."""
    if not isinstance(out, Claim):
        with claim_output(None, out, job=job) as claim:
            return run_batch(prompts, claim, run_one, concurrency=concurrency, progress=progress,
                             input_problems=input_problems, header=header, fresh=fresh, waiting=waiting)
    from tqdm import tqdm

    out.start(header, fresh)
    path = out.path
    writer = ResultWriter(path)
    todo = [p for p in prompts if p.id not in writer.done]
    summary = BatchSummary(total=len(prompts), skipped_done=len(prompts) - len(todo),
                           input_problems=list(input_problems or []))
    work: queue.Queue[Prompt | None] = queue.Queue()
    for p in todo:
        work.put(p)
    finished: queue.Queue[dict[str, Any]] = queue.Queue()
    stop = threading.Event()
    failed: list[str] = []  # the first write failure stops the run

    def worker() -> None:
        while not stop.is_set():
            try:
                p = work.get_nowait()
            except queue.Empty:
                return
            try:
                rec = run_prompt(run_one, p)
            except BaseException as e:  # SystemExit from a program: an error record, no thread traceback
                rec = _carry({"id": p.id, "status": "error", "error": f"{type(e).__name__}: {e}"}, p.extra)
            if stop.is_set():
                return
            try:
                rec = writer.write_result(rec, p.extra)
            except OSError as e:
                failed.append(f"cannot write {path}: {e.strerror or e}")
                stop.set()
                rec = {"id": p.id, "status": "error", "error": f"not written: {e.strerror or e}"}
            except Exception as e:  # never a thread traceback: counted, and rerun next time
                rec = {"id": p.id, "status": "error", "error": f"not written: {type(e).__name__}: {e}"}
            finished.put(rec)

    # Daemon threads: on Ctrl-C the process leaves without waiting for in-flight requests;
    # what was written is whole lines, and a rerun picks up the rest.
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(concurrency, len(todo))))]
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=summary.skipped_done, disable=not progress, unit="prompt",
               file=sys.stderr, dynamic_ncols=True)
    try:
        for t in threads:
            t.start()
        while summary.attempted < len(todo):
            try:
                rec = finished.get(timeout=0.5)
            except queue.Empty:
                if failed or (not any(t.is_alive() for t in threads) and finished.empty()):
                    break
                continue
            summary.attempted += 1
            if rec.get("status") == "ok":
                summary.ok += 1
            else:
                summary.errors += 1
            summary.completion_tokens += _tokens(rec)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{summary.completion_tokens / max(elapsed, 1e-9):.1f}", errors=summary.errors,
                            **({"kv_wait": waiting()} if waiting is not None else {}))
            bar.update(1)
    except KeyboardInterrupt:
        stop.set()
        summary.interrupted = True
    finally:
        summary.elapsed_s = time.perf_counter() - t0
        bar.close()
        writer.close()
    summary.write_error = failed[0] if failed else (f"cannot write {path}: {writer.failed}" if writer.failed else None)
    if summary.write_error:
        raise BatchWriteError(f"{summary.write_error}; stopped after {summary.ok} ok and {summary.errors} error(s) "
                              f"(what was written is kept; rerun the same command to finish)", summary)
    return summary

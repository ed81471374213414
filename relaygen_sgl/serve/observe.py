"""What an operator sees of `relaygen serve`: one access-log line per request and the
Prometheus metrics behind GET /metrics.

Each request carries an `Outcome` in its ASGI scope; the chat handler fills it (the relay
job, a stream that reached its end, why the request ended early), and the outermost
middleware turns it into the access line and the request counters once the response is
over. Relay numbers (tokens, switches, handoffs, latency) are counted when a relay really
ends, in its own thread, from what it generated, whether or not a client was still there.
The metrics live in a registry per app, so two apps in one process never share counters;
their names follow Prometheus' conventions (a unit or `_total` suffix, the HTTP status as
`code`, no `_created` series), with the process' own (memory, CPU, open file descriptors).
A path is logged as the client sent it, before percent-decoding, with anything but printable
ASCII escaped: a `%0A` in a URL never starts a new log line.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from relaygen_sgl.core.config import ROLES
from relaygen_sgl.core.result import RelayResult

log = logging.getLogger("relaygen.serve.access")
KEY = "relaygen.outcome"  # where a request's Outcome sits in its ASGI scope
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json")
REJECTED = (408, 413, 429)  # body too slow, too large, server at capacity
HANDOFF_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RELAY_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
METRICS_TYPE = CONTENT_TYPE_LATEST
_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")


@dataclass
class Outcome:
    """One request, as its handler saw it."""

    job: Any = None  # the relay Job, once one started
    stream: bool = False
    streamed_to_end: bool = False  # the stream sent its last event
    note: str = ""  # why it ended early: "client left mid-body", "body timeout", ...


def relay_of(job: Any) -> RelayResult | None:
    """What a relay generated: its result, or the partial one an aborted relay carries."""
    if job is None or not job.finished:
        return None
    if job.result is not None:
        return job.result
    partial = getattr(job.error, "partial", None)
    return partial if isinstance(partial, RelayResult) else None


def relay_outcome(job: Any) -> str:
    """completed (a stop string that cut it counts as completed), cancelled (its client
    left), timeout, or failed."""
    if job.result is not None or job.reason == "stop":
        return "completed"
    return {"disconnect": "cancelled", "deadline": "timeout"}.get(job.reason or "", "failed")


def log_path(scope: Any) -> str:
    """The request's path as sent (percent-encoded), non-printable bytes escaped, cut to 200."""
    raw = scope.get("raw_path") or str(scope.get("path", "")).encode("utf-8", "surrogateescape")
    return _UNPRINTABLE.sub(lambda m: b"%%%02X" % m.group()[0], raw[:200]).decode("ascii")


class _WithoutCreated:
    """A registry's metrics without their `_created` samples (a timestamp per series, which
    Prometheus' text format would show as a gauge of its own)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Any:
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    def __init__(self, gate: Any, kv_waiting: Any = None) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total ...
        self.requests = Counter("relaygen_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        running = Gauge("relaygen_relays_running", "Relays generating now", registry=r)
        running.set_function(lambda: gate.running)
        queued = Gauge("relaygen_relays_queued", "Requests waiting for a free relay slot", registry=r)
        queued.set_function(lambda: gate.waiting)
        kv = Gauge("relaygen_relays_waiting_for_kv", "Relays started that wait for room in the servers' KV pools "
                   "(the trajectories in flight fill them)", registry=r)
        kv.set_function(kv_waiting or (lambda: 0))
        self.relays = Counter("relaygen_relays", "Relays that ended, by outcome (completed, failed, cancelled: "
                              "the client left, timeout: past the request deadline)", ["outcome"], registry=r)
        self.degraded = Counter("relaygen_relays_degraded", "Relays the large model finished alone after the "
                                "small server failed (or was down when they started)", registry=r)
        self.tokens = Counter("relaygen_tokens", "Completion tokens the relays generated, by role", ["role"],
                              registry=r)
        self.prompt_tokens = Counter("relaygen_prompt_tokens", "Prompt tokens of the relays", registry=r)
        self.switches = Counter("relaygen_switches", "Switches between the two models", registry=r)
        self.large_share = Histogram("relaygen_large_share_ratio", "Share of a relay's completion tokens the large "
                                     "model wrote (0 to 1)", buckets=SHARE_BUCKETS, registry=r)
        self.handoff = Histogram("relaygen_handoff_seconds", "From the end of one model's turn to the first token "
                                 "of the other's", buckets=HANDOFF_BUCKETS, registry=r)
        self.latency = Histogram("relaygen_relay_seconds", "Relay run time, from its start to its end, by method",
                                 ["method"], buckets=RELAY_BUCKETS, registry=r)
        self.rejections = Counter("relaygen_rejections", "Requests refused before a relay started: 408 (the body "
                                  "did not arrive in time), 413 (too large), 429 (at capacity)", ["code"],
                                  registry=r)
        for role in ROLES:  # every series a dashboard plots exists from the first scrape
            self.tokens.labels(role)
        for outcome in ("completed", "failed", "cancelled", "timeout"):
            self.relays.labels(outcome)
        for status in REJECTED:
            self.rejections.labels(str(status))

    def relay_ended(self, job: Any) -> None:
        """Called in the relay's thread once it has stopped."""
        self.relays.labels(relay_outcome(job)).inc()
        res = relay_of(job)
        if res is None:
            return
        if res.degraded is not None:
            self.degraded.inc()
        s = res.stats
        self.tokens.labels("large").inc(s.large_tokens)
        self.tokens.labels("small").inc(s.small_tokens)
        self.prompt_tokens.inc(len(res.prompt_ids))
        self.switches.inc(s.switches)
        if s.large_tokens + s.small_tokens:
            self.large_share.observe(s.large_tokens / (s.large_tokens + s.small_tokens))
        last = None
        for seg in res.segments:
            if seg.role not in ROLES:
                continue
            if last is not None and seg.role != last and seg.handoff_s is not None:
                self.handoff.observe(max(seg.handoff_s, 0.0))
            last = seg.role
        self.latency.labels(res.method).observe(time.monotonic() - job.started_at)

    def request_ended(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()
        if status in REJECTED:
            self.rejections.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


def access_line(method: str, path: str, status: int, seconds: float, out: Outcome) -> str:
    """`POST /v1/chat/completions 200 2.41s stream relay switches=4 large_share=0.38 tokens=96
    (large 36, small 60)`, plus why it ended early when it did."""
    parts = [f"{method} {path} {status} {seconds:.3f}s"]
    if out.stream:
        parts.append("stream")
    res = relay_of(out.job)
    if res is not None:
        s = res.stats
        parts.append(f"{res.method} switches={s.switches} large_share={s.large_share:.3f} "
                     f"tokens={s.large_tokens + s.small_tokens} (large {s.large_tokens}, small {s.small_tokens})")
        if res.degraded is not None:
            parts.append("degraded")
    elif out.job is not None:
        parts.append("relay still stopping")
    note = out.note or ("client left mid-stream" if out.stream and status == 200 and not out.streamed_to_end
                        else "")
    if note:
        parts.append(f"({note})")
    return " ".join(parts)


class Observe:
    """Pure ASGI, outermost: times each request, sees its status, logs its one access line
    and counts it. A client that went away is a normal end here, never an error: Starlette's
    ClientDisconnect stops at this layer, so neither the app's error handler nor uvicorn
    logs it as a failure."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        out = scope[KEY] = Outcome()
        status = 0

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:  # (raised past the handler, e.g. by a stream under ASGI >= 2.4)
            out.note = out.note or "client left"
            status = status or 499
        except BaseException:
            status = status or 500
            raise
        finally:
            status = status or 499  # the app returned without answering: nobody was there to answer
            self.metrics.request_ended(scope.get("path", ""), status)
            log.info("%s", access_line(scope.get("method", ""), log_path(scope), status,
                                       time.monotonic() - t0, out))

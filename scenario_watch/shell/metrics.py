"""Prometheus metrics: counters bumped at events, gauges read from the daemon's snapshot at scrape time.

Every name has the one `scenario_watch_` prefix, seconds as the unit and `_total` on counters. Labels
come from small fixed sets (a preset's configured name, an endpoint, a status class, a reason): never a
file name or a job id, which would make a new series per prompt. Each `Metrics` has a registry of its
own, so several daemons (tests) live in one process without sharing counts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scenario_watch import __version__, logs
from scenario_watch.files import fsync_dir, temp_path
from scenario_watch.journal.store import REFUNDED_STAGE

P = "scenario_watch_"
# The text exposition format every Prometheus (and node_exporter's textfile collector) reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

OUTCOMES = ("done", "failed")
# Where a prompt can fail (outbox.fail's callers); anything else is counted as "other".
STAGES = frozenset(
    {"validate", "references", "budget", "estimate", "submit", "poll", "generation", "timeout", "download"}
)
WAITING_REASONS = ("rate_limit", "credentials", "budget", "unwritable", "reference", "slot")
ENDPOINTS = frozenset({"generate", "estimate", "job", "jobs_list", "asset", "upload", "model", "download"})
RETRY_REASONS = frozenset(
    {
        "rate_limit",
        "server_error",
        "connection",
        "timeout",
        "lost_answer",
        "url_expired",
        "download",
        "not_found",
        "no_outputs",
    }
)
OTHER = "other"
# Image generations take seconds to minutes; a job times out after [jobs] timeout (900 s by default).
DURATION_BUCKETS = (5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800)

log = logs.get()

# No `_created` series beside every counter and histogram: in the text format they are just more
# gauges, doubling each scrape for a value nobody alerts on (process-wide: prometheus_client's switch).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream


@dataclass(frozen=True)
class Snapshot:
    """What only the running daemon knows, read at each scrape (no cost between scrapes)."""

    in_flight: int = 0  # jobs at Scenario (submitted, not yet downloaded)
    waiting: Mapping[str, int] = field(default_factory=dict)  # WAITING_REASONS -> prompts
    budget_remaining: float | None = None  # creative units left today; None: no daily cap
    watcher_ok: bool = True  # the inbox observer is alive


def waiting_reasons(published: Mapping[str, Any]) -> dict[str, int]:
    """Snapshot.waiting from the heartbeat's published state (heartbeat.Heartbeat.snapshot)."""
    counts = dict.fromkeys(WAITING_REASONS, 0)
    counts["reference"] = len(published.get("waiting") or {})
    queue = str(published.get("queue") or "a free slot")
    if queue == "credentials":
        reason = "credentials"
    elif queue.startswith("budget"):
        reason = "budget"
    elif queue.startswith("rate limit"):
        reason = "rate_limit"
    elif queue == "a free slot":
        reason = "slot"
    else:
        reason = "unwritable"  # the scheduler's text: "<folder> not writable: <why>"
    counts[reason] += int(published.get("queued") or 0)
    return counts


def endpoint(method: str, url: str, base_url: str | None) -> str:
    """The API endpoint a request went to, from a small fixed set (never the ids in the path)."""
    parts = urlsplit(url)
    path = parts.path
    if base_url is not None:
        base = urlsplit(base_url)
        prefix = base.path.rstrip("/") + "/"
        if (parts.scheme, parts.netloc) != (base.scheme, base.netloc) or not path.startswith(prefix):
            return "upload" if method.upper() == "PUT" else "download"  # the CDN: signed URLs
        path = path[len(prefix) :]
    match [part for part in path.split("/") if part]:
        case ["generate", *_]:
            return "estimate" if "dryRun" in parse_qs(parts.query) else "generate"
        case ["jobs"]:
            return "jobs_list"
        case ["jobs", _]:
            return "job"
        case ["assets", _]:
            return "asset"
        case ["assets"] | ["uploads", *_]:
            return "upload"
        case ["models", *_]:
            return "model"
    return OTHER


def status_class(status: int | None) -> str:
    """2xx, 3xx, 4xx, 5xx, or error (no answer at all)."""
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "error"


class Metrics:
    """The daemon's metrics; the event methods are thread-safe and cheap (a lock and an add)."""

    def __init__(
        self,
        presets: Iterable[str] = (),
        base_url: str | None = None,
        budget_daily: float = 0.0,
        version: str = __version__,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.presets = frozenset(presets)
        self.base_url = base_url
        self._snapshot: Callable[[], Snapshot] = Snapshot
        r = self.registry
        self.taken = Counter(f"{P}prompts_taken", "Prompts claimed from the inbox.", ["preset"], registry=r)
        self.finished = Counter(
            f"{P}prompts_finished",
            "Prompts finished, by outcome (done/failed) and the stage a failure happened at.",
            ["outcome", "stage", "preset"],
            registry=r,
        )
        self.duration = Histogram(
            f"{P}job_duration_seconds",
            "Seconds from submission to the outputs written, of prompts done.",
            ["preset"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.spent = Counter(
            f"{P}creative_units_spent",
            "Creative units charged (refunded failures excluded); sum() over preset for the total.",
            ["preset"],
            registry=r,
        )
        self.requests = Counter(
            f"{P}api_requests",
            "Requests to the Scenario API and its CDN, by endpoint and status class (error: no answer).",
            ["endpoint", "status_class"],
            registry=r,
        )
        self.retries = Counter(f"{P}retries", "Retries, by reason.", ["reason"], registry=r)
        self.last_success = Gauge(
            f"{P}last_success_timestamp_seconds", "Unix time the last prompt was done.", registry=r
        )
        Info(f"{P}build", "The running version.", registry=r).info({"version": version})
        if budget_daily > 0:  # the cap, beside what is left of it: alerts take the ratio
            Gauge(
                f"{P}budget_daily_creative_units", "[budget] daily: creative units per UTC day.", registry=r
            ).set(budget_daily)
        # Zeros from the start: rate() and absent() alerts need the series before the first event.
        for preset in ("", *self.presets):
            self.taken.labels(preset)
            self.spent.labels(preset)
            self.finished.labels("done", "", preset)
        r.register(_SnapshotCollector(self))

    # -- events ---------------------------------------------------------------------------------------

    def _preset(self, preset: str | None) -> str:
        if not preset:
            return ""
        return preset if preset in self.presets else OTHER  # a preset since removed from the config

    def prompt_taken(self, preset: str | None = None) -> None:
        """A prompt was claimed (journaled)."""
        self.taken.labels(self._preset(preset)).inc()

    def prompt_finished(
        self,
        outcome: str,
        *,
        stage: str | None = None,
        preset: str | None = None,
        cost: float | None = None,
        duration: float | None = None,
        at: float | None = None,
    ) -> None:
        """A prompt reached done or failed: its stage (failed), cost charged, seconds since submission."""
        label = self._preset(preset)
        outcome = outcome if outcome in OUTCOMES else OTHER
        stage = "" if outcome == "done" or not stage else (stage if stage in STAGES else OTHER)
        self.finished.labels(outcome, stage, label).inc()
        if cost and not (outcome == "failed" and stage == REFUNDED_STAGE):  # as the budget counts it
            self.spent.labels(label).inc(cost)
        if outcome == "done":
            if duration is not None and duration >= 0:
                self.duration.labels(label).observe(duration)
            self.last_success.set(time.time() if at is None else at)

    def set_last_success(self, at: float) -> None:
        """At start: the journal's last done prompt (Unix time), so a restart does not reset the alert."""
        self.last_success.set(at)

    def api_response(self, method: str, url: str, status: int | None) -> None:
        """One request answered (status) or not (None: connection error, timeout)."""
        self.requests.labels(endpoint(method, url, self.base_url), status_class(status)).inc()

    def retry(self, reason: str) -> None:
        """Something is tried again (rate_limit, server_error, connection, timeout, lost_answer ...)."""
        self.retries.labels(reason if reason in RETRY_REASONS else OTHER).inc()

    # -- scrape ---------------------------------------------------------------------------------------

    def set_snapshot(self, fn: Callable[[], Snapshot]) -> None:
        """The callable each scrape reads the gauges from (called on the scraping thread)."""
        self._snapshot = fn

    def snapshot(self) -> Snapshot:
        """The daemon's current snapshot; an empty one if the callable fails (the scrape still works)."""
        try:
            return self._snapshot()
        except Exception:
            log.exception("metrics.snapshot_failed")
            return Snapshot(watcher_ok=False)

    def render(self) -> bytes:
        """Every metric in the text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    """The gauges, from the daemon's snapshot at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """One snapshot, turned into the gauges."""
        snap = self.metrics.snapshot()
        yield GaugeMetricFamily(f"{P}jobs_in_flight", "Jobs at Scenario now.", value=snap.in_flight)
        waiting = GaugeMetricFamily(
            f"{P}prompts_waiting", "Prompts not sent yet, by what they wait for.", labels=["reason"]
        )
        counts = dict.fromkeys(WAITING_REASONS, 0)
        for reason, n in snap.waiting.items():
            key = reason if reason in counts else OTHER
            counts[key] = counts.get(key, 0) + n
        for reason, n in counts.items():
            waiting.add_metric([reason], n)
        yield waiting
        if snap.budget_remaining is not None:  # no daily cap: no series (not +Inf, which alerts dislike)
            yield GaugeMetricFamily(
                f"{P}budget_remaining_creative_units",
                "Creative units left today (UTC) under [budget] daily.",
                value=snap.budget_remaining,
            )
        yield GaugeMetricFamily(f"{P}watcher_up", "1 while the inbox observer runs.", value=snap.watcher_ok)


class TextfileWriter:
    """Writes the metrics to a file every `interval` seconds, atomically (for node_exporter's textfile)."""

    def __init__(self, metrics: Metrics, path: Path, interval: float = 15.0) -> None:
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self._due = float("-inf")
        self._failing = False
        self._lock = threading.Lock()  # tick (main loop) and close (shutdown) may overlap

    def next_due(self) -> float:
        """When tick has something to do (monotonic)."""
        return self._due

    def tick(self, now: float) -> None:
        """Write the file if it is due (now: monotonic)."""
        if now < self._due:
            return
        self._due = now + self.interval
        self.write()

    def write(self) -> bool:
        """Write the text now: a temp file in the same folder, fsync, rename over the old one."""
        with self._lock:
            try:
                _replace(self.path, self.metrics.render())
            except OSError as exc:  # a full or read-only disk: said once, tried again next time
                if not self._failing:
                    log.error("metrics.textfile_failed", file=str(self.path), error=str(exc))
                self._failing = True
                return False
            self._failing = False
            return True


def _replace(path: Path, body: bytes) -> None:
    # A reader sees the old file or the new one, never half of one; node_exporter skips hidden names.
    temp = temp_path(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)  # replacing is the point here (unlike the outbox's no-clobber rename)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

"""Watching the daemon: its metrics, the HTTP listener (/metrics, /status.json, the page), the textfile.

Built only when `[http] listen` or `[metrics] textfile` asks for it: otherwise the pipeline counts
into tally.NO_TALLY and start-up imports neither prometheus_client nor the listener. The gauges are
read from a snapshot the main loop builds whenever the heartbeat takes a new look (at most once a
second while things change); the scraping thread only reads that finished object, never the
scheduler's dicts the main loop changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scenario_watch.api.client import ScenarioClient
from scenario_watch.clock import Clock
from scenario_watch.config import Settings
from scenario_watch.dispatch.budget import Budget
from scenario_watch.intake.intake import Intake
from scenario_watch.journal.store import Store
from scenario_watch.shell import status
from scenario_watch.shell.heartbeat import Heartbeat
from scenario_watch.shell.instance import lock_path
from scenario_watch.tally import NO_TALLY, Tally

if TYPE_CHECKING:  # imported when wanted only (start-up time of a daemon without them)
    from scenario_watch.shell.metrics import Metrics, Snapshot, TextfileWriter
    from scenario_watch.shell.web import Listener


class Watching:
    """The metrics and the ways they are read (listener, textfile); a no-op when neither is set."""

    def __init__(self, settings: Settings, client: ScenarioClient, presets: Iterable[str]) -> None:
        """Make the metrics if anything reads them (no I/O)."""
        self.settings = settings
        self.metrics: Metrics | None = None
        self.tally: Tally = NO_TALLY
        self.listener: Listener | None = None
        self.textfile: TextfileWriter | None = None
        self._seen: object = None  # the heartbeat state the snapshot was made from
        self._snapshot: Snapshot | None = None
        if settings.http.listen is None and settings.metrics.textfile is None:
            return
        from scenario_watch.shell.metrics import Metrics

        self.metrics = Metrics(presets=presets, base_url=client.base_url, budget_daily=settings.budget.daily)
        self.tally = self.metrics

    @property
    def url(self) -> str | None:
        """Where the listener answers (None: no listener)."""
        return self.listener.url if self.listener is not None else None

    def start(
        self,
        *,
        store: Store,
        client: ScenarioClient,
        heartbeat: Heartbeat,
        intake: Intake,
        budget: Budget,
        preset_folders: Mapping[str, Path],
        journal: str,
        clock: Clock,
    ) -> None:
        """Count the client's requests, and bind the listener (a taken port: ConfigError, exit 2)."""
        metrics = self.metrics
        if metrics is None:
            return
        from scenario_watch.shell.metrics import Snapshot, TextfileWriter

        self.heartbeat, self.intake, self.budget = heartbeat, intake, budget
        client.on_response(metrics.api_response)

        def retried(method: str, url: str, status_code: int | None, kind: str) -> None:
            """A retry urllib3 made by itself: one more request, and its reason."""
            metrics.api_response(method, url, status_code)
            metrics.retry(kind)

        client.on_retry(retried)
        last = store.last_done_at()
        if last is not None:  # a restart does not reset "time since the last success"
            metrics.set_last_success(last)
        self._snapshot = Snapshot(budget_remaining=budget.remaining())
        metrics.set_snapshot(lambda: self._snapshot or Snapshot())
        settings = self.settings
        if settings.metrics.textfile is not None:
            self.textfile = TextfileWriter(metrics, settings.metrics.textfile, settings.metrics.interval)
        if settings.http.listen is not None:
            from scenario_watch.shell.web import Listener

            lock = lock_path(settings.folders.state, journal)

            def report() -> dict[str, Any]:
                """The `status --json` object (on the listener's thread: it reads the journal only)."""
                return status.build(store, lock, settings.budget, clock.wall())

            self.listener = Listener.from_settings(settings, store, report, metrics, preset_folders)
            self.listener.start()

    def tick(self, now: float) -> None:
        """After the heartbeat's tick: a new snapshot if it took a new look; the textfile when due."""
        if self.metrics is None:
            return
        state = self.heartbeat.state
        if state is not None and state is not self._seen:
            self._seen = state
            self._refresh(state)
        if self.textfile is not None:
            self.textfile.tick(now)

    def next_due(self) -> float | None:
        """When tick has something to do (monotonic), or None."""
        return self.textfile.next_due() if self.textfile is not None else None

    def _refresh(self, state: Mapping[str, Any]) -> None:
        from scenario_watch.shell.metrics import Snapshot, waiting_reasons

        self._snapshot = Snapshot(
            in_flight=int(state.get("in_flight") or 0),
            waiting=waiting_reasons(state),
            budget_remaining=self.budget.remaining(),
            watcher_ok=self.intake.observers_ok,
        )

    def close(self, now: float) -> None:
        """Stop the listener; write the textfile a last time, with the final counts (safe twice)."""
        if self.listener is not None:
            self.listener.close()
        if self.textfile is not None:
            self._refresh(self.heartbeat.snapshot(now))
            self.textfile.write()
            self.textfile = None

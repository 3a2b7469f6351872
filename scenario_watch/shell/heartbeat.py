"""What the running daemon tells `status`: one JSON value in the journal's meta table.

It holds what only the running process knows (pauses, why each queued prompt waits) and a
heartbeat time. Written when it changed, at most once a second, and every few seconds regardless,
so `status` can tell a live daemon from a stuck one; an idle daemon wakes only for the heartbeat.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from scenario_watch import logs
from scenario_watch.journal.rows import json_object
from scenario_watch.journal.store import Store
from scenario_watch.prepare.reference import missing_reference_name
from scenario_watch.scheduler import Scheduler

log = logs.get()

META_KEY = "daemon"
# At most one write a second while things change...
PUBLISH_EVERY = 1.0
# ...and one every so often when nothing does: the heartbeat.
HEARTBEAT_EVERY = 5.0


def iso(wall: float) -> str:
    """A Unix time as ISO 8601 UTC, to the second (as status shows it)."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _reference(problem: str) -> str:
    """What a prompt waits for: "reference beach.jpg" (the dispatcher keeps the whole problem text)."""
    return f"reference {missing_reference_name(problem) or problem}"


def published(store: Store) -> dict[str, Any]:
    """What the daemon (this one or the last) published last; empty when nothing readable is there."""
    found = store.get_meta(META_KEY)
    return json_object(found[0] if found else None)


class Heartbeat:
    """Publishes the scheduler's pauses and waits (main thread only)."""

    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        awaiting_references: Mapping[int, str],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.awaiting_references = awaiting_references  # the dispatcher's: prompt id → what is missing
        self.wall = wall
        self.pid = os.getpid()
        self._last: dict[str, Any] | None = None
        self.state: dict[str, Any] | None = None  # the latest snapshot tick took (a new dict each time)
        self._last_write = float("-inf")
        self._next_check = float("-inf")
        self._pending = False  # something may have changed since the last check
        self._failing = False
        # The generation time the last run had learned (it published it): a restart polls its first
        # jobs when they should be done too, instead of finding them done a growing interval late.
        typical = published(store).get("typical")
        if isinstance(typical, int | float) and not isinstance(typical, bool) and typical > 0:
            scheduler.recall(float(typical))

    def tick(self, now: float) -> None:
        """Publish the state if it changed (at most once a second), or when the heartbeat is due."""
        if now < self._next_check:
            self._pending = True
            return
        self._next_check, self._pending = now + PUBLISH_EVERY, False
        state = self.state = self.snapshot(now)
        if state != self._last or now >= self._last_write + HEARTBEAT_EVERY:
            self._write(state, now)

    def next_due(self) -> float:
        """When tick has something to do (monotonic)."""
        return self._next_check if self._pending else self._last_write + HEARTBEAT_EVERY

    def snapshot(self, now: float) -> dict[str, Any]:
        """The state as status reads it; monotonic times turned into Unix times."""
        s = self.scheduler
        wall_now = self.wall()

        def wall(moment: float) -> float | None:
            """A monotonic moment as unix time (None stays None)."""
            return round(wall_now + moment - now) if moment > now else None

        return {
            "pid": self.pid,
            "rate_limited_until": wall(s.paused_until),
            "auth_blocked": s.auth_blocked,
            "budget_until": wall(s.budget_until),
            "unwritable": s.unwritable,
            "queue": self._queue_reason(wall(s.paused_until), wall(s.budget_until)),
            "waiting": {str(pid): _reference(text) for pid, text in self.awaiting_references.items()},
            "queued": len(s.waiting),
            "in_flight": len(s.slots),
            # How long a generation takes, learned (None until a job finished): status estimates progress.
            "typical": None if s.typical is None else round(s.typical, 2),
        }

    def _queue_reason(self, rate_limited_until: float | None, budget_until: float | None) -> str:
        """What every prompt in the queue waits for (the first pause that holds them back)."""
        if self.scheduler.auth_blocked:
            return "credentials"
        if self.scheduler.unwritable:
            return self.scheduler.unwritable
        if budget_until is not None:
            return f"budget until {iso(budget_until)}"
        if rate_limited_until is not None:
            return f"rate limit until {iso(rate_limited_until)}"
        return "a free slot"

    def _write(self, state: dict[str, Any], now: float) -> None:
        try:
            self.store.set_meta(META_KEY, json.dumps({**state, "heartbeat": round(self.wall(), 3)}))
        except sqlite3.Error as exc:  # the journal's disk is full: said once, tried again later
            if not self._failing:
                log.error("status.publish_failed", error=str(exc))
            self._failing = True
            self._last_write = now
            return
        self._failing = False
        self._last, self._last_write = state, now

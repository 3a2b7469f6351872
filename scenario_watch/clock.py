"""One clock for everything with a deadline: monotonic for delays, wall for the journal.

The daemon gets `SystemClock`; tests (and the sandbox beside them) share a `ManualClock` and move
time forward themselves, so a 15-minute timeout or a 3-minute quiet period is tested in milliseconds.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for delays and deadlines; Unix seconds for what is journaled or shown."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (scheduling)."""
        ...

    def wall(self) -> float:
        """Unix time (the journal, files people read, the API's timestamps)."""
        ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    def wall(self) -> float:
        """time.time()."""
        return time.time()


SYSTEM = SystemClock()


class ManualClock:
    """A clock that moves only when told (thread-safe): both readings advance together."""

    def __init__(self, wall: float = 1_790_000_000.0, monotonic: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self._wall = wall
        self._monotonic = monotonic

    def monotonic(self) -> float:
        """The current monotonic reading."""
        with self._lock:
            return self._monotonic

    def wall(self) -> float:
        """The current Unix time."""
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both readings forward."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._wall += seconds
            self._monotonic += seconds


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC, for files people read."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")

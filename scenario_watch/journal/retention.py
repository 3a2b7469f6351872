"""[journal] keep_days: the daemon's loop prunes old finished prompts in small batches, in the background.

Each tick does one bounded step (a batch of prompts, or some freed pages given back) so the loop goes
on claiming and submitting between steps; while there is more, the next step follows shortly, and
once the journal is clean the next pass is an hour away. With `run --once` a pass starts at once and
the run waits for it (a daemon started by a timer prunes too). What is kept and why: journal_prune.py.
"""

from __future__ import annotations

import sqlite3

from scenario_watch import logs
from scenario_watch.clock import Clock
from scenario_watch.journal.journal_schema import journal_problem
from scenario_watch.journal.store import Store

log = logs.get()

DAY = 86400.0
# Prompts per transaction: the journal is locked for about 3 ms (journal_bench.py, 1,000,000 prompts;
# 70 ms when a WAL checkpoint falls in it), so a worker writing a prompt's state never waits long.
BATCH = 200
# Between two steps while there is more: the loop claims and submits in between.
STEP_PAUSE = 0.05
# The first pass waits until the start's own work (recovery, the inbox scan) is done.
FIRST_PASS = 60.0
# Between passes once nothing is left: finished prompts age by the hour, not faster.
PASS_EVERY = 3600.0


class Retention:
    """Prunes the journal of prompts finished more than keep_days ago (main thread only)."""

    def __init__(self, store: Store, keep_days: float, clock: Clock, *, at_once: bool = False) -> None:
        self.store = store
        self.keep = keep_days * DAY
        self.clock = clock
        first = clock.monotonic() + (0.0 if at_once else FIRST_PASS)
        self._due: float | None = first if keep_days > 0 else None
        self._removed = 0  # rows removed in this pass (logged once it is over)
        self._busy = False  # a pass has more to do

    def busy(self) -> bool:
        """Whether a pass is under way (`run --once` waits for it to end)."""
        return self._busy

    def next_due(self) -> float | None:
        """When tick has something to do (monotonic); None with keep_days = 0 (keep everything)."""
        return self._due

    def tick(self, now: float) -> None:
        """One step when due: a batch pruned, or some space given back; then the next step's time."""
        if self._due is None or now < self._due:
            return
        try:
            removed = self.store.prune(self.clock.wall() - self.keep, BATCH)
            self._removed += removed
            more = removed > 0 or self.store.give_back()
        except sqlite3.Error as exc:  # a full or locked disk: tried again at the next pass
            log.error("journal.prune_failed", error=str(exc), hint=journal_problem(exc))
            more = False
        self._busy = more
        if more:
            self._due = now + STEP_PAUSE
            return
        if self._removed:
            size = self.store.path.stat().st_size if self.store.path.exists() else 0
            log.info("journal.pruned", rows=self._removed, journal_mb=round(size / 1e6, 1))
        self._removed, self._due = 0, now + PASS_EVERY

"""Intake: files that arrive in the inbox, checked until complete, claimed into this daemon's folder.

The watcher's events, the startup scan and the periodic rescan feed `Arrivals`; what is complete is
claimed by an atomic rename into `<inbox>/.processing/<instance>/`. The observer is checked and
restarted here when it dies.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from . import logs
from .config import WatchSettings
from .watcher import PROCESSING, Arrivals, Watcher, claim

log = logs.get()

# Claim in batches, so a backlog of thousands does not delay the first submission.
CLAIM_BATCH = 64
# How often the observer's health is checked, and the longest wait between restart attempts.
OBSERVER_CHECK = 5.0
OBSERVER_RESTART_MAX = 60.0


def instance_id(state: Path) -> str:
    """This daemon's name among those sharing an inbox, made once and kept in its state folder."""
    path = state / "instance-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = re.sub(r"[^\w.-]", "_", f"{socket.gethostname()}-{secrets.token_hex(3)}")
        path.write_text(name + "\n")
        return name


class Intake:
    """What arrives in the inbox, until it is claimed; the observer kept alive."""

    def __init__(
        self, inbox: Path, state: Path, settings: WatchSettings, arrived: Callable[[str, bool], None]
    ) -> None:
        self.inbox = inbox
        self.settings = settings
        # Each daemon claims into a folder of its own: daemons sharing an inbox never touch (or, after
        # a restart, adopt) each other's claims.
        self.processing = inbox / PROCESSING / instance_id(state)
        self.processing.mkdir(parents=True, exist_ok=True)
        self.watcher = Watcher(inbox, settings, arrived)
        self.arrivals = Arrivals(settings.settle)
        self.watching = False
        self.more = False  # the last claim batch was full: more may be ready now
        self.next_rescan = 0.0
        self.next_observer_check = 0.0
        self.observer_backoff = 1.0

    def start(self, now: float, *, watch: bool) -> None:
        """Start the observer (unless `watch` is off) and scan the inbox once."""
        self.watching = watch
        if watch:
            self.watcher.start()
        for path in self.watcher.scan():
            self.arrivals.note(path, moved=False)
        self.next_rescan = now + self.settings.rescan_interval

    def stop(self) -> None:
        """Stop the observer."""
        self.watcher.stop()

    def note(self, path: str, moved: bool) -> None:
        """A file may have arrived (an event from the observer thread, passed on by the loop)."""
        self.arrivals.note(path, moved)

    def pending(self) -> int:
        """Files seen but not yet claimed."""
        return len(self.arrivals)

    def claim_ready(self, now: float) -> list[tuple[str, Path]]:
        """Claim the files complete by now (a batch): each as (inbox-relative name, claimed path)."""
        batch = self.arrivals.ready(now, limit=CLAIM_BATCH)
        self.more = len(batch) == CLAIM_BATCH
        claimed = []
        for path in batch:
            try:
                dest = claim(path, self.inbox, self.processing)
            except Exception:  # one odd file must not hold up the others
                log.exception("prompt.claim_failed", path=path)
                continue
            if dest is not None:
                claimed.append((os.path.relpath(path, self.inbox), dest))  # sub/x.json when recursive
        return claimed

    def unknown_claims(self, known: set[str]) -> list[tuple[str, Path]]:
        """Files in the claim folder the journal does not know (a crash between claim and record)."""
        return [
            (str(path.relative_to(self.processing)), path)
            for path in sorted(self.processing.rglob("*.json"))
            if path.is_file() and str(path) not in known
        ]

    def tick(self, now: float) -> None:
        """Rescan when due (events get lost) and keep the observer alive."""
        if not self.watching:
            return
        if now >= self.next_rescan:
            self.next_rescan = now + self.settings.rescan_interval
            # Events get lost (queue overflow, network shares, a replaced folder): look for ourselves.
            missed = [path for path in self.watcher.scan() if path not in self.arrivals]
            if missed:
                log.info("watch.rescan_found", count=len(missed))
            for path in missed:
                self.arrivals.note(path, moved=False)
        if now >= self.next_observer_check:
            self._check_observer(now)

    def next_due(self) -> float | None:
        """The earliest moment intake has something to do (monotonic), or None."""
        times = [t for t in (self.arrivals.next_check(),) if t is not None]
        if self.watching:
            times += [self.next_rescan, self.next_observer_check]
        return min(times, default=None)

    def _check_observer(self, now: float) -> None:
        self.next_observer_check = now + OBSERVER_CHECK
        if self.watcher.alive():
            self.observer_backoff = 1.0
            return
        log.error("watch.observer_died", restart_in=self.observer_backoff)
        try:
            self.watcher.restart()
            self.next_rescan = now  # files that arrived while it was down
        except OSError as exc:
            log.error("watch.restart_failed", error=str(exc))
        self.next_observer_check = now + self.observer_backoff
        self.observer_backoff = min(OBSERVER_RESTART_MAX, self.observer_backoff * 2)

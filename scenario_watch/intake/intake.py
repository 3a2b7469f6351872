"""Intake: files that arrive in the inbox, checked until complete, claimed into this daemon's folder.

The watcher's events, the startup scan and the periodic rescan feed `Arrivals`; what is complete is
claimed by an atomic rename into `<inbox>/.processing/<instance>/`. The observer is checked and
restarted here when it dies. Each preset folder is one more source, watched the same way and claimed
into its own `<folder>/.processing/<instance>/` (the same filesystem as the file, so the rename is atomic),
except the files it held before the preset existed (backlog.py): those are left alone until released.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from scenario_watch import logs
from scenario_watch.config import WatchSettings
from scenario_watch.errors import ConfigError
from scenario_watch.files import rename_into
from scenario_watch.intake.names import SkipLog, is_json_name, is_text_name, journal_safe
from scenario_watch.intake.watcher import PROCESSING, Arrivals, Watcher, claim

if TYPE_CHECKING:
    from scenario_watch.intake.backlog import Baselines
    from scenario_watch.intake.kept import Kept

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


class Claim(NamedTuple):
    """A file taken: its journal name (inbox-relative, or `PRESET/file`), where it is now, its preset."""

    name: str
    path: Path
    preset: str | None = None


def _real_folder(path: Path) -> bool:
    """True for a real folder; ConfigError for a link or anything else at `path`."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{path} is not a folder (a link or a file put in its place?): the daemon claims prompts there;"
            " move it away and start again"
        )
    return True


def _files_below(folder: Path) -> list[Path]:
    """Every file (or link, filed as one) below `folder`, never going through a link (os.walk does not)."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            mode = os.lstat(Path(root) / name).st_mode
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                found.append(Path(root) / name)
    return found


@dataclass(frozen=True)
class _Source:
    """One watched folder: the inbox, or a preset's folder."""

    folder: Path
    preset: str | None
    processing: Path
    watcher: Watcher

    def name(self, path: str | Path) -> str:
        """The journal name of a file of this folder: presets' are `NAME/file` (their outputs' folder)."""
        rel = journal_safe(os.path.relpath(path, self.folder))
        return rel if self.preset is None else f"{self.preset}/{rel}"


class Intake:
    """What arrives in the inbox and the preset folders, until it is claimed; the observers kept alive."""

    def __init__(
        self,
        inbox: Path,
        state: Path,
        settings: WatchSettings,
        arrived: Callable[[str, bool], None],
        presets: Mapping[str, Path] | None = None,
        kept: Kept | None = None,
    ) -> None:
        self.inbox = inbox
        # Presets on the outbox: what they took stays in place (kept.py), never taken twice.
        self.kept = kept
        self.settings = settings
        # Each daemon claims into a folder of its own: daemons sharing an inbox never touch (or, after
        # a restart, adopt) each other's claims.
        instance = instance_id(state)
        skipped = SkipLog()
        presets = presets or {}
        self.sources = [
            _Source(
                inbox,
                None,
                inbox / PROCESSING / instance,
                Watcher(inbox, settings, arrived, exclude=list(presets.values()), skipped=skipped),
            )
        ]
        for name, folder in presets.items():
            watcher = Watcher(folder, settings, arrived, preset=name, skipped=skipped)
            self.sources.append(_Source(folder, name, folder / PROCESSING / instance, watcher))
        for path in self._claim_paths():
            try:
                path.mkdir(parents=True, exist_ok=True)  # a preset's folder may not exist yet
            except OSError as exc:  # a file (or a dangling link) where the claim folder goes
                raise ConfigError(f"{path} cannot be made a folder ({exc.strerror}): move it away") from None
        # Who may write the inbox may rename `.processing` and put a link in its place: the start, each
        # claim and each use of a claimed file check that the claim folders are real folders, no link.
        for path in self._claim_paths():
            _real_folder(path)
        self.claims_refused = False  # a claim folder was replaced: nothing more is taken
        self.arrivals = Arrivals(settings.settle)
        # What the preset folders held before their presets (set by backlog.at_start before start()).
        self.baselines: Baselines | None = None
        self.watching = False
        self.more = False  # the last claim batch was full: more may be ready now
        self.next_rescan = 0.0
        self.next_observer_check = 0.0
        self.observer_backoff = 1.0
        self.observers_ok = True  # every observer was alive at the last check

    def start(self, now: float, *, watch: bool) -> None:
        """Start the observer (unless `watch` is off) and scan the inbox once."""
        self.watching = watch
        for source in self.sources:
            if watch:
                source.watcher.start()
            for path in self._scan(source):
                self.arrivals.note(path, moved=False)
        self.next_rescan = now + self.settings.rescan_interval

    def stop(self) -> None:
        """Stop the observers."""
        for source in self.sources:
            source.watcher.stop()

    def note(self, path: str, moved: bool) -> None:
        """A file may have arrived (an event from the observer thread, passed on by the loop)."""
        self.arrivals.note(path, moved)

    def pending(self) -> int:
        """Files seen but not yet claimed."""
        return len(self.arrivals)

    def _claim_paths(self) -> list[Path]:
        return [p for source in self.sources for p in (source.processing.parent, source.processing)]

    def claim_folders_intact(self) -> bool:
        """Whether every claim folder is a real folder or missing (a replaced inbox: made again), not a
        link or a file put in its place; said once when not."""
        for path in self._claim_paths():
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            except OSError:
                mode = 0  # unreadable: not known to be a real folder
            if not stat.S_ISDIR(mode):
                if not self.claims_refused:
                    log.error(
                        "intake.claim_folder_replaced",
                        folder=str(path),
                        note="nothing more is taken from the inbox; check who replaced it, then restart",
                    )
                self.claims_refused = True
                return False
        return True

    def claim_ready(self, now: float) -> list[Claim]:
        """Claim the files complete by now (a batch); none once the claim folders were replaced."""
        batch = self.arrivals.ready(now, limit=CLAIM_BATCH)
        self.more = len(batch) == CLAIM_BATCH
        if (
            batch and not self.claim_folders_intact()
        ):  # what waits stays in the inbox: forgotten, not looped on
            self.arrivals, self.more = Arrivals(self.settings.settle), False
            return []
        claimed = []
        for path in batch:
            source = self._source_of(path)
            if self._left_alone(source, path):  # an event on a file the preset leaves alone
                continue
            try:
                dest = claim(path, source.folder, source.processing)
            except Exception:  # one odd file must not hold up the others
                log.exception("prompt.claim_failed", path=path)
                continue
            if dest is None:
                continue
            if self.kept is not None and source.preset in self.kept.folders:
                self.kept.took(source.preset, path, dest)  # linked back: stage one's manifest stays true
            claimed.append(Claim(source.name(path), dest, source.preset))  # sub/x.json when recursive
        return claimed

    def restore_kept(self, known: set[str]) -> int:
        """At start: link back what a preset on the outbox claimed just before a crash, between the claim
        and the link back (so before the journal heard of it: not in `known`); how many were linked."""
        if self.kept is None:
            return 0
        restored = 0
        for source in self.sources:
            if source.preset not in self.kept.folders:
                continue
            for claimed in sorted(_files_below(source.processing)):
                original = source.folder / claimed.relative_to(source.processing)
                if str(claimed) not in known and claimed.is_file() and not os.path.lexists(original):
                    self.kept.took(source.preset, str(original), claimed)
                    restored += 1
        return restored

    def unknown_claims(self, known: set[str]) -> list[Claim]:
        """Files in the claim folders the journal does not know (a crash between claim and record)."""
        found = []
        for source in self.sources:
            for path in sorted(_files_below(source.processing)):  # never through a link
                # One rule for what a prompt file is (UPPER.JSON too); a preset folder takes images too.
                wanted = source.preset is not None or is_json_name(path.name) or is_text_name(path.name)
                if wanted and str(path) not in known:
                    rel = path.relative_to(source.processing)
                    safe = Path(journal_safe(str(rel)))
                    if safe != rel:  # claimed by a release that kept such names as they were
                        (source.processing / safe.parent).mkdir(parents=True, exist_ok=True)
                        path = rename_into(path, source.processing / safe.parent, safe.name)
                    found.append(Claim(source.name(source.folder / rel), path, source.preset))
        return found

    def _source_of(self, path: str) -> _Source:
        """The watched folder `path` is in: the deepest one (a preset folder may lie inside the inbox)."""
        inside = [s for s in self.sources if path.startswith(str(s.folder) + os.sep)]
        return max(inside, key=lambda s: len(str(s.folder)), default=self.sources[0])

    def tick(self, now: float) -> None:
        """Rescan when due (events get lost) and keep the observer alive."""
        if not self.watching:
            return
        if now >= self.next_rescan:
            self.next_rescan = now + self.settings.rescan_interval
            # Events get lost (queue overflow, network shares, a replaced folder): look for ourselves.
            scanned = [path for source in self.sources for path in self._scan(source)]
            missed = [path for path in scanned if path not in self.arrivals]
            if missed:
                log.info("watch.rescan_found", count=len(missed))
            for path in missed:
                self.arrivals.note(path, moved=False)
        if now >= self.next_observer_check:
            self._release()
            self._check_observer(now)

    def _scan(self, source: _Source) -> list[str]:
        """The folder's candidates, but those its preset leaves alone."""
        return [path for path in source.watcher.scan() if not self._left_alone(source, path)]

    def _left_alone(self, source: _Source, path: str) -> bool:
        """Left alone: there before the preset, or (a preset on the outbox) already taken and kept."""
        if self.kept is not None and self.kept.holds(source.preset, path):
            return True
        return self.baselines is not None and self.baselines.left_alone(source.preset, path)

    def _release(self) -> None:
        """Files `scenario-watch take` released from a preset's backlog: complete, so taken at once."""
        if self.baselines is not None:
            for path in self.baselines.refresh():
                self.arrivals.note(path, moved=True)

    def next_due(self) -> float | None:
        """The earliest moment intake has something to do (monotonic), or None."""
        times = [t for t in (self.arrivals.next_check(),) if t is not None]
        if self.watching:
            times += [self.next_rescan, self.next_observer_check]
        return min(times, default=None)

    def _check_observer(self, now: float) -> None:
        self.next_observer_check = now + OBSERVER_CHECK
        dead = [source for source in self.sources if not source.watcher.alive()]
        self.observers_ok = not dead
        if not dead:
            self.observer_backoff = 1.0
            return
        for source in dead:
            log.error("watch.observer_died", folder=str(source.folder), restart_in=self.observer_backoff)
            try:
                source.watcher.restart()
                self.next_rescan = now  # files that arrived while it was down
            except OSError as exc:
                log.error("watch.restart_failed", error=str(exc))
        self.next_observer_check = now + self.observer_backoff
        self.observer_backoff = min(OBSERVER_RESTART_MAX, self.observer_backoff * 2)

"""watchdog events + startup scan + periodic rescan → complete files, claimed by atomic rename."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from scenario_watch import logs
from scenario_watch.config import WatchSettings
from scenario_watch.errors import UnsafeFile
from scenario_watch.files import read_regular, rename_into
from scenario_watch.intake.names import Skip, SkipLog, classify, is_ignored, is_json_name, journal_safe

PROCESSING = ".processing"
PEEK_LIMIT = 1024 * 1024
MOVE_PAIRING_DELAY = 0.01
# Filesystems whose changes made by other machines inotify never reports.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
        "ncpfs", "davfs", "sshfs", "fuse.sshfs", "fuse.rclone", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse",
    }
)  # fmt: skip

log = logs.get()

# What the handler takes as "a file may have arrived" (see _Handler.on_any_event).
WANTED = (
    FileMovedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
)


class _Handler(FileSystemEventHandler):
    """Only enqueues: an exception in a watchdog handler would kill the observer thread."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Pass on a file that may have arrived (never raises)."""
        try:
            if event.is_directory and self.watcher.recursive:
                return  # a subfolder to watch (without recursion, a folder named *.json is claimed: it fails)
            if isinstance(event, FileMovedEvent | DirMovedEvent):
                path, moved = os.fsdecode(event.dest_path), True
            elif isinstance(event, WANTED):  # created, modified, closed after writing
                path, moved = os.fsdecode(event.src_path), False
            else:
                return
            if not path:
                return
            verdict = self.watcher.classify(path)
            if isinstance(verdict, str):
                self.watcher.arrived(path, moved)
            elif isinstance(verdict, Skip) and not event.is_directory:
                self.watcher.skipped.note(path, verdict)
        except Exception:  # never let one odd event stop watching for good
            log.exception("watch.handler_error")


@dataclass
class _Seen:
    moved: bool
    size: int = -1
    mtime_ns: int = -1
    since: float = 0.0


class Arrivals:
    """Files that may have arrived, held until they are complete.

    A file moved in is complete at once. A file written in place is complete when it parses as a
    JSON object, or when its size and mtime have not changed for `settle` seconds (then it is
    claimed even if it is bad, so that it fails with a clear error instead of waiting forever).
    Anything but a regular file (a symlink, FIFO, folder ...) is claimed at once, never opened.
    """

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._seen: dict[str, _Seen] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, path: str) -> bool:
        return path in self._seen

    def note(self, path: str, moved: bool) -> None:
        """A file may have arrived (moved in: complete at once)."""
        seen = self._seen.get(path)
        if seen is None:
            self._seen[path] = _Seen(moved)
        elif moved:
            seen.moved = True

    def ready(self, now: float, limit: int) -> list[str]:
        """Up to `limit` paths complete enough to claim now; the others stay for a later check."""
        ready: list[str] = []
        for path, seen in list(self._seen.items()):
            if len(ready) >= limit:
                break
            verdict = self._check(path, seen, now)
            if verdict != "wait":
                del self._seen[path]
            if verdict == "ready":
                ready.append(path)
        return ready

    def next_check(self) -> float | None:
        """When the earliest waiting file may have settled (monotonic), or None."""
        if not self._seen:
            return None
        return min(seen.since for seen in self._seen.values()) + self.settle

    def _check(self, path: str, seen: _Seen, now: float) -> str:
        try:
            st = os.lstat(path)
        except OSError:
            return "gone"
        if seen.moved or not stat.S_ISREG(st.st_mode):
            # Nothing to wait for in a symlink or a FIFO (and opening one could follow or block): the
            # claim renames it unread and validation files it in failed/ with the reason.
            return "ready"
        if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
            seen.size, seen.mtime_ns, seen.since = st.st_size, st.st_mtime_ns, now
            # An image cannot be complete JSON: it is ready when it settles (or was moved in).
            if is_json_name(path) and 0 < st.st_size <= PEEK_LIMIT and _complete_json(path):
                return "ready"
            return "wait"
        return "ready" if now - seen.since >= self.settle else "wait"


def _complete_json(path: str) -> bool:
    try:
        return isinstance(json.loads(read_regular(path, PEEK_LIMIT)), dict)
    except (OSError, ValueError, RecursionError, UnsafeFile):
        return False


def claim(path: str, inbox: Path, processing: Path) -> Path | None:
    """Take a file by renaming it into `processing` (this daemon's own folder under <inbox>/.processing/,
    so the rename is atomic and never replaces another daemon's claim); None if another got it first.
    A name that is not UTF-8 is claimed under its journal-safe spelling (`%E9t%E9.json`)."""
    parts = Path(os.path.relpath(path, inbox)).parts
    for depth in range(1, len(parts)):  # a subfolder swapped for a link since it was seen: not ours
        if os.path.islink(inbox.joinpath(*parts[:depth])):
            log.warning("prompt.claim_refused", path=path, reason="a folder on its way is a link")
            return None
    rel = Path(journal_safe(os.path.join(*parts)))
    folder = processing / rel.parent
    for _ in range(2):
        try:
            return rename_into(path, folder, rel.name)  # the entry itself: a symlink is not followed
        except FileNotFoundError:
            if not os.path.lexists(path):
                return None  # claimed by another daemon sharing the inbox, or removed by its writer
            folder.mkdir(parents=True, exist_ok=True)  # a new subfolder, or a replaced inbox
    return None


def filesystem_type(path: Path, mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """The type of the filesystem holding `path`, from the mount table (longest matching mount point)."""
    real = os.path.realpath(path)
    best, fstype = "", None
    try:
        table = mounts.read_text()
    except OSError:
        return None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


class Watcher:
    """The observer (inotify, or polling for network shares), restartable, plus the folder's scan.

    One watches the inbox (JSON prompt files); one more watches each preset folder (`preset` set:
    images too, never recursive). `exclude`: folders inside this one that another watcher owns.
    """

    def __init__(
        self,
        inbox: Path,
        settings: WatchSettings,
        arrived: Callable[[str, bool], None],
        *,
        preset: str | None = None,
        exclude: Sequence[Path] = (),
        skipped: SkipLog | None = None,
    ) -> None:
        self.inbox = inbox
        self.settings = settings
        self.arrived = arrived
        self.preset = preset
        self.recursive = settings.recursive and preset is None
        self.exclude = tuple(str(folder) for folder in exclude)
        self.skipped = skipped or SkipLog()
        self._observer: BaseObserver | None = None
        self._inode = 0
        if settings.polling != "auto":
            self.polling = settings.polling
            return
        fstype = filesystem_type(inbox)
        self.polling = fstype in NETWORK_FILESYSTEMS
        if self.polling:
            log.warning(
                "watch.network_filesystem",
                fstype=fstype,
                note="inotify misses changes made by other machines: using the polling observer "
                "(set [watch] polling = false to override)",
            )

    def start(self) -> None:
        """Start the observer (falling back to polling at inotify's limits)."""
        (self.inbox / PROCESSING).mkdir(parents=True, exist_ok=True)
        self._inode = os.stat(self.inbox).st_ino
        try:
            self._observer = self._start(self.polling)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE) or self.polling:
                raise
            knob = (
                "fs.inotify.max_user_watches"
                if exc.errno == errno.ENOSPC
                else "fs.inotify.max_user_instances"
            )
            log.error(
                "watch.inotify_limit",
                error=os.strerror(exc.errno or 0),
                hint=f"raise it with `sysctl -w {knob}=...` (and in /etc/sysctl.d/); polling meanwhile",
            )
            self.polling = True
            self._observer = self._start(True)
        where = (
            {"inbox": str(self.inbox)}
            if self.preset is None
            else {"preset": self.preset, "folder": str(self.inbox)}
        )
        log.info("watch.started", **where, observer="polling" if self.polling else "inotify")

    def classify(self, path: str) -> str | Skip | None:
        """Whether this watcher takes `path` (see `classify`)."""
        return classify(
            path,
            str(self.inbox),
            self.recursive,
            self.settings.ignore,
            images=self.preset is not None,
            exclude=self.exclude,
        )

    def _start(self, polling: bool) -> BaseObserver:
        observer: BaseObserver
        if polling:
            observer = PollingObserver(timeout=1.0)
        else:
            from watchdog.observers.inotify import InotifyObserver
            from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

            # watchdog holds each IN_MOVED_FROM for `delay` (0.5 s) waiting for its IN_MOVED_TO, and
            # its queue sleeps on that head event even when the pair arrives meanwhile, so every event
            # behind a claim (a rename) could wait 0.5 s. A pair split by more than 10 ms only becomes
            # two unpaired events, which the handler takes as they are (moved in: arrived; out: gone).
            InotifyMoveEventGrouper.delay = MOVE_PAIRING_DELAY

            # Full events: a file moved in from outside the inbox comes as a move, so it is read at once.
            observer = InotifyObserver(generate_full_events=True)
        handler = _Handler(self)
        # inotify always watches .processing/ too, so each claim's rename is one paired move event:
        # watchdog holds an unpaired IN_MOVED_FROM for 0.5 s and every event behind it waits as long.
        # The handler drops what recursive = false does not want.
        # Only the events the handler reads: no IN_OPEN/IN_CLOSE_NOWRITE, so the daemon's own reads and
        # scans (and watchdog's walk after a queue overflow, which would overflow it again) make none.
        observer.schedule(
            handler, str(self.inbox), recursive=self.recursive or not polling, event_filter=list(WANTED)
        )
        observer.daemon = True
        observer.start()
        return observer

    def alive(self) -> bool:
        """The observer and its emitter threads still run (an emitter stops when its folder goes)."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        try:  # a watch follows the folder it was put on: an inbox replaced by a new one is unwatched
            if os.stat(self.inbox).st_ino != self._inode:
                return False
        except OSError:
            return False
        return bool(observer.emitters) and all(emitter.is_alive() for emitter in observer.emitters)

    def restart(self) -> None:
        """Replace a dead observer (a handler crash, a share that went away)."""
        self.stop()
        self.start()

    def scan(self) -> list[str]:
        """Every candidate file now in the folder (one scandir; a walk when recursive); skips logged once."""
        found: list[str] = []
        folders = [str(self.inbox)]
        while folders:
            try:
                entries = list(os.scandir(folders.pop()))
            except OSError as exc:
                log.warning("watch.scan_failed", error=str(exc))
                continue
            for entry in entries:
                verdict = self.classify(entry.path)
                if verdict is None:
                    continue  # a preset folder inside the inbox: its own watcher's
                if entry.is_dir(follow_symlinks=False) and (self.recursive or not isinstance(verdict, str)):
                    if not is_ignored(entry.name, self.settings.ignore):  # .processing, @eaDir ...
                        self._look_into(entry.path, folders)
                elif isinstance(verdict, str):
                    # Any kind of entry, not only regular files: a symlink, FIFO or folder named *.json
                    # is claimed too, so it ends in failed/ with the reason instead of lying here unexplained.
                    found.append(entry.path)
                else:
                    self.skipped.note(entry.path, verdict)
        return sorted(found)

    def _look_into(self, path: str, folders: list[str]) -> None:
        """A subfolder: walk it when recursive; otherwise name once what lies there unseen (one scandir)."""
        if self.recursive:
            folders.append(path)
            return
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            verdict = self.classify(entry.path)
            if isinstance(verdict, Skip) and not entry.is_dir(follow_symlinks=False):
                self.skipped.note(entry.path, verdict)

    def stop(self) -> None:
        """Stop the observer."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=2)

"""Backlogs: what lay in a watched folder before the daemon first looked, and who pays for it.

A preset never pays for what its folder held before the preset existed. The first time the daemon
sees a preset (or the preset's folder changed), the files there are recorded in the journal (`meta`,
one JSON value for every preset) and left alone: logged once (`preset.backlog_left`), counted by
`status`, and taken only when `scenario-watch take PRESET --all | FILE...` releases them. A file is
the same file while its name, size and modification time (in ns) are: one replaced or changed since
counts as new and is taken, as is everything that arrives later, also while the daemon is stopped.
The inode is left out on purpose: it changes when a share is remounted or a folder restored, and a
false "new" would pay for the whole folder.

The inbox keeps its promise (whatever waits there is processed), but on the very first start with
files waiting, the log says how many and what they will cost (`inbox.backlog`) before anything is paid.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import format_cost
from scenario_watch.dispatch.budget import Shape, shape
from scenario_watch.errors import ScenarioWatchError
from scenario_watch.journal.store import Store
from scenario_watch.prepare.preparation import prepare
from scenario_watch.prepare.prompt import PromptRules

if TYPE_CHECKING:
    from scenario_watch.intake.intake import Intake

log = logs.get()

META_KEY = "presets.left_alone"
FIRST_START_KEY = "inbox.first_start"
# The inbox's first-start estimate: prompt files read, dry runs asked (one per parameter shape), and
# how long start-up waits for their answers before it goes on without a figure.
SAMPLE = 32
MAX_DRY_RUNS = 3
DRY_RUN_WAIT = 5.0

Identity = tuple[int, int]  # size, mtime_ns


def identity(path: str) -> Identity | None:
    """What makes a file the same file across restarts: its size and modification time; None if gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class Baseline:
    """The files one preset found in its folder when it first saw it, and left alone."""

    folder: str  # the folder's real path when the files were recorded
    since: float  # when (Unix time)
    files: dict[str, Identity]

    def present(self, folder: Path) -> dict[str, Identity]:
        """The recorded files still there, unchanged."""
        return {name: i for name, i in self.files.items() if identity(str(folder / name)) == i}


def real(folder: Path) -> str:
    """A folder as the baseline records it: symlinks resolved, so a renamed link is the same folder."""
    return os.path.realpath(folder)


def read(store: Store) -> tuple[dict[str, Baseline], float | None]:
    """Every preset's baseline as the journal keeps it, and when it was written (None: never)."""
    found = store.get_meta(META_KEY)
    if found is None:
        return {}, None
    return parse(found[0]), found[1]


def parse(value: str) -> dict[str, Baseline]:
    """The journal's JSON value as baselines (an unreadable value holds none)."""
    try:
        raw = json.loads(value)
        return {
            name: Baseline(
                str(entry["folder"]),
                float(entry["since"]),
                {str(f): (int(i[0]), int(i[1])) for f, i in entry["files"].items()},
            )
            for name, entry in raw.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        log.warning("preset.backlog_unreadable", note="the journal's record of left-alone files is lost")
        return {}


def dump(baselines: Mapping[str, Baseline]) -> str:
    """Baselines as the journal's JSON value."""
    return json.dumps(
        {
            name: {"folder": b.folder, "since": b.since, "files": {f: list(i) for f, i in b.files.items()}}
            for name, b in baselines.items()
        },
        sort_keys=True,
    )


class Baselines:
    """The daemon's view of what each preset leaves alone; reread when `take` changed the journal."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.folders: dict[str, Path] = {}
        self.by_preset: dict[str, Baseline] = {}
        self.version: float | None = None  # when the journal's value was written, as last read

    def record(self, folders: Mapping[str, Path], scan: Callable[[str], list[str]], wall: float) -> None:
        """At start: a new baseline for each preset first seen (or moved), the others pruned of gone files."""
        stored, _ = read(self.store)
        fresh: dict[str, Baseline] = {}
        changed = set(stored) != set(folders)  # a preset removed from the configuration is forgotten
        for name, folder in folders.items():
            old = stored.get(name)
            if old is not None and old.folder == real(folder):
                fresh[name] = Baseline(old.folder, old.since, old.present(folder))
                changed |= len(fresh[name].files) != len(old.files)
                continue
            files = {os.path.basename(p): i for p in scan(name) if (i := identity(p)) is not None}
            fresh[name] = Baseline(real(folder), wall, files)
            changed = True
            if files:
                log.info(
                    "preset.backlog_left",
                    preset=name,
                    folder=str(folder),
                    count=len(files),
                    reason="first seen" if old is None else f"its folder changed (was {old.folder})",
                    note="files there before the preset are never paid for without being asked",
                    hint=f"scenario-watch take {name} --all (or name the files) takes them",
                )
        self.folders, self.by_preset = dict(folders), fresh
        if changed:
            self.store.set_meta(META_KEY, dump(fresh))
        found = self.store.get_meta(META_KEY)
        self.version = found[1] if found else None

    def left_alone(self, preset: str | None, path: str) -> bool:
        """Whether `path` (in `preset`'s folder) lay there before the preset and was not released."""
        baseline = self.by_preset.get(preset) if preset is not None else None
        if baseline is None:
            return False
        name = os.path.basename(path)
        known = baseline.files.get(name)
        if known is None:
            return False
        if identity(path) == known:
            return True
        del baseline.files[name]  # replaced or changed: a new file (the journal forgets it next start)
        return False

    def refresh(self) -> list[str]:
        """Paths `take` released since the last look (the journal's value changed): take them now."""
        if not any(baseline.files for baseline in self.by_preset.values()):
            return []  # nothing left alone, nothing to release: no need to ask the journal
        found = self.store.get_meta(META_KEY)
        if found is None or found[1] == self.version:
            return []
        self.version = found[1]
        stored = parse(found[0])
        released = []
        for name, baseline in self.by_preset.items():
            now = stored.get(name)
            keep = now.files if now is not None and now.folder == baseline.folder else {}
            for file in [f for f in baseline.files if f not in keep]:
                del baseline.files[file]
                released.append(str(self.folders[name] / file))
        if released:
            log.info("preset.backlog_released", count=len(released))
        return sorted(released)


# -- `scenario-watch take` ----------------------------------------------------------------------------


def take(journal: Path, preset: str, folder: Path, names: Sequence[str] | None) -> tuple[list[str], int]:
    """Release files a preset left alone (all, or those named): lines for a person, and how many failed."""
    where = f"[presets.{preset}]"
    unseen = [
        f"{where}: the daemon has not seen {folder} as this preset's folder yet, so nothing is left alone"
        " there; at its next start what the folder holds is left alone, and `take` releases it after that"
    ]
    if not journal.exists():
        return unseen, len(names or ())
    store = Store(journal)
    try:
        baselines, _ = read(store)
        baseline = baselines.get(preset)
        if baseline is None or baseline.folder != real(folder):
            return unseen, len(names or ())
        present = baseline.present(folder)
        chosen: list[str] = sorted(present) if names is None else []
        lines: list[str] = []
        for name in names or ():
            file = _in_folder(name, folder)
            if file is not None and file in present:
                chosen.append(file)
            else:
                lines.append(f"{name}: not among the files {where} left alone in {folder}")
        bad = len(lines)
        if not chosen:
            return [*lines, f"{where}: nothing to take"], bad
        for file in chosen:
            del baseline.files[file]
        baseline.files = {f: i for f, i in baseline.files.items() if f in present}  # forget the gone
        store.set_meta(META_KEY, dump(baselines))
    finally:
        store.close()
    lines += [f"{file}: released" for file in chosen]
    lines.append(
        f"{where}: {len(chosen)} file(s) will be taken (each one job): by a running daemon within a few"
        " seconds, else at its next start"
    )
    return lines, bad


def _in_folder(name: str, folder: Path) -> str | None:
    """A file named on the command line as its name in the preset's folder (bare, or a path into it)."""
    path = Path(name)
    if path.parent != Path(".") and real(path.parent) != real(folder):
        return None  # a file somewhere else
    return path.name


def counts(store: Store) -> dict[str, dict[str, Any]]:
    """Per preset: its folder and how many files it leaves alone now (for `status`)."""
    baselines, _ = read(store)
    return {
        name: {"folder": b.folder, "left_alone": len(b.present(Path(b.folder)))}
        for name, b in sorted(baselines.items())
    }


# -- at start -----------------------------------------------------------------------------------------


def at_start(
    store: Store,
    intake: Intake,
    client: ScenarioClient,
    rules: PromptRules,
    *,
    once: bool,
    wall: float,
    out: TextIO | None = None,
) -> None:
    """Before the first submission: record what the presets leave alone; tell the inbox's backlog."""
    presets = {s.preset: s for s in intake.sources if s.preset is not None}
    baselines = Baselines(store)
    baselines.record({n: s.folder for n, s in presets.items()}, lambda n: presets[n].watcher.scan(), wall)
    intake.baselines = baselines
    inbox = intake.sources[0]
    first = store.get_meta(FIRST_START_KEY) is None
    if first:  # a journal from before this marker existed that holds prompts is no first start
        first = not any(store.counts().values())
        store.set_meta(FIRST_START_KEY, json.dumps({"at": wall}))
    if not (first or once):
        return
    files = inbox.watcher.scan()
    cost: float | None = None
    if first and files:
        cost, basis = estimate(files, inbox.folder, client, rules)
        log.info(
            "inbox.backlog",
            count=len(files),
            inbox=str(inbox.folder),
            estimated_cost=None if cost is None else round(cost, 2),
            basis=basis,
            note="first start: these are processed now, as everything dropped in the inbox is",
        )
    if once or files:
        about = f" (about {format_cost(round(cost, 1))} creative units)" if cost is not None else ""
        print(f"{len(files)} prompt file(s) waiting in {inbox.folder}{about}", file=out or sys.stderr)


def estimate(
    files: Sequence[str], inbox: Path, client: ScenarioClient, rules: PromptRules
) -> tuple[float | None, str]:
    """What the files will cost, from a bounded sample and a few dry runs; the figure and how it was made."""
    sample = list(files[:SAMPLE])
    shapes: dict[Shape, dict[str, Any]] = {}
    per_file: list[Shape | None] = []
    for path in sample:
        try:
            prompt = prepare(
                Path(path), name=os.path.relpath(path, inbox), base_dir=Path(path).parent, rules=rules
            )
        except (ScenarioWatchError, OSError, ValueError):
            per_file.append(None)  # it fails validation: free
            continue
        # References aside: local files are no assets yet (the dry run would refuse them), and the
        # price depends on the outputs, the resolution and search (budget.shape), not on the image.
        key = shape(prompt.inputs)
        shapes.setdefault(key, dict(prompt.inputs))
        per_file.append(key)
    priced = _dry_runs(client, list(shapes.items())[:MAX_DRY_RUNS])
    if not priced:
        why = "no valid prompt file in the sample" if not shapes else "no dry run answered"
        return None, f"unknown: {why} (read {len(sample)} of {len(files)} files)"
    mean = sum(priced.values()) / len(priced)
    total_sample = sum(priced.get(key, mean) for key in per_file if key is not None)
    total = total_sample * len(files) / len(sample)
    how = f"dryRun of {len(priced)} parameter shape(s)"
    if len(sample) == len(files) and len(priced) == len(shapes):
        return total, f"{how}, every file read"
    return total, f"{how} over a sample of {len(sample)} of {len(files)} files, scaled"


def _dry_runs(client: ScenarioClient, asks: list[tuple[Shape, dict[str, Any]]]) -> dict[Shape, float]:
    """Dry runs in a thread: start-up waits at most DRY_RUN_WAIT for them, then goes on without."""
    priced: dict[Shape, float] = {}
    lock = threading.Lock()

    def ask() -> None:
        for key, inputs in asks:
            try:
                cost = client.estimate(inputs)
            except Exception as exc:  # a thread's boundary: an estimate never stops the start
                log.info("inbox.backlog_estimate_failed", error=str(exc))
                return
            with lock:
                priced[key] = cost

    thread = threading.Thread(target=ask, name="backlog-estimate", daemon=True)
    thread.start()
    thread.join(DRY_RUN_WAIT)
    with lock:  # a late answer is not waited for
        return dict(priced)

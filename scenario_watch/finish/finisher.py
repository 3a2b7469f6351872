"""The end of a prompt: its final state, the move to done/ or failed/ with an error file, the hook owed.

A task never decides a prompt's fate itself: it returns `Failed` or `Delivered` (lifecycle.py) and
the finisher acts on it. The order is the crash-safe one: the final state is journaled first, then
the file moves (an error file before its prompt), then "filed, hook owed" is one journal write, and
only then the hook starts; a crash anywhere in between is finished at the next start (recovery.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from scenario_watch import logs
from scenario_watch.clock import SYSTEM, Clock, iso
from scenario_watch.files import fit_name, free_name, move_no_clobber, write_atomic
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import Delivered, Ended, Failed, State
from scenario_watch.sections import FolderSettings
from scenario_watch.tally import NO_TALLY, Tally

log = logs.get()


class FiledHook(Protocol):
    """What runs after a prompt is filed (hooks.py): whether it wants this outcome, and run it."""

    def wants(self, state: State) -> bool:
        """Whether prompts ending in `state` have something to run."""
        ...

    def run(self, prompt_id: int) -> None:
        """Run it for this prompt, soon and elsewhere (never blocking the caller)."""
        ...


def error_file_for(filed: Path) -> Path:
    """The error report beside a file in failed/: `x.json` → `x.error.json`, `x.png` → `x.png.error.json`.

    Each failed item has its own report: a prompt and an image of one stem failing together don't share.
    """
    if filed.suffix.lower() == ".json":
        return filed.with_name(fit_name(f"{filed.stem}.error.json"))
    return filed.with_name(fit_name(f"{filed.name}.error.json"))


class Finisher:
    """Records how a prompt ended, files it under done/ or failed/, and starts the hook it owes."""

    def __init__(
        self,
        folders: FolderSettings,
        store: Store,
        *,
        hook: FiledHook | None = None,
        move_references: bool = False,
        clock: Clock = SYSTEM,
        tally: Tally = NO_TALLY,
        companion: Callable[[Row], Path | None] = lambda row: None,
    ) -> None:
        self.folders = folders
        self.companion = companion  # the other file of a sidecar pair (sidecar.py): filed with the prompt
        self.store = store
        self.hook = hook
        self.tally = tally
        self.move_references = move_references
        self.clock = clock
        self._failed_lock = threading.Lock()  # two prompts of one name failing at once must not swap reports
        self._release_lock = threading.Lock()

    def finish(self, prompt_id: int, result: Failed | Delivered) -> Ended:
        """Journal the final state, then file the prompt (and start its hook)."""
        if isinstance(result, Failed):
            self.store.failed(prompt_id, result.stage, result.error, result.hint)
            hint = {"hint": result.hint} if result.hint else {}
            log.warning("prompt.failed", stage=result.stage, error=result.error, **hint)
        else:
            self.store.done(prompt_id, list(result.outputs))
            log.info("prompt.done", outputs=list(result.outputs))
        row = self.store.get(prompt_id)
        self._count(row)
        ended = self.file(row)
        if row.state == State.DONE:
            self.release_references(row)
        return ended

    def _count(self, row: Row) -> None:
        """The metrics' word on a prompt that ended (here only: each prompt ends once)."""
        duration = None
        if row.finished_at is not None and row.submitted_at is not None:
            duration = row.finished_at - row.submitted_at
        self.tally.prompt_finished(
            row.state.value,
            stage=row.stage,
            preset=row.preset,
            cost=row.cost,
            duration=duration,
            at=row.finished_at,
        )

    def file(self, row: Row) -> Ended:
        """Move a finished prompt to done/ or failed/ and record where; not filed: try again later."""
        claimed = Path(row.claimed)
        if not os.path.lexists(claimed):  # lexists: a dangling symlink is still there to file
            self._filed(row, claimed)
            return Ended(filed=True)
        try:
            self._file_companion(row)  # first: once the prompt is filed, nothing files its companion
            if row.state == State.DONE:
                rel = Path(row.file)
                dest = move_no_clobber(claimed, self.folders.done / rel.parent, rel.name)
            else:
                with self._failed_lock:
                    dest = self._file_failed(row)
        except OSError as exc:  # the prompt stays in .processing meanwhile
            log.error("prompt.filing_failed", error=str(exc))
            return Ended(filed=False, problem=f"done/ or failed/ not writable: {exc.strerror or exc}")
        self._filed(row, dest)
        return Ended(filed=True)

    def _file_companion(self, row: Row) -> None:
        """A sidecar pair is filed together: the image of a `.txt`, or the `.txt` of a preset's image."""
        path = self.companion(row)
        if path is None:
            return
        with self._release_lock:
            if path.name in self._in_use(row.folder(self.folders.inbox)):
                log.info("sidecar.kept", file=path.name, note="another prompt still uses it")
                return
            rel = Path(row.file)
            top = self.folders.done if row.state == State.DONE else self.folders.failed
            dest = move_no_clobber(path, top / rel.parent, path.name)
        log.info("sidecar.filed", file=path.name, to=str(dest))

    def _in_use(self, folder: Path) -> set[str]:
        """The reference files active prompts of `folder` name (those must stay where they are)."""
        return {
            entry
            for other in self.store.active()
            if other.folder(self.folders.inbox) == folder
            for entry in (other.inputs or {}).get("referenceImages", [])
        }

    def _file_failed(self, row: Row) -> Path:
        """Put the original next to its error file in failed/ (the error file first)."""
        rel = Path(row.file)
        failed = self.folders.failed / rel.parent
        failed.mkdir(parents=True, exist_ok=True)
        dest = free_name(failed, rel.name)
        report: dict[str, Any] = {"error": row.error or "failed", "stage": row.stage or "?", "file": row.file}
        if row.job_id:
            report["jobId"] = row.job_id
        if row.hint:
            report["hint"] = row.hint
        report["at"] = iso(self.clock.wall())
        body = json.dumps(report, indent=2, ensure_ascii=False).encode() + b"\n"
        error_file = error_file_for(dest)
        error_file.unlink(missing_ok=True)  # a stale report of an earlier failure under the same name
        write_atomic(error_file, lambda out: out.write(body))
        return move_no_clobber(Path(row.claimed), failed, dest.name)

    def _filed(self, row: Row, dest: Path) -> None:
        """Record where the prompt ended, with its hook owed in the same write, then start the hook."""
        hook = self.hook is not None and self.hook.wants(row.state)
        self.store.filed(row.id, dest, hook=hook)
        if hook and self.hook is not None:
            self.hook.run(row.id)

    def release_references(self, row: Row) -> None:
        """With [watch] move_references, move reference files to done/ with the last prompt using them."""
        if not self.move_references:
            return
        with self._release_lock:  # two last users finishing at once must not both move the file
            in_use = {
                entry
                for other in self.store.active()
                for entry in (other.inputs or {}).get("referenceImages", [])
            }
            folder = row.folder(self.folders.inbox)
            for ref in row.references:
                entry = ref.get("file")
                path = folder / entry if entry else None
                if path is None or entry in in_use or path.parent != folder or not path.is_file():
                    continue  # still needed, already moved, or outside the inbox (a reference root)
                dest = move_no_clobber(path, self.folders.done, path.name)
                log.info("reference.moved", reference=entry, to=str(dest))

"""Images a preset on the outbox took but left in place, so stage one's manifest stays true.

A preset whose folder is the outbox (or inside it) is fed by another prompt's outputs, which that
prompt's manifest, its hook's `SW_FILES` and any reader of the outbox expect to find where they were
published. So such a preset does not move an image away: it claims it (an atomic rename, as
always), then links it back under its name (the same file: no copy, no extra space), and remembers
it here (name, size, modification time) so it is never taken again, after a restart too. An image
replaced under that name is another file (another size or time) and is taken.

The record is one JSON value in the journal's meta table (`presets.kept`), written only by the
daemon (`take` writes the left-alone record, another key): pruned at start of files gone since.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scenario_watch import logs
from scenario_watch.intake.backlog import Identity, identity, real
from scenario_watch.journal.rows import json_object
from scenario_watch.journal.store import Store

log = logs.get()

META_KEY = "presets.kept"


def keeps(folder: Path, outbox: Path) -> bool:
    """Whether a preset on `folder` takes other prompts' outputs (its folder is the outbox or inside it)."""
    return folder == outbox or folder.is_relative_to(outbox)


class Kept:
    """Per preset on the outbox: the images it took and left in place, by name."""

    def __init__(self, store: Store, folders: Mapping[str, Path]) -> None:
        self.store = store
        self.folders = dict(folders)
        self.files: dict[str, dict[str, Identity]] = {}
        stored = self._read()
        for name, folder in self.folders.items():
            entry = stored.get(name)
            if not isinstance(entry, dict) or entry.get("folder") != real(
                folder
            ):  # a new preset, or its folder moved: nothing kept
                self.files[name] = {}
                continue
            raw = entry.get("files")
            try:
                recorded = (
                    {str(f): (int(i[0]), int(i[1])) for f, i in raw.items()} if isinstance(raw, dict) else {}
                )
            except (ValueError, TypeError, IndexError, KeyError):
                recorded = {}
            self.files[name] = {f: i for f, i in recorded.items() if identity(str(folder / f)) == i}
        if stored != self._value():
            self._write()

    def holds(self, preset: str | None, path: str) -> bool:
        """Whether `path` is an image `preset` already took and left in place (unchanged since)."""
        files = self.files.get(preset) if preset is not None else None
        if not files:
            return False
        name = os.path.basename(path)
        known = files.get(name)
        if known is None:
            return False
        if identity(path) == known:
            return True
        del files[name]  # replaced or changed: a new image (the journal forgets it at the next write)
        return False

    def took(self, preset: str, path: str, claimed: Path) -> None:
        """`preset` claimed `path` (now at `claimed`): remember it, then link it back under its name."""
        found = identity(str(claimed))
        if found is None or preset not in self.files:
            return
        self.files[preset][os.path.basename(path)] = found
        self._write()  # first: the link's own event must find it kept
        try:
            os.link(claimed, path)
        except OSError as exc:  # a new file took the name meanwhile, or links are not allowed there
            log.warning(
                "preset.keep_failed",
                preset=preset,
                file=path,
                error=exc.strerror or str(exc),
                note="the image was moved, not kept in place: stage one's manifest no longer finds it",
            )

    def _value(self) -> dict[str, Any]:
        return {
            name: {"folder": real(self.folders[name]), "files": {f: list(i) for f, i in files.items()}}
            for name, files in self.files.items()
        }

    def _read(self) -> dict[str, Any]:
        found = self.store.get_meta(META_KEY)
        return json_object(found[0] if found else None)

    def _write(self) -> None:
        self.store.set_meta(META_KEY, json.dumps(self._value(), sort_keys=True))

"""The optional state file: jobs, assets, uploads and the signing key as JSON, kept across restarts."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scenario_watch.sandbox.records import AssetRecord, JobRecord, Snapshot, UploadRecord
from scenario_watch.sandbox.state import World

VERSION = 1
DEBOUNCE = 0.1  # seconds: a burst of changes is written once, and a crash loses at most this much


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as JSON-ready data (bytes as base64)."""
    assets = []
    for asset in snap.assets:
        raw = asdict(asset)
        raw["data"] = None if asset.data is None else _b64(asset.data)
        assets.append(raw)
    uploads = []
    for upload in snap.uploads:
        raw = asdict(upload)
        raw["parts"] = {str(n): _b64(part) for n, part in upload.parts.items()}
        uploads.append(raw)
    return {
        "version": VERSION,
        "key": _b64(snap.key),
        "next_seq": snap.next_seq,
        "generate_jobs": snap.generate_jobs,
        "jobs": [asdict(job) for job in snap.jobs],
        "assets": assets,
        "uploads": uploads,
    }


def decode(raw: Any) -> Snapshot:
    """A snapshot from encode()'s data; ValueError, KeyError or TypeError if it is not that."""
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} sandbox state")
    assets = []
    for item in raw["assets"]:
        data = item.pop("data")
        assets.append(AssetRecord(**item, data=None if data is None else base64.b64decode(data)))
    uploads = []
    for item in raw["uploads"]:
        parts = {int(n): base64.b64decode(part) for n, part in item.pop("parts").items()}
        uploads.append(UploadRecord(**item, parts=parts))
    return Snapshot(
        key=base64.b64decode(raw["key"]),
        next_seq=int(raw["next_seq"]),
        generate_jobs=[str(job_id) for job_id in raw["generate_jobs"]],
        jobs=[JobRecord(**item) for item in raw["jobs"]],
        assets=assets,
        uploads=uploads,
    )


def load(path: Path) -> Snapshot | None:
    """The snapshot in the file; None if there is none yet, or (warning once on stderr) it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        print(f"sandbox: cannot read state file {path} ({exc}); starting empty", file=sys.stderr)
        return None
    try:
        return decode(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"sandbox: state file {path} is corrupt ({exc!r}); starting empty", file=sys.stderr)
        return None


def save(path: Path, snap: Snapshot) -> None:
    """Write the snapshot atomically: a temp file in the same folder, fsync, rename over the old one."""
    data = json.dumps(encode(snap), separators=(",", ":")).encode()
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class Saver:
    """Writes the world to its state file shortly after each change, and once more on close()."""

    def __init__(self, world: World, path: Path) -> None:
        self.world, self.path = world, path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-saver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(DEBOUNCE):
            self.flush_if_changed()

    def flush_if_changed(self) -> None:
        """Save if anything changed since the last save."""
        if self.world.changed.is_set():
            self.world.changed.clear()  # before the export: a change during the write is saved next time
            try:
                save(self.path, self.world.export())
            except OSError as exc:  # a full disk must not kill the sandbox: say so and try again later
                self.world.changed.set()
                print(f"sandbox: cannot write state file {self.path}: {exc}", file=sys.stderr)

    def close(self) -> None:
        """Stop the thread and write the final state."""
        self._stop.set()
        self._thread.join()
        self.world.changed.set()
        self.flush_if_changed()

"""Delivery: a succeeded job's outputs and manifest, published by rename into the outbox, manifest last.

The outbox only delivers; ending the prompt is the finisher's. Delivery never takes a file it did
not write: every name is published by a no-replace rename, and a name taken by anyone else (another
daemon on the same outbox, a person) means the next name. The stem is reserved across processes by
an exclusive create of a hidden marker, and each published output is journaled at once, so a redo
(after a failed download, a crash, or a preset that took an earlier output away) skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import deque
from pathlib import Path
from typing import Any

from . import logs
from .client import ScenarioClient
from .clock import SYSTEM, Clock
from .config import FolderSettings
from .errors import UrlExpired
from .files import fsync_dir, rename_noreplace, temp_path
from .finisher import iso
from .jobs import Asset, Job
from .rows import Row
from .store import Store
from .tally import NO_TALLY, Tally

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
# A hidden file that holds a stem for the daemon writing it (created exclusively: one owner). A temp
# name (.part), which folder watchers already ignore, removed at start like any leftover temp file.
STEM_MARKER = ".{name}.sw-stem.part"
# Outputs whose sizes say how much room a submission needs before it is paid.
SIZE_WINDOW = 32

log = logs.get()


class Outbox:
    """Writes a succeeded job's images and manifest into the outbox."""

    def __init__(
        self,
        folders: FolderSettings,
        client: ScenarioClient,
        store: Store,
        clock: Clock = SYSTEM,
        tally: Tally = NO_TALLY,
    ) -> None:
        self.folders = folders
        self.tally = tally
        self.client = client
        self.store = store
        self.clock = clock
        self._sizes: deque[int] = deque(maxlen=SIZE_WINDOW)  # recent outputs' sizes (appends are atomic)

    def output_size(self) -> int | None:
        """The largest of the recent outputs' sizes (room to keep free per output), or None before any."""
        return max(self._sizes, default=None)

    def reserve_stem(self, row: Row) -> str:
        """Pick the output stem once (`x`, `x-2`, ...), held by an exclusive marker; journaled for redos."""
        if row.out_stem:
            return row.out_stem
        # A prompt from a subfolder of the inbox keeps that subfolder in the outbox: sub/x_1.png.
        base = Path(row.file).parent / (row.stem or Path(row.file).stem)
        folder = self.folders.outbox / base.parent
        folder.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            name = base.name if n == 1 else f"{base.name}-{n}"
            n += 1
            if self._taken(folder, name):
                continue
            try:  # the one step two daemons cannot both win
                os.close(
                    os.open(folder / STEM_MARKER.format(name=name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                )
            except FileExistsError:
                continue
            stem = str(base.parent / name)
            self.store.reserve_out_stem(row.id, stem)
            return stem

    @staticmethod
    def _taken(folder: Path, name: str) -> bool:
        """Whether outputs of this stem are there already (a person's or an earlier prompt's)."""
        if os.path.lexists(folder / f"{name}.manifest.json"):
            return True
        return any(os.path.lexists(folder / f"{name}_1.{ext}") for ext in set(EXTENSIONS.values()))

    def deliver(self, row: Row, job: Job) -> tuple[str, ...]:
        """Publish every asset not yet published, then the manifest; the names, relative to the outbox."""
        stem = self.reserve_stem(row)
        outbox = self.folders.outbox
        delivered = list(row.delivered)
        published = {entry["assetId"] for entry in delivered}
        for n, asset_id in enumerate(job.asset_ids, start=1):
            if asset_id in published:
                continue  # an earlier attempt published it (and a preset may have taken it since)
            asset = self.client.get_asset(asset_id)
            name = f"{Path(stem).name}_{n}.{EXTENSIONS.get(asset.mime_type, 'png')}"
            dest, digest = self._download(asset, outbox / Path(stem).parent, name)
            delivered.append({"file": dest.name, "assetId": asset_id, "mimeType": asset.mime_type, **digest})
            self.store.published(row.id, delivered)
        body = json.dumps(self._manifest(row, job, delivered), indent=2, ensure_ascii=False).encode() + b"\n"
        manifest = self._publish_bytes(outbox / Path(stem).parent, f"{Path(stem).name}.manifest.json", body)
        with contextlib.suppress(OSError):  # the stem is held by its manifest from now on
            (outbox / Path(stem).parent / STEM_MARKER.format(name=Path(stem).name)).unlink()
        parent = Path(stem).parent
        return (*(str(parent / entry["file"]) for entry in delivered), str(parent / manifest.name))

    def _download(self, asset: Asset, folder: Path, name: str) -> tuple[Path, dict[str, Any]]:
        """Stream one output into a temp file, take its digest there, then publish it under a free name.

        The digest comes from the temp file before publication: once published, a preset folder on
        the outbox may take it away at once.
        """
        temp = temp_path(folder / name)
        try:
            try:
                self._fetch(asset.url, temp)
            except UrlExpired:  # signed URLs expire: ask for the asset again and use the fresh URL once
                self.tally.retry("url_expired")
                self._fetch(self.client.get_asset(asset.asset_id).url, temp)
            digest = _digest(temp)
            self._sizes.append(digest["size"])
            return self._publish(temp, folder, name), digest
        finally:
            temp.unlink(missing_ok=True)

    def _fetch(self, url: str, temp: Path) -> None:
        with temp.open("wb") as out:
            self.client.download(url, out)
            out.flush()
            os.fsync(out.fileno())

    def _publish(self, temp: Path, folder: Path, name: str) -> Path:
        """Rename `temp` to `name`, or `name-2` ... when anyone else holds the name; never replaces."""
        base, ext = os.path.splitext(name)
        n = 1
        while True:
            dest = folder / (name if n == 1 else f"{base}-{n}{ext}")
            n += 1
            try:
                rename_noreplace(temp, dest)
            except FileExistsError:
                log.info("output.name_taken", file=dest.name, note="someone else's file: the next name")
                continue
            fsync_dir(folder)
            return dest

    def _publish_bytes(self, folder: Path, name: str, body: bytes) -> Path:
        temp = temp_path(folder / name)
        try:
            with temp.open("xb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            return self._publish(temp, folder, name)
        finally:
            temp.unlink(missing_ok=True)

    def _manifest(self, row: Row, job: Job, files: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "source": row.file,
            **({"preset": row.preset} if row.preset else {}),
            "prompt": (row.inputs or {}).get("prompt"),
            "parameters": {k: v for k, v in (row.inputs or {}).items() if k != "prompt"},
            "model": self.client.model_id,
            "jobId": job.job_id,
            "assetIds": list(job.asset_ids),
            "references": row.references,
            "creativeUnitsCost": row.cost if row.cost is not None else job.cost,
            "files": files,
            "timings": {
                "claimedAt": iso(row.claimed_at),
                "submittedAt": iso(row.submitted_at),
                "writtenAt": iso(self.clock.wall()),
            },
        }


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}

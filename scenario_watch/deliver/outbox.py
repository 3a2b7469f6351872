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
import io
import json
import os
import stat
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import Asset, Job
from scenario_watch.clock import SYSTEM, Clock, iso
from scenario_watch.deliver import naming, provenance
from scenario_watch.errors import BadImage, UnsafeFile, UrlExpired
from scenario_watch.files import digest, fit_name, fsync_dir, open_own, rename_noreplace, temp_path
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.prepare.containers import Malformed
from scenario_watch.prepare.presets import Preset
from scenario_watch.sections import FolderSettings, OutboxSettings
from scenario_watch.tally import NO_TALLY, Tally

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
# A hidden file that holds a stem for the daemon writing it (created exclusively: one owner). A temp
# name (.part), which folder watchers already ignore, removed at start like any leftover temp file.
STEM_MARKER = ".{name}.sw-stem.part"
# Bytes a stem may grow by in its names (`.manifest.json`, the marker, `_12.webp`, `-3`, a temp name):
# a long prompt name gives a shorter stem, so that none of them is too long to write.
STEM_ROOM = 40
# A manifest larger than this is not one of ours (read to check a name taken after a crash).
MANIFEST_MAX = 1 << 20
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
        settings: OutboxSettings | None = None,
        tally: Tally = NO_TALLY,
        presets: Mapping[str, Preset] | None = None,
    ) -> None:
        self.folders = folders
        self.settings = settings or OutboxSettings()
        self.presets = presets or {}
        self.tally = tally
        self.client = client
        self.store = store
        self.clock = clock
        self._sizes: deque[int] = deque(maxlen=SIZE_WINDOW)  # recent outputs' sizes (appends are atomic)

    def settings_for(self, row: Row) -> OutboxSettings:
        """[outbox] as the prompt's preset sets it (its own keys over the global ones), else global."""
        preset = self.presets.get(row.preset) if row.preset else None
        return preset.outbox if preset is not None else self.settings

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
            name = fit_name(base.name if n == 1 else f"{base.name}-{n}", STEM_ROOM)
            n += 1
            if self._taken(folder, name):
                continue
            try:  # the one step two daemons cannot both win
                marker = folder / STEM_MARKER.format(name=name)  # it becomes the manifest: mode of a file
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o666))
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
            rel = naming.render(
                self.settings_for(row).name,
                stem=Path(stem).name,
                index=n,
                when=datetime.fromtimestamp(self.clock.wall(), UTC),
                preset=row.preset or "",
                job_id=job.job_id,
                model=self.client.model_id,
            )
            folder = outbox / Path(stem).parent / rel.parent
            folder.mkdir(parents=True, exist_ok=True)  # a template may name subfolders
            dest, entry = self._download(asset, folder, rel.name, row, job)
            delivered.append({"file": str(rel.parent / dest.name), "assetId": asset_id, **entry})
            self.store.published(row.id, delivered)
        body = json.dumps(self._manifest(row, job, delivered), indent=2, ensure_ascii=False).encode() + b"\n"
        manifest = self._publish_manifest(outbox / Path(stem).parent, Path(stem).name, body, job.job_id)
        parent = Path(stem).parent
        return (*(str(parent / entry["file"]) for entry in delivered), str(parent / manifest.name))

    def _download(
        self, asset: Asset, folder: Path, base: str, row: Row, job: Job
    ) -> tuple[Path, dict[str, Any]]:
        """Download one output, make it what [outbox] asks, then publish it under a free name.

        The digest comes before publication: once published, a preset folder on the outbox may take it
        away at once. An output that is rewritten (provenance, format) is downloaded into memory, where
        it is rewritten anyway, so the only file is the one published: each file created and deleted
        per output makes ext4's next inode allocation slower (it skips recently deleted inodes).
        """
        temp = temp_path(folder / base)
        settings = self.settings_for(row)
        try:
            if settings.format == "original" and not settings.metadata:  # streamed to disk as it comes
                with temp.open("xb") as out:
                    self._fetch(asset, out)
                    out.flush()
                    os.fsync(out.fileno())
                size, sha256 = digest(temp)
                entry: dict[str, Any] = {"size": size, "sha256": sha256}
                mime_type = asset.mime_type
            else:
                buffer = io.BytesIO()
                self._fetch(asset, buffer)
                data = buffer.getvalue()
                entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                out_bytes, mime_type = self._transform(data, asset.mime_type, row, job)
                if out_bytes != data:
                    original = entry["sha256"]
                    entry = {
                        "size": len(out_bytes),
                        "sha256": hashlib.sha256(out_bytes).hexdigest(),
                        "originalSha256": original,
                    }
                with temp.open("xb") as out:
                    out.write(out_bytes)
                    out.flush()
                    os.fsync(out.fileno())
            self._sizes.append(entry["size"])
            name = f"{base}.{EXTENSIONS.get(mime_type, 'png')}"
            dest = self._publish(temp, folder, name, lambda dest: _same_file(dest, entry["sha256"]))
            return dest, {"mimeType": mime_type, **entry}
        finally:
            temp.unlink(missing_ok=True)  # published: already gone

    def _transform(self, data: bytes, mime_type: str, row: Row, job: Job) -> tuple[bytes, str]:
        """Scenario's bytes in the [outbox] format, with provenance written in; as they are if it cannot."""
        settings = self.settings_for(row)
        if settings.format != "original":
            try:
                from scenario_watch.deliver import convert  # Pillow loads only where outputs are converted

                data, mime_type = convert.convert(data, mime_type, settings.format, settings.quality)
            except BadImage as exc:  # paid for: delivered as Scenario made it rather than lost
                log.warning("output.not_converted", job_id=job.job_id, error=str(exc))
        if settings.metadata:
            try:
                data = provenance.embed(data, mime_type, self._provenance(row, job))
            except Malformed as exc:
                log.warning("output.no_metadata", job_id=job.job_id, error=str(exc))
        return data, mime_type

    def _provenance(self, row: Row, job: Job) -> provenance.Provenance:
        inputs = dict(row.inputs or {})
        references = [
            provenance.InputImage(
                name=str(ref.get("file") or ref.get("assetId") or ""),
                sha256=ref.get("sha256"),
                asset_id=ref.get("assetId"),
            )
            for ref in row.references or ()
        ]
        return provenance.Provenance(
            prompt=str(inputs.pop("prompt", "") or ""),
            model_id=self.client.model_id,
            job_id=job.job_id,
            inputs={k: v for k, v in inputs.items() if k != "referenceImages"},
            references=references,
            cost=row.cost if row.cost is not None else job.cost,
            created=made_at(row, job),
        )

    def _fetch(self, asset: Asset, out: IO[bytes]) -> None:
        try:
            self.client.download(asset.url, out)
        except UrlExpired:  # signed URLs expire: ask for the asset again and use the fresh URL once
            self.tally.retry("url_expired")
            out.seek(0)
            out.truncate()
            self.client.download(self.client.get_asset(asset.asset_id).url, out)

    def _publish(self, temp: Path, folder: Path, name: str, ours: Callable[[Path], bool]) -> Path:
        """Rename `temp` to `name`, or `name-2` ... when anyone else holds the name; never replaces.

        A name held by this very file (`ours`: published by an attempt that was killed before it could
        journal it) is taken as it is: the redo publishes no second copy.
        """
        base, ext = os.path.splitext(name)
        n = 1
        while True:
            dest = folder / fit_name(name if n == 1 else f"{base}-{n}{ext}")
            n += 1
            try:
                rename_noreplace(temp, dest)
            except FileExistsError:
                if ours(dest):
                    log.info(
                        "output.published_before", file=dest.name, note="an earlier attempt's, same content"
                    )
                    return dest
                log.info("output.name_taken", file=dest.name, note="someone else's file: the next name")
                continue
            fsync_dir(folder)
            return dest

    def _publish_manifest(self, folder: Path, stem: str, body: bytes, job_id: str) -> Path:
        """Write the manifest into the stem's marker and rename that to the manifest's name.

        The stem is held throughout (by the marker, then by the manifest), and nothing is left to delete.
        A marker removed at a restart (a leftover temp file) is made again; if a link or anything but a
        file of ours has its name, a fresh temp file is written instead and that is left alone.
        """
        name = f"{stem}.manifest.json"
        temp = folder / STEM_MARKER.format(name=stem)
        try:
            out = open_own(temp)
        except UnsafeFile:
            temp = temp_path(folder / name)
            out = temp.open("xb")
        try:
            with out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            return self._publish(temp, folder, name, lambda dest: _manifest_of(dest, job_id))
        finally:
            temp.unlink(missing_ok=True)  # published: already gone

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


def made_at(row: Row, job: Job) -> datetime:
    """When Scenario made the images: the job's end by its own clock (its start when the API gives no
    status history), else the submission. The same on every attempt, so a redo after a crash writes the
    very bytes it published before (and knows them)."""
    if job.created_at:
        with contextlib.suppress(ValueError):
            start = datetime.fromisoformat(job.created_at.replace("Z", "+00:00"))
            start = start if start.tzinfo else start.replace(tzinfo=UTC)
            return start + timedelta(seconds=job.duration or 0.0)
    return datetime.fromtimestamp(row.submitted_at or row.claimed_at, UTC)


def _same_file(path: Path, sha256: str) -> bool:
    """Whether `path` is a regular file (never a link) with exactly this content."""
    try:
        return digest(path)[1] == sha256
    except (OSError, UnsafeFile):  # a link, a FIFO, ... is never ours
        return False


def _manifest_of(path: Path, job_id: str) -> bool:
    """Whether `path` is a manifest this daemon wrote for this job (a regular file naming the job)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > MANIFEST_MAX:
            return False
        return bool(json.loads(path.read_bytes()).get("jobId") == job_id)
    except (OSError, ValueError, AttributeError):
        return False

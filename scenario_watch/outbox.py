"""Outputs and filing: downloads, manifests, moves to done/ and failed/ (atomic file operations: files.py)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from . import logs
from .client import ScenarioClient
from .config import FolderSettings
from .errors import UrlExpired
from .files import free_name, move_no_clobber, write_atomic
from .jobs import Job
from .rows import Row, State
from .store import Store

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}

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
    """The error report beside a file in failed/: `x.json` and `x.png` both get `x.error.json`."""
    return filed.with_name(f"{os.path.splitext(filed.name)[0]}.error.json")


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC, for files people read."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class Outbox:
    """Writes a succeeded job's images and manifest, and files prompts under done/ or failed/."""

    def __init__(
        self,
        folders: FolderSettings,
        client: ScenarioClient,
        store: Store,
        *,
        move_references: bool = False,
        hook: FiledHook | None = None,
    ) -> None:
        self.folders = folders
        self.client = client
        self.store = store
        self.move_references = move_references
        self.hook = hook
        self._reserve_lock = threading.Lock()
        self._release_lock = threading.Lock()

    def reserve_stem(self, row: Row) -> str:
        """Pick the output stem once (`x`, `x-2`, ...) so a redo after a crash writes the same names."""
        if row.out_stem:
            return row.out_stem
        # A prompt from a subfolder of the inbox keeps that subfolder in the outbox: sub/x_1.png.
        base = str(Path(row.file).parent / (row.stem or Path(row.file).stem))
        with self._reserve_lock:
            n = 1
            while True:
                stem = base if n == 1 else f"{base}-{n}"
                if not self._stem_taken(stem):
                    break
                n += 1
            self.store.reserve_out_stem(row.id, stem)
        return stem

    def _stem_taken(self, stem: str) -> bool:
        outbox = self.folders.outbox
        if (outbox / f"{stem}.manifest.json").exists():
            return True
        if any((outbox / f"{stem}_1.{ext}").exists() for ext in set(EXTENSIONS.values())):
            return True
        return stem in self.store.reserved_stems()

    def deliver(self, row: Row, job: Job) -> list[str]:
        """Download every asset (skipping files a previous attempt finished), then the manifest."""
        stem = self.reserve_stem(row)
        outbox = self.folders.outbox
        (outbox / stem).parent.mkdir(parents=True, exist_ok=True)
        files: list[dict[str, Any]] = []
        for n, asset_id in enumerate(job.asset_ids, start=1):
            asset = self.client.get_asset(asset_id)
            dest = outbox / f"{stem}_{n}.{EXTENSIONS.get(asset.mime_type, 'png')}"
            digest = self._download(asset_id, asset.url, dest) if not dest.exists() else _digest(dest)
            files.append({"file": dest.name, "assetId": asset_id, "mimeType": asset.mime_type, **digest})
        manifest = outbox / f"{stem}.manifest.json"
        body = json.dumps(self._manifest(row, job, files), indent=2, ensure_ascii=False).encode() + b"\n"
        write_atomic(manifest, lambda out: out.write(body))
        return [str(Path(stem).parent / f["file"]) for f in files] + [f"{stem}.manifest.json"]

    def _download(self, asset_id: str, url: str, dest: Path) -> dict[str, Any]:
        """Write one output; its size and sha256, taken from the temp file before it is published
        (once published, a preset folder on the outbox may take it away at once)."""
        digest: dict[str, Any] = {}

        def fill(out: IO[bytes], url: str) -> None:
            """Write the downloaded bytes into the temp file."""
            self.client.download(url, out)
            out.flush()
            digest.update(_digest(Path(out.name)))

        try:
            write_atomic(dest, lambda out: fill(out, url))
        except UrlExpired:
            # Signed URLs expire: ask for the asset again and use the fresh URL once.
            fresh = self.client.get_asset(asset_id)
            write_atomic(dest, lambda out: fill(out, fresh.url))
        return digest

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
                "writtenAt": iso(datetime.now(UTC).timestamp()),
            },
        }

    def file_done(self, row: Row) -> Path:
        """Move a done prompt's file into done/ (its subfolder kept)."""
        rel = Path(row.file)
        return move_no_clobber(Path(row.claimed), self.folders.done / rel.parent, rel.name)

    def file_failed(self, row: Row, stage: str, error: str, hint: str | None) -> Path:
        """Put the original next to `<stem>.error.json` in failed/ (the error file first)."""
        with self._reserve_lock:  # two prompts of one name failing at once must not swap reports
            return self._file_failed(row, stage, error, hint)

    def _file_failed(self, row: Row, stage: str, error: str, hint: str | None) -> Path:
        rel = Path(row.file)
        failed = self.folders.failed / rel.parent
        failed.mkdir(parents=True, exist_ok=True)
        dest = free_name(failed, rel.name)
        report: dict[str, Any] = {"error": error, "stage": stage, "file": row.file}
        if row.job_id:
            report["jobId"] = row.job_id
        if hint:
            report["hint"] = hint
        report["at"] = iso(datetime.now(UTC).timestamp())
        body = json.dumps(report, indent=2, ensure_ascii=False).encode() + b"\n"
        error_file = error_file_for(dest)
        error_file.unlink(missing_ok=True)  # a stale report of an earlier failure under the same name
        write_atomic(error_file, lambda out: out.write(body))
        return move_no_clobber(Path(row.claimed), failed, dest.name)

    def fail(self, row: Row, stage: str, error: str, hint: str | None = None) -> bool:
        """Record a prompt as failed and file it with its error file; False: filing must be retried."""
        self.store.failed(row.id, stage, error, hint)
        log.warning("prompt.failed", stage=stage, error=error, **({"hint": hint} if hint else {}))
        return self.file(self.store.get(row.id))

    def file(self, row: Row) -> bool:
        """Move a finished prompt to done/ or failed/ and record where; False: try again later."""
        claimed = Path(row.claimed)
        if not os.path.lexists(claimed):  # lexists: a dangling symlink is still there to file
            self._filed(row, claimed)
            return True
        try:
            if row.state == State.DONE:
                dest = self.file_done(row)
            else:
                dest = self.file_failed(row, row.stage or "?", row.error or "failed", row.hint)
        except OSError as exc:  # the prompt stays in .processing meanwhile
            log.error("prompt.filing_failed", error=str(exc))
            return False
        self._filed(row, dest)
        return True

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
            self._release_references(row)

    def _release_references(self, row: Row) -> None:
        in_use = {e for other in self.store.active() for e in (other.inputs or {}).get("referenceImages", [])}
        folder = row.folder(self.folders.inbox)
        for ref in row.references:
            entry = ref.get("file")
            path = folder / entry if entry else None
            if path is None or entry in in_use or path.parent != folder or not path.is_file():
                continue  # still needed, already moved, or outside the inbox (a reference root)
            dest = move_no_clobber(path, self.folders.done, path.name)
            log.info("reference.moved", reference=entry, to=str(dest))


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}

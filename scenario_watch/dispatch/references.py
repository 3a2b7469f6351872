"""Reference images: the local files a prompt names, uploaded once per content (sha256) as assets."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.errors import PromptError
from scenario_watch.files import read_regular
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.prepare.presets import Preset, prompt_folder
from scenario_watch.prepare.prompt import MAX_REFERENCE_BYTES, Prompt, check_reference
from scenario_watch.sections import ImageSettings

log = logs.get()

# Uploads of one content are serialised by one of this many locks (picked by the content's hash):
# ten prompts editing one photo upload it once, and the locks do not grow with the photos seen.
UPLOAD_LOCKS = 64
# A 1x1 PNG: what a dry run is shown for a local reference file (it wants asset ids, not files).
PLACEHOLDER_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class References:
    """Turns a prompt's reference entries into asset ids, uploading each content once."""

    def __init__(
        self,
        client: ScenarioClient,
        store: Store,
        inbox: Path,
        roots: list[Path],
        presets: Mapping[str, Preset],
        settings: ImageSettings | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.inbox = inbox
        self.roots = roots
        self.presets = presets
        self.settings = settings or ImageSettings(normalize=False)
        self._locks = [threading.Lock() for _ in range(UPLOAD_LOCKS)]

    def resolve(self, row: Row) -> dict[str, Any]:
        """The inputs to send: local reference files uploaded once per content (sha256)."""
        inputs = dict(row.inputs or {})
        entries = inputs.get("referenceImages")
        if not entries:
            return inputs
        resolved: list[str] = []
        records: list[dict[str, Any]] = []
        folder = prompt_folder(row, self.inbox, self.presets)
        preset = self.presets.get(row.preset) if row.preset else None
        settings = preset.images if preset is not None else self.settings  # [images] as its preset sets it
        for entry in entries:
            ref = check_reference(entry, folder, self.roots)
            if ref.asset_id is not None:
                resolved.append(ref.asset_id)
                records.append({"assetId": ref.asset_id})
                continue
            assert ref.path is not None and ref.mime_type is not None
            data = read_regular(ref.path, MAX_REFERENCE_BYTES)  # never through a link swapped in since
            if len(data) > MAX_REFERENCE_BYTES:
                raise PromptError([f"referenceImages: {entry!r} grew past {MAX_REFERENCE_BYTES >> 20} MiB"])
            original = hashlib.sha256(data).hexdigest()
            upload, mime_type, name, changes = data, ref.mime_type, ref.path.name, None
            if settings.normalize:  # BadImage (a PromptError) fails the prompt, unpaid
                from scenario_watch.prepare import (
                    images,  # Pillow loads when the first local image is sent, not at start
                )

                normalized = images.normalize(data, max_side=settings.max_side, name=entry)
                upload, mime_type, changes = normalized.data, normalized.mime_type, normalized.changes
                if mime_type != ref.mime_type:  # re-encoded into another type: a name that says so
                    name = f"{ref.path.stem}.{mime_type.split('/')[1].replace('jpeg', 'jpg')}"
            digest = hashlib.sha256(upload).hexdigest() if upload is not data else original
            resolved.append(self._upload_once(digest, upload, name, mime_type, entry))
            record: dict[str, Any] = {"file": entry, "sha256": original, "size": len(data)}
            if digest != original:
                record["uploadedSha256"] = digest
            if changes is not None:
                record["changes"] = changes
            records.append({**record, "assetId": resolved[-1]})
        inputs["referenceImages"] = resolved
        if not row.references:  # a resend sees asset ids only: keep the first, fuller record
            self.store.set_references(row.id, records)
        return inputs

    def _upload_once(self, digest: str, data: bytes, name: str, mime_type: str, entry: str) -> str:
        """The asset id of this content, uploading it only if no earlier prompt did."""
        with self._locks[int(digest[:8], 16) % UPLOAD_LOCKS]:
            asset_id = self.store.uploaded_asset(digest)
            if asset_id is None:
                asset_id = self.client.upload_image(data, name, mime_type)
                self.store.remember_upload(digest, asset_id)
                log.info("reference.uploaded", reference=entry, asset_id=asset_id, size=len(data))
        return asset_id


class DryRunReferences:
    """The referenceImages of a dry run (`estimate`): every entry counts, a local file too.

    A dry run takes asset ids only, and a local file is no asset until the daemon uploads it: each one
    stands in as an asset id the prompt already names or, without one, as one tiny placeholder image
    uploaded once per run (an upload is free; the real files are uploaded when the prompt is sent).
    """

    def __init__(self, client: ScenarioClient) -> None:
        self.client = client
        self.placeholder: str | None = None

    def inputs(self, prompt: Prompt) -> dict[str, Any]:
        """The prompt's inputs as the daemon would send them, a stand-in id for each local file."""
        inputs = dict(prompt.inputs)
        if prompt.references:
            named = [ref.asset_id for ref in prompt.references if ref.asset_id]
            inputs["referenceImages"] = [ref.asset_id or self._stand_in(named) for ref in prompt.references]
        return inputs

    def _stand_in(self, named: list[str]) -> str:
        if named:
            return named[0]
        if self.placeholder is None:
            self.placeholder = self.client.upload_image(
                PLACEHOLDER_PNG, "scenario-watch-estimate.png", "image/png"
            )
        return self.placeholder

"""Reference images: the local files a prompt names, uploaded once per content (sha256) as assets.

The references were checked when the prompt was accepted (`prepare/reference.py`); what that found is
what is uploaded here. After a restart the journaled entries are checked again by the same rules (the
folders changed unwatched meanwhile). Either way the file is read the safe way at upload (never through
a link, bounded, typed by its bytes), so one that went missing or changed since fails the prompt with a
clear problem.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.prepare.preparation import prompt_folder
from scenario_watch.prepare.presets import Preset
from scenario_watch.prepare.prompt import Prompt
from scenario_watch.prepare.reference import Reference, check_reference, read_reference
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
        roots: Sequence[Path],
        presets: Mapping[str, Preset],
        settings: ImageSettings | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.inbox = inbox
        self.roots = roots  # [watch] reference_roots: after a restart the rules are applied again
        self.presets = presets
        self.settings = settings or ImageSettings(normalize=False)
        self._locks = [threading.Lock() for _ in range(UPLOAD_LOCKS)]
        # Prompt id → the references accept checked (entry → what it is), until they are uploaded. Set
        # on the main thread, taken by a worker: one dict operation each, atomic in CPython.
        self._checked: dict[int, dict[str, Reference]] = {}

    def accepted(self, prompt_id: int, references: list[Reference]) -> None:
        """Keep what accept found about a prompt's references: the upload uses it, without a second check."""
        if references:
            self._checked[prompt_id] = {ref.entry: ref for ref in references}

    def forget(self, prompt_id: int) -> None:
        """The prompt's submission is over (sent, failed, or an earlier job adopted): nothing to upload."""
        self._checked.pop(prompt_id, None)

    def resolve(self, row: Row) -> dict[str, Any]:
        """The inputs to send: local reference files uploaded once per content (sha256)."""
        inputs = dict(row.inputs or {})
        entries = inputs.get("referenceImages")
        checked = self._checked.get(row.id, {})  # none after a restart: the journaled entries are checked
        if not entries:
            return inputs
        resolved: list[str] = []
        records: list[dict[str, Any]] = []
        folder = prompt_folder(row, self.inbox, self.presets)
        preset = self.presets.get(row.preset) if row.preset else None
        settings = preset.images if preset is not None else self.settings  # [images] as its preset sets it
        for entry in entries:
            # After a restart the folders may have changed while nothing watched: the same rules as
            # accept (a link out of the inbox or the roots is refused, not followed), then opened safely.
            ref = checked.get(entry) or check_reference(entry, folder, self.roots)
            if ref.asset_id is not None:
                resolved.append(ref.asset_id)
                records.append({"assetId": ref.asset_id})
                continue
            assert ref.path is not None
            # Gone, reached through a link, no image any more: PromptError (the prompt fails, unpaid).
            data, file_type = read_reference(ref, folder, self.roots)
            original = hashlib.sha256(data).hexdigest()
            upload, mime_type, name, changes = data, file_type, ref.path.name, None
            if settings.normalize:  # BadImage (a PromptError) fails the prompt, unpaid
                from scenario_watch.prepare import (
                    images,  # Pillow loads when the first local image is sent, not at start
                )

                normalized = images.normalize(data, max_side=settings.max_side, name=entry)
                upload, mime_type, changes = normalized.data, normalized.mime_type, normalized.changes
                if mime_type != file_type:  # re-encoded into another type: a name that says so
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

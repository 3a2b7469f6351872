"""Multipart uploads: create one, PUT its parts to signed CDN URLs, complete it, and its import timeline."""

from __future__ import annotations

import copy
import hashlib
import secrets
from typing import Any

from scenario_watch.sandbox.account import Account
from scenario_watch.sandbox.images import sniff_mime
from scenario_watch.sandbox.models import ApiError
from scenario_watch.sandbox.records import ME, OWNER, CdnError, UploadRecord, is_int, iso, ms

# After "complete", an upload is validating, then validated, then imported (or failed) at these ages.
UPLOAD_VALIDATED_AT, UPLOAD_DONE_AT = 0.1, 0.3


class Uploads(Account):
    """The upload endpoints and the CDN writes of parts (thread-safe)."""

    def create_upload(self, body: Any) -> dict[str, Any]:
        """POST /uploads: a pending upload with a signed PUT URL per part."""
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        for key in ("fileName", "contentType"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise ApiError(400, f"{key} is required and must be a non-empty string")
        if body.get("kind") != "image":
            raise ApiError(400, "kind must be 'image'")
        parts, size = body.get("parts"), body.get("fileSize")
        if not is_int(parts) or not 1 <= parts <= 10_000:
            raise ApiError(400, "parts must be an integer from 1 to 10000")
        if not is_int(size) or size < 1:
            raise ApiError(400, "fileSize must be a positive integer")
        upload = UploadRecord("upload_" + secrets.token_hex(12), copy.deepcopy(body), self.clock())
        with self._lock:
            self._uploads[upload.upload_id] = upload
            self._touch()
            return {"upload": self._render_upload(upload, None)}

    def upload(self, upload_id: str) -> dict[str, Any]:
        """GET /uploads/{id}: the upload as it is now."""
        with self._lock:
            return {"upload": self._render_upload(self._upload(upload_id), None)}

    def _upload(self, upload_id: str) -> UploadRecord:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise ApiError(404, "Upload not found")
        return upload

    def upload_action(self, upload_id: str, body: Any) -> dict[str, Any]:
        """Complete a multipart upload: assemble and check the parts; the import then takes ~0.3 s."""
        action = body.get("action") if isinstance(body, dict) else None
        if action != "complete":
            raise ApiError(400, "action must be 'complete'")
        with self._lock:
            upload = self._upload(upload_id)
            if upload.completed is not None:
                raise ApiError(400, "This upload is already complete")
            missing = [n for n in range(1, upload.body["parts"] + 1) if n not in upload.parts]
            if missing:
                raise ApiError(400, f"Part(s) not uploaded: {', '.join(map(str, missing))}")
            data = b"".join(upload.parts[n] for n in sorted(upload.parts))
            mime = sniff_mime(data)
            if len(data) != upload.body["fileSize"]:
                upload.error = (
                    f"The assembled file has {len(data)} bytes, not fileSize {upload.body['fileSize']}"
                )
            elif mime is None:
                upload.error = "The file is not a supported image format"
            else:
                upload.asset_id = self._add_asset(data, mime, "", ME, upload.body["fileName"])
            assets = [upload.asset_id] if upload.asset_id else []
            job = self._new_job("upload", None, ME, None, UPLOAD_DONE_AT, assets)
            if upload.error:
                job.final_status, job.error = "failure", upload.error
            upload.parts.clear()  # assembled into the asset: the parts need not be kept twice
            upload.completed, upload.job_id = job.created, job.job_id
            return {"upload": self._render_upload(upload, "complete")}

    def _render_upload(self, upload: UploadRecord, status: str | None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "id": upload.upload_id,
            "fileName": upload.body["fileName"],
            "contentType": upload.body["contentType"],
            "kind": "image",
            "source": "multipart",
            "fileSize": upload.body["fileSize"],
            "partsCount": upload.body["parts"],
            "authorId": ME,
            "ownerId": OWNER,
            "createdAt": iso(ms(upload.created)),
        }
        if upload.completed is None:
            answer["status"] = "pending"
            answer["updatedAt"] = answer["createdAt"]
            answer["parts"] = [self._part(upload, n) for n in range(1, upload.body["parts"] + 1)]
            return answer
        age, changed = self.clock() - upload.completed, 0.0
        if status is None:
            if age < UPLOAD_VALIDATED_AT:
                status = "validating"
            elif age < UPLOAD_DONE_AT:
                status, changed = "validated", UPLOAD_VALIDATED_AT
            else:
                status, changed = ("failed" if upload.error else "imported"), UPLOAD_DONE_AT
        answer["status"] = status
        answer["updatedAt"] = iso(ms(upload.completed + changed))
        answer["jobId"] = upload.job_id
        if status == "failed":
            answer["errorMessage"] = upload.error
        if status == "imported":
            answer["entityId"] = upload.asset_id
        return answer

    def _part(self, upload: UploadRecord, number: int) -> dict[str, Any]:
        url, expires = self.signer.sign(self.cdn_url, f"/uploads/{upload.upload_id}/{number}", self.url_ttl)
        return {"number": number, "url": url, "expires": iso(expires * 1000)}

    def put_part(self, path: str, query: dict[str, str], data: bytes) -> str:
        """A CDN PUT of one part; its ETag."""
        self.signer.check(path, query)
        _, _, upload_id, number = path.split("/")
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None or not number.isdigit() or not 1 <= int(number) <= upload.body["parts"]:
                raise CdnError(404, "The specified upload or part does not exist.")
            if upload.completed is not None:
                raise CdnError(400, "The upload is already complete.")
            upload.parts[int(number)] = data
            self._touch()
        return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'

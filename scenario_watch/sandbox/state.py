"""The simulated Scenario account: jobs, assets, uploads, validation, pricing and URL signing (no HTTP)."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from .images import dimensions, make_png, sniff_mime

MODEL_ID = "model_google-gemini-pro-image-editing"
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "auto")
RESOLUTIONS = ("1K", "2K", "4K")
INPUT_KEYS = (
    "prompt",
    "referenceImages",
    "aspectRatio",
    "resolution",
    "useGoogleSearch",
    "numOutputs",
    "seed",
)
MAX_REFERENCES = 14
SEED_MAX = 2_147_483_647
DIRECT_UPLOAD_LIMIT = 6 * 1024 * 1024
# The share of the generation time at which a job enters each running status.
TIMELINE = (
    ("pending", 0.0),
    ("queued", 0.05),
    ("warming-up", 0.15),
    ("in-progress", 0.25),
    ("finalizing", 0.85),
)
# After "complete", an upload is validating, then validated, then imported (or failed) at these ages.
UPLOAD_VALIDATED_AT, UPLOAD_DONE_AT = 0.1, 0.3
EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/tiff": "tiff",
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ApiError(Exception):
    """An API answer other than success: HTTP status, the `reason` and optional `details`."""

    def __init__(self, status: int, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details


class CdnError(ApiError):
    """A CDN refusal; rendered as the XML error document CloudFront and S3 send."""


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds and a Z."""
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class JobRecord:
    job_id: str
    seq: int
    input: dict[str, Any]
    created_ms: int
    created_mono: float
    duration: float
    cost: int
    final_status: str = "success"
    error: str | None = None
    hint: str | None = None
    asset_ids: list[str] = field(default_factory=list)


@dataclass
class AssetRecord:
    asset_id: str
    mime: str
    data: bytes | None  # None: a generated image, drawn on first use from `seed`
    seed: str
    created_ms: int


@dataclass
class UploadRecord:
    upload_id: str
    body: dict[str, Any]
    created_ms: int
    parts: dict[int, bytes] = field(default_factory=dict)
    completed_mono: float | None = None
    asset_id: str | None = None
    error: str | None = None


class Signer:
    """Signs CDN paths with an expiry (HMAC-SHA256, a random key per sandbox) and checks them."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _mac(self, path: str, expires: str) -> str:
        return hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, base: str, path: str, ttl: float) -> tuple[str, int]:
        expires = int(time.time() + ttl)
        query = f"Expires={expires}&Key-Pair-Id=sandbox&Signature={self._mac(path, str(expires))}"
        return f"{base}{path}?{query}", expires

    def check(self, path: str, query: dict[str, str]) -> None:
        expires, signature = query.get("Expires", ""), query.get("Signature", "")
        if not expires or not signature or query.get("Key-Pair-Id") != "sandbox":
            raise CdnError(403, "Missing Key-Pair-Id, Expires or Signature query parameter")
        if not hmac.compare_digest(self._mac(path, expires), signature):
            raise CdnError(403, "Invalid signature")
        if not expires.isdigit() or time.time() > int(expires):
            raise CdnError(403, "Request has expired")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_inputs(body: Any, known_asset: Callable[[str], bool]) -> None:
    """Check generate inputs like the API table; ApiError(400) names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object of model inputs")
    unknown = sorted(set(body) - set(INPUT_KEYS))
    if unknown:
        raise ApiError(400, f"Unknown parameter(s) for this model: {', '.join(unknown)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt is required and must be a non-empty string")
    refs = body.get("referenceImages", [])
    if not isinstance(refs, list):
        raise ApiError(400, "referenceImages must be an array of asset ids")
    if len(refs) > MAX_REFERENCES:
        raise ApiError(400, f"referenceImages accepts at most {MAX_REFERENCES} images, got {len(refs)}")
    for index, ref in enumerate(refs):
        if not isinstance(ref, str) or not known_asset(ref):
            raise ApiError(400, f"referenceImages[{index}]: asset {ref!r} not found")
    if body.get("aspectRatio", "auto") not in ASPECT_RATIOS:
        raise ApiError(400, f"aspectRatio must be one of {', '.join(ASPECT_RATIOS)}")
    if body.get("resolution", "2K") not in RESOLUTIONS:
        raise ApiError(400, f"resolution must be one of {', '.join(RESOLUTIONS)}")
    outputs = body.get("numOutputs", 1)
    if not _is_int(outputs) or not 1 <= outputs <= 4:
        raise ApiError(400, "numOutputs must be an integer from 1 to 4")
    seed = body.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ApiError(400, f"seed must be an integer from 0 to {SEED_MAX}")
    if not isinstance(body.get("useGoogleSearch", False), bool):
        raise ApiError(400, "useGoogleSearch must be a boolean")


def cost_of(body: dict[str, Any]) -> int:
    """Creative units: 5 per output (10 at 4K), plus 2 with Google search."""
    per_output = 10 if body.get("resolution") == "4K" else 5
    return per_output * int(body.get("numOutputs", 1)) + (2 if body.get("useGoogleSearch") else 0)


def estimate(body: dict[str, Any]) -> dict[str, Any]:
    cost = cost_of(body)
    return {"creativeUnitsCost": cost, "creativeUnitsDiscount": 0, "costDetails": {"custom-generation": cost}}


class World:
    """Everything the sandbox remembers; every public method is thread-safe."""

    def __init__(self, generation_seconds: float, parallel_limit: int, url_ttl: float) -> None:
        self.generation_seconds = generation_seconds
        self.parallel_limit = parallel_limit
        self.url_ttl = url_ttl
        self.cdn_url = ""
        self.signer = Signer()
        self._lock = threading.RLock()
        self._jobs: dict[str, JobRecord] = {}
        self._unfinished: set[str] = set()
        self._assets: dict[str, AssetRecord] = {}
        self._uploads: dict[str, UploadRecord] = {}
        self._failures: deque[tuple[str, str, str | None]] = deque()  # (status, error, hint)
        self._images: dict[str, bytes] = {}
        self.generate_jobs: list[str] = []

    # -- jobs ---------------------------------------------------------------------------------------

    def fail_next_jobs(self, n: int, error: str, hint: str, status: str) -> None:
        if status not in ("failure", "canceled"):
            raise ValueError("status must be 'failure' or 'canceled'")
        with self._lock:
            self._failures.extend([(status, error, hint or None)] * n)

    def generate(self, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """Validate, price and (unless a dry run) create a job; the HTTP status and answer."""
        with self._lock:
            validate_inputs(body, self._assets.__contains__)
            if dry_run:
                return 269, estimate(body)
            running = self._running()
            if running >= self.parallel_limit:
                details = {"actionName": "custom-generation", "actionLimit": self.parallel_limit}
                raise ApiError(429, "Too many parallel jobs", details)
            job = JobRecord(
                job_id="job_" + secrets.token_hex(12),
                seq=len(self._jobs),
                input=copy.deepcopy(body),
                created_ms=now_ms(),
                created_mono=time.monotonic(),
                duration=self.generation_seconds,
                cost=cost_of(body),
            )
            if self._failures:
                job.final_status, job.error, job.hint = self._failures.popleft()
            self._jobs[job.job_id] = job
            self._unfinished.add(job.job_id)
            self.generate_jobs.append(job.job_id)
            return 200, {"job": self._render(job), **estimate(body)}

    def _running(self) -> int:
        now = time.monotonic()
        done = {j for j in self._unfinished if now - self._jobs[j].created_mono >= self._jobs[j].duration}
        self._unfinished -= done  # each job leaves the set once, so this stays cheap with many jobs
        return len(self._unfinished)

    def job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, "Job not found")
            return self._render(job)

    def statuses(self) -> dict[str, str]:
        with self._lock:
            return {job_id: self._render(job)["status"] for job_id, job in self._jobs.items()}

    def _render(self, job: JobRecord) -> dict[str, Any]:
        """The job as the API shows it now: status, progress and history follow the elapsed time."""
        elapsed, d = time.monotonic() - job.created_mono, job.duration
        history = [(status, share * d) for status, share in TIMELINE if share * d <= elapsed or share == 0]
        if elapsed >= d:
            history.append((job.final_status, d))
        status = history[-1][0]
        if status == "success":
            progress = 1.0
        elif status == "in-progress":
            progress = round(0.9 * (elapsed - 0.25 * d) / (0.6 * d), 3)
        else:
            progress = 0.95 if status == "finalizing" else 0.0
        if status == "success" and not job.asset_ids:
            job.asset_ids = [
                self._generated_asset(job, n) for n in range(int(job.input.get("numOutputs", 1)))
            ]
        metadata: dict[str, Any] = {"assetIds": list(job.asset_ids), "input": copy.deepcopy(job.input)}
        if status in ("failure", "canceled"):
            metadata["error"] = job.error or "Generation failed"
            if job.hint:
                metadata["hint"] = job.hint
        stamps = [job.created_ms + int(offset * 1000) for _, offset in history]
        return {
            "jobId": job.job_id,
            "jobType": "custom-generation",
            "status": status,
            "progress": progress,
            "statusHistory": [
                {"status": s, "date": iso(ms)} for (s, _), ms in zip(history, stamps, strict=True)
            ],
            "createdAt": iso(job.created_ms),
            "updatedAt": iso(stamps[-1]),
            "billing": {"cuCost": job.cost, "cuDiscount": 0},
            "metadata": metadata,
        }

    def list_jobs(
        self, created_after: str | None, page_size: str | None, token: str | None
    ) -> dict[str, Any]:
        """Jobs newest first. Before the last page comes one empty page with a token, as a real API may."""
        after_us = _parse_instant(created_after) if created_after else None
        try:
            size = int(page_size) if page_size is not None else 10
        except ValueError:
            size = 0
        if not 1 <= size <= 100:
            raise ApiError(400, "pageSize must be an integer from 1 to 100")
        before, padded = _read_token(token) if token else (None, False)
        with self._lock:
            jobs = [
                job
                for job in reversed(self._jobs.values())
                if (after_us is None or job.created_ms * 1000 > after_us)
                and (before is None or job.seq < before)
            ]
            if before is not None and not padded and len(jobs) <= size:
                return {"jobs": [], "nextPaginationToken": _make_token(before, padded=True)}
            page = jobs[:size]
            answer: dict[str, Any] = {"jobs": [self._render(job) for job in page]}
            if len(jobs) > size:
                answer["nextPaginationToken"] = _make_token(page[-1].seq, padded=False)
            return answer

    # -- assets -------------------------------------------------------------------------------------

    def _generated_asset(self, job: JobRecord, n: int) -> str:
        asset_id = "asset_" + hashlib.sha256(f"{job.job_id}:{n}".encode()).hexdigest()[:24]
        seed = f"{asset_id}\n{job.input.get('prompt', '')}"
        self._assets[asset_id] = AssetRecord(asset_id, "image/png", None, seed, now_ms())
        return asset_id

    def asset_bytes(self, asset_id: str) -> bytes:
        """The bytes the CDN serves for an asset (KeyError if unknown); generated images are cached."""
        with self._lock:
            asset = self._assets[asset_id]
            if asset.data is not None:
                return asset.data
            image = self._images.get(asset_id)
            if image is None:
                image = self._images[asset_id] = make_png(asset.seed)
            return image

    def asset(self, asset_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._assets.get(asset_id)
            if record is None:
                raise ApiError(404, "Asset not found")
            data = self.asset_bytes(asset_id)
            url, _ = self._asset_url(record)
        width, height = dimensions(data)
        return {
            "asset": {
                "id": asset_id,
                "url": url,
                "mimeType": record.mime,
                "kind": "image",
                "status": "success",
                "properties": {"width": width, "height": height, "size": len(data)},
                "metadata": {},
                "createdAt": iso(record.created_ms),
            }
        }

    def _asset_url(self, record: AssetRecord) -> tuple[str, int]:
        path = f"/assets/{record.asset_id}.{EXTENSIONS.get(record.mime, 'bin')}"
        return self.signer.sign(self.cdn_url, path, self.url_ttl)

    def download(self, asset_id: str, body: Any) -> dict[str, Any]:
        """POST /assets/{id}/download: a fresh signed URL; converting formats is not simulated."""
        target = body.get("targetFormat") if isinstance(body, dict) else None
        if target not in ("png", "jpeg", "webp"):
            raise ApiError(400, "targetFormat must be one of png, jpeg, webp")
        with self._lock:
            record = self._assets.get(asset_id)
            if record is None:
                raise ApiError(404, "Asset not found")
            if record.mime != f"image/{target}":
                raise ApiError(400, f"The sandbox cannot convert {record.mime} to {target}")
            url, _ = self._asset_url(record)
            return {"url": url, "mimeType": record.mime}

    def upload_asset(self, body: Any) -> dict[str, Any]:
        """POST /assets: a small image as bare base64 becomes an asset."""
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise ApiError(400, "image is required: the file as a bare base64 string")
        if not isinstance(body.get("name", ""), str):
            raise ApiError(400, "name must be a string")
        if body["image"].startswith("data:"):
            raise ApiError(400, "image must be bare base64, without a data: URL prefix")
        try:
            data = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "image is not valid base64") from exc
        if len(data) >= DIRECT_UPLOAD_LIMIT:
            raise ApiError(400, "image is 6 MB or larger: upload it in parts with /v1/uploads")
        mime = sniff_mime(data)
        if mime is None:
            raise ApiError(400, "image is not a supported format (jpeg, png, gif, webp, tiff)")
        with self._lock:
            asset_id = self._add_asset(data, mime)
        return self.asset(asset_id)

    def _add_asset(self, data: bytes, mime: str) -> str:
        asset_id = "asset_" + secrets.token_hex(12)
        self._assets[asset_id] = AssetRecord(asset_id, mime, data, asset_id, now_ms())
        return asset_id

    def cdn_asset(self, path: str, query: dict[str, str]) -> tuple[str, bytes]:
        """A CDN GET: check the signature, then the MIME type and bytes."""
        self.signer.check(path, query)
        asset_id = path.removeprefix("/assets/").rsplit(".", 1)[0]
        with self._lock:
            record = self._assets.get(asset_id)
            if record is None:
                raise CdnError(404, "The specified key does not exist.")
            return record.mime, self.asset_bytes(asset_id)

    # -- multipart uploads ------------------------------------------------------------------------

    def create_upload(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        for key in ("fileName", "contentType"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise ApiError(400, f"{key} is required and must be a non-empty string")
        if body.get("kind") != "image":
            raise ApiError(400, "kind must be 'image'")
        parts, size = body.get("parts"), body.get("fileSize")
        if not _is_int(parts) or not 1 <= parts <= 10_000:
            raise ApiError(400, "parts must be an integer from 1 to 10000")
        if not _is_int(size) or size < 1:
            raise ApiError(400, "fileSize must be a positive integer")
        upload = UploadRecord("upload_" + secrets.token_hex(12), copy.deepcopy(body), now_ms())
        with self._lock:
            self._uploads[upload.upload_id] = upload
            return {"upload": self._render_upload(upload, None)}

    def upload(self, upload_id: str) -> dict[str, Any]:
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
            if upload.completed_mono is not None:
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
                upload.asset_id = self._add_asset(data, mime)
            upload.completed_mono = time.monotonic()
            return {"upload": self._render_upload(upload, "complete")}

    def _render_upload(self, upload: UploadRecord, status: str | None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "id": upload.upload_id,
            "fileName": upload.body["fileName"],
            "contentType": upload.body["contentType"],
            "kind": "image",
            "fileSize": upload.body["fileSize"],
            "createdAt": iso(upload.created_ms),
        }
        if upload.completed_mono is None:
            answer["status"] = "pending"
            answer["parts"] = [self._part(upload, n) for n in range(1, upload.body["parts"] + 1)]
            return answer
        age = time.monotonic() - upload.completed_mono
        if status is None:
            status = (
                "validating" if age < UPLOAD_VALIDATED_AT else "validated" if age < UPLOAD_DONE_AT else ""
            )
        if not status:
            status = "failed" if upload.error else "imported"
        answer["status"] = status
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
            if upload.completed_mono is not None:
                raise CdnError(400, "The upload is already complete.")
            upload.parts[int(number)] = data
        return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _parse_instant(value: str) -> int:
    """An ISO 8601 instant as integer microseconds since the epoch (naive means UTC)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ApiError(400, f"createdAfter is not an ISO 8601 date: {value!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def _make_token(before: int, *, padded: bool) -> str:
    raw = json.dumps({"before": before, "padded": padded}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str) -> tuple[int, bool]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before, padded = raw["before"], raw["padded"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(400, "Invalid paginationToken") from exc
    if not _is_int(before) or not isinstance(padded, bool):
        raise ApiError(400, "Invalid paginationToken")
    return before, padded

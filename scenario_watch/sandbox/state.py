"""The simulated Scenario account: jobs, assets, uploads and URL signing (no HTTP)."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .images import dimensions, make_png, sniff_mime
from .knobs import KNOBS, check_knobs
from .models import ASPECT_RATIOS, MODEL_ID, RESOLUTIONS, ApiError, cost_of, echoed, estimate, validate_inputs
from .records import (
    ME,
    OWNER,
    TEAMMATE,
    AssetRecord,
    CdnError,
    JobRecord,
    Signer,
    Snapshot,
    UploadRecord,
    is_int,
    iso,
    make_token,
    ms,
    parse_instant,
    read_token,
)

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
RNG_STREAMS = ("late", "lost", "noise", "team")


class World:
    """Everything the sandbox remembers; every public method is thread-safe."""

    # The knobs (see knobs.py), as plain attributes: read without the lock, set through set_knobs.
    generation_seconds: float
    parallel_limit: int
    url_ttl: float
    seed_input: bool
    cost_per_output: float
    echo_strings: bool
    echo_model_id: bool
    team_noise: float
    plan_required: str | None
    lost_answer_rate: float
    late_answer_rate: float
    late_answer_delay: float
    rng_seed: int
    terminal_history: bool

    def __init__(
        self, knobs: dict[str, Any], snapshot: Snapshot | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock  # wall seconds: a test may share a manual clock with the daemon it drives
        self._lock = threading.RLock()
        self.cdn_url = ""
        self.changed = threading.Event()  # set on every change a state file should keep
        for name, (_, default) in KNOBS.items():
            setattr(self, name, default)
        self._rngs: dict[str, random.Random] = {}
        self.set_knobs({"rng_seed": 0, **knobs})
        self._failures: deque[tuple[str, str, str | None]] = deque()  # (status, error, hint)
        self._images: dict[str, bytes] = {}
        snap = snapshot or Snapshot(secrets.token_bytes(32), 0, [], [], [], [])
        self.signer = Signer(snap.key, clock)
        self._next_seq = snap.next_seq
        self.generate_jobs: list[str] = list(snap.generate_jobs)
        self._jobs = {job.job_id: job for job in sorted(snap.jobs, key=lambda job: job.seq)}
        self._unfinished = set(self.generate_jobs)  # _running() prunes the finished ones
        self._assets = {asset.asset_id: asset for asset in snap.assets}
        self._uploads = {upload.upload_id: upload for upload in snap.uploads}

    def set_knobs(self, values: dict[str, Any]) -> None:
        """Check every value, then apply them all (ValueError names the first bad one)."""
        checked = check_knobs(values)
        with self._lock:
            for name, value in checked.items():
                setattr(self, name, value)
            if "rng_seed" in checked:  # one stream per purpose: turning one knob never shifts another's draws
                self._rngs = {name: random.Random(f"{self.rng_seed}:{name}") for name in RNG_STREAMS}

    def knobs(self) -> dict[str, Any]:
        """The current value of every knob."""
        with self._lock:
            return {name: getattr(self, name) for name in KNOBS}

    def export(self) -> Snapshot:
        """A copy of everything a state file keeps, taken atomically."""
        with self._lock:
            return Snapshot(
                self.signer.key,
                self._next_seq,
                list(self.generate_jobs),
                copy.deepcopy(list(self._jobs.values())),
                copy.deepcopy(list(self._assets.values())),
                copy.deepcopy(list(self._uploads.values())),
            )

    def _touch(self) -> None:
        self.changed.set()

    # -- jobs ---------------------------------------------------------------------------------------

    def fail_next_jobs(self, n: int, error: str, hint: str, status: str) -> None:
        """The next n generations end in `status` with this error and hint."""
        if status not in ("failure", "canceled"):
            raise ValueError("status must be 'failure' or 'canceled'")
        with self._lock:
            self._failures.extend([(status, error, hint or None)] * n)

    def generate_fate(self) -> tuple[float, bool]:
        """Draw what happens to one real generate: seconds to handle it late (0: on time), answer lost."""
        with self._lock:
            late = self._rngs["late"].random() < self.late_answer_rate
            lost = self._rngs["lost"].random() < self.lost_answer_rate
            return (self.late_answer_delay if late else 0.0), lost

    def generate(self, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """Check the plan, validate, price and (unless a dry run) create a job; the HTTP status and answer."""
        with self._lock:
            if self.plan_required is not None:  # the credentials are fine: only this model is off-plan
                raise ApiError(403, self.plan_required)
            validate_inputs(body, self._assets.__contains__, self.seed_input)
            if dry_run:
                return 269, estimate(body, self.cost_per_output)
            running = self._running()
            if running >= self.parallel_limit:
                details = {"actionName": "custom-generation", "actionLimit": self.parallel_limit}
                raise ApiError(429, "Too many parallel jobs", details)
            job = self._new_job("custom", MODEL_ID, ME, body, self.generation_seconds)
            if self._failures:
                job.final_status, job.error, job.hint = self._failures.popleft()
            self._unfinished.add(job.job_id)
            self.generate_jobs.append(job.job_id)
            if self._rngs["noise"].random() < self.team_noise:
                self._team_noise(str(body.get("prompt")))
            return 200, {"job": self._render(job), **estimate(body, self.cost_per_output)}

    def _new_job(
        self,
        job_type: str,
        model_id: str | None,
        author: str,
        body: dict[str, Any] | None,
        duration: float,
        asset_ids: list[str] | None = None,
    ) -> JobRecord:
        """Create and list a job; a generation's input is stored as the API echoes it."""
        stored = None
        if body is not None:
            stored = echoed(body, self.echo_strings)
            if self.echo_model_id:
                stored["modelId"] = model_id
        job = JobRecord(
            job_id="job_" + secrets.token_hex(12),
            seq=self._next_seq,
            job_type=job_type,
            model_id=model_id,
            author=author,
            input=stored,
            created=self.clock(),
            duration=duration,
            cost=cost_of(body, self.cost_per_output) if body is not None else 0,
            asset_ids=asset_ids or [],
        )
        self._next_seq += 1
        self._jobs[job.job_id] = job
        self._touch()
        return job

    def _team_noise(self, our_prompt: str) -> None:
        """A teammate's generation (same model, another prompt) and a teammate's upload."""
        rng = self._rngs["team"]
        n = rng.randrange(1_000_000)
        prompt = f"teammate's idea #{n}"
        theirs = {
            "prompt": prompt if prompt != our_prompt else prompt + " (again)",
            "aspectRatio": rng.choice(ASPECT_RATIOS),
            "resolution": rng.choice(RESOLUTIONS),
            "numOutputs": rng.randint(1, 4),
        }
        self._new_job("custom", MODEL_ID, TEAMMATE, theirs, self.generation_seconds)
        self._upload_job(self._add_asset(None, "image/png", f"teammate upload {n}", TEAMMATE), TEAMMATE)

    def _upload_job(self, asset_id: str, author: str) -> JobRecord:
        return self._new_job("upload", None, author, None, 0.0, [asset_id])

    def add_foreign_job(
        self, input: dict[str, Any], model_id: str = MODEL_ID, job_type: str = "custom"
    ) -> str:
        """Plant a teammate's job in the listing: a generation with this input, or an upload; its id."""
        if job_type not in ("custom", "upload"):
            raise ValueError("job_type must be 'custom' or 'upload'")
        with self._lock:
            if job_type == "upload":
                asset_id = self._add_asset(None, "image/png", f"foreign upload {self._next_seq}", TEAMMATE)
                return self._upload_job(asset_id, TEAMMATE).job_id
            return self._new_job("custom", model_id, TEAMMATE, input, self.generation_seconds).job_id

    def _running(self) -> int:
        now = self.clock()
        done = {j for j in self._unfinished if now - self._jobs[j].created >= self._jobs[j].duration}
        self._unfinished -= done  # each job leaves the set once, so this stays cheap with many jobs
        return len(self._unfinished)

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: the job as it is now."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, "Job not found")
            return self._render(job)

    def statuses(self) -> dict[str, str]:
        """Every job's current status."""
        with self._lock:
            return {job_id: self._render(job)["status"] for job_id, job in self._jobs.items()}

    def _render(self, job: JobRecord) -> dict[str, Any]:
        """The job as the API shows it now: status, progress and history follow the elapsed time."""
        elapsed, d = self.clock() - job.created, job.duration
        steps = TIMELINE if job.job_type == "custom" else TIMELINE[:1]  # an upload job just runs, then ends
        history = [(status, share * d) for status, share in steps if share * d <= elapsed or share == 0]
        if elapsed >= d:
            history.append((job.final_status, d))
        status = history[-1][0]
        if status == "success":
            progress = 1.0
        elif status == "in-progress":
            progress = round(0.9 * (elapsed - 0.25 * d) / (0.6 * d), 3)
        else:
            progress = 0.95 if status == "finalizing" else 0.0
        if status == "success" and not job.asset_ids and job.input is not None:
            job.asset_ids = [
                self._generated_asset(job, n) for n in range(int(job.input.get("numOutputs", 1)))
            ]
        metadata: dict[str, Any] = {"assetIds": list(job.asset_ids) if status == "success" else []}
        if job.input is not None:
            metadata["input"] = copy.deepcopy(job.input)
        if status in ("failure", "canceled"):
            metadata["error"] = job.error or "Generation failed"
            if job.hint:
                metadata["hint"] = job.hint
        stamps = [ms(job.created + offset) for _, offset in history]
        shown = list(zip(history, stamps, strict=True))
        if not self.terminal_history and elapsed >= d:
            shown = shown[:-1]  # the final status is in `status` only, as some live answers have it
        return {
            "jobId": job.job_id,
            "jobType": job.job_type,
            "status": status,
            "progress": progress,
            "statusHistory": [{"status": s, "date": iso(stamp)} for (s, _), stamp in shown],
            "createdAt": iso(ms(job.created)),
            "updatedAt": iso(stamps[-1]),
            "authorId": job.author,
            "ownerId": OWNER,
            "billing": {"cuCost": job.cost, "cuDiscount": 0},
            "metadata": metadata,
        }

    def list_jobs(
        self, created_after: str | None, page_size: str | None, token: str | None
    ) -> dict[str, Any]:
        """Jobs newest first. Before the last page comes one empty page with a token, as a real API may."""
        after_us = parse_instant(created_after) if created_after else None
        try:
            size = int(page_size) if page_size is not None else 10
        except ValueError:
            size = 0
        if not 1 <= size <= 100:
            raise ApiError(400, "pageSize must be an integer from 1 to 100")
        before, padded = read_token(token) if token else (None, False)
        with self._lock:
            jobs = [
                job
                for job in reversed(self._jobs.values())
                if (after_us is None or ms(job.created) * 1000 > after_us)
                and (before is None or job.seq < before)
            ]
            if before is not None and not padded and len(jobs) <= size:
                return {"jobs": [], "nextPaginationToken": make_token(before, padded=True)}
            page = jobs[:size]
            answer: dict[str, Any] = {"jobs": [self._render(job) for job in page]}
            if len(jobs) > size:
                answer["nextPaginationToken"] = make_token(page[-1].seq, padded=False)
            return answer

    # -- assets -------------------------------------------------------------------------------------

    def _generated_asset(self, job: JobRecord, n: int) -> str:
        asset_id = "asset_" + hashlib.sha256(f"{job.job_id}:{n}".encode()).hexdigest()[:24]
        assert job.input is not None
        prompt = str(job.input.get("prompt", ""))
        self._assets[asset_id] = AssetRecord(
            asset_id,
            "image/png",
            None,
            f"{asset_id}\n{prompt}",
            job.created + job.duration,
            source="img2img" if job.input.get("referenceImages") else "txt2img",
            author=job.author,
            metadata={"modelId": job.model_id, "prompt": prompt, "parentJobId": job.job_id},
        )
        self._touch()
        return asset_id

    def asset_bytes(self, asset_id: str) -> bytes:
        """The bytes the CDN serves for an asset (KeyError if unknown); drawn images are cached."""
        with self._lock:
            asset = self._assets[asset_id]
            if asset.data is not None:
                return asset.data
            image = self._images.get(asset_id)
            if image is None:
                image = self._images[asset_id] = make_png(asset.seed)
            return image

    def asset(self, asset_id: str) -> dict[str, Any]:
        """GET /v1/assets/{id}: the asset with a freshly signed CDN URL."""
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
                "source": record.source,
                "privacy": "private",
                "authorId": record.author,
                "ownerId": OWNER,
                "collectionIds": [],
                "tags": [],
                "editCapabilities": [],
                "properties": {"width": width, "height": height, "size": len(data)},
                "metadata": {"kind": "image", "type": record.source, **record.metadata},
                "createdAt": iso(ms(record.created)),
                "updatedAt": iso(ms(record.created)),
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
        """POST /assets: a small image as bare base64 becomes an asset (and an upload job)."""
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise ApiError(400, "image is required: the file as a bare base64 string")
        name = body.get("name", "")
        if not isinstance(name, str):
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
            asset_id = self._add_asset(data, mime, "", ME, name)
            self._upload_job(asset_id, ME)
        return self.asset(asset_id)

    def _add_asset(self, data: bytes | None, mime: str, seed: str, author: str, name: str = "") -> str:
        """A new uploaded asset: these bytes, or (None) an image drawn from the seed."""
        asset_id = "asset_" + secrets.token_hex(12)
        metadata = {"name": name} if name else {}
        self._assets[asset_id] = AssetRecord(
            asset_id, mime, data, seed or asset_id, self.clock(), author=author, metadata=metadata
        )
        self._touch()
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

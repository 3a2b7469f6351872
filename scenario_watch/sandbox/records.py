"""The sandbox's stored records (jobs, assets, uploads), clock and pagination helpers, and the CDN signer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from scenario_watch.sandbox.models import ApiError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Who made what: the sandbox's own key belongs to ME; team noise comes from TEAMMATE, in the same project.
ME, TEAMMATE, OWNER = "user_sandbox", "user_teammate", "proj_sandbox"


class CdnError(ApiError):
    """A CDN refusal; rendered as the XML error document CloudFront and S3 send."""


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds and a Z."""
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms(seconds: float) -> int:
    """Wall-clock seconds as integer milliseconds."""
    return int(seconds * 1000)


# Times are wall-clock seconds (time.time()), not monotonic: a sandbox restarted on its state file
# must carry on every job's timeline from where it was.
@dataclass
class JobRecord:
    job_id: str
    seq: int
    job_type: str  # "custom" (a generation) or "upload"
    model_id: str | None
    author: str
    input: dict[str, Any] | None  # None: the job echoes no input (uploads)
    created: float
    duration: float
    cost: int | float
    final_status: str = "success"
    error: str | None = None
    hint: str | None = None
    asset_ids: list[str] = field(default_factory=list)


@dataclass
class AssetRecord:
    asset_id: str
    mime: str
    data: bytes | None  # None: an image drawn on first use from `seed`
    seed: str
    created: float
    source: str = "uploaded"  # the SDK's asset source: uploaded, txt2img, img2img
    author: str = ME
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class UploadRecord:
    upload_id: str
    body: dict[str, Any]
    created: float
    parts: dict[int, bytes] = field(default_factory=dict)
    completed: float | None = None
    asset_id: str | None = None
    error: str | None = None
    job_id: str | None = None


@dataclass
class Snapshot:
    """Everything a state file keeps: enough for a restarted sandbox to carry on."""

    key: bytes
    next_seq: int
    generate_jobs: list[str]
    jobs: list[JobRecord]
    assets: list[AssetRecord]
    uploads: list[UploadRecord]


class Signer:
    """Signs CDN paths with an expiry (HMAC-SHA256, a random key per sandbox) and checks them."""

    def __init__(self, key: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.key = key or secrets.token_bytes(32)
        self.clock = clock

    def _mac(self, path: str, expires: str) -> str:
        return hmac.new(self.key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, base: str, path: str, ttl: float) -> tuple[str, int]:
        """A signed URL for the path, valid for ttl seconds; and its expiry (epoch seconds)."""
        expires = int(self.clock() + ttl)
        query = f"Expires={expires}&Key-Pair-Id=sandbox&Signature={self._mac(path, str(expires))}"
        return f"{base}{path}?{query}", expires

    def check(self, path: str, query: dict[str, str]) -> None:
        """CdnError(403) unless the query signs this path and has not expired."""
        expires, signature = query.get("Expires", ""), query.get("Signature", "")
        if not expires or not signature or query.get("Key-Pair-Id") != "sandbox":
            raise CdnError(403, "Missing Key-Pair-Id, Expires or Signature query parameter")
        if not hmac.compare_digest(self._mac(path, expires), signature):
            raise CdnError(403, "Invalid signature")
        if not expires.isdigit() or self.clock() > int(expires):
            raise CdnError(403, "Request has expired")


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_instant(value: str) -> int:
    """An ISO 8601 instant as integer microseconds since the epoch (naive means UTC)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ApiError(400, f"createdAfter is not an ISO 8601 date: {value!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def make_token(before: int, *, padded: bool) -> str:
    raw = json.dumps({"before": before, "padded": padded}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(token: str) -> tuple[int, bool]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before, padded = raw["before"], raw["padded"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(400, "Invalid paginationToken") from exc
    if not is_int(before) or not isinstance(padded, bool):
        raise ApiError(400, "Invalid paginationToken")
    return before, padded

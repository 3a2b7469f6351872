"""The Scenario REST API over HTTP (transport.py), with errors as types."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlencode

import urllib3
from urllib3.exceptions import HTTPError, ProtocolError

from scenario_watch import __version__
from scenario_watch.api.jobs import Asset, Job, as_number, parse_job
from scenario_watch.api.retries import RetryListener, fault_kind, policy, status_kind
from scenario_watch.api.transport import ResponseListener, Transport, never_sent
from scenario_watch.errors import (
    AuthError,
    BadRequest,
    NotFound,
    OutcomeUnknown,
    PlanError,
    RateLimited,
    TransientError,
    UrlExpired,
)

CHUNK = 256 * 1024
# POST /v1/assets takes base64 "under 6 MB"; the limit may apply to the whole request body, so the body
# (base64, name and JSON punctuation) must stay a margin below it. Anything bigger goes multipart.
DIRECT_UPLOAD_LIMIT = 6_000_000
DIRECT_UPLOAD_MARGIN = 64 * 1024
PART_SIZE = 5 * 1024 * 1024
DRY_RUN = "api"  # dryRun=api: the estimate at the API tier (dryRun=true prices the web app's tier)
GATEWAY_TIMEOUT = 504  # a proxy's answer for a server still at work: a generate may still make its job

# 403 has two meanings (SCENARIO_API.md): credentials without the scope, or a model that needs a higher
# plan. Only the first is fixed by new credentials; the second fails that prompt and never clears by
# retrying. A reason that speaks of the plan, or of permission or access to the model, is the second.
PLAN_REASON = re.compile(
    r"\b(plans?|upgrade|subscri(be|ption)s?|tiers?)\b|\b(permission|access)\b.*\bmodels?\b", re.IGNORECASE
)


class ScenarioClient:
    """Generate, poll, list, fetch assets, upload references, download outputs."""

    def __init__(
        self,
        base_url: str,
        key: str,
        secret: str,
        *,
        model_id: str,
        project_id: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id
        self.project_id = project_id
        self._retry = policy(retries)
        agent = {"User-Agent": f"scenario-watch/{__version__}"}
        auth = urllib3.make_headers(basic_auth=f"{key}:{secret}")
        self.api = Transport(self._retry, timeout, {**agent, **auth}, redirects=False)
        # The CDN gets no credentials: its signed URLs carry their own authorisation.
        self.cdn = Transport(self._retry, timeout, agent, redirects=True)

    def on_retry(self, listener: RetryListener | None) -> None:
        """Tell `listener` of every retry urllib3 makes by itself (5xx, connection, timeout)."""
        self._retry.listener = listener

    def on_response(self, listener: ResponseListener | None) -> None:
        """Tell `listener` of every request's outcome, API and CDN alike (status, or None: no answer)."""
        self.api.listener = self.cdn.listener = listener

    def close(self) -> None:
        """Close the pooled connections."""
        self.api.close()
        self.cdn.close()

    # -- generate -------------------------------------------------------------------------------------

    def generate(self, inputs: dict[str, Any]) -> tuple[Job, float | None]:
        """Submit one generation; the job and its creative-unit cost.

        Raises OutcomeUnknown when the request may have created a job (timeout or reset after
        sending, 5xx, unreadable answer): the caller must reconcile before sending it again.
        """
        body = self._call("POST", f"/generate/custom/{self.model_id}", payload=inputs, post=True)
        job = body.get("job")
        if not isinstance(job, dict):
            raise OutcomeUnknown("generate answered without a job object", answered=True)
        parsed = parse_job(job)
        if parsed is None:
            raise OutcomeUnknown("generate answered with a job that has no id", answered=True)
        return parsed, as_number(body.get("creativeUnitsCost"))

    def estimate(self, inputs: dict[str, Any]) -> float:
        """The creative-unit cost of a generation, without running it (dryRun=api: HTTP 269, or 200)."""
        body = self._call(
            "POST", f"/generate/custom/{self.model_id}", payload=inputs, params={"dryRun": DRY_RUN}, post=True
        )
        if isinstance(body.get("job"), dict):
            # A server that ignores dryRun runs (and bills) the generation: say so loudly, never "estimate".
            job = parse_job(body["job"])
            raise BadRequest(200, f"the API ignored dryRun={DRY_RUN} and created job {job and job.job_id}")
        cost = as_number(body.get("creativeUnitsCost"))
        if cost is None:
            raise TransientError("the estimate answer has no creativeUnitsCost")
        return cost

    # -- models ---------------------------------------------------------------------------------------

    def get_model(self, model_id: str | None = None) -> dict[str, Any]:
        """GET /v1/models/{id} (default: the configured model), the raw body for schema.parse_model."""
        return self._call("GET", f"/models/{model_id or self.model_id}")

    # -- jobs -----------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        """A job's current state (GET /v1/jobs/{id})."""
        body = self._call("GET", f"/jobs/{job_id}")
        job = parse_job(body.get("job"))
        if job is None:
            raise TransientError(f"job {job_id}: the answer has no job object")
        return job

    def list_jobs(self, created_after: str, page_size: int = 100) -> Iterator[Job]:
        """Every job created after an ISO 8601 instant, following pagination tokens to the end.

        Empty pages may still carry a token: they are followed. A token seen before is a loop: TransientError.
        """
        token: str | None = None
        seen: set[str] = set()
        for _ in range(10_000):  # a bound, in case the server hands out new tokens forever
            params: dict[str, Any] = {"createdAfter": created_after, "pageSize": page_size}
            if token:
                params["paginationToken"] = token
            body = self._call("GET", "/jobs", params=params)
            jobs = body.get("jobs")
            if not isinstance(jobs, list):
                raise TransientError("the job list answer has no jobs array")
            for raw in jobs:
                job = parse_job(raw)
                if job is not None:
                    yield job
            found = body.get("nextPaginationToken")
            if not isinstance(found, str) or not found:
                return
            if found in seen:
                raise TransientError("the job listing repeated a pagination token")
            seen.add(found)
            token = found
        raise TransientError("job listing did not end after 10000 pages")

    # -- assets ---------------------------------------------------------------------------------------

    def get_asset(self, asset_id: str) -> Asset:
        """An asset's signed CDN URL and MIME type (GET /v1/assets/{id})."""
        body = self._call("GET", f"/assets/{asset_id}")
        asset = body.get("asset")
        if not isinstance(asset, dict) or not isinstance(asset.get("url"), str):
            raise TransientError(f"asset {asset_id}: the answer has no url")
        mime = asset.get("mimeType")
        return Asset(asset_id, asset["url"], mime if isinstance(mime, str) else "image/png")

    def upload_image(self, data: bytes, name: str, mime_type: str) -> str:
        """Upload a reference image; its new asset id (base64 while the body is under 6 MB, else parts)."""
        if direct_body_size(len(data), name) < DIRECT_UPLOAD_LIMIT - DIRECT_UPLOAD_MARGIN:
            encoded = base64.b64encode(data).decode("ascii")
            body = self._call("POST", "/assets", payload={"image": encoded, "name": name}, post=True)
            asset = body.get("asset")
            if not isinstance(asset, dict) or not isinstance(asset.get("id"), str):
                raise TransientError("the upload answer has no asset id")
            return str(asset["id"])
        return self._upload_parts(data, name, mime_type)

    def _upload_parts(self, data: bytes, name: str, mime_type: str) -> str:
        parts = -(-len(data) // PART_SIZE)
        request = {
            "fileName": name,
            "contentType": mime_type,
            "kind": "image",
            "parts": parts,
            "fileSize": len(data),
        }
        upload = self._call("POST", "/uploads", payload=request, post=True).get("upload")
        if not isinstance(upload, dict) or not isinstance(upload.get("id"), str):
            raise TransientError("the upload answer has no upload id")
        upload_id = upload["id"]
        for part in upload.get("parts") or []:
            number = part.get("number") if isinstance(part, dict) else None
            if not isinstance(number, int) or not isinstance(part.get("url"), str):
                raise TransientError(f"upload {upload_id}: a part without number or url")
            chunk = data[(number - 1) * PART_SIZE : number * PART_SIZE]
            try:  # the part URLs are signed: no credentials
                resp = self.cdn.request("PUT", part["url"], body=chunk)
            except HTTPError as exc:
                message = f"upload {upload_id} part {number}: {type(exc).__name__}"
                raise TransientError(message, kind=fault_kind(exc)) from exc
            if resp.status >= 300:
                message = f"upload {upload_id} part {number}: HTTP {resp.status}"
                raise TransientError(message, kind=status_kind(resp.status))
        self._call("POST", f"/uploads/{upload_id}/action", payload={"action": "complete"}, post=True)
        delay = 0.1
        for _ in range(600):
            state = self._call("GET", f"/uploads/{upload_id}").get("upload") or {}
            status = state.get("status") if isinstance(state, dict) else None
            if status == "imported" and isinstance(state.get("entityId"), str):
                return str(state["entityId"])
            if status == "failed":
                raise BadRequest(
                    400, f"the upload of {name} failed: {state.get('errorMessage') or 'no reason'}"
                )
            time.sleep(delay)  # a bounded wait inside one worker; uploads import within seconds
            delay = min(2.0, delay * 1.5)
        raise TransientError(f"upload {upload_id} was not imported in time")

    def download(self, url: str, out: IO[bytes]) -> int:
        """Stream a signed CDN URL into `out` (no credentials sent); the number of bytes written."""
        try:
            resp = self.cdn.request("GET", url, stream=True)
            read_off = False  # the whole body was read: the connection can serve the next request
            try:
                if resp.status != 200:
                    resp.drain_conn()  # an error page is small: read it off
                    read_off = True
                    if resp.status == 403:
                        raise UrlExpired("the CDN refused the signed URL (expired or bad signature)")
                    message = f"the CDN answered HTTP {resp.status}"
                    raise TransientError(message, kind=status_kind(resp.status))
                expected = resp.headers.get("Content-Length")
                written = 0
                for chunk in resp.stream(CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                read_off = True
            finally:
                if not read_off:  # a write failed or the line dropped mid-body: never reused
                    resp.close()
                resp.release_conn()
        except ProtocolError as exc:  # the body ended before its Content-Length (or the line dropped)
            raise TransientError(f"download cut short: {type(exc).__name__}", kind="connection") from exc
        except HTTPError as exc:
            raise TransientError(f"download failed: {type(exc).__name__}", kind=fault_kind(exc)) from exc
        if expected is not None and expected.isdigit() and int(expected) != written:
            raise TransientError(f"download cut short: {written} of {expected} bytes", kind="connection")
        return written

    # -- plumbing -------------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        payload: Any = None,
        params: dict[str, Any] | None = None,
        post: bool = False,
    ) -> dict[str, Any]:
        params = dict(params or {})
        if self.project_id:
            params["projectId"] = self.project_id
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        body = None if payload is None else json.dumps(payload, allow_nan=False).encode()
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            resp = self.api.request(method, url, body=body, headers=headers)
        except HTTPError as exc:
            kind = fault_kind(exc)
            if never_sent(exc):
                message = f"{method} {path}: cannot connect ({type(exc).__name__})"
                raise TransientError(message, kind=kind) from exc
            if post:
                message = f"{method} {path}: no answer ({type(exc).__name__})"
                raise OutcomeUnknown(message, answered=False, kind=kind) from exc
            raise TransientError(f"{method} {path}: {type(exc).__name__}", kind=kind) from exc
        return _answer(resp, post=post)


def _answer(resp: urllib3.BaseHTTPResponse, *, post: bool) -> dict[str, Any]:
    status = resp.status
    if 200 <= status < 300:
        try:
            body = json.loads(resp.data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = f"HTTP {status} with a body that is not a JSON object"
            raise OutcomeUnknown(message, answered=True) if post else TransientError(message)
        return body
    reason, details = _error(resp)
    if status == 403 and is_plan_refusal(reason):
        raise PlanError(status, reason)
    if status in (401, 403):
        raise AuthError(status, reason)
    if status == 404:
        raise NotFound(status, reason)
    if status == 429:
        limit = details.get("actionLimit")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        raise RateLimited(status, reason, _retry_after(resp), limit=limit)
    if 400 <= status < 500:
        raise BadRequest(status, reason)
    message = f"HTTP {status}: {reason}"
    kind = status_kind(status)
    if not post:
        raise TransientError(message, kind=kind)
    # A 504 is a gateway that stopped waiting, not the server's answer: its work may go on.
    raise OutcomeUnknown(message, answered=status != GATEWAY_TIMEOUT, kind=kind)


def is_plan_refusal(reason: str) -> bool:
    """Whether a 403's reason says the plan does not include the model (not a credentials problem)."""
    return PLAN_REASON.search(reason) is not None


def direct_body_size(size: int, name: str) -> int:
    """Bytes of the JSON body of a base64 upload of `size` bytes named `name` (as `_call` encodes it)."""
    return 4 * -(-size // 3) + len(json.dumps({"image": "", "name": name}).encode())


def _error(resp: urllib3.BaseHTTPResponse) -> tuple[str, dict[str, Any]]:
    """An error answer's `reason` (else the HTTP reason phrase) and `details` (else empty)."""
    fallback = resp.reason or f"HTTP {resp.status}"
    try:
        body = json.loads(resp.data)
    except ValueError:
        return fallback, {}
    if not isinstance(body, dict):
        return fallback, {}
    reason = body.get("reason")
    details = body.get("details")
    return (
        reason if isinstance(reason, str) and reason else fallback,
        details if isinstance(details, dict) else {},
    )


def _retry_after(resp: urllib3.BaseHTTPResponse) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare enough to fall back to our own backoff


__all__ = ["ScenarioClient", "is_plan_refusal"]

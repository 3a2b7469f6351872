"""What each API and CDN endpoint answers: Basic auth, routing to the World, errors as each service sends."""

from __future__ import annotations

import base64
import hmac
import json
import threading
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from scenario_watch.sandbox.faults import FaultQueue
from scenario_watch.sandbox.models import MODEL_ID, ApiError, model_answer
from scenario_watch.sandbox.records import CdnError
from scenario_watch.sandbox.request_log import Recorder
from scenario_watch.sandbox.state import World

INVALID = object()  # a request body that is not JSON
CDN_CODES = {400: "InvalidArgument", 403: "AccessDenied", 404: "NoSuchKey"}


@dataclass
class Context:
    """What both servers share."""

    world: World
    faults: FaultQueue
    recorder: Recorder
    key: str
    secret: str
    stopping: threading.Event


@dataclass
class Reply:
    """An answer to send: a JSON payload, or raw bytes of some content type; `lost`: reset instead."""

    status: int
    payload: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    lost: bool = False

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return b"" if self.payload is None else json.dumps(self.payload).encode()


def error_reply(exc: ApiError) -> Reply:
    if isinstance(exc, CdnError):
        code = CDN_CODES.get(exc.status, "Error")
        xml = f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code>"
        xml += f"<Message>{exc.reason}</Message></Error>"
        return Reply(exc.status, raw=xml.encode(), content_type="application/xml")
    payload: dict[str, Any] = {"reason": exc.reason}
    if exc.details is not None:
        payload["details"] = exc.details
    return Reply(exc.status, payload)


def parse_json(raw: bytes) -> Any:
    """The JSON in a body, None for an empty one, INVALID for anything else."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return INVALID


# -- the API server -------------------------------------------------------------------------------


def _authorized(ctx: Context, headers: Message) -> bool:
    """Whether the request carries the sandbox's key and secret as HTTP Basic auth."""
    header = headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    expected = base64.b64encode(f"{ctx.key}:{ctx.secret}".encode()).decode()
    return scheme.lower() == "basic" and hmac.compare_digest(token.strip().encode(), expected.encode())


def api(ctx: Context, method: str, path: str, query: dict[str, str], headers: Message, body: Any) -> Reply:
    """An API request's answer: 401 without the credentials, else its endpoint's (an ApiError as JSON)."""
    if not _authorized(ctx, headers):
        return Reply(401, {"reason": "Unauthorized"})
    try:
        if method in ("POST", "PUT", "PATCH") and body is INVALID:
            raise ApiError(400, "The request body is not valid JSON")
        return _route(ctx, method, path, query, body)
    except ApiError as exc:
        return error_reply(exc)


def _route(ctx: Context, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
    world = ctx.world
    parts = path.strip("/").split("/")
    match method, parts:
        case "POST", ["v1", "generate", "custom", model]:
            if model != MODEL_ID:
                raise ApiError(404, f"Model not found: {model}")
            return _generate(ctx, query, body)
        case "GET", ["v1", "models", model]:
            return Reply(200, model_answer(model, world.seed_input))
        case "GET", ["v1", "jobs"]:
            return Reply(
                200,
                world.list_jobs(
                    query.get("createdAfter"), query.get("pageSize"), query.get("paginationToken")
                ),
            )
        case "GET", ["v1", "jobs", job_id]:
            return Reply(200, {"job": world.job(job_id)})
        case "POST", ["v1", "jobs", job_id, "action"]:
            world.job(job_id)  # 404 for an unknown job first
            raise ApiError(400, "Cannot cancel this type of job")
        case "GET", ["v1", "assets", asset_id]:
            return Reply(200, world.asset(asset_id))
        case "POST", ["v1", "assets"]:
            return Reply(200, world.upload_asset(body))
        case "POST", ["v1", "assets", asset_id, "download"]:
            return Reply(200, world.download(asset_id, body))
        case "POST", ["v1", "uploads"]:
            return Reply(200, world.create_upload(body))
        case "GET", ["v1", "uploads", upload_id]:
            return Reply(200, world.upload(upload_id))
        case "POST", ["v1", "uploads", upload_id, "action"]:
            return Reply(200, world.upload_action(upload_id, body))
    raise ApiError(404, f"No route for {method} {path}")


def _generate(ctx: Context, query: dict[str, str], body: Any) -> Reply:
    """A generate POST, answered late or lost as the knobs draw it (dry runs never are)."""
    world = ctx.world
    dry_run = query.get("dryRun", "").lower() in ("true", "api")
    delay, lost = (0.0, False) if dry_run else world.generate_fate()
    # A slow gateway: the request is handled only after the delay, so no job exists before then.
    if delay and ctx.stopping.wait(delay):
        return Reply(0, lost=True)  # the sandbox stopped meanwhile: hang up, create nothing
    status, payload = world.generate(body, dry_run)
    return Reply(status, payload, lost=lost and status == 200)


# -- the CDN server -------------------------------------------------------------------------------


def cdn(ctx: Context, method: str, path: str, query: dict[str, str], headers: Message, raw: bytes) -> Reply:
    """A CDN request's answer: a signed asset GET or part PUT (a refusal as the XML error)."""
    world = ctx.world
    try:
        if "Authorization" in headers:  # signed URLs plus a credential: a real CDN refuses
            raise CdnError(400, "Only one auth mechanism allowed; do not send an Authorization header")
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET" | "HEAD", ["assets", _]:
                mime, data = world.cdn_asset(path, query)
                return Reply(200, raw=data, content_type=mime)
            case "PUT", ["uploads", _, _]:
                etag = world.put_part(path, query, raw)
                return Reply(200, raw=b"", content_type="application/octet-stream", headers={"ETag": etag})
        raise CdnError(404, "Not Found")
    except ApiError as exc:
        return error_reply(exc)

"""HTTP request handling for the sandbox: API and CDN routes, injected faults, control endpoints."""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .faults import REPLACING, Fault, FaultQueue, route_of
from .models import MODEL_ID, ApiError, model_answer
from .records import CdnError
from .state import World

CHUNK = 64 * 1024
INVALID = object()  # a request body that is not JSON
CDN_CODES = {400: "InvalidArgument", 403: "AccessDenied", 404: "NoSuchKey"}


@dataclass(frozen=True)
class RequestRecord:
    """One request either server saw (never the Authorization value); status 0: reset or no answer yet."""

    server: str
    method: str
    path: str
    query: dict[str, str]
    body: Any
    has_auth: bool
    status: int
    time: float  # monotonic, this process's (latency benchmarks)
    at: float  # wall, the sandbox's clock (a test's manual clock moves it)


class Recorder:
    """The request log, in arrival order; the status is filled in once the answer is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> int:
        with self._lock:
            self._records.append(record)
            return len(self._records) - 1

    def set_status(self, index: int, status: int) -> None:
        with self._lock:
            self._records[index] = replace(self._records[index], status=status)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)


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


def garble(reply: Reply, kind: str) -> Reply:
    """Reshape the job(s) in an answer: `id` instead of `jobId`, or no `status`/`metadata`."""
    payload = reply.payload if isinstance(reply.payload, dict) else {}
    jobs = [payload["job"]] if isinstance(payload.get("job"), dict) else []
    jobs += [job for job in payload.get("jobs", []) if isinstance(job, dict)]
    for job in jobs:
        if kind == "id_shape":
            job["id"] = job.pop("jobId")
        else:
            job.pop("status", None)
            job.pop("metadata", None)
    return reply


class SandboxServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its role and can cut its open keep-alive connections."""

    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops connections when hundreds arrive at once

    def __init__(self, address: tuple[str, int], name: str, context: Context) -> None:
        self.name, self.context = name, context
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away: not worth a traceback
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut idle keep-alive sockets, so a stopped sandbox stops answering on them too."""
        with self.connections_lock:
            open_sockets = list(self.connections)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 keep-alive, every answer with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "scenario-sandbox"
    sys_version = ""
    timeout = 300  # an idle keep-alive connection is dropped after this, so threads do not pile up
    server: SandboxServer
    _record_index: int | None = None  # this request's place in the log (None: not logged)

    # Headers and body leave in one write: separate small writes meet Nagle + delayed ACK (40 ms each).
    wbufsize = CHUNK

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines of http.server."""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _dispatch(self) -> None:
        try:
            self._handle()
        except OSError:  # the client hung up while we answered
            self.close_connection = True
        except Exception:  # a sandbox bug: say so to the client and on stderr, keep serving
            traceback.print_exc()
            self._send(Reply(500, {"reason": "sandbox internal error"}))

    def _handle(self) -> None:
        split = urlsplit(self.path)
        path = split.path
        query = {key: values[0] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        raw = self._read_body()
        if raw is None:
            return
        ctx, name = self.server.context, self.server.name
        if name == "api" and path.startswith("/_sandbox/"):
            self._send(control(ctx, self.command, path, raw))
            return
        body = parse_json(raw) if name == "api" else None
        record = RequestRecord(
            name,
            self.command,
            path,
            query,
            None if body is INVALID else body,
            "Authorization" in self.headers,
            0,
            time.monotonic(),
            ctx.world.clock(),
        )
        self._record_index = ctx.recorder.add(record)
        try:
            self._serve(ctx.faults.take(route_of(name, self.command, path)), path, query, raw, body)
        finally:
            self._record_index = None

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(Reply(411, {"reason": "Send a Content-Length; chunked bodies are not supported"}))
            return None
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if not length.isdigit():
            self.close_connection = True
            self._send(Reply(400, {"reason": "Invalid Content-Length"}))
            return None
        return self.rfile.read(int(length))

    def _serve(self, fault: Fault | None, path: str, query: dict[str, str], raw: bytes, body: Any) -> None:
        """Answer the request, bent by the fault if there is one."""

        def handle() -> Reply:
            if self.server.name == "cdn":
                return self._cdn(path, query, raw)
            return self._api(path, query, body)

        if fault is None:
            self._send(handle())
        elif fault.kind == "delay":
            if not fault.after:
                time.sleep(fault.delay)
            reply = handle()
            if fault.after:
                time.sleep(fault.delay)
            self._send(reply)
        elif fault.kind in REPLACING:
            if fault.after:
                handle()
            self._break(fault)
        elif fault.kind == "truncated":
            self._send(handle(), truncate=True)
        else:
            self._send(garble(handle(), fault.kind))

    def _break(self, fault: Fault) -> None:
        """Answer with the fault instead: an error status, garbage, or a reset connection."""
        if fault.kind == "malformed":
            self._send(Reply(200, raw=b'{"job": '))
        elif fault.kind == "status":
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            self._send(Reply(fault.status, {"reason": fault.reason}, headers=headers))
        else:
            self._reset()

    def _reset(self) -> None:
        """Hang up with an RST instead of answering (SO_LINGER 0 turns the close into one)."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The descriptor really closes (sending the RST) when finish() drops the reader and writer,
        # right after this request; nothing is written in between.
        self.connection.close()

    def _send(self, reply: Reply, *, truncate: bool = False) -> None:
        if reply.lost:
            self._reset()
            return
        if self._record_index is not None:  # logged before the client can see the answer
            self.server.context.recorder.set_status(self._record_index, reply.status)
        data = reply.body()
        self.send_response(reply.status)
        if reply.status != 204:  # a 204 has no body, so no Content-Length or Content-Type either
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            data = b""
        if truncate:  # promise the whole body, send half, hang up: a short read for the client
            data = data[: len(data) // 2]
            self.close_connection = True
        for start in range(0, len(data), CHUNK):
            self.wfile.write(data[start : start + CHUNK])
        self.wfile.flush()

    # -- the API server ---------------------------------------------------------------------------

    def _authorized(self) -> bool:
        ctx = self.server.context
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = base64.b64encode(f"{ctx.key}:{ctx.secret}".encode()).decode()
        return scheme.lower() == "basic" and hmac.compare_digest(token.strip().encode(), expected.encode())

    def _api(self, path: str, query: dict[str, str], body: Any) -> Reply:
        if not self._authorized():
            return Reply(401, {"reason": "Unauthorized"})
        try:
            if self.command in ("POST", "PUT", "PATCH") and body is INVALID:
                raise ApiError(400, "The request body is not valid JSON")
            return self._route(path, query, body)
        except ApiError as exc:
            return error_reply(exc)

    def _route(self, path: str, query: dict[str, str], body: Any) -> Reply:
        world = self.server.context.world
        parts = path.strip("/").split("/")
        match self.command, parts:
            case "POST", ["v1", "generate", "custom", model]:
                if model != MODEL_ID:
                    raise ApiError(404, f"Model not found: {model}")
                return self._generate(world, query, body)
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
        raise ApiError(404, f"No route for {self.command} {path}")

    def _generate(self, world: World, query: dict[str, str], body: Any) -> Reply:
        """A generate POST, answered late or lost as the knobs draw it (dry runs never are)."""
        dry_run = query.get("dryRun", "").lower() in ("true", "api")
        delay, lost = (0.0, False) if dry_run else world.generate_fate()
        # A slow gateway: the request is handled only after the delay, so no job exists before then.
        if delay and self.server.context.stopping.wait(delay):
            return Reply(0, lost=True)  # the sandbox stopped meanwhile: hang up, create nothing
        status, payload = world.generate(body, dry_run)
        return Reply(status, payload, lost=lost and status == 200)

    # -- the CDN server ---------------------------------------------------------------------------

    def _cdn(self, path: str, query: dict[str, str], raw: bytes) -> Reply:
        world = self.server.context.world
        try:
            if "Authorization" in self.headers:  # signed URLs plus a credential: a real CDN refuses
                raise CdnError(400, "Only one auth mechanism allowed; do not send an Authorization header")
            parts = path.strip("/").split("/")
            match self.command, parts:
                case "GET" | "HEAD", ["assets", _]:
                    mime, data = world.cdn_asset(path, query)
                    return Reply(200, raw=data, content_type=mime)
                case "PUT", ["uploads", _, _]:
                    etag = world.put_part(path, query, raw)
                    return Reply(
                        200, raw=b"", content_type="application/octet-stream", headers={"ETag": etag}
                    )
            raise CdnError(404, "Not Found")
        except ApiError as exc:
            return error_reply(exc)


def parse_json(raw: bytes) -> Any:
    """The JSON in a body, None for an empty one, INVALID for anything else."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return INVALID


def control(ctx: Context, method: str, path: str, raw: bytes) -> Reply:
    """The /_sandbox/ endpoints: drive a sandbox that runs in another process (no auth, never faulted)."""
    body = parse_json(raw)
    try:
        if body is INVALID:
            raise ValueError("the body is not valid JSON")
        match method, path:
            case "POST", "/_sandbox/faults":
                faults = [Fault.from_json(item) for item in (body if isinstance(body, list) else [body])]
                for fault in faults:
                    ctx.faults.add(fault)
                return Reply(204)
            case "DELETE", "/_sandbox/faults":
                ctx.faults.clear()
                return Reply(204)
            case "GET", "/_sandbox/requests":
                return Reply(200, [asdict(record) for record in ctx.recorder.snapshot()])
            case "GET", "/_sandbox/state":
                return Reply(
                    200, {"generate_jobs": list(ctx.world.generate_jobs), "jobs": ctx.world.statuses()}
                )
            case "GET", "/_sandbox/knobs":
                return Reply(200, ctx.world.knobs())
            case "POST", "/_sandbox/knobs":
                ctx.world.set_knobs(body)
                return Reply(200, ctx.world.knobs())
            case "POST", "/_sandbox/fail-next-jobs":
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object {n, error, hint, status}")
                n = body.get("n", 1)
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError("n must be a positive integer")
                ctx.world.fail_next_jobs(
                    n,
                    str(body.get("error", "Generation failed")),
                    str(body.get("hint", "")),
                    str(body.get("status", "failure")),
                )
                return Reply(204)
        return Reply(404, {"reason": f"No control endpoint {method} {path}"})
    except ValueError as exc:
        return Reply(400, {"reason": str(exc)})

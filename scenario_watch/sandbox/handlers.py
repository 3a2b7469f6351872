"""HTTP transport for both servers: connections, request bodies, the log, injected faults, sending."""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from scenario_watch.sandbox.control import control
from scenario_watch.sandbox.endpoints import INVALID, Context, Reply, api, cdn, parse_json
from scenario_watch.sandbox.faults import REPLACING, Fault, route_of
from scenario_watch.sandbox.request_log import RequestRecord

CHUNK = 64 * 1024


def garble(reply: Reply, kind: str) -> Reply:
    """Reshape the job(s) in an answer: `id` instead of `jobId`, no `status`/`metadata`, or no `metadata`."""
    payload = reply.payload if isinstance(reply.payload, dict) else {}
    jobs = [payload["job"]] if isinstance(payload.get("job"), dict) else []
    jobs += [job for job in payload.get("jobs", []) if isinstance(job, dict)]
    for job in jobs:
        if kind == "id_shape":
            job["id"] = job.pop("jobId")
        elif kind == "no_metadata":
            job.pop("metadata", None)
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
            ctx = self.server.context
            if self.server.name == "cdn":
                return cdn(ctx, self.command, path, query, self.headers, raw)
            return api(ctx, self.command, path, query, self.headers, body)

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

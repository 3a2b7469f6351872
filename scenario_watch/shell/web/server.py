"""The HTTP listener: /metrics, /status.json, the live page and its pictures. Read-only, stdlib only.

A `ThreadingHTTPServer` in a daemon thread. Every route is a GET (or HEAD) that changes nothing;
pictures are named by journal id and number (`/picture/12/1`), never by a path from the request.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from scenario_watch import logs
from scenario_watch.config import Settings
from scenario_watch.errors import ConfigError
from scenario_watch.journal.store import Store
from scenario_watch.sections import FolderSettings, HttpSettings
from scenario_watch.shell.listen import is_loopback, split_listen
from scenario_watch.shell.metrics import CONTENT_TYPE, Metrics
from scenario_watch.shell.web.guard import HEADERS, Gate, Scrubber
from scenario_watch.shell.web.pictures import NotFound, Opened, Pictures, Refused

log = logs.get()

STATIC = {  # name -> content type: the only files /static/ serves, read once from the package
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
_PICTURE = re.compile(r"/(picture|thumb|reference|reference-thumb)/(\d{1,12})/(\d{1,3})")
# A client that sends nothing for this long loses its thread (no slow-loris holding threads forever).
REQUEST_TIMEOUT = 15.0
# Connections served at once (a page, its pictures, a scraper); beyond that they are closed unread.
MAX_CONNECTIONS = 32


class Listener:
    """The listener; `start()` binds and serves in a thread, `close()` stops it (safe twice)."""

    def __init__(
        self,
        http: HttpSettings,
        status: Callable[[], dict[str, Any]],
        metrics: Metrics | None,
        pictures: Pictures,
        scrubber: Scrubber,
    ) -> None:
        if http.listen is None:
            raise ConfigError("[http] listen is not set")
        self.host, self.port = split_listen(http.listen)
        token = http.token.get_secret_value() if http.token else None
        if token is None and not is_loopback(self.host):  # the settings check this too: never rely on it
            raise ConfigError(f"[http] listen = {http.listen!r} is not a loopback address: set [http] token")
        self.gate = Gate(token)
        self.status = status
        self.metrics = metrics
        self.pictures = pictures
        self.scrubber = scrubber
        package = resources.files(__package__) / "static"
        self.page = (package / "index.html").read_bytes()
        self.static = {name: (package / name).read_bytes() for name in STATIC}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: Store,
        status: Callable[[], dict[str, Any]],
        metrics: Metrics | None,
        preset_folders: Mapping[str, Path] | None = None,
    ) -> Listener:
        """The listener for these settings (`[http]`, the folders, the secrets to keep out of answers)."""
        folders = settings.folders
        presets = dict(preset_folders or {})
        roots = settings.watch.reference_roots
        api = [s.get_secret_value() for s in (settings.api.key, settings.api.secret) if s]
        token = settings.http.token.get_secret_value() if settings.http.token else None
        return cls(
            settings.http,
            status,
            metrics,
            Pictures(store, folders, presets, roots),
            Scrubber(_labels(folders, presets, roots), api, token),
        )

    @property
    def url(self) -> str:
        """Where it answers (the real port once started with port 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread; OSError (port taken, address not here) as a ConfigError."""
        handler = type("Handler", (_Handler,), {"listener": self})
        server_class = _Server6 if ":" in self.host else _Server
        try:
            self._server = server_class((self.host, self.port), handler)
        except OSError as exc:
            raise ConfigError(f"[http] listen = {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.port = self._server.server_address[1]
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, args=(self._server,), name="http", daemon=True)
        self._thread.start()
        log.info("http.listening", url=self.url, token=self.gate.token is not None)

    def _serve(self, server: _Server) -> None:
        # handle_request blocks until a connection comes (server.timeout is None): an idle listener
        # never wakes, where serve_forever would poll twice a second. close() wakes it by connecting.
        while not self._stopping:
            server.handle_request()

    def close(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        wake = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        with contextlib.suppress(OSError), socket.create_connection((wake, self.port), timeout=2):
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()


class _Server(ThreadingHTTPServer):
    """One thread a connection, at most MAX_CONNECTIONS at once: more are closed at once, unread."""

    daemon_threads = True
    request_queue_size = 64  # listen() backlog: socketserver's 5 drops a page's burst of thumbnail requests

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve in a thread if a slot is free; else drop the connection (a flood costs no threads)."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The thread's work; its slot is given back at the end."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


def _labels(folders: FolderSettings, presets: Mapping[str, Path], roots: Sequence[Path]) -> dict[str, Path]:
    """How each daemon folder is named in answers instead of its path on this host."""
    labels = {
        "inbox": folders.inbox,
        "outbox": folders.outbox,
        "done": folders.done,
        "failed": folders.failed,
        "state": folders.state,
    }
    labels.update({f"presets.{name}": folder for name, folder in presets.items()})
    labels.update({f"reference_roots[{n}]": root for n, root in enumerate(roots)})
    return labels


class _Handler(BaseHTTPRequestHandler):
    listener: Listener
    server_version = "scenario-watch"  # not Python's version
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    # -- plumbing -----------------------------------------------------------------------------------

    def end_headers(self) -> None:
        """Every answer, errors included, with the security headers."""
        for name, value in HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One debug line a request, without the query (it may hold a token)."""
        log.debug("http.request", method=self.command, path=urlsplit(self.path).path, status=int(code))

    def log_message(self, format: str, *args: Any) -> None:
        """http.server's own messages (bad requests, timeouts) at debug level."""
        log.debug("http.message", message=format % args)

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", headers.pop("cache", "no-store"))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: HTTPStatus, text: str, **headers: str) -> None:
        self._send(
            status,
            f"{status.value} {status.phrase}: {text}\n".encode(),
            "text/plain; charset=utf-8",
            **headers,
        )

    def do_HEAD(self) -> None:
        """As GET, without the body."""
        self.do_GET()

    def do_POST(self) -> None:
        """Nothing here changes anything."""
        self._text(HTTPStatus.METHOD_NOT_ALLOWED, "read-only", Allow="GET, HEAD")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    # -- routes -------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        """Route a request: login, then (authorised) the page, static files, status, metrics, pictures."""
        lst = self.listener
        try:
            url = urlsplit(self.path)
            path = url.path  # never unquoted: %2e%2e or %2f simply match no route
            if not lst.gate.host_allowed(self.headers.get("Host")):
                self._text(HTTPStatus.MISDIRECTED_REQUEST, "use http://127.0.0.1 or http://localhost")
            elif path == "/login":
                self._login(parse_qs(url.query).get("token", [""])[0])
            elif not lst.gate.allows(self.headers.get("Authorization"), self.headers.get("Cookie")):
                self._text(
                    HTTPStatus.UNAUTHORIZED,
                    "send Authorization: Bearer TOKEN, or open /login?token=TOKEN once in a browser",
                    WWW_Authenticate='Bearer realm="scenario-watch"',
                )
            elif path == "/":
                self._send(HTTPStatus.OK, lst.page, "text/html; charset=utf-8")
            elif path.startswith("/static/") and path[8:] in STATIC:
                name = path[8:]
                self._send(HTTPStatus.OK, lst.static[name], STATIC[name], cache="no-cache")
            elif path == "/status.json":
                self._status()
            elif path == "/metrics" and lst.metrics is not None:
                self._send(HTTPStatus.OK, lst.metrics.render(), CONTENT_TYPE)
            elif match := _PICTURE.fullmatch(path):
                self._picture(match[1], int(match[2]), int(match[3]))
            else:
                self._text(HTTPStatus.NOT_FOUND, "no such page")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (a page reloaded mid-picture)
        except Exception:
            log.exception("http.failed", path=urlsplit(self.path).path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "see the daemon's log")

    def _login(self, token: str) -> None:
        gate = self.listener.gate
        cookie = gate.login(token)
        if cookie is None and gate.token is not None:
            self._text(HTTPStatus.UNAUTHORIZED, "wrong token")
            return
        self.send_response(HTTPStatus.SEE_OTHER)
        if cookie is not None:  # none configured: nothing to log in to, straight to the page
            self.send_header("Set-Cookie", cookie)
        self.send_header("Location", "/")  # the token leaves the address bar at once
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _status(self) -> None:
        lst = self.listener
        report = lst.scrubber.value(lst.status())
        body = json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode()
        self._send(HTTPStatus.OK, body, "application/json; charset=utf-8")

    def _picture(self, route: str, prompt_id: int, n: int) -> None:
        pictures = self.listener.pictures
        try:
            if route in ("thumb", "reference-thumb"):
                data = pictures.thumbnail("output" if route == "thumb" else "reference", prompt_id, n)
                self._send(HTTPStatus.OK, data, "image/webp", cache="private, max-age=86400")
                return
            path = pictures.output(prompt_id, n) if route == "picture" else pictures.reference(prompt_id, n)
            opened = pictures.open(path)
        except NotFound:
            self._text(HTTPStatus.NOT_FOUND, "no such picture")
            return
        except Refused as exc:
            log.warning("http.picture_refused", route=route, prompt_id=prompt_id, n=n, why=str(exc))
            self._text(HTTPStatus.FORBIDDEN, "this file is not served")
            return
        self._stream(opened)

    def _stream(self, opened: Opened) -> None:
        with opened.handle:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", opened.mime)
            self.send_header("Content-Length", str(opened.size))
            self.send_header("Cache-Control", "private, max-age=3600")
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(opened.handle, self.wfile, 1 << 16)

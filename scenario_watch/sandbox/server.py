"""The Sandbox: a local Scenario API (and its CDN) on two loopback ports, driven from Python."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from .faults import Fault, FaultQueue
from .handlers import Context, Recorder, RequestRecord, SandboxServer
from .state import World


class Sandbox:
    """Two ThreadingHTTPServers (API under /v1 with Basic auth, signed-URL CDN) over one World."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        generation_seconds: float = 1.0,
        key: str = "sandbox-key",
        secret: str = "sandbox-secret",
        parallel_limit: int = 50,
        url_ttl: float = 86400.0,
    ) -> None:
        self.host, self.port, self.cdn_port = host, port, cdn_port
        self.key, self.secret = key, secret
        self.world = World(generation_seconds, parallel_limit, url_ttl)
        self.faults = FaultQueue()
        self.recorder = Recorder()
        self._context = Context(self.world, self.faults, self.recorder, key, secret)
        self._servers: list[SandboxServer] = []
        self._threads: list[threading.Thread] = []

    # Knobs a test may turn while the sandbox runs; new jobs and new URLs pick the new value.
    @property
    def generation_seconds(self) -> float:
        return self.world.generation_seconds

    @generation_seconds.setter
    def generation_seconds(self, value: float) -> None:
        self.world.generation_seconds = value

    @property
    def parallel_limit(self) -> int:
        return self.world.parallel_limit

    @parallel_limit.setter
    def parallel_limit(self, value: int) -> None:
        self.world.parallel_limit = value

    @property
    def url_ttl(self) -> float:
        return self.world.url_ttl

    @url_ttl.setter
    def url_ttl(self, value: float) -> None:
        self.world.url_ttl = value

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Bind both ports and serve in daemon threads; returns self."""
        if self._servers:
            return self
        api = SandboxServer((self.host, self.port), "api", self._context)
        cdn = SandboxServer((self.host, self.cdn_port), "cdn", self._context)
        self.port, self.cdn_port = api.server_address[1], cdn.server_address[1]
        self.world.cdn_url = self.cdn_url
        for server in (api, cdn):
            thread = threading.Thread(target=server.serve_forever, name=f"sandbox-{server.name}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop both servers and cut their connections; safe to call twice."""
        servers, self._servers = self._servers, []
        stoppers = [threading.Thread(target=server.shutdown, daemon=True) for server in servers]
        for stopper in stoppers:
            stopper.start()
        # serve_forever only sees the stop flag between polls (every 0.5 s); a connection wakes it at once.
        while any(stopper.is_alive() for stopper in stoppers):
            for server in servers:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self._url_host, server.server_address[1]), 1),
                ):
                    pass
            for stopper in stoppers:
                stopper.join(0.02)
        for server in servers:
            server.close_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def _url_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host

    @property
    def base_url(self) -> str:
        return f"http://{self._url_host}:{self.port}/v1"

    @property
    def cdn_url(self) -> str:
        return f"http://{self._url_host}:{self.cdn_port}"

    # -- what tests drive and inspect -------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        self.faults.add(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request either server saw, in arrival order (control endpoints excluded)."""
        return self.recorder.snapshot()

    @property
    def generate_jobs(self) -> list[str]:
        """Ids of the jobs real (not dry-run) generate POSTs created, in order."""
        return list(self.world.generate_jobs)

    def job(self, job_id: str) -> dict[str, Any]:
        """The job as GET /v1/jobs/{id} would show it now (ApiError if unknown)."""
        return self.world.job(job_id)

    def asset_bytes(self, asset_id: str) -> bytes:
        """The bytes the CDN serves for an asset (KeyError if unknown)."""
        return self.world.asset_bytes(asset_id)

    def fail_next_jobs(
        self, n: int, error: str = "Generation failed", hint: str = "", status: str = "failure"
    ) -> None:
        """The next n jobs created end in `status` ("failure" or "canceled") with this error and hint."""
        self.world.fail_next_jobs(n, error, hint, status)

    def wait_for(self, predicate: Callable[[Sandbox], object], timeout: float = 10.0) -> bool:
        """Poll predicate(self) until it is truthy or the timeout passes."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


def main_serve(port: int, cdn_port: int = 0, generation_seconds: float = 1.0) -> None:
    """Run a sandbox in the foreground until SIGINT or SIGTERM (`scenario-watch sandbox`)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only a flag: the main thread does the shutting down

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    sandbox = Sandbox(port=port, cdn_port=cdn_port, generation_seconds=generation_seconds).start()
    try:
        print(
            f"sandbox: API {sandbox.base_url} key={sandbox.key} secret={sandbox.secret} "
            f"(CDN {sandbox.cdn_url}, jobs take {generation_seconds:g}s; Ctrl-C stops)",
            flush=True,
        )
        stop.wait()
    finally:
        sandbox.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The Sandbox: a local Scenario API (and its CDN) on two loopback ports, driven from Python."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Generic, TypeVar, cast, overload

from scenario_watch.sandbox import persist
from scenario_watch.sandbox.endpoints import Context
from scenario_watch.sandbox.faults import Fault, FaultQueue
from scenario_watch.sandbox.handlers import SandboxServer
from scenario_watch.sandbox.models import MODEL_ID
from scenario_watch.sandbox.request_log import Recorder, RequestRecord
from scenario_watch.sandbox.state import World

T = TypeVar("T")


class Knob(Generic[T]):
    """A Sandbox attribute that reads and sets one World knob; setting checks the value (ValueError)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Knob[T]: ...
    @overload
    def __get__(self, obj: Sandbox, owner: type) -> T: ...
    def __get__(self, obj: Sandbox | None, owner: type) -> Knob[T] | T:
        if obj is None:
            return self
        return cast(T, getattr(obj.world, self.name))

    def __set__(self, obj: Sandbox, value: T) -> None:
        obj.world.set_knobs({self.name: value})


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
        rng_seed: int = 0,
        state_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`state_file`: keep jobs, assets, uploads and the signing key there, across restarts."""
        self.host, self.port, self.cdn_port = host, port, cdn_port
        self.key, self.secret = key, secret
        self.state_file = state_file
        knobs = {
            "generation_seconds": generation_seconds,
            "parallel_limit": parallel_limit,
            "url_ttl": url_ttl,
            "rng_seed": rng_seed,
        }
        self.world = World(knobs, persist.load(state_file) if state_file else None, clock)
        self.faults = FaultQueue()
        self.recorder = Recorder()
        self._stopping = threading.Event()
        self._context = Context(self.world, self.faults, self.recorder, key, secret, self._stopping)
        self._servers: list[SandboxServer] = []
        self._threads: list[threading.Thread] = []
        self._saver: persist.Saver | None = None

    # Knobs a test may turn while the sandbox runs (see knobs.py); new requests see the new value.
    generation_seconds: Knob[float] = Knob()
    parallel_limit: Knob[int] = Knob()
    url_ttl: Knob[float] = Knob()
    seed_input: Knob[bool] = Knob()
    cost_per_output: Knob[float] = Knob()
    echo_strings: Knob[bool] = Knob()
    echo_model_id: Knob[bool] = Knob()
    team_noise: Knob[float] = Knob()
    plan_required: Knob[str | None] = Knob()
    lost_answer_rate: Knob[float] = Knob()
    late_answer_rate: Knob[float] = Knob()
    late_answer_delay: Knob[float] = Knob()
    rng_seed: Knob[int] = Knob()
    terminal_history: Knob[bool] = Knob()

    def set_knobs(self, **values: Any) -> None:
        """Set several knobs at once, as POST /_sandbox/knobs does (ValueError: none is set)."""
        self.world.set_knobs(values)

    @property
    def knobs(self) -> dict[str, Any]:
        """Every knob's current value."""
        return self.world.knobs()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Bind both ports and serve in daemon threads; returns self."""
        if self._servers:
            return self
        self._stopping.clear()
        api = SandboxServer((self.host, self.port), "api", self._context)
        cdn = SandboxServer((self.host, self.cdn_port), "cdn", self._context)
        self.port, self.cdn_port = api.server_address[1], cdn.server_address[1]
        self.world.cdn_url = self.cdn_url
        for server in (api, cdn):
            thread = threading.Thread(target=server.serve_forever, name=f"sandbox-{server.name}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        if self.state_file is not None:
            self._saver = persist.Saver(self.world, self.state_file)
        return self

    def stop(self) -> None:
        """Stop both servers and cut their connections; safe to call twice."""
        servers, self._servers = self._servers, []
        self._stopping.set()  # late answers still waiting give up instead of creating jobs
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
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.close()

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

    def add_foreign_job(
        self, input: dict[str, Any], model_id: str = MODEL_ID, job_type: str = "custom"
    ) -> str:
        """Plant a teammate's job (a generation with this input, or an "upload") in the listing; its id."""
        return self.world.add_foreign_job(input, model_id, job_type)

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


def main_serve(
    port: int, cdn_port: int = 0, generation_seconds: float = 1.0, state_file: Path | None = None
) -> None:
    """Run a sandbox in the foreground until SIGINT or SIGTERM (`scenario-watch sandbox`)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only a flag: the main thread does the shutting down

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    sandbox = Sandbox(
        port=port, cdn_port=cdn_port, generation_seconds=generation_seconds, state_file=state_file
    ).start()
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

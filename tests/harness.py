"""The daemon in the test's own process, on a manual clock it shares with the sandbox.

A driver thread runs the daemon's loop; whenever no task is in a worker and no event waits, it moves
the clock to the next moment something is due. So a 15-minute job timeout, a 3-minute quiet period or
a 60-second backoff passes in milliseconds, while every request still crosses loopback HTTP to the
real sandbox server, every file is real, and the real watchdog observer watches the inbox.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from scenario_watch.api.client import ScenarioClient
from scenario_watch.clock import ManualClock
from scenario_watch.config import load_settings
from scenario_watch.sandbox import Sandbox
from scenario_watch.shell.daemon import Daemon

# The clock moves at most this far at once (so pauses and timers are met in order, never skipped).
MAX_STEP = 30.0


class LogCapture:
    """Every log event of the process as a dict (bound context included), for assertions."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.entries.append({**event, "level": method})
        raise structlog.DropEvent

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.entries)


@contextlib.contextmanager
def capture_logs() -> Iterator[LogCapture]:
    """Route structlog into a LogCapture for the duration (context variables merged, as the CLI does)."""
    saved = structlog.get_config()
    _forget_cached_loggers()  # a CLI run in this process (cache_logger_on_first_use) bound them for good
    capture = LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        cache_logger_on_first_use=False,
    )
    try:
        yield capture
    finally:
        structlog.configure(**saved)
        _forget_cached_loggers()


def _forget_cached_loggers() -> None:
    """Make every module's lazy logger look up the configuration again at its next line."""
    for name, module in list(sys.modules.items()):
        if name.startswith("scenario_watch"):
            for value in vars(module).values():
                if isinstance(value, structlog._config.BoundLoggerLazyProxy):
                    value.__dict__.pop("bind", None)


class HereDaemon:
    """The daemon of `config`, started in this process and driven on `clock` by a thread; stop() ends it."""

    def __init__(
        self,
        config: Any,
        sandbox: Sandbox,
        clock: ManualClock,
        capture: LogCapture,
        env: dict[str, str] | None = None,
        *,
        once: bool = False,
    ) -> None:
        env = (
            env
            if env is not None
            else {"SCENARIO_API_KEY": sandbox.key, "SCENARIO_API_SECRET": sandbox.secret}
        )
        loaded = load_settings(config, env=env)
        settings = loaded.settings
        key, secret = loaded.credentials or ("", "")
        api = settings.api
        client = ScenarioClient(api.base_url, key, secret, model_id=api.model_id, timeout=api.request_timeout)
        self.clock = clock
        self.capture = capture
        self.daemon = Daemon(settings, client, once=once, env={"PATH": "/usr/bin:/bin"}, clock=clock)
        self.daemon.start()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._drive, name="driver", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        d, clock = self.daemon, self.clock
        try:
            while not self._stop.is_set():
                now = clock.monotonic()
                d.tick(now)
                if d.once and d.idle():
                    break
                if d.pump(0.0):
                    continue
                if d.scheduler.busy or d.intake.more or d.hooks.busy():
                    began = time.monotonic()
                    d.pump(0.02)  # a worker, a claim or a hook is at work: real time passes, here too
                    clock.advance(time.monotonic() - began)
                    continue
                due = d.next_due(now)
                # Nothing runs: give the observer a moment to report a file, then jump.
                if due > now and not d.pump(0.005):
                    clock.advance(min(due - now, MAX_STEP))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self.finished.set()

    # The DaemonProcess interface (conftest), so a test reads the same either way.
    def events(self) -> list[dict[str, Any]]:
        return self.capture.events()

    def saw(self, event: str, **fields: Any) -> bool:
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events()
        )

    def output(self) -> str:
        return "\n".join(repr(e) for e in self.events())

    def stop(self, timeout: float = 10.0) -> int:
        self._stop.set()
        self._thread.join(timeout)
        self.daemon.close()
        if self.error is not None:
            raise self.error
        return self.daemon.exit_code


def wait_done(finished: Callable[[], bool], daemon: HereDaemon, timeout: float = 20.0) -> None:
    """Wait (real time) for a condition while the driver runs; fail with the daemon's error if it died."""
    deadline = time.monotonic() + timeout
    while not finished():
        if daemon.finished.is_set() and daemon.error is not None:
            raise daemon.error
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

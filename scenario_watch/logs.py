"""structlog setup: JSON lines or console, one event per line, secrets masked everywhere."""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

MASK = "********"


class Redactor:
    """Replace any known secret that shows up in an event value (defence in depth)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = [s for s in secrets if len(s) >= 4]
        if len(self.secrets) == 2:  # the Authorization header's value, should it ever be printed
            self.secrets.append(base64.b64encode(":".join(self.secrets).encode()).decode())

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not self.secrets:
            return event
        for key, value in event.items():
            event[key] = self.mask(value)
        return event

    def mask(self, value: Any) -> Any:
        """`value` with every secret masked, looking inside lists and dicts (tracebacks are both)."""
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, MASK)
            return value
        if isinstance(value, dict):
            return {k: self.mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.mask(v) for v in value]
        return value


def configure(
    fmt: str = "auto", level: str = "info", secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Route structlog and the stdlib loggers (requests, urllib3, watchdog) to one renderer."""
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        # Tracebacks as data, without frame locals: a local may hold the credentials.
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        shared.append(structlog.processors.ExceptionRenderer(transformer))
        renderer = structlog.processors.JSONRenderer()
    shared.append(Redactor(secrets))  # last: it sees every value, tracebacks included
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning: urllib3 logs every retry, watchdog every event.
    for noisy in ("urllib3", "watchdog", "requests"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    inotify = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _StoppedEmitter) for f in inotify.filters):
        inotify.addFilter(_StoppedEmitter())
    structlog.configure(
        # filter_by_level first: a line below the level costs nothing more.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class _StoppedEmitter(logging.Filter):
    """Drop watchdog's error for an event read while its observer is being stopped (a race of its own,
    watchdog 7: about one clean stop in six): an error line at every few stops would be a false alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).endswith("called when the thread is inactive")


def bind(**context: Any) -> None:
    """Bind context to every later line of this thread (values that are None are left out)."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v is not None})


def get(name: str = "scenario_watch") -> Any:
    """A structlog logger (the library configures nothing; only the CLI calls configure)."""
    return structlog.get_logger(name)

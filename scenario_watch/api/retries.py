"""The HTTP retry policy (urllib3's Retry, declared once), and what kind a fault was.

urllib3 retries by itself what is safe to retry (see `policy`); a listener is told of each of
those retries, and every TransientError carries the kind of its fault, so the retries metric can
say why something was tried again without parsing messages.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError, TimeoutError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

# Told of each retry urllib3 makes on its own: (method, absolute URL, status or None, kind).
RetryListener = Callable[[str, str, int | None, str], None]


class RetryPolicy(Retry):
    """urllib3's Retry, telling a listener of each retry it decides (the metrics count them)."""

    listener: RetryListener | None = None

    def new(self, **kw: Any) -> Self:
        """The next Retry of the chain, with the same listener."""
        new = super().new(**kw)
        new.listener = self.listener
        return new

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        """Count one attempt more; raises when none is left (then it is no retry, and not reported)."""
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        status = response.status if response is not None else None
        if self.listener is not None and (error is not None or (status is not None and status >= 500)):
            kind = status_kind(status) if status is not None else error_kind(error)
            self.listener(method or "GET", _absolute(url, _pool), status, kind)
        return new


def policy(attempts: int) -> RetryPolicy:
    """The one retry policy of API and CDN requests, `attempts` retries at most."""
    # Declared once: connect errors are retried for every method (the server never saw the request);
    # read errors and 5xx only for idempotent methods, so a generate POST is never resent blindly.
    # 429 is not retried here: the caller turns it into backpressure and honours Retry-After.
    return RetryPolicy(
        total=attempts,
        connect=attempts,
        read=attempts,
        status=attempts,
        other=0,
        allowed_methods=frozenset({"GET", "HEAD", "PUT"}),
        status_forcelist=frozenset({500, 502, 503, 504}),
        backoff_factor=0.25,
        backoff_max=4.0,
        backoff_jitter=0.25,
        respect_retry_after_header=False,
        raise_on_status=False,
    )


def status_kind(status: int) -> str:
    """A failed status as the retries metric names it."""
    return "server_error" if status >= 500 else "other"


def error_kind(error: BaseException | None) -> str:
    """A request that got no answer, as the retries metric names it: timeout or connection."""
    # urllib3 counts a refused connection as a kind of connect timeout: it is a connection fault here.
    timed_out = isinstance(error, TimeoutError) and not isinstance(error, NewConnectionError)
    return "timeout" if timed_out else "connection"


def fault_kind(exc: HTTPError) -> str:
    """A urllib3 error as the retries metric names it (the cause inside MaxRetryError too)."""
    return error_kind(exc.reason if isinstance(exc, MaxRetryError) else exc)


def _absolute(url: str | None, pool: ConnectionPool | None) -> str:
    """The full URL of a request urllib3 names by its path (the pool knows the host)."""
    if not url or pool is None or "://" in url:
        return url or ""
    scheme = getattr(pool, "scheme", None) or "http"
    port = "" if pool.port in (None, {"http": 80, "https": 443}.get(scheme)) else f":{pool.port}"
    host = f"[{pool.host}]" if ":" in pool.host else pool.host
    return f"{scheme}://{host}{port}{url}"

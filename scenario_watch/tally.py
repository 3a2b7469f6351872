"""What the pipeline tells the metrics: a small protocol, and the no-op used when none are wanted.

The rooms that see the events (the claim, the finisher, the retries of the dispatcher, tracker and
outbox) know only this protocol: they never import prometheus_client or the listener, and without
`[http] listen` or `[metrics] textfile` an event costs one call that returns at once.
`metrics.Metrics` implements it.
"""

from __future__ import annotations

from typing import Protocol

from scenario_watch.errors import RateLimited, TransientError


class Tally(Protocol):
    """The events the metrics count."""

    def prompt_taken(self, preset: str | None = None) -> None:
        """A prompt was claimed and journaled."""
        ...

    def prompt_finished(
        self,
        outcome: str,
        *,
        stage: str | None = None,
        preset: str | None = None,
        cost: float | None = None,
        duration: float | None = None,
        at: float | None = None,
    ) -> None:
        """A prompt reached done or failed (once per prompt)."""
        ...

    def retry(self, reason: str) -> None:
        """Something is tried again, for this reason."""
        ...


class NoTally:
    """Counts nothing: metrics are off."""

    def prompt_taken(self, preset: str | None = None) -> None:
        """Nothing."""

    def prompt_finished(
        self,
        outcome: str,
        *,
        stage: str | None = None,
        preset: str | None = None,
        cost: float | None = None,
        duration: float | None = None,
        at: float | None = None,
    ) -> None:
        """Nothing."""

    def retry(self, reason: str) -> None:
        """Nothing."""


NO_TALLY = NoTally()


def retry_reason(exc: BaseException) -> str:
    """Why a failed call is tried again, as the retries metric names it."""
    if isinstance(exc, RateLimited):
        return "rate_limit"
    if isinstance(exc, TransientError):
        return exc.kind  # connection, timeout, server_error, url_expired, other
    return "other"

"""The one exception root of scenario-watch and its few precise subclasses."""

from __future__ import annotations


class ScenarioWatchError(Exception):
    """Root of every error scenario-watch raises on purpose."""


class ConfigError(ScenarioWatchError):
    """The configuration is missing or invalid (exit code 2)."""


class PromptError(ScenarioWatchError):
    """A prompt file cannot be used; ``problems`` are one-line messages for a person."""

    def __init__(self, problems: list[str], hint: str | None = None) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.hint = hint


class MissingReference(PromptError):
    """A reference image is not there (yet): the prompt may wait for it to arrive."""


class UnsafeFile(PromptError):
    """Not a regular file (a symlink, FIFO, folder, device or socket): refused without reading it."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(
            [f"{name} is {kind}: refused (the inbox only takes regular files)"],
            hint="drop the file itself (copy it in, or write it elsewhere and rename it in)",
        )
        self.kind = kind


class BadImage(PromptError):
    """An image that cannot be used as it is; ``reason`` says why (empty, truncated, damaged, exif...)."""

    def __init__(self, reason: str, problem: str, hint: str | None = None) -> None:
        super().__init__([problem], hint)
        self.reason = reason


class ApiError(ScenarioWatchError):
    """The Scenario API answered with an error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class AuthError(ApiError):
    """401, or a 403 that is not about the plan: the credentials are wrong or lack the scope."""


class PlanError(ApiError):
    """403 because the plan does not include the model: not a credentials problem, and retrying won't help."""


class BadRequest(ApiError):
    """400 (or another 4xx): the API rejected the input; resending it will not help."""


class NotFound(ApiError):
    """404: the job or asset is unknown to the API."""


class RateLimited(ApiError):
    """429: too many parallel jobs; ``retry_after`` in seconds and the team's parallel ``limit`` when said."""

    def __init__(self, status: int, reason: str, retry_after: float | None, limit: int | None = None) -> None:
        super().__init__(status, reason)
        self.retry_after = retry_after
        self.limit = limit


class TransientError(ScenarioWatchError):
    """A fault that may go away by itself: connection error, timeout, 5xx, malformed body.

    `kind` says which, for the retries metric: connection, timeout, server_error, or other.
    """

    def __init__(self, message: str, *, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class OutcomeUnknown(TransientError):
    """A generate POST was sent but its answer was lost: a job may or may not exist.

    `answered`: the server did answer (a 5xx, an unreadable body), so its work on the request is over
    and a listing soon settles it; otherwise (a timeout, a reset) a job may still be in the making.
    """

    def __init__(self, message: str, *, answered: bool, kind: str = "other") -> None:
        super().__init__(message, kind=kind)
        self.answered = answered


class UrlExpired(TransientError):
    """The CDN refused a signed URL (403): fetch the asset again for a fresh one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="url_expired")


class TransitionRefused(ScenarioWatchError):
    """A state change the lifecycle table does not allow from the prompt's current state (a bug)."""

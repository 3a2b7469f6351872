"""Fault knobs: what can go wrong on a request, which requests it hits, and a thread-safe FIFO of them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

Route = Literal["generate", "job", "jobs", "asset", "assets", "uploads", "cdn", "any"]
Kind = Literal[
    "status", "reset", "delay", "malformed", "truncated", "id_shape", "missing_fields", "no_metadata"
]
ROUTES: tuple[str, ...] = get_args(Route)
KINDS: tuple[str, ...] = get_args(Kind)
# These kinds replace the answer: without `after` the request is not handled at all (nothing is created).
REPLACING = frozenset({"status", "reset", "malformed"})


@dataclass(frozen=True)
class Fault:
    """One injected failure, applied to the first `times` matching requests (-1: forever).

    `after=True` handles the request first (a generate really creates its job) and then breaks the
    answer; for "delay" it means answer late instead of handle late. "truncated", "id_shape",
    "missing_fields" (no `status`, no `metadata`) and "no_metadata" (the status kept: a success that
    names no outputs) always handle the request, since they garble the real answer.
    """

    route: Route
    kind: Kind
    times: int = 1
    after: bool = False
    status: int = 500
    retry_after: float | None = None
    delay: float = 0.0
    reason: str = "injected fault"

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, not {self.route!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be a positive count, or -1 for forever")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after cannot be negative")

    @classmethod
    def from_json(cls, raw: Any) -> Fault:
        """A fault from a JSON object (the control endpoint); ValueError names what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("a fault must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        for name in ("route", "kind", "reason"):
            if name in raw and not isinstance(raw[name], str):
                raise ValueError(f"{name} must be a string")
        for name in ("times", "status"):
            if name in raw and (not isinstance(raw[name], int) or isinstance(raw[name], bool)):
                raise ValueError(f"{name} must be an integer")
        for name in ("delay", "retry_after"):
            value = raw.get(name)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise ValueError(f"{name} must be a number")
        if "after" in raw and not isinstance(raw["after"], bool):
            raise ValueError("after must be a boolean")
        try:
            return cls(**raw)
        except TypeError as exc:  # a missing route or kind
            raise ValueError(str(exc)) from exc


def route_of(server: str, method: str, path: str) -> str | None:
    """The fault route a request belongs to (None: a path no named route covers)."""
    if server == "cdn":
        return "cdn"
    parts = path.strip("/").split("/")
    if parts[0] != "v1" or len(parts) < 2:
        return None
    head, rest = parts[1], parts[2:]
    if head == "generate" and method == "POST":
        return "generate"
    if head == "jobs":
        return "job" if rest else "jobs"
    if head == "assets":
        return "asset" if rest else "assets"
    if head == "uploads":
        return "uploads"
    return None


class FaultQueue:
    """Faults in the order they were injected; each request takes the first one that matches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[tuple[Fault, list[int]]] = []  # the list holds the remaining count

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._queue.append((fault, [fault.times]))

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def pending(self) -> list[Fault]:
        with self._lock:
            return [fault for fault, _ in self._queue]

    def take(self, route: str | None) -> Fault | None:
        """Use up one application of the first fault for this route, if any."""
        with self._lock:
            for index, (fault, remaining) in enumerate(self._queue):
                if fault.route == "any" or fault.route == route:
                    if remaining[0] > 0:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            del self._queue[index]
                    return fault
        return None

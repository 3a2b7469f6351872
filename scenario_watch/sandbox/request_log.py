"""The request log: every request either server saw, in arrival order, with the status it got."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    """One request either server saw (never the Authorization value); status 0: reset or no answer yet."""

    server: str
    method: str
    path: str
    query: dict[str, str]
    body: Any
    has_auth: bool
    status: int
    time: float  # monotonic, this process's (latency benchmarks)
    at: float  # wall, the sandbox's clock (a test's manual clock moves it)


class Recorder:
    """The request log, in arrival order; the status is filled in once the answer is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> int:
        with self._lock:
            self._records.append(record)
            return len(self._records) - 1

    def set_status(self, index: int, status: int) -> None:
        with self._lock:
            self._records[index] = replace(self._records[index], status=status)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

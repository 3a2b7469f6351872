"""What reaches the main loop through its one queue: arrivals, finished tasks, a dying worker, a wake-up."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from scenario_watch.lifecycle import Result, Task


@dataclass(frozen=True)
class Arrived:
    """The observer saw a file that may be a prompt."""

    path: str
    moved: bool


@dataclass(frozen=True)
class Finished:
    """A worker finished a task."""

    prompt_id: int
    task: Task
    result: Result


@dataclass(frozen=True)
class WorkerDied:
    """A worker thread is ending on a BaseException (its task's result was sent first)."""

    thread: threading.Thread


@dataclass(frozen=True)
class Wake:
    """Look at the stop flag now (from a signal handler)."""


Event = Arrived | Finished | WorkerDied | Wake

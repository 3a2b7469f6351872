"""What reaches the main loop through its one queue: arrivals, finished tasks, a wake-up."""

from __future__ import annotations

from dataclasses import dataclass

from .scheduler import Outcome, Task


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
    outcome: Outcome


@dataclass(frozen=True)
class Wake:
    """Look at the stop flag now (from a signal handler)."""


Event = Arrived | Finished | Wake

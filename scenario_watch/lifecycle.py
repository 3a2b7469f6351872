"""The life of a prompt, in one place: its states, the allowed transitions, what runs next, and results.

Read this module first. A prompt file is claimed (renamed into the inbox's `.processing/` folder and
journaled), checked, sent to Scenario, polled, delivered, and filed under done/ or failed/:

    claimed ──▶ queued ──▶ submitting ──▶ submitted ──▶ downloading ──▶ done
       │          │    ◀──── (nothing was created)         │               │
       └──────────┴──────────────┴─────────────┴───────────┴──────▶ failed

Every transition is one journal write that names the states it may come from (`TRANSITIONS`); the
journal refuses any other and logs it. `NEXT` says which task follows each state: the live path and
recovery after a restart both read it, so they cannot drift apart. A task returns one of the typed
results below; the scheduler turns its facts into times, and the finisher ends a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scenario_watch.journal.rows import Row


class State(StrEnum):
    """Where a prompt is in its life (the journal's `state` column)."""

    CLAIMED = "claimed"  # renamed into .processing and journaled, not yet checked
    QUEUED = "queued"  # checked: waits for a free slot at Scenario
    SUBMITTING = "submitting"  # a generate POST is being sent, or its answer was lost: reconcile first
    SUBMITTED = "submitted"  # the job id is known: poll it, never send again
    DOWNLOADING = "downloading"  # the job succeeded (paid): its outputs are being delivered
    DONE = "done"  # delivered (filed under done/ once `final_path` is set)
    FAILED = "failed"  # ended with an error file (filed under failed/ once `final_path` is set)


ACTIVE = (State.CLAIMED, State.QUEUED, State.SUBMITTING, State.SUBMITTED, State.DOWNLOADING)
FINAL = (State.DONE, State.FAILED)
# Failed at these stages, a prompt's job was paid and may have succeeded at Scenario after all: `retry`
# asks about that job before paying again, so the journal keeps such a prompt for good (a few rows).
PAID_STAGES = frozenset({"poll", "timeout", "download"})

# to-state → the states it may come from. Anything else is refused by the journal (a bug: logged).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.CLAIMED, State.SUBMITTING}),  # checked; or: the POST made nothing
    State.SUBMITTING: frozenset({State.QUEUED, State.SUBMITTING}),  # (re)sent after a reconcile
    # The POST answered; a lost answer's job was found; a retried timeout's job was adopted.
    State.SUBMITTED: frozenset({State.SUBMITTING, State.QUEUED}),
    State.DOWNLOADING: frozenset({State.SUBMITTED}),
    State.DONE: frozenset({State.DOWNLOADING}),
    State.FAILED: frozenset(ACTIVE),
}


class Task(StrEnum):
    """What runs for a prompt when it is due."""

    ACCEPT = "accept"  # check a claimed prompt (again: a reference it names may have arrived)
    SUBMIT = "submit"  # send it, needs a free slot (a lost answer is reconciled first)
    POLL = "poll"  # ask Scenario how the job is doing (holds its slot)
    DOWNLOAD = "download"  # deliver the outputs (the slot is free: the job is over at Scenario)
    FILE = "file"  # move a finished prompt to done/ or failed/ (an earlier try could not)


# The task that follows each state, for the live path and for recovery after a restart alike.
NEXT: dict[State, Task] = {
    State.CLAIMED: Task.ACCEPT,
    State.QUEUED: Task.SUBMIT,
    State.SUBMITTING: Task.SUBMIT,
    State.SUBMITTED: Task.POLL,
    State.DOWNLOADING: Task.DOWNLOAD,
    State.DONE: Task.FILE,
    State.FAILED: Task.FILE,
}

# Tasks that run in a worker thread (HTTP, downloads, file moves); the others run on the main loop.
WORKER_TASKS = frozenset({Task.SUBMIT, Task.POLL, Task.DOWNLOAD})


def next_task(row: Row) -> Task | None:
    """What runs next for a prompt as the journal knows it; None when nothing is left (filed)."""
    if row.state in FINAL and row.final_path is not None:
        return None
    return NEXT[row.state]


class Pause(StrEnum):
    """Why submitting (and the task that met it) waits; each kind is one rule wherever it is met."""

    RATE = "rate"  # 429: too many jobs at once (Retry-After, the plan's limit)
    CREDENTIALS = "credentials"  # 401/403 on the credentials: keep every job, say so once
    BUDGET = "budget"  # [budget] daily would be passed: wait for the next UTC day
    UNWRITABLE = "unwritable"  # the outbox (or done/failed) cannot be written: pay for nothing


# -- what a task returns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advanced:
    """The task moved the prompt on (journaled): `NEXT` of its new state runs next."""

    state: State | None = None  # the state it moved to (None: whatever the journal says now)
    duration: float | None = None  # a finished job's generation time by the API's clock
    at: float | None = None  # when the API answered a submission (monotonic): the job's start, for its polls


@dataclass(frozen=True)
class Again:
    """The same task again later: after `delay`, or a backoff by `attempt`, at least `retry_after`."""

    attempt: int = 0  # failed attempts so far (0: the API answered, e.g. a job still running)
    retry_after: float | None = None
    delay: float | None = None


@dataclass(frozen=True)
class Paused:
    """The task met a pause that holds every submission; it runs again when the pause ends."""

    kind: Pause
    reason: str = ""
    retry_after: float | None = None  # RATE: the API's Retry-After
    delay: float | None = None  # BUDGET: until the next day
    limit: int | None = None  # RATE: the plan's parallel limit (details.actionLimit)


@dataclass(frozen=True)
class Failed:
    """The prompt ends in failed/ with an error file: where it failed, what, and what a person can do."""

    stage: str
    error: str
    hint: str | None = None


@dataclass(frozen=True)
class Delivered:
    """Every output and the manifest are published: the prompt ends in done/."""

    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Ended:
    """The finisher's word on a prompt that ended: filed, or (a full disk) the move is tried later."""

    filed: bool
    problem: str | None = None  # why done/ or failed/ could not be written


Result = Advanced | Again | Paused | Failed | Delivered | Ended

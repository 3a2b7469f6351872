"""What a restart resumes, in order: leftover temp files, unfinished filings, the journal's prompts.

Submitted jobs are polled again (never resent); a submission whose answer may have been lost is
queued first, and its submit reconciles before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from . import logs
from .files import remove_temp_files
from .intake import Intake
from .outbox import Outbox
from .scheduler import Outcome, Scheduler, Task
from .store import State, Store

log = logs.get()


def recover(
    store: Store,
    scheduler: Scheduler,
    outbox: Outbox,
    intake: Intake,
    accept: Callable[[int], None],
    now: float,
) -> None:
    """Resume what a previous run left: finish filings, requeue, re-poll, reconcile, redo."""
    folders = outbox.folders
    for folder in (folders.outbox, folders.done, folders.failed, folders.state):
        removed = remove_temp_files(folder)
        if removed:
            log.info("recover.temp_removed", folder=str(folder), count=removed)
    known = set()
    for row in store.unfiled():
        known.add(row.claimed)
        scheduler.done(row.id, Task.REFILE, Outcome.ended(outbox.file(row)), now)
    for row in store.active():
        known.add(row.claimed)
        logs.bind(file=row.file, job_id=row.job_id)
        log.info("recover.resume", state=str(row.state))
        if row.state == State.CLAIMED and row.inputs is None:
            accept(row.id)
        elif row.state == State.CLAIMED:
            scheduler.enqueue(row.id)
        elif row.state == State.SUBMITTING:
            scheduler.enqueue(row.id, first=True)  # submit reconciles before it sends anything
        elif row.state == State.SUBMITTED:
            scheduler.resume_job(row.id, now)
        else:
            scheduler.at(now, row.id, Task.DOWNLOAD)
        structlog.contextvars.clear_contextvars()
    # A crash between the claim (rename) and the journal entry leaves an unknown file there.
    for name, path in intake.unknown_claims(known):
        accept(store.add(name, Path(path)))

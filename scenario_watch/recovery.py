"""Recovery after a restart: finish filings, resume every prompt where the journal left it, run owed hooks.

The order matters: temp files of interrupted writes go first, then prompts that finished but were not
filed, then the unfinished ones by state (a lost generate answer is reconciled before anything is
resent), then claims the journal never heard of (a crash between the rename and the record).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from . import logs
from .config import FolderSettings
from .files import remove_temp_files
from .hooks import HookRunner
from .intake import Intake
from .outbox import Outbox
from .rows import State
from .scheduler import Outcome, Scheduler, Task
from .store import Store

log = logs.get()


def recover(
    *,
    folders: FolderSettings,
    store: Store,
    outbox: Outbox,
    scheduler: Scheduler,
    intake: Intake,
    hooks: HookRunner,
    accept: Callable[[int], None],
    now: float,
) -> None:
    """Resume what a previous run left: finish filings, requeue, re-poll, reconcile, redo, run hooks."""
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
    for claim in intake.unknown_claims(known):
        accept(store.add(claim.name, claim.path, claim.preset))
    # Filed before the crash, hook not run yet (at least once: it may have been running).
    owed = hooks.resume()
    if owed:
        log.info("recover.hooks", count=owed)

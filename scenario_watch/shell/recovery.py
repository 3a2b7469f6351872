"""Recovery after a restart: finish filings, resume every prompt where the journal left it, run owed hooks.

What runs for each prompt is `lifecycle.next_task`, the same table the live path reads. The order
matters: temp files of interrupted writes go first, then the prompts by journal order (a lost
generate answer is reconciled before anything is resent: it goes first in the queue), then claims
the journal never heard of (a crash between the rename and the record).
"""

from __future__ import annotations

import structlog

from scenario_watch import logs
from scenario_watch.files import remove_temp_files
from scenario_watch.finish.finisher import Finisher
from scenario_watch.finish.hooks import HookRunner
from scenario_watch.intake.intake import Intake
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import State, Task, next_task
from scenario_watch.scheduler import Scheduler
from scenario_watch.sections import FolderSettings
from scenario_watch.tally import NO_TALLY, Tally

log = logs.get()


def recover(
    *,
    folders: FolderSettings,
    store: Store,
    finisher: Finisher,
    scheduler: Scheduler,
    intake: Intake,
    hooks: HookRunner,
    now: float,
    tally: Tally = NO_TALLY,
) -> None:
    """Resume what a previous run left: finish filings, requeue, re-poll, reconcile, redo, run hooks."""
    for folder in (folders.outbox, folders.done, folders.failed, folders.state):
        removed = remove_temp_files(folder)
        if removed:
            log.info("recover.temp_removed", folder=str(folder), count=removed)
    known = set()
    for row in store.unfinished():
        known.add(row.claimed)
        task = next_task(row)
        if task is None:
            continue
        logs.bind(file=row.file, job_id=row.job_id)
        log.info("recover.resume", state=str(row.state), task=task.value)
        if task == Task.FILE:
            scheduler.after(row.id, Task.FILE, finisher.file(row), None, now)
        else:
            scheduler.resume(row.id, task, now, first=row.state == State.SUBMITTING)
        structlog.contextvars.clear_contextvars()
    # A crash between the claim (rename) and the journal entry leaves an unknown file there; a preset
    # on the outbox had not linked it back yet either.
    restored = intake.restore_kept(known)
    if restored:
        log.info("recover.kept_restored", count=restored, note="linked back into the outbox as it was")
    for claim in intake.unknown_claims(known):
        scheduler.resume(store.add(claim.name, claim.path, claim.preset), Task.ACCEPT, now)
        tally.prompt_taken(claim.preset)
    # Filed before the crash, hook not run yet (at least once: it may have been running).
    owed = hooks.resume()
    if owed:
        log.info("recover.hooks", count=owed)

"""Wiring: the main loop, the worker pool, recovery after a restart, signals and sd_notify.

One process, a few threads: watchdog's observer thread reports arrivals; a pool of workers runs the
HTTP tasks (submit, poll, download); this loop is the only owner of the scheduler's state. Workers
talk to it through one event queue and return facts (`Outcome`), never times.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from . import backlog, health, logs
from .client import ScenarioClient
from .config import Settings
from .dispatcher import Dispatcher
from .errors import ConfigError
from .events import Arrived, Event, Finished, Wake
from .heartbeat import Heartbeat
from .hooks import HookRunner
from .intake import Claim, Intake
from .notify import Notifier, status_line
from .outbox import Outbox
from .presets import load_presets
from .recovery import recover
from .rows import ACTIVE, State
from .scheduler import Outcome, Scheduler, Step, Task
from .store import Store
from .tracker import Tracker

log = logs.get()

# Workers beyond max_in_flight: downloads and reference uploads run beside the polls of full slots.
SPARE_WORKERS = 4
MAX_WORKERS = 64
# A task that crashed (a bug, not a fault of the API) is tried again this much later.
TASK_CRASH_RETRY = 30.0
# On shutdown, running requests get this long to finish before they are abandoned (safely).
GRACE = 3.0
# A journal that could not be written (its disk full): no new file is claimed until this much later.
JOURNAL_RETRY = 5.0


class Daemon:
    """One process: the observer feeds a queue, workers do HTTP, one loop decides what is due."""

    def __init__(
        self,
        settings: Settings,
        client: ScenarioClient,
        *,
        once: bool = False,
        journal: str = "journal.sqlite3",
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.folders = folders = settings.folders
        self.client = client
        self.once = once
        self.clock = clock
        for folder in (folders.inbox, folders.outbox, folders.done, folders.failed):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the folder {folder}: {exc.strerror}") from exc
        env = dict(os.environ) if env is None else env
        presets = load_presets(settings)  # a bad preset or hook command stops the start (exit 2)
        # SimpleQueue: put() is safe from a signal handler (Queue's lock is not reentrant).
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.store = Store(folders.state / journal)
        self.hooks = HookRunner(
            settings.hooks, self.store, folders.outbox, env, lambda: self.events.put(Wake())
        )
        self.outbox = Outbox(
            folders, client, self.store, move_references=settings.watch.move_references, hook=self.hooks
        )
        self.dispatcher = Dispatcher(settings, client, self.store, self.outbox, presets)
        reconciler = self.dispatcher.reconciler
        self.tracker = Tracker(settings.jobs, client, self.store, self.outbox, reconciler, clock)
        self.scheduler = Scheduler(settings.jobs)
        self.outputs = (folders.outbox, folders.done, folders.failed)
        # Permissions stop the start (exit 2); a full disk only pauses submissions.
        self.scheduler.probed(health.check_at_start([*self.outputs, folders.state]), clock())
        self.heartbeat = Heartbeat(self.store, self.scheduler, self.dispatcher.awaiting_references)
        folders_of = {name: preset.folder for name, preset in presets.items()}
        arrived = lambda path, moved: self.events.put(Arrived(path, moved))  # noqa: E731 (observer thread)
        self.intake = Intake(folders.inbox, folders.state, settings.watch, arrived, folders_of)
        self.notifier = Notifier(env)
        self.tasks: queue.SimpleQueue[tuple[int, Task] | None] = queue.SimpleQueue()
        self.runners: dict[Task, Callable[[int], Outcome]] = {
            Task.SUBMIT: self.dispatcher.submit,
            Task.POLL: self.tracker.poll,
            Task.DOWNLOAD: self.tracker.download,
        }
        self.stopping = threading.Event()
        self.exit_code = 0
        self.workers: list[threading.Thread] = []
        self.unjournaled: list[Claim] = []  # claimed, but the journal could not take them
        self.journal_retry_at = 0.0
        self.closed = False

    # -- lifecycle ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, loop until stopped (or drained with --once), close; the exit code."""
        self.start()
        try:
            while not self.stopping.is_set():
                now = self.clock()
                self.tick(now)
                if self.once and self.idle():
                    break
                self._wait(now)
        finally:
            self.close()
        return self.exit_code

    def start(self) -> None:
        """Start the workers, resume what the journal holds, then watch and scan the inbox."""
        for n in range(min(MAX_WORKERS, self.settings.jobs.max_in_flight + SPARE_WORKERS)):
            worker = threading.Thread(target=self._work, name=f"worker-{n}", daemon=True)
            worker.start()
            self.workers.append(worker)
        self.dispatcher.schemas.load()  # before anything is validated: the model's inputs, live
        recover(
            folders=self.folders,
            store=self.store,
            outbox=self.outbox,
            scheduler=self.scheduler,
            intake=self.intake,
            hooks=self.hooks,
            accept=self._accept,
            now=self.clock(),
        )
        backlog.at_start(
            self.store, self.intake, self.client, self.dispatcher.rules(), once=self.once, wall=time.time()
        )
        self.intake.start(self.clock(), watch=not self.once)
        self.notifier.send("READY=1")
        folders = self.folders
        log.info(
            "daemon.started", inbox=str(folders.inbox), outbox=str(folders.outbox), api=self.client.base_url
        )

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Signal handler: only set flags (the loop logs and acts); a second signal exits at once."""
        if self.stopping.is_set():
            os._exit(0)
        self.stopping.set()
        self.events.put(Wake())

    def close(self, grace: float = GRACE) -> None:
        """Stop intake, give running requests a bounded grace period, then close the journal."""
        if self.closed:
            return
        self.closed = True
        self.notifier.send("STOPPING=1")
        counts = self.store.counts()
        log.info(
            "daemon.stopping",
            tasks_running=len(self.scheduler.busy),
            at_scenario=counts[State.SUBMITTING] + counts[State.SUBMITTED],
            resume_next_start=sum(counts[state] for state in ACTIVE),
        )
        self.stopping.set()
        self.intake.stop()
        for _ in self.workers:
            self.tasks.put(None)
        deadline = time.monotonic() + grace
        for worker in self.workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self.hooks.close(grace=max(0.0, deadline - time.monotonic()))  # unfinished ones: next start
        # A worker still in a request is abandoned: its prompt's state is in the journal, and the
        # next start resumes it (a lost generate answer is reconciled, never resent blindly).
        self.client.close()
        self.store.close()
        log.info("daemon.stopped")

    def idle(self) -> bool:
        """Nothing left to do (for --once), or nothing possible until the credentials are fixed."""
        if self.scheduler.auth_blocked:
            return True
        return self.scheduler.idle() and not self.intake.pending() and not self.hooks.busy()

    # -- the loop -------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One iteration: claim what is ready, start what is due, keep the observer alive."""
        try:
            self._claim(now)
            if not self.stopping.is_set():
                self.intake.tick(now)
                self.dispatcher.schemas.refresh_if_stale()
            if self.scheduler.probe_due(now):
                self.scheduler.probed(health.recheck(self.outputs), now)
            for prompt_id, task in self.scheduler.due(now, submit=not self.stopping.is_set()):
                self._start(prompt_id, task)
            self.heartbeat.tick(now)
            self.notifier.tick(now, self._status() if self.notifier.wants_status() else None)
        except Exception:
            log.exception("daemon.tick_failed")

    def _wait(self, now: float) -> None:
        """Sleep until something is due or an event arrives, then handle every queued event."""
        if self.intake.more:
            timeout = 0.0
        else:
            deadlines = [self.scheduler.next_due(), self.intake.next_due(), self.notifier.next_due()]
            deadlines += [self.heartbeat.next_due(), self.journal_retry_at if self.unjournaled else None]
            cap = now + self.settings.watch.rescan_interval
            timeout = max(0.0, min([cap, *(d for d in deadlines if d is not None)]) - now)
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if isinstance(event, Arrived):
                self.intake.note(event.path, event.moved)
            elif isinstance(event, Finished):
                self._finished(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _claim(self, now: float) -> None:
        """Journal what intake claims; while the journal's disk is full, claim nothing new and retry."""
        if now < self.journal_retry_at:
            return
        pending = self.unjournaled or self.intake.claim_ready(now)
        while pending:
            try:
                prompt_id = self.store.add(*pending[0])
            except sqlite3.OperationalError as exc:  # "database or disk is full": the file stays claimed
                self.unjournaled, self.journal_retry_at = pending, now + JOURNAL_RETRY
                self.intake.more = False  # nothing is claimed meanwhile: no reason to loop at once
                hint = "free space where the journal is; no new file is taken meanwhile, none is lost"
                log.error("journal.write_failed", error=str(exc), claimed=len(pending), hint=hint)
                return
            pending = pending[1:]
            self._accept(prompt_id)
        self.unjournaled = []

    def _start(self, prompt_id: int, task: Task) -> None:
        """Run a due task: local ones here, HTTP ones in a worker."""
        if task == Task.ACCEPT:
            self._accept(prompt_id)
        elif task == Task.REFILE:
            filed = self.outbox.file(self.store.get(prompt_id))
            self.scheduler.done(prompt_id, task, Outcome.ended(filed), self.clock())
        else:
            self.tasks.put((prompt_id, task))

    def _accept(self, prompt_id: int) -> None:
        try:
            outcome = self.dispatcher.accept(prompt_id)
        except sqlite3.OperationalError as exc:  # the journal's disk is full: validate again later
            log.error("journal.write_failed", error=str(exc), prompt_id=prompt_id)
            outcome = Outcome(Step.ACCEPT, delay=JOURNAL_RETRY)
        finally:
            structlog.contextvars.clear_contextvars()
        self.scheduler.done(prompt_id, Task.ACCEPT, outcome, self.clock())

    def _work(self) -> None:
        while (item := self.tasks.get()) is not None:
            prompt_id, task = item
            try:
                outcome = self.runners[task](prompt_id)
            except Exception as exc:  # the catch-all lives at the task boundary: try the same step later
                log.exception("worker.task_failed", prompt_id=prompt_id, task=task.value)
                # A full journal disk (sqlite3.OperationalError) clears sooner than a bug: look again soon.
                delay = JOURNAL_RETRY if isinstance(exc, sqlite3.OperationalError) else TASK_CRASH_RETRY
                outcome = Outcome(Step(task.value), delay=delay)  # each worker task is a step
            finally:
                structlog.contextvars.clear_contextvars()
            self.events.put(Finished(prompt_id, task, outcome))

    def _finished(self, event: Finished) -> None:
        outcome, limit = event.outcome, self.scheduler.limit
        blocked = self.scheduler.done(event.prompt_id, event.task, outcome, self.clock())
        if self.scheduler.limit != limit:
            log.warning("api.parallel_limit", limit=self.scheduler.limit, note="lowered to the plan's limit")
        if blocked:  # submission just stopped for everyone: one clear error, not one per prompt
            hint = "check SCENARIO_API_KEY and SCENARIO_API_SECRET; prompts stay queued"
            log.error("api.auth_failed", reason=outcome.reason, hint=hint)
            if self.once:
                self.exit_code = 2

    def _status(self) -> str:
        counts, scheduler = self.store.counts(), self.scheduler
        return status_line(
            len(scheduler.waiting), len(scheduler.slots), counts[State.DONE], counts[State.FAILED]
        )

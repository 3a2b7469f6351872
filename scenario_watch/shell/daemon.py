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

from scenario_watch import health, logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.clock import SYSTEM, Clock
from scenario_watch.config import Settings
from scenario_watch.deliver.outbox import Outbox
from scenario_watch.deliver.tracker import Tracker
from scenario_watch.dispatch.dispatcher import Dispatcher
from scenario_watch.finish.finisher import Finisher
from scenario_watch.finish.hooks import HookRunner
from scenario_watch.intake import backlog
from scenario_watch.intake.intake import Claim, Intake
from scenario_watch.intake.kept import Kept, keeps
from scenario_watch.journal.journal_schema import journal_problem
from scenario_watch.journal.retention import Retention
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import (
    ACTIVE,
    NEXT,
    Advanced,
    Again,
    Delivered,
    Failed,
    Paused,
    Result,
    State,
    Task,
    next_task,
)
from scenario_watch.prepare import sidecar
from scenario_watch.prepare.presets import check_against, load_presets
from scenario_watch.scheduler import Scheduler
from scenario_watch.shell.events import Arrived, Event, Finished, Wake, WorkerDied
from scenario_watch.shell.heartbeat import Heartbeat
from scenario_watch.shell.notify import Notifier, status_line
from scenario_watch.shell.recovery import recover
from scenario_watch.shell.watching import Watching
from scenario_watch.shell.workers import Workers

log = logs.get()

# The most workers: max_in_flight and these more (downloads and reference uploads run beside the polls
# of full slots), at most MAX_WORKERS; workers.py starts fewer and adds them while tasks wait.
SPARE_WORKERS = 4
MAX_WORKERS = 64
# A task that crashed (a bug, not a fault of the API) is tried again this much later.
TASK_CRASH_RETRY = 30.0
# On shutdown, running requests get this long to finish before they are abandoned (safely).
GRACE = 3.0
# A journal that could not be written (its disk full): no new file is claimed until this much later.
JOURNAL_RETRY = 5.0
HELD_RETRY = 60.0  # a prompt whose claim folder was replaced: a restart is what clears it


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
        clock: Clock = SYSTEM,
    ) -> None:
        """Remember what to build; nothing is read, written or started before `start()`."""
        self.settings = settings
        self.folders = settings.folders
        self.client = client
        self.once = once
        self.journal = journal
        self.env = dict(os.environ) if env is None else env
        self.clock = clock
        # SimpleQueue: put() is safe from a signal handler (Queue's lock is not reentrant).
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.held: set[int] = set()  # prompts held while the claim folders are replaced (said once)
        self.scheduler = Scheduler(settings.jobs)
        self.stopping = threading.Event()
        self.exit_code = 0
        self.workers = Workers(
            self._run,
            lambda prompt_id, task, result: self.events.put(Finished(prompt_id, task, result)),
            lambda thread: self.events.put(WorkerDied(thread)),
            most=min(MAX_WORKERS, settings.jobs.max_in_flight + SPARE_WORKERS),
            crashed=Again(delay=TASK_CRASH_RETRY),
        )
        self.unjournaled: list[Claim] = []  # claimed, but the journal could not take them
        self.journal_retry_at = 0.0
        self.started = False
        self.closed = False

    def _build(self) -> None:
        """Create the folders, open the journal and wire the parts (the I/O of a start)."""
        settings, folders, clock = self.settings, self.folders, self.clock
        health.make_folders([folders.inbox, folders.outbox, folders.done, folders.failed])
        # Names and folders now; the keys once the model's live schema is known (start).
        presets = load_presets(settings, None)
        self.store = store = Store(folders.state / self.journal, clock)
        # Metrics, listener and textfile, when configured; the events are counted into `tally`.
        self.watching = Watching(settings, self.client, presets.keys())
        self.tally = tally = self.watching.tally
        wake = lambda: self.events.put(Wake())  # noqa: E731 (a hook finished: --once may be done)
        self.hooks = HookRunner(settings.hooks, store, folders.outbox, self.env, wake)
        self.finisher = Finisher(
            folders,
            store,
            hook=self.hooks,
            move_references=settings.watch.move_references,
            clock=clock,
            tally=tally,
            companion=lambda row: sidecar.companion(row, folders.inbox, presets),
        )
        outbox = Outbox(folders, self.client, store, clock, settings.outbox, tally, presets)
        self.dispatcher = Dispatcher(
            settings, self.client, store, presets, clock=clock, output_size=outbox.output_size, tally=tally
        )
        reconciler = self.dispatcher.reconciler
        self.tracker = Tracker(settings.jobs, self.client, store, outbox, reconciler, clock, tally)
        self.outputs = (folders.outbox, folders.done, folders.failed)
        # Permissions stop the start (exit 2); a full disk only pauses submissions.
        self.scheduler.probed(health.check_at_start([*self.outputs, folders.state]), clock.monotonic())
        self.heartbeat = Heartbeat(store, self.scheduler, self.dispatcher.awaiting_references, clock.wall)
        self.retention = Retention(store, settings.journal.keep_days, clock, at_once=self.once)
        self.folders_of = folders_of = {name: preset.folder for name, preset in presets.items()}
        arrived = lambda path, moved: self.events.put(Arrived(path, moved))  # noqa: E731 (observer thread)
        on_outbox = {name: folder for name, folder in folders_of.items() if keeps(folder, folders.outbox)}
        kept = Kept(store, on_outbox) if on_outbox else None
        self.intake = Intake(folders.inbox, folders.state, settings.watch, arrived, folders_of, kept)
        self.notifier = Notifier(self.env)
        self.runners: dict[Task, Callable[[int], Result]] = {
            Task.SUBMIT: self.dispatcher.submit,
            Task.POLL: self.tracker.poll,
            Task.DOWNLOAD: self.tracker.download,
        }

    # -- lifecycle ------------------------------------------------------------------------------------

    def run(self, started: Callable[[], None] | None = None) -> int:
        """Start, loop until stopped (or drained with --once), close; the exit code.

        `started` is called once the daemon runs (the CLI prints the page's address then).
        """
        self.start()
        try:
            if started is not None:
                started()
            while not self.stopping.is_set():
                now = self.clock.monotonic()
                self.tick(now)
                if self.once and self.idle():
                    break
                self.pump(max(0.0, self.next_due(now) - now))  # until due, or an event comes
        finally:
            self.close()
        return self.exit_code

    def start(self) -> None:
        """Build, start the workers, resume what the journal holds, then watch and scan the inbox."""
        self._build()
        try:
            schema = self.dispatcher.schemas.load()  # before anything is checked: the model's inputs, live
            # A preset or [defaults] key the model does not take stops the start (exit 2), naming both.
            check_against(self.settings, schema)
            # The listener binds its port here: a taken one stops the start (exit 2).
            self.watching.start(
                store=self.store,
                client=self.client,
                heartbeat=self.heartbeat,
                intake=self.intake,
                budget=self.dispatcher.budget,
                preset_folders=self.folders_of,
                journal=self.journal,
                clock=self.clock,
            )
        except BaseException:
            self.store.close()
            raise
        self.started = True
        self.workers.start()
        recover(
            folders=self.folders,
            store=self.store,
            finisher=self.finisher,
            scheduler=self.scheduler,
            intake=self.intake,
            hooks=self.hooks,
            now=self.clock.monotonic(),
            tally=self.tally,
        )
        rules, wall = self.dispatcher.rules(), self.clock.wall()
        backlog.at_start(self.store, self.intake, self.client, rules, once=self.once, wall=wall)
        self.intake.start(self.clock.monotonic(), watch=not self.once)
        self.notifier.send("READY=1")
        inbox, outbox = str(self.folders.inbox), str(self.folders.outbox)
        log.info("daemon.started", inbox=inbox, outbox=outbox, api=self.client.base_url)
        if self.watching.url is not None:
            log.info("daemon.page", url=f"{self.watching.url}/", note="the live page; /metrics beside it")

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Signal handler: only set flags (the loop logs and acts); a second signal exits at once."""
        if self.stopping.is_set():  # forced: a failure code, so systemd and scripts see it was cut short
            os._exit(128 + signum)
        self.stopping.set()
        self.events.put(Wake())

    def close(self, grace: float = GRACE) -> None:
        """Stop intake, give running requests a bounded grace period, then close the journal."""
        if self.closed or not self.started:
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
        deadline = time.monotonic() + grace  # real time: threads are joined, whatever the clock says
        self.workers.close(deadline)
        self.hooks.close(grace=max(0.0, deadline - time.monotonic()))  # unfinished ones: next start
        self.watching.close(self.clock.monotonic())  # the textfile's last write has the final counts
        # A worker still in a request is abandoned: its prompt's state is in the journal, and the
        # next start resumes it (a lost generate answer is reconciled, never resent blindly).
        self.client.close()
        self.store.close()
        log.info("daemon.stopped")

    def idle(self) -> bool:
        """Nothing left to do (for --once), or nothing possible until the credentials are fixed."""
        if self.scheduler.auth_blocked:
            return True
        busy = self.intake.pending() or self.hooks.busy() or self.retention.busy()
        return self.scheduler.idle() and not busy

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
            self.watching.tick(now)
            self.retention.tick(now)
            self.notifier.tick(now, self._status() if self.notifier.wants_status() else None)
        except Exception:
            log.exception("daemon.tick_failed")

    def next_due(self, now: float) -> float:
        """The next moment the loop has something to do (monotonic), at most a rescan interval away."""
        if self.intake.more:
            return now
        deadlines = [self.scheduler.next_due(), self.intake.next_due(), self.notifier.next_due()]
        deadlines += [self.heartbeat.next_due(), self.journal_retry_at if self.unjournaled else None]
        deadlines += [self.watching.next_due(), self.retention.next_due()]
        return min([now + self.settings.watch.rescan_interval, *(d for d in deadlines if d is not None)])

    def pump(self, timeout: float) -> bool:
        """Handle every queued event, waiting up to `timeout` (real seconds) for the first; any handled."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return False
        while True:
            if isinstance(event, Arrived):
                self.intake.note(event.path, event.moved)
            elif isinstance(event, Finished):
                self._finished(event.prompt_id, event.task, event.result)
            elif isinstance(event, WorkerDied):  # of a BaseException: a new one takes its place
                log.error("worker.died", worker=event.thread.name, note="a new worker takes its place")
                self.workers.replace(event.thread)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return True

    def _claim(self, now: float) -> None:
        """Journal what intake claims; while the journal cannot be written, claim nothing new and retry."""
        if now < self.journal_retry_at:
            return
        pending = self.unjournaled or self.intake.claim_ready(now)
        while pending:
            try:
                prompt_id = self.store.add(*pending[0])
            except sqlite3.OperationalError as exc:  # the file stays claimed, and is journaled later
                self.unjournaled, self.journal_retry_at = pending, now + JOURNAL_RETRY
                self.intake.more = False  # nothing is claimed meanwhile: no reason to loop at once
                hint = f"{journal_problem(exc)}; no new file is taken meanwhile, none is lost"
                log.error("journal.write_failed", error=str(exc), claimed=len(pending), hint=hint)
                return
            self.tally.prompt_taken(pending[0].preset)
            pending = pending[1:]
            self._run_here(prompt_id, Task.ACCEPT)
        self.unjournaled = []

    def _start(self, prompt_id: int, task: Task) -> None:
        """Run a due task: local ones here, HTTP ones in a worker."""
        if task in (Task.ACCEPT, Task.FILE):
            self._run_here(prompt_id, task)
        else:
            self.workers.put(prompt_id, task)

    def _run_here(self, prompt_id: int, task: Task) -> None:
        """Run a main-loop task (accept, or file again) and take its result."""
        self._finished(prompt_id, task, self._run(prompt_id, task))

    def _run(self, prompt_id: int, task: Task) -> Result:
        """Run one task (in whichever thread) and end the prompt if it says so; never raises."""
        try:
            # A claimed file is read and filed only in a claim folder that is no link (intake.py).
            if task in (Task.ACCEPT, Task.FILE) and not self.intake.claim_folders_intact():
                return self._held(prompt_id, task)
            if task == Task.ACCEPT:
                result = self.dispatcher.accept(prompt_id)
            elif task == Task.FILE:
                result = self.finisher.file(self.store.get(prompt_id))
            else:
                result = self.runners[task](prompt_id)
            if isinstance(result, Failed | Delivered):
                if not self.intake.claim_folders_intact():  # the step runs again once it is (a restart)
                    return self._held(prompt_id, task)
                result = self.finisher.finish(prompt_id, result)
        except sqlite3.OperationalError as exc:  # the journal: full, locked, ... clears sooner than a bug
            log.error("journal.write_failed", error=str(exc), hint=journal_problem(exc), task=task.value)
            result = Again(delay=JOURNAL_RETRY)
        except Exception:  # the catch-all lives at the task boundary: the same task again later
            log.exception("worker.task_failed", prompt_id=prompt_id, task=task.value)
            result = Again(delay=TASK_CRASH_RETRY)
        finally:
            structlog.contextvars.clear_contextvars()
        return result

    def _held(self, prompt_id: int, task: Task) -> Result:
        """A step that would read or file a claimed file while the claim folders are replaced: later."""
        if prompt_id not in self.held:  # said once a prompt (workers call this too: a set is enough)
            self.held.add(prompt_id)
            log.warning(
                "prompt.held", prompt_id=prompt_id, task=task.value, note="its claim folder was replaced"
            )
        return Again(delay=HELD_RETRY)

    def _finished(self, prompt_id: int, task: Task, result: Result) -> None:
        """Take a task's result: the lifecycle says what follows, the scheduler when."""
        scheduler = self.scheduler
        limit, blocked, unwritable = scheduler.limit, scheduler.auth_blocked, scheduler.unwritable
        following = None
        if isinstance(result, Advanced):  # the lifecycle's table says what follows the new state
            following = NEXT[result.state] if result.state else next_task(self.store.get(prompt_id))
        scheduler.after(prompt_id, task, result, following, self.clock.monotonic())
        if scheduler.unwritable and not unwritable:  # said once; health.recheck says when it is over
            log.error(
                "output.unwritable", reason=scheduler.unwritable, note="nothing is sent (paid) until then"
            )
        if scheduler.limit != limit:
            log.warning("api.parallel_limit", limit=scheduler.limit, note="lowered to the plan's limit")
        if scheduler.auth_blocked and not blocked:  # one clear error for everyone, not one per prompt
            hint = "check SCENARIO_API_KEY and SCENARIO_API_SECRET; every prompt and job is kept meanwhile"
            reason = result.reason if isinstance(result, Paused) else ""
            log.error("api.auth_failed", reason=reason, hint=hint)
            if self.once:
                self.exit_code = 2
        elif blocked and not scheduler.auth_blocked:
            log.info("api.auth_restored", note="the API accepts the credentials again; submitting resumes")

    def _status(self) -> str:
        counts, scheduler = self.store.counts(), self.scheduler
        return status_line(
            len(scheduler.waiting), len(scheduler.slots), counts[State.DONE], counts[State.FAILED]
        )

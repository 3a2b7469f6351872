"""Wiring: the main loop, the worker threads, recovery after a restart, signals and sd_notify."""

from __future__ import annotations

import hashlib
import heapq
import os
import queue
import random
import re
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from . import logs
from .client import Job, ScenarioClient
from .config import Settings
from .errors import (
    Ambiguous,
    ApiError,
    AuthError,
    ConfigError,
    MissingReference,
    NotFound,
    OutcomeUnknown,
    PromptError,
    RateLimited,
    ScenarioWatchError,
    TransientError,
)
from .outbox import Outbox, move_no_clobber, remove_temp_files
from .prompt import check_reference, load_prompt, read_prompt_bytes
from .store import Row, State, Store
from .watcher import PROCESSING, Arrivals, Watcher, claim

log = logs.get()

MAX_DOWNLOAD_ATTEMPTS = 8
# Reconciling lists jobs created since a little before the POST: clocks of client and API differ.
CLOCK_SKEW = timedelta(minutes=2)
AUTH_RETRY = 300.0
OBSERVER_RESTART_MAX = 60.0
CLAIM_BATCH = 64
REFERENCE_RECHECK = 0.5
EXPECTED_MARGIN = 0.05
REFILE_DELAY = 10.0
SEED_LIMIT = 2147483648


@dataclass(frozen=True)
class Next:
    """What a worker tells the main loop to do next with one prompt."""

    kind: str  # "poll" | "submit" | "download" | "pause" | "auth" | "finished"
    delay: float = 0.0
    reason: str = ""


class Notifier:
    """sd_notify over $NOTIFY_SOCKET in a few lines (no dependency); silent when unset."""

    def __init__(self, env: dict[str, str]) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    def send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc))


def instance_id(state: Path) -> str:
    """This daemon's name among those sharing an inbox, made once and kept in its state folder."""
    path = state / "instance-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = re.sub(r"[^\w.-]", "_", f"{socket.gethostname()}-{secrets.token_hex(3)}")
        path.write_text(name + "\n")
        return name


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
        self.folders = settings.folders
        self.jobs = settings.jobs
        self.client = client
        self.once = once
        self.clock = clock
        for folder in (self.folders.inbox, self.folders.outbox, self.folders.done, self.folders.failed):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the folder {folder}: {exc.strerror}") from exc
        self.store = Store(self.folders.state / journal)
        # Each daemon claims into a folder of its own: daemons sharing an inbox never touch (or, after
        # a restart, adopt) each other's claims.
        self.processing = self.folders.inbox / PROCESSING / instance_id(self.folders.state)
        self.outbox = Outbox(self.folders, client, self.store)
        # SimpleQueue: put() is safe from a signal handler (Queue's lock is not reentrant).
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.tasks: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self.task_kinds: dict[str, Callable[[int], Next]] = {
            "submit": self._submit,
            "poll": self._poll,
            "download": self._download,
        }
        self.watcher = Watcher(self.folders.inbox, settings.watch, self._arrived)
        self.arrivals = Arrivals(settings.watch.settle)
        self.notifier = Notifier(dict(os.environ) if env is None else env)
        self.stopping = threading.Event()
        self.exit_code = 0
        self.waiting: deque[int] = deque()  # claimed, valid, waiting for a slot at Scenario
        self.timers: list[tuple[float, int, str]] = []  # (due, prompt id, task kind)
        self.slots: set[int] = set()  # prompts holding one of max_in_flight
        self.busy: set[int] = set()  # prompts with a task in a worker
        self.intervals: dict[int, float] = {}
        self.started: dict[int, float] = {}  # when each job was submitted (monotonic), for polling
        self.typical: float | None = None  # how long a generation takes, learnt from finished jobs
        self.download_failing_since: dict[int, float] = {}
        self.paused_until = 0.0
        self.auth_blocked = False
        self.next_rescan = 0.0
        self.next_watchdog = 0.0
        self.observer_backoff = 1.0
        self.next_observer_check = 0.0
        self.last_status = ""
        self.more_arrivals = False
        self.awaiting_references: set[int] = set()
        self._upload_locks: dict[str, threading.Lock] = {}
        self._upload_locks_guard = threading.Lock()
        self.workers: list[threading.Thread] = []
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
        count = min(64, self.jobs.max_in_flight + 4)
        for n in range(count):
            worker = threading.Thread(target=self._work, name=f"worker-{n}", daemon=True)
            worker.start()
            self.workers.append(worker)
        self._recover()
        if not self.once:
            self.watcher.start()
        for path in self.watcher.scan():
            self.arrivals.note(path, moved=False)
        self.next_rescan = self.clock() + self.settings.watch.rescan_interval
        self.notifier.send("READY=1")
        log.info(
            "daemon.started",
            inbox=str(self.folders.inbox),
            outbox=str(self.folders.outbox),
            api=self.client.base_url,
            waiting=len(self.arrivals),
        )

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Signal handler: only set flags (the loop logs and acts); a second signal exits at once."""
        if self.stopping.is_set():
            os._exit(0)
        self.stopping.set()
        self.events.put(("wake",))

    def close(self, grace: float = 3.0) -> None:
        """Stop intake, give running requests a bounded grace period, then close the journal."""
        if self.closed:
            return
        self.closed = True
        self.notifier.send("STOPPING=1")
        log.info("daemon.stopping", running=len(self.busy))
        self.stopping.set()
        self.watcher.stop()
        for _ in self.workers:
            self.tasks.put(None)
        deadline = time.monotonic() + grace
        for worker in self.workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        # A worker still in a request is abandoned: its prompt's state is in the journal, and the
        # next start resumes it (a lost generate answer is reconciled, never resent blindly).
        self.client.close()
        self.store.close()
        log.info("daemon.stopped")

    def idle(self) -> bool:
        return not (self.waiting or self.timers or self.busy or len(self.arrivals)) or self.auth_blocked

    # -- the loop -------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One iteration: claim what is ready, start what is due, keep the observer alive."""
        try:
            # Claim in batches, so a backlog of thousands does not delay the first submission.
            batch = self.arrivals.ready(now, limit=CLAIM_BATCH)
            for path in batch:
                try:
                    self._claim(path)
                except Exception:  # one odd file must not hold up the others
                    log.exception("prompt.claim_failed", path=path)
            self.more_arrivals = len(batch) == CLAIM_BATCH
            if now >= self.next_rescan and not self.once:
                self.next_rescan = now + self.settings.watch.rescan_interval
                # Events get lost (queue overflow, network shares, a replaced folder): look for ourselves.
                missed = [path for path in self.watcher.scan() if path not in self.arrivals]
                if missed:
                    log.info("watch.rescan_found", count=len(missed))
                for path in missed:
                    self.arrivals.note(path, moved=False)
            self._check_observer(now)
            self._dispatch(now)
            self._report(now)
        except Exception:
            log.exception("daemon.tick_failed")

    def _wait(self, now: float) -> None:
        deadlines = [now + self.settings.watch.rescan_interval, self.next_rescan]
        if self.timers:
            deadlines.append(self.timers[0][0])
        if self.waiting and now < self.paused_until:
            deadlines.append(self.paused_until)
        settle = self.arrivals.next_check()
        if settle is not None:
            deadlines.append(settle)
        if self.notifier.watchdog_every:
            deadlines.append(self.next_watchdog)
        if not self.once:
            deadlines.append(self.next_observer_check)
        timeout = 0.0 if self.more_arrivals else max(0.0, min(deadlines) - now)
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple[Any, ...]) -> None:
        if item[0] == "arrived":
            self.arrivals.note(item[1], item[2])
        elif item[0] == "result":
            self._on_result(item[1], item[2])
        elif item[0] == "refile":
            heapq.heappush(self.timers, (self.clock() + REFILE_DELAY, item[1], "refile"))

    def _arrived(self, path: str, moved: bool) -> None:
        self.events.put(("arrived", path, moved))

    def _dispatch(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, prompt_id, kind = heapq.heappop(self.timers)
            if kind == "auth":
                self.auth_blocked = False  # try the credentials again
            elif kind == "refile":
                self._file(self.store.get(prompt_id))
            elif kind == "accept":
                row = self.store.get(prompt_id)
                with structlog.contextvars.bound_contextvars(file=row.file):
                    self._accept(prompt_id, row.file, Path(row.claimed))
            elif kind == "submit":
                self.waiting.appendleft(prompt_id)
            else:
                self._start(prompt_id, kind)
        if self.stopping.is_set() or now < self.paused_until or self.auth_blocked:
            return
        while self.waiting and len(self.slots) < self.jobs.max_in_flight:
            prompt_id = self.waiting.popleft()
            self.slots.add(prompt_id)
            self._start(prompt_id, "submit")

    def _start(self, prompt_id: int, kind: str) -> None:
        self.busy.add(prompt_id)
        self.tasks.put((kind, prompt_id))

    def _work(self) -> None:
        while (item := self.tasks.get()) is not None:
            kind, prompt_id = item
            try:
                nxt = self.task_kinds[kind](prompt_id)
            except Exception:  # the catch-all lives at the task boundary: try the same step later
                log.exception("worker.task_failed", prompt_id=prompt_id, task=kind)
                nxt = Next(kind, delay=30.0)
            finally:
                structlog.contextvars.clear_contextvars()
            self.events.put(("result", prompt_id, nxt))

    def _on_result(self, prompt_id: int, nxt: Next) -> None:
        self.busy.discard(prompt_id)
        now = self.clock()
        if nxt.kind != "poll":
            self.slots.discard(prompt_id)  # a retry waits for a free slot again
        if nxt.kind == "pause":
            self.paused_until = max(self.paused_until, now + nxt.delay)
            self.waiting.appendleft(prompt_id)
        elif nxt.kind == "auth":
            if not self.auth_blocked:  # one clear error, not one per prompt
                log.error(
                    "api.auth_failed",
                    reason=nxt.reason,
                    hint="check SCENARIO_API_KEY and SCENARIO_API_SECRET; prompts stay queued",
                )
            self.auth_blocked = True
            self.waiting.appendleft(prompt_id)
            if self.once:
                self.exit_code = 2
            else:
                heapq.heappush(self.timers, (now + AUTH_RETRY, -1, "auth"))
        elif nxt.kind in ("poll", "download", "submit"):
            heapq.heappush(self.timers, (now + nxt.delay, prompt_id, nxt.kind))

    def _check_observer(self, now: float) -> None:
        if self.once or now < self.next_observer_check or self.stopping.is_set():
            return
        self.next_observer_check = now + 5.0
        if self.watcher.alive():
            self.observer_backoff = 1.0
            return
        log.error("watch.observer_died", restart_in=self.observer_backoff)
        try:
            self.watcher.restart()
            self.next_rescan = now  # files that arrived while it was down
        except OSError as exc:
            log.error("watch.restart_failed", error=str(exc))
        self.next_observer_check = now + self.observer_backoff
        self.observer_backoff = min(OBSERVER_RESTART_MAX, self.observer_backoff * 2)

    def _report(self, now: float) -> None:
        if self.notifier.watchdog_every and now >= self.next_watchdog:
            self.notifier.send("WATCHDOG=1")
            self.next_watchdog = now + self.notifier.watchdog_every
        if not self.notifier.address:
            return
        counts = self.store.counts()
        status = (
            f"queued {len(self.waiting)}, in flight {len(self.slots)}, "
            f"done {counts[State.DONE]}, failed {counts[State.FAILED]}"
        )
        if status != self.last_status:
            self.last_status = status
            self.notifier.send(f"STATUS={status}")

    # -- intake ---------------------------------------------------------------------------------------

    def _claim(self, path: str) -> None:
        claimed = claim(path, self.folders.inbox, self.processing)
        if claimed is None:
            return
        name = os.path.relpath(path, self.folders.inbox)  # sub/x.json when watching recursively
        prompt_id = self.store.add(name, claimed)
        structlog.contextvars.bind_contextvars(file=name)
        try:
            log.debug("prompt.claimed")
            self._accept(prompt_id, name, claimed)
        finally:
            structlog.contextvars.unbind_contextvars("file")

    def _accept(self, prompt_id: int, name: str, claimed: Path) -> None:
        """Validate a claimed prompt locally: invalid input never reaches the API."""
        watch = self.settings.watch
        try:
            data = read_prompt_bytes(claimed)
            prompt = load_prompt(
                data,
                file_name=name,
                base_dir=self._prompt_folder(name),
                defaults=self.settings.defaults,
                roots=watch.reference_roots,
            )
        except MissingReference as exc:
            row = self.store.get(prompt_id)
            waited = time.time() - row.claimed_at
            if waited < watch.reference_wait:
                # A prompt may arrive before its image: look again shortly, up to reference_wait.
                if prompt_id not in self.awaiting_references:
                    self.awaiting_references.add(prompt_id)
                    log.info("prompt.awaiting_reference", missing=exc.problems[0], up_to=watch.reference_wait)
                retry = min(REFERENCE_RECHECK, watch.reference_wait - waited)
                heapq.heappush(self.timers, (self.clock() + retry, prompt_id, "accept"))
                return
            self.awaiting_references.discard(prompt_id)
            error = f"{exc} (waited {watch.reference_wait:g} s for it)"
            self._fail(row, "references", error, exc.hint)
            return
        except PromptError as exc:
            self._fail(self.store.get(prompt_id), "validate", f"invalid prompt file: {exc}", exc.hint)
            return
        except OSError as exc:
            self._fail(self.store.get(prompt_id), "validate", f"cannot read the prompt file: {exc.strerror}")
            return
        except Exception as exc:  # whatever a file holds, it must end in failed/, never stop intake
            log.exception("prompt.unexpected_error")
            self._fail(self.store.get(prompt_id), "validate", f"cannot use the prompt file: {exc!r}")
            return
        self.awaiting_references.discard(prompt_id)
        inputs = dict(prompt.inputs)
        # The API picks a random seed when none is given; picking it here instead changes nothing for
        # the image but makes every submission unique: a lost answer is then matched to its own job,
        # never to a twin prompt's, and the manifest records the seed.
        inputs.setdefault("seed", secrets.randbelow(SEED_LIMIT))
        if prompt.references:
            inputs["referenceImages"] = [ref.entry for ref in prompt.references]
        self.store.set_prompt(prompt_id, inputs, prompt.stem)
        self.waiting.append(prompt_id)
        log.info("prompt.queued", prompt_id=prompt_id)

    def _recover(self) -> None:
        """Resume what a previous run left: finish filings, requeue, re-poll, reconcile, redo."""
        for folder in (self.folders.outbox, self.folders.done, self.folders.failed):
            removed = remove_temp_files(folder)
            if removed:
                log.info("recover.temp_removed", folder=str(folder), count=removed)
        known = set()
        for row in self.store.unfiled():
            known.add(row.claimed)
            self._file(row)
        for row in self.store.active():
            known.add(row.claimed)
            structlog.contextvars.bind_contextvars(file=row.file, job_id=row.job_id)
            log.info("recover.resume", state=str(row.state))
            if row.state == State.CLAIMED:
                if row.inputs is None:
                    self._accept(row.id, row.file, Path(row.claimed))
                else:
                    self.waiting.append(row.id)
            elif row.state == State.SUBMITTING:
                self.waiting.appendleft(row.id)  # _submit reconciles before it sends anything
            elif row.state == State.SUBMITTED:
                self.slots.add(row.id)
                heapq.heappush(self.timers, (0.0, row.id, "poll"))
            else:
                heapq.heappush(self.timers, (0.0, row.id, "download"))
            structlog.contextvars.clear_contextvars()
        processing = self.processing
        processing.mkdir(parents=True, exist_ok=True)
        # A crash between the claim (rename) and the journal entry leaves an unknown file here.
        for path in sorted(processing.rglob("*.json")):
            if path.is_file() and str(path) not in known:
                name = str(path.relative_to(processing))
                self._accept(self.store.add(name, path), name, path)

    # -- worker tasks (run in worker threads) ---------------------------------------------------------

    def _bind(self, row: Row) -> None:
        structlog.contextvars.bind_contextvars(file=row.file, job_id=row.job_id)

    def _submit(self, prompt_id: int) -> Next:
        row = self.store.get(prompt_id)
        self._bind(row)
        if row.state not in (State.CLAIMED, State.SUBMITTING):
            return Next("finished")  # a step retried after it had already happened
        if row.state == State.SUBMITTING:
            try:
                job = self._reconcile(row)
            except (TransientError, RateLimited, AuthError) as exc:
                log.warning("job.reconcile_failed", error=str(exc))
                return Next("submit", delay=self._backoff(row.submit_attempts))
            except (ApiError, Ambiguous) as exc:
                hint = (
                    "check Scenario's job list for this prompt before retrying it: it may have been generated"
                )
                self._fail(row, "submit", f"cannot tell whether the lost request created a job: {exc}", hint)
                return Next("finished")
            if job is not None:
                self.store.submitted(row.id, job.job_id, job.cost)
                structlog.contextvars.bind_contextvars(job_id=job.job_id)
                log.info("job.adopted", note="found the job a lost answer had created; not resent")
                return Next("poll", delay=self._interval(row.id))
        try:
            inputs = self._resolve_references(row)
        except PromptError as exc:
            self._fail(row, "references", str(exc), exc.hint)
            return Next("finished")
        except (TransientError, RateLimited) as exc:
            log.warning("reference.upload_failed", error=str(exc))
            return Next("submit", delay=self._backoff(row.submit_attempts + 1))
        except AuthError as exc:
            return Next("auth", reason=f"HTTP {exc.status}: {exc.reason}")
        except ApiError as exc:
            self._fail(
                row, "references", f"uploading a reference failed: {exc.reason}", "check the image file"
            )
            return Next("finished")
        started = (datetime.now(UTC) - CLOCK_SKEW).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.store.submitting(row.id, inputs, started)  # the intent, before the request
        try:
            job, cost = self.client.generate(inputs)
        except RateLimited as exc:
            self.store.back_to_claimed(row.id)
            delay = exc.retry_after if exc.retry_after is not None else self._backoff(row.submit_attempts)
            log.warning("api.rate_limited", reason=exc.reason, pause=round(delay, 2))
            return Next("pause", delay=delay)
        except AuthError as exc:
            self.store.back_to_claimed(row.id)
            return Next("auth", reason=f"HTTP {exc.status}: {exc.reason}")
        except ApiError as exc:  # 400 (and 404: an unknown model_id) will not change by resending
            hint = (
                "fix the prompt file and retry it"
                if exc.status == 400
                else "check [api] model_id and base_url"
            )
            self._fail(row, "submit", f"the API rejected the prompt: {exc.reason}", hint)
            return Next("finished")
        except OutcomeUnknown as exc:
            # The job may exist: keep the SUBMITTING state, so the next attempt reconciles first.
            log.warning("job.outcome_unknown", error=str(exc))
            return Next("submit", delay=self._backoff(row.submit_attempts))
        except TransientError as exc:
            self.store.back_to_claimed(row.id)  # never reached the server: safe to send again
            log.warning("job.submit_failed", error=str(exc))
            return Next("submit", delay=self._backoff(row.submit_attempts))
        self.store.submitted(row.id, job.job_id, cost)
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        log.info("job.submitted", cost=cost)
        return Next("poll", delay=self._interval(row.id))

    def _reconcile(self, row: Row) -> Job | None:
        """Find the job a lost generate answer created: same inputs, created since, not ours already.

        Raises Ambiguous when a candidate job does not echo its input: resending then could pay twice.
        """
        if row.submit_started is None or row.inputs is None:
            return None
        known = self.store.known_job_ids()
        silent = []
        for job in self.client.list_jobs(row.submit_started):
            if job.job_id in known:
                continue
            if not job.input:
                silent.append(job.job_id)
            elif all(job.input.get(key) == value for key, value in row.inputs.items()):
                return job
        if silent:
            raise Ambiguous(f"jobs {', '.join(silent[:5])} do not show their input")
        log.info("job.reconciled", found=False, note="no job was created; sending again")
        return None

    def _resolve_references(self, row: Row) -> dict[str, Any]:
        """The inputs to send: local reference files uploaded once per content (sha256)."""
        inputs = dict(row.inputs or {})
        entries = inputs.get("referenceImages")
        if not entries:
            return inputs
        resolved: list[str] = []
        records: list[dict[str, Any]] = []
        for entry in entries:
            ref = check_reference(entry, self._prompt_folder(row.file), self.settings.watch.reference_roots)
            if ref.asset_id is not None:
                resolved.append(ref.asset_id)
                records.append({"assetId": ref.asset_id})
                continue
            assert ref.path is not None and ref.mime_type is not None
            data = ref.path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            with self._upload_lock(digest):  # ten prompts editing one photo upload it once
                asset_id = self.store.uploaded_asset(digest)
                if asset_id is None:
                    asset_id = self.client.upload_image(data, ref.path.name, ref.mime_type)
                    self.store.remember_upload(digest, asset_id)
                    log.info("reference.uploaded", reference=entry, asset_id=asset_id, size=len(data))
            resolved.append(asset_id)
            records.append({"file": entry, "sha256": digest, "size": len(data), "assetId": asset_id})
        inputs["referenceImages"] = resolved
        if not row.references:  # a resend sees asset ids only: keep the first, fuller record
            self.store.set_references(row.id, records)
        return inputs

    def _prompt_folder(self, file: str) -> Path:
        """The inbox folder a prompt arrived in (`file` is relative to the inbox): references are too."""
        return self.folders.inbox / Path(file).parent

    def _upload_lock(self, digest: str) -> threading.Lock:
        with self._upload_locks_guard:
            return self._upload_locks.setdefault(digest, threading.Lock())

    def _release_references(self, row: Row) -> None:
        """With [watch] move_references, move reference files to done/ with the last prompt using them."""
        if not self.settings.watch.move_references:
            return
        in_use = {e for other in self.store.active() for e in (other.inputs or {}).get("referenceImages", [])}
        folder = self._prompt_folder(row.file)
        for ref in row.references:
            entry = ref.get("file")
            path = folder / entry if entry else None
            if path is None or entry in in_use or path.parent != folder or not path.is_file():
                continue  # still needed, already moved, or outside the inbox (a reference root)
            dest = move_no_clobber(path, self.folders.done, path.name)
            log.info("reference.moved", reference=entry, to=str(dest))

    def _poll(self, prompt_id: int) -> Next:
        row = self.store.get(prompt_id)
        self._bind(row)
        if row.state != State.SUBMITTED or row.job_id is None:
            return Next("download" if row.state == State.DOWNLOADING else "finished")
        try:
            job = self.client.get_job(row.job_id)
        except NotFound:
            self._fail(
                row,
                "poll",
                f"Scenario does not know job {row.job_id}",
                "the job is gone (the sandbox forgets its jobs when it stops); retry the prompt",
            )
            return Next("finished")
        except (ScenarioWatchError, OSError) as exc:  # transient, 429, 401/403, odd answers: ask again
            if self._timed_out(row, "unknown"):
                return Next("finished")
            log.warning("job.poll_failed", error=str(exc))
            retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
            return Next("poll", delay=max(retry_after or 0.0, self._interval(row.id)))
        self.store.polled(row.id)
        if job.final:
            self._forget(row.id)
        if job.status == "success":
            if job.duration is not None:  # learn how long generations take (moving average)
                self.typical = (
                    job.duration if self.typical is None else 0.7 * self.typical + 0.3 * job.duration
                )
            cost = row.cost if row.cost is not None else job.cost
            self.store.downloading(row.id, list(job.asset_ids), cost)
            log.info("job.succeeded", assets=len(job.asset_ids))
            return Next("download")  # frees the slot at Scenario now; the download is a task of its own
        if job.final:
            error = job.error or f"the job ended with status {job.status}"
            self._fail(row, "generation", f"generation {job.status}: {error}", job.hint)
            return Next("finished")
        if self._timed_out(row, job.status):
            return Next("finished")
        log.debug("job.status", status=job.status, progress=job.progress)
        return Next("poll", delay=self._interval(row.id))

    def _timed_out(self, row: Row, status: str) -> bool:
        """Give up on a job older than [jobs] timeout (failed/, stage timeout); True if it was."""
        if row.submitted_at is None or time.time() - row.submitted_at <= self.jobs.timeout:
            return False
        self._fail(
            row,
            "timeout",
            f"the job did not finish within {self.jobs.timeout:g} s (last status {status})",
            f"raise [jobs] timeout if generations are slow today; job {row.job_id} may still finish at "
            "Scenario (check it there before retrying: a retry generates and pays again)",
        )
        return True

    def _download(self, prompt_id: int) -> Next:
        row = self.store.get(prompt_id)
        self._bind(row)
        if row.state != State.DOWNLOADING or row.job_id is None:
            return Next("finished")
        job = Job(job_id=row.job_id, status="success", asset_ids=tuple(row.asset_ids), cost=row.cost)
        try:
            outputs = self.outbox.deliver(row, job)
        except AuthError as exc:  # not the download's fault: wait for the credentials to be fixed
            log.error("output.auth_failed", error=str(exc))
            return Next("download", delay=self._backoff(6))
        except (TransientError, ApiError) as exc:
            attempts = self.store.download_failed(row.id)
            now = self.clock()
            failing_for = now - self.download_failing_since.setdefault(row.id, now)
            # The job is paid for: give up only after many attempts spread over [jobs] timeout.
            if attempts >= MAX_DOWNLOAD_ATTEMPTS and failing_for >= self.jobs.timeout:
                self._fail(
                    row,
                    "download",
                    f"downloading the outputs failed {attempts} times: {exc}",
                    f"job {row.job_id} succeeded (and was paid for): fetch its assets "
                    f"{', '.join(row.asset_ids)} from Scenario; a retry would generate and pay again",
                )
                return Next("finished")
            log.warning("output.download_failed", error=str(exc), attempt=attempts)
            return Next("download", delay=self._backoff(attempts))
        except OSError as exc:
            # A full disk or an unwritable outbox: nothing is dropped, the prompt waits and retries.
            log.error(
                "output.write_failed", error=str(exc), hint="free disk space or fix the outbox permissions"
            )
            return Next("download", delay=min(30.0, 2 * self.jobs.poll_max_interval))
        self.store.done(row.id, outputs)
        self._forget(row.id)
        done = self.store.get(row.id)
        self._file(done)
        self._release_references(done)
        log.info("prompt.done", outputs=outputs)
        return Next("finished")

    # -- endings --------------------------------------------------------------------------------------

    def _forget(self, prompt_id: int) -> None:
        """Drop what the daemon keeps in memory about a prompt whose job is over."""
        self.intervals.pop(prompt_id, None)
        self.started.pop(prompt_id, None)
        self.download_failing_since.pop(prompt_id, None)

    def _fail(self, row: Row, stage: str, error: str, hint: str | None = None) -> None:
        self._forget(row.id)
        self.store.failed(row.id, stage, error, hint)
        log.warning("prompt.failed", stage=stage, error=error, hint=hint)
        self._file(self.store.get(row.id))

    def _file(self, row: Row) -> None:
        """Move a finished prompt to done/ or failed/ (with its error file) and record where."""
        claimed = Path(row.claimed)
        if not claimed.exists():
            self.store.filed(row.id, claimed)
            return
        try:
            if row.state == State.DONE:
                dest = self.outbox.file_done(row)
            else:
                dest = self.outbox.file_failed(row, row.stage or "?", row.error or "failed", row.hint)
        except OSError as exc:  # try again later: the prompt stays in .processing meanwhile
            log.error("prompt.filing_failed", error=str(exc))
            self.events.put(("refile", row.id))
            return
        self.store.filed(row.id, dest)

    # -- timing ---------------------------------------------------------------------------------------

    def _interval(self, prompt_id: int) -> float:
        """The delay before the next poll of a job.

        It starts at poll_interval and grows x1.5 towards poll_max_interval (jittered), which bounds
        the request rate. Once finished jobs have shown how long a generation takes, a job younger
        than that is polled when it should be done instead: fewer polls, and results seen sooner.
        """
        now = self.clock()
        started = self.started.setdefault(prompt_id, now)
        current = self.intervals.get(prompt_id, self.jobs.poll_interval)
        typical = self.typical
        if typical is not None and (due := started + typical + EXPECTED_MARGIN - now) > 0:
            return min(due, self.jobs.poll_max_interval)
        self.intervals[prompt_id] = min(self.jobs.poll_max_interval, current * 1.5)
        return current * random.uniform(0.9, 1.1)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter after transient faults: poll_interval x 2^n, at most 60 s."""
        return random.uniform(0.5, 1.0) * min(60.0, self.jobs.poll_interval * 2.0 ** min(attempt, 10))

"""The tracker: poll a job at Scenario, give up on one that runs too long, download what it made.

A job that succeeded is paid for: its download is retried for a long time (it is never resubmitted),
a prompt whose outputs cannot be written yet (a full disk) waits, and a refusal of the credentials
pauses (the job is kept, whatever `[jobs] timeout` says). Only an answer of Scenario ends a job here:
a timeout counts while the API says the job still runs, never while it cannot be asked.
"""

from __future__ import annotations

import threading

from scenario_watch import health, logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import Job
from scenario_watch.clock import SYSTEM, Clock
from scenario_watch.config import JobSettings
from scenario_watch.deliver.outbox import Outbox
from scenario_watch.dispatch.reconcile import Reconciler
from scenario_watch.errors import (
    ApiError,
    AuthError,
    NotFound,
    RateLimited,
    ScenarioWatchError,
    TransientError,
)
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import Advanced, Again, Delivered, Failed, Pause, Paused, Result, State
from scenario_watch.tally import NO_TALLY, Tally, retry_reason

log = logs.get()

# A paid job's download gives up only after this many attempts spread over at least [jobs] timeout.
MAX_DOWNLOAD_ATTEMPTS = 8
RETRY_ASKS = (
    "`scenario-watch retry` asks Scenario about the job first and delivers it if it succeeded (no new cost)"
)


class Tracker:
    """Poll and download tasks; it remembers since when each prompt's downloads have been failing."""

    def __init__(
        self,
        jobs: JobSettings,
        client: ScenarioClient,
        store: Store,
        outbox: Outbox,
        reconciler: Reconciler,
        clock: Clock = SYSTEM,
        tally: Tally = NO_TALLY,
    ) -> None:
        self.jobs = jobs
        self.tally = tally
        self.client = client
        self.store = store
        self.outbox = outbox
        self.reconciler = reconciler
        self.clock = clock
        self._failing_since: dict[int, float] = {}  # prompt id → first failed download (monotonic)
        self._unanswered: set[int] = set()  # prompts whose polls are asked again (said once each)
        self._lock = threading.Lock()  # workers share the dict and the set

    def poll(self, prompt_id: int) -> Result:
        """Ask Scenario how the job is doing; on success, the download is next (the slot frees)."""
        result = self._poll(prompt_id)
        if isinstance(result, Advanced | Failed):  # past polling: no more to say of unanswered polls
            with self._lock:
                self._unanswered.discard(prompt_id)
        return result

    def _poll(self, prompt_id: int) -> Result:
        row = self.store.get(prompt_id)
        logs.bind(file=row.file, job_id=row.job_id)
        if row.state != State.SUBMITTED or row.job_id is None:
            return Advanced()  # a step retried after it had already happened: the state says what's next
        try:
            job = self.client.get_job(row.job_id)
        except NotFound as exc:  # Scenario's own answer named the job: a 404 may pass
            hint = f"another account's credentials, or a sandbox without its state file? {RETRY_ASKS}"
            error = f"Scenario did not know job {row.job_id}"
            return self._ask_again(row, "job.poll_not_found", "not_found", error, hint, exc)
        except AuthError as exc:  # the job runs on (and is paid): wait for the credentials, keep it
            return Paused(Pause.CREDENTIALS, f"HTTP {exc.status}: {exc.reason}")
        except (ScenarioWatchError, OSError) as exc:  # transient, 429, odd answers: ask again
            log.warning("job.poll_failed", error=str(exc))
            self.tally.retry(retry_reason(exc))
            retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
            return Again(attempt=1, retry_after=retry_after)
        if job.status == "success" and not job.asset_ids:  # paid, and no outputs named: never done empty
            error = f"Scenario said job {row.job_id} succeeded but named no outputs"
            return self._ask_again(row, "job.success_without_outputs", "no_outputs", error, RETRY_ASKS)
        if job.status == "success":
            self._note_orphans(row)
            cost = row.cost if row.cost is not None else job.cost
            self.store.downloading(row.id, list(job.asset_ids), cost)
            log.info("job.succeeded", assets=len(job.asset_ids))
            return Advanced(State.DOWNLOADING, duration=job.duration)
        if job.final:
            error = f"generation {job.status}: {job.error or f'the job ended with status {job.status}'}"
            return Failed("generation", error, job.hint)
        if self._expired(row):
            error = f"the job did not finish within {self.jobs.timeout:g} s (last status {job.status})"
            hint = (
                f"raise [jobs] timeout if generations are slow today; the job may still finish: {RETRY_ASKS}"
            )
            return Failed("timeout", error, hint)
        self.store.polled(row.id, job.progress)  # for `status`, which shows it while the job runs
        log.debug("job.status", status=job.status, progress=job.progress)
        return Again()

    def _ask_again(
        self, row: Row, event: str, reason: str, error: str, hint: str, exc: Exception | None = None
    ) -> Result:
        """An answer that names the paid job but not how it ended: asked again until [jobs] timeout
        (said once), then failed at stage poll with the job's id (`retry` asks Scenario first)."""
        self.tally.retry(reason)
        if not self._expired(row):
            with self._lock:
                first = row.id not in self._unanswered
                self._unanswered.add(row.id)
            if first:
                note = f"asked again up to {self.jobs.timeout:g} s"
                log.warning(event, **({"error": str(exc)} if exc else {}), note=note)
            return Again(attempt=1)
        return Failed("poll", f"{error} for {self.jobs.timeout:g} s", hint)

    def _note_orphans(self, row: Row) -> None:
        """After a resend, the lost attempt may have made a job after all: say so (it was paid for)."""
        if row.lost_since is None:
            return
        try:
            orphans = self.reconciler.orphans(row)
        except (ScenarioWatchError, OSError) as exc:
            log.warning("job.orphan_check_failed", error=str(exc))
            return
        for orphan in orphans:
            log.warning(
                "job.orphan",
                orphan_job_id=orphan.job_id,
                cost=orphan.cost,
                note="a lost request made this job after all; the prompt was resent, so it was paid twice",
            )

    def _expired(self, row: Row) -> bool:
        """The job is older than [jobs] timeout (wall clock: the journal's times survive a restart)."""
        return row.submitted_at is not None and self.clock.wall() - row.submitted_at > self.jobs.timeout

    def download(self, prompt_id: int) -> Result:
        """Deliver the job's outputs and manifest into the outbox."""
        row = self.store.get(prompt_id)
        logs.bind(file=row.file, job_id=row.job_id)
        if row.state != State.DOWNLOADING or row.job_id is None:
            return Advanced()
        job = Job(job_id=row.job_id, status="success", asset_ids=tuple(row.asset_ids), cost=row.cost)
        try:
            outputs = self.outbox.deliver(row, job)
        except AuthError as exc:  # not the download's fault: wait for the credentials to be fixed
            return Paused(Pause.CREDENTIALS, f"HTTP {exc.status}: {exc.reason}")
        except (TransientError, ApiError) as exc:
            return self._download_failed(row, exc)
        except OSError as exc:
            # A full disk or an unwritable outbox: nothing is dropped, the prompt waits and retries,
            # and no new prompt is sent (paid) until the outbox can be written again.
            hint = "free disk space or fix the outbox permissions; submitting waits until then"
            log.error("output.write_failed", error=str(exc), hint=hint)
            return Paused(Pause.UNWRITABLE, health.unwritable(self.outbox.folders.outbox, exc))
        with self._lock:
            self._failing_since.pop(row.id, None)
        return Delivered(outputs)

    def _download_failed(self, row: Row, exc: ScenarioWatchError) -> Result:
        attempts = self.store.download_failed(row.id)
        now = self.clock.monotonic()
        with self._lock:
            failing_for = now - self._failing_since.setdefault(row.id, now)
        # The job is paid for: give up only after many attempts spread over [jobs] timeout.
        if attempts < MAX_DOWNLOAD_ATTEMPTS or failing_for < self.jobs.timeout:
            log.warning("output.download_failed", error=str(exc), attempt=attempts)
            self.tally.retry("download")
            return Again(attempt=attempts)
        with self._lock:
            self._failing_since.pop(row.id, None)
        error = f"downloading the outputs failed {attempts} times: {exc}"
        hint = (
            f"job {row.job_id} succeeded (and was paid for): fetch its assets "
            f"{', '.join(row.asset_ids)} from Scenario, or `scenario-watch retry` it: that downloads again, "
            "without paying again"
        )
        return Failed("download", error, hint)

"""The dispatcher: accept a claimed prompt, check that its result can be delivered, submit it.

A generate POST costs money and has no idempotency key, so the order here is the crash-safety
contract: the intent is journaled (SUBMITTING) before the request; an answer that may have been
lost is reconciled (list the jobs created since, match the input) before anything is sent again;
and nothing is sent while its outputs could not be written. Each method is one task and returns a
result of lifecycle.py; it never files a prompt itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import Any

from scenario_watch import health, logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import format_cost
from scenario_watch.clock import SYSTEM, Clock
from scenario_watch.config import Settings
from scenario_watch.dispatch.budget import Budget
from scenario_watch.dispatch.reconcile import Reconciler
from scenario_watch.dispatch.references import References
from scenario_watch.errors import (
    ApiError,
    AuthError,
    MissingReference,
    NotFound,
    OutcomeUnknown,
    PlanError,
    PromptError,
    RateLimited,
    ScenarioWatchError,
    TransientError,
)
from scenario_watch.files import digest as file_digest
from scenario_watch.intake.names import is_json_name
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import Advanced, Again, Failed, Pause, Paused, Result, State
from scenario_watch.prepare.preparation import find_preset, prepare, prompt_folder
from scenario_watch.prepare.presets import Preset
from scenario_watch.prepare.prompt import PromptRules, rules_from_settings
from scenario_watch.prepare.reference import Reference
from scenario_watch.prepare.schema import unknown_input
from scenario_watch.prepare.schema_source import SchemaSource
from scenario_watch.prepare.sidecar import TextPending
from scenario_watch.tally import NO_TALLY, Tally, retry_reason

log = logs.get()

# Reconciling lists jobs created since a little before the POST: clocks of client and API differ.
CLOCK_SKEW = timedelta(minutes=2)
# A prompt whose reference is not there yet is validated again this often (up to reference_wait).
REFERENCE_RECHECK = 0.5


class Dispatcher:
    """Turns claimed prompt files into jobs at Scenario; each method is one task."""

    def __init__(
        self,
        settings: Settings,
        client: ScenarioClient,
        store: Store,
        presets: Mapping[str, Preset] | None = None,
        budget: Budget | None = None,
        clock: Clock = SYSTEM,
        output_size: Callable[[], int | None] = lambda: None,
        tally: Tally = NO_TALLY,
    ) -> None:
        self.settings = settings
        self.tally = tally
        api = settings.api
        self.clock = clock
        self.schemas = SchemaSource(client, store, api.schema_refresh)
        self.reconciler = Reconciler(
            client, store, lambda: self.schemas.current, api.lost_answer_wait, clock.wall
        )
        self.presets = presets or {}
        self.client = client
        self.store = store
        self.inbox = settings.folders.inbox
        folders = settings.folders
        self.outputs = (folders.outbox, folders.done, folders.failed)
        self.output_size = output_size  # the largest recent output (the outbox learns it), or None
        roots = settings.watch.reference_roots
        self.references = References(client, store, self.inbox, roots, self.presets, settings.images)
        self.budget = budget or Budget(settings.budget, store.spent_since, clock.wall, meta=store)
        for row in store.lost_answers():  # after a restart: their jobs may exist, costs unknown yet
            self.budget.hold(row.id, row.inputs or {})
        # Prompts waiting for a reference file, and its name (for status; main thread only).
        self.awaiting_references: dict[int, str] = {}

    # -- accept (main thread) --------------------------------------------------------------------------

    def accept(self, prompt_id: int) -> Result:
        """Check a claimed prompt locally: invalid input never reaches the API."""
        row = self.store.get(prompt_id)
        logs.bind(file=row.file)
        watch = self.settings.watch
        waited = self.clock.wall() - row.claimed_at
        try:
            prompt = prepare(
                Path(row.claimed),
                find_preset(self.presets, row.preset),
                name=row.file,
                base_dir=prompt_folder(row, self.inbox, self.presets),
                rules=self.rules(),
                wait_text=waited < watch.settle,  # a preset image's .txt may follow it that long
            )
            digest = file_digest(row.claimed)[1]
        except TextPending:
            return Again(delay=min(REFERENCE_RECHECK, max(0.0, watch.settle - waited)))
        except MissingReference as exc:
            if waited < watch.reference_wait:
                # A prompt may arrive before its image: look again shortly, up to reference_wait.
                if prompt_id not in self.awaiting_references:
                    log.info("prompt.awaiting_reference", missing=exc.problems[0], up_to=watch.reference_wait)
                self.awaiting_references[prompt_id] = exc.problems[0].removeprefix("referenceImages: ")
                return Again(delay=min(REFERENCE_RECHECK, watch.reference_wait - waited))
            self.awaiting_references.pop(prompt_id, None)
            return Failed("references", f"{exc} (waited {watch.reference_wait:g} s for it)", exc.hint)
        except PromptError as exc:
            self.awaiting_references.pop(prompt_id, None)
            return Failed("validate", f"invalid prompt file: {exc}", exc.hint)
        except OSError as exc:
            self.awaiting_references.pop(prompt_id, None)
            return Failed("validate", f"cannot read the prompt file: {exc.strerror}")
        except Exception as exc:  # whatever a file holds, it must end in failed/, never stop intake
            self.awaiting_references.pop(prompt_id, None)
            log.exception("prompt.unexpected_error")
            return Failed("validate", f"cannot use the prompt file: {exc!r}")
        unsettled = _unsettled(prompt.references, Path(row.claimed), self.clock.wall(), watch.settle)
        if unsettled is not None and waited < watch.reference_wait:  # a reference written in place:
            self.awaiting_references[prompt_id] = f"{unsettled[0]} to be written whole"  # (status)
            return Again(delay=min(REFERENCE_RECHECK, unsettled[1]))  # uploaded once it is complete
        self.awaiting_references.pop(prompt_id, None)  # (status: it no longer waits for a reference)
        if unsettled is not None:
            error = (
                f"referenceImages: {unsettled[0]!r} was still being written {watch.reference_wait:g} s later"
            )
            return Failed("references", error, "write it elsewhere and move it in, then retry the prompt")
        inputs = dict(prompt.inputs)
        if prompt.references:  # journaled as written (they survive a restart); what they are is kept
            inputs["referenceImages"] = [ref.entry for ref in prompt.references]
        self.store.queued(prompt_id, inputs, prompt.stem, digest)
        self.references.accepted(prompt_id, prompt.references)
        log.info("prompt.queued", prompt_id=prompt_id)
        return Advanced(State.QUEUED)

    def rules(self) -> PromptRules:
        """What prompts are checked against now: the model's current schema, [defaults], reference roots."""
        return rules_from_settings(self.settings, self.schemas.current)

    # -- submit (worker) -------------------------------------------------------------------------------

    def submit(self, prompt_id: int) -> Result:
        """Send a queued prompt: reconcile a lost answer first, check delivery, upload references, POST."""
        result = self._submit(prompt_id)
        if not isinstance(result, Again | Paused):  # sent, adopted or failed: accept's findings are spent
            self.references.forget(prompt_id)
        return result

    def _submit(self, prompt_id: int) -> Result:
        row = self.store.get(prompt_id)
        logs.bind(file=row.file, job_id=row.job_id)
        if row.state not in (State.QUEUED, State.SUBMITTING):
            return Advanced()  # a step retried after it had already happened: the state says what's next
        if row.state == State.SUBMITTING:
            # A lost answer: its job may exist, its cost unknown. It stays reserved while reconciling.
            self.budget.hold(row.id, row.inputs or {})
            found = self._find_lost_job(row)
            if found is not None:
                if not isinstance(found, Again | Paused):  # found (cost journaled), or failed
                    self.budget.release(row.id)
                return found
            self.budget.release(row.id)  # certainly no job: admitted anew below, like any other
        elif row.file_sha256 and (job_id := adoption(row.file, self.store.adoption_notes(row.file_sha256))):
            adopted = self._adopt_retried(row, job_id)
            if adopted is not None:
                return adopted
        need = health.output_bytes(row.inputs or {}, self.output_size())
        problem = health.deliverable(self.outputs, need)
        if problem is not None:  # a job is paid when sent: never send what could not be delivered
            return Paused(Pause.UNWRITABLE, problem)
        try:
            inputs = self.references.resolve(row)
        except PromptError as exc:
            return Failed("references", str(exc), exc.hint)
        except (TransientError, ApiError) as exc:
            failed = ("references", "uploading a reference failed", "check the image file")
            return self._api_fault(row, exc, "reference.upload_failed", *failed)
        refused = self._within_budget(row, inputs)
        if refused is not None:
            return refused
        result: Result | None = None
        try:
            result = self._send(row, inputs)
            return result
        finally:  # an answer lost on the way (still SUBMITTING) keeps its reservation until reconciled
            if not (isinstance(result, Again) and self.store.get(row.id).state == State.SUBMITTING):
                self.budget.release(row.id)

    def _adopt_retried(self, row: Row, job_id: str) -> Result | None:
        """A retried prompt whose earlier job may have run on: adopt that job, or pay anew (None)."""
        try:
            job = self.client.get_job(job_id)
        except NotFound:
            job = None
        except (TransientError, ApiError) as exc:
            failed = ("submit", "cannot ask Scenario about the earlier job", "retry it again later")
            return self._api_fault(row, exc, "job.retry_lookup_failed", *failed)
        if job is not None and (job.status == "success" or not job.final):
            self.store.adopt(row.id, job_id, job.cost)
            logs.bind(job_id=job_id)
            log.info(
                "job.adopted", status=job.status, note="the retried prompt's earlier job: not paid again"
            )
            return Advanced(State.SUBMITTED)
        self.store.adopted(job_id)
        status = "unknown to Scenario" if job is None else job.status
        log.info(
            "job.retry_new", earlier_job_id=job_id, status=status, note="the earlier job did not succeed"
        )
        return None

    def _within_budget(self, row: Row, inputs: dict[str, Any]) -> Result | None:
        """None when [budget] lets the prompt go (its estimate is reserved), else what to do instead."""
        try:
            verdict = self.budget.admit(row.id, inputs, self.client.estimate)
        except (TransientError, ApiError) as exc:
            failed = (
                "budget",
                "the API could not estimate the prompt's cost",
                "fix the prompt file and retry it",
            )
            return self._api_fault(row, exc, "budget.estimate_failed", *failed)
        if verdict.allowed:
            return None
        if verdict.too_dear:
            error = (
                f"estimated at {format_cost(verdict.estimate)} creative units, above [budget] "
                f"max_per_prompt = {format_cost(self.budget.max_per_prompt)}"
            )
            hint = "lower numOutputs or resolution, or raise [budget] max_per_prompt, then retry it"
            return Failed("budget", error, hint)
        assert verdict.resumes_at is not None
        # Not sent, not failed: it waits at the head of the queue for the next UTC day.
        return Paused(Pause.BUDGET, "daily budget", delay=max(0.0, verdict.resumes_at - self.budget.wall()))

    def _api_fault(
        self, row: Row, exc: ScenarioWatchError, event: str, stage: str, error: str, hint: str
    ) -> Result:
        """A call made for a submission failed: try later, wait for the credentials, or fail the prompt."""
        if isinstance(exc, TransientError | RateLimited):
            log.warning(event, error=str(exc))
            self.tally.retry(retry_reason(exc))
            return Again(attempt=row.submit_attempts + 1)
        if isinstance(exc, AuthError):
            return Paused(Pause.CREDENTIALS, f"HTTP {exc.status}: {exc.reason}")
        reason = exc.reason if isinstance(exc, ApiError) else str(exc)
        return Failed(stage, f"{error}: {reason}", hint)

    def _find_lost_job(self, row: Row) -> Result | None:
        """A previous POST's answer was lost: adopt its job, wait, or None (certainly none: send again)."""
        try:
            verdict = self.reconciler.find(row)
        except (TransientError, ApiError) as exc:
            hint = "check Scenario's job list for this prompt before retrying it: it may have been generated"
            failed = ("submit", "cannot tell whether the lost request created a job", hint)
            return self._api_fault(row, exc, "job.reconcile_failed", *failed)
        if verdict.job is not None:
            logs.bind(job_id=verdict.job.job_id)
            log.info("job.adopted", note="found the job a lost answer had created; not resent")
            return Advanced(State.SUBMITTED)
        if verdict.wait is not None:
            waited = self.clock.wall() - (row.sent_at or row.claimed_at)
            if waited > self.settings.jobs.timeout:  # ambiguous for that long: a person must look
                hint = "check Scenario's job list: a job named may be this prompt's (it was not resent)"
                error = f"cannot tell whether the lost request created a job: {verdict.reason}"
                return Failed("submit", error, hint)
            log.info("job.reconcile_wait", reason=verdict.reason, again_in=round(verdict.wait, 1))
            return Again(delay=verdict.wait)
        assert row.submit_started is not None
        self.store.resending(row.id, row.submit_started)
        self.tally.retry("lost_answer")
        log.info("job.reconciled", found=False, note=f"{verdict.reason}: no job was created; sending again")
        return None

    def _send(self, row: Row, inputs: dict[str, Any]) -> Result:
        """Journal the intent, POST, and turn the answer (or the error) into a result."""
        schema = self.schemas.current
        unknown = [key for key in inputs if key not in schema.inputs]
        if unknown:  # the schema changed since the prompt was accepted: nothing unlisted is ever sent
            return Failed("validate", unknown_input(schema, unknown[0]), "fix the prompt file and retry it")
        started = datetime.fromtimestamp(self.clock.wall(), UTC) - CLOCK_SKEW
        self.store.submitting(
            row.id, inputs, started.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        attempt = row.submit_attempts + 1
        try:
            with self.reconciler.sending(row.id, inputs):
                job, cost = self.client.generate(inputs)
                answered = self.clock.monotonic()
                self.store.submitted(row.id, job.job_id, cost)  # recorded before a twin may reconcile
        except RateLimited as exc:
            self.store.back_to_queued(row.id)
            log.warning("api.rate_limited", reason=exc.reason, retry_after=exc.retry_after, limit=exc.limit)
            self.tally.retry("rate_limit")
            return Paused(Pause.RATE, exc.reason, retry_after=exc.retry_after, limit=exc.limit)
        except AuthError as exc:
            self.store.back_to_queued(row.id)
            return Paused(Pause.CREDENTIALS, f"HTTP {exc.status}: {exc.reason}")
        except PlanError as exc:  # this model needs another plan: no retry clears it, other prompts go on
            hint = "this model is not available on the account's plan: upgrade it or set [api] model_id"
            return Failed("submit", f"the API refused this model: {exc.reason}", hint)
        except ApiError as exc:  # 400 (and 404: an unknown model_id) will not change by resending
            hint = "fix the prompt file and retry it"
            if exc.status != 400:
                hint = "check [api] model_id and base_url"
            elif any(name in exc.reason for name in (*schema.inputs, *inputs)) or "parameter" in exc.reason:
                self.schemas.refresh()  # the API named an input: the model's schema may have changed
            return Failed("submit", f"the API rejected the prompt: {exc.reason}", hint)
        except OutcomeUnknown as exc:
            # The job may exist: keep the SUBMITTING state, so the next attempt reconciles first.
            if exc.answered:  # the server answered: its work on the request is over, a listing settles it
                self.store.answered(row.id)
            log.warning("job.outcome_unknown", error=str(exc), answered=exc.answered)
            return Again(attempt=attempt)
        except TransientError as exc:
            self.store.back_to_queued(row.id)  # never reached the server: safe to send again
            log.warning("job.submit_failed", error=str(exc))
            self.tally.retry(retry_reason(exc))
            return Again(attempt=attempt)
        self.budget.learn(inputs, cost)  # what this shape really costs: the next estimate
        logs.bind(job_id=job.job_id)
        log.info("job.submitted", cost=cost)
        return Advanced(State.SUBMITTED, at=answered)


def _unsettled(
    references: list[Reference], claimed: Path, now: float, settle: float
) -> tuple[str, float] | None:
    """A local reference file changed less than `settle` seconds ago (written in place: maybe not complete)
    and how long until it has been still that long; None: all are still. Judged by its modification time
    against this clock, so a file server whose clock is off by more than `settle` is not judged right."""
    for ref in references:
        # An asset id, or a preset's own image (the claimed file: intake settled it).
        if ref.path is None or ref.path in (claimed, claimed.parent.resolve() / claimed.name):
            continue
        try:
            age = now - os.stat(ref.path).st_mtime
        except OSError:
            continue  # gone: the upload says so
        if -1.0 < age < settle:  # a time further ahead is a skewed clock, not a writer at work
            return ref.entry, settle - age
    return None


def adoption(file: str, notes: list[tuple[str, str]]) -> str | None:
    """The job a retried file's earlier attempt made, from `retry`'s notes for its content (None: pay
    anew): the note of the same name; or, for a prompt file back under another name (`x-2.json`: the
    name was taken), one from the same folder, whose references and preset are then the same too. Never
    another folder's (a preset's image is that preset's prompt) nor another `.txt`'s (its image)."""
    folder = PurePath(file).parent
    same = [job for noted, job in notes if noted == file]
    renamed = [
        job
        for noted, job in notes
        if PurePath(noted).parent == folder and is_json_name(noted) and is_json_name(file)
    ]
    found = same or renamed
    return found[0] if found else None

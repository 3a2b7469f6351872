"""The dispatcher: accept a claimed prompt, upload its references, submit it, reconcile a lost answer.

A generate POST costs money and has no idempotency key, so the order here is the crash-safety
contract: the intent is journaled (SUBMITTING) before the request; an answer that may have been
lost is reconciled (list the jobs created since, match the input) before anything is sent again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import logs
from .budget import Budget
from .client import ScenarioClient
from .config import Settings
from .errors import (
    ApiError,
    AuthError,
    MissingReference,
    OutcomeUnknown,
    PlanError,
    PromptError,
    RateLimited,
    TransientError,
)
from .files import read_regular
from .jobs import format_cost
from .outbox import Outbox
from .presets import Preset, find_preset, prepare, prompt_folder
from .prompt import MAX_REFERENCE_BYTES, PromptRules, check_reference, rules_from_settings
from .reconcile import Reconciler
from .rows import Row, State
from .scheduler import Outcome, Step
from .schema import unknown_input
from .schema_source import SchemaSource
from .store import Store

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
        outbox: Outbox,
        presets: Mapping[str, Preset] | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.settings = settings
        api = settings.api
        self.schemas = SchemaSource(client, store, api.schema_refresh)
        self.reconciler = Reconciler(client, store, lambda: self.schemas.current, api.lost_answer_wait)
        self.presets = presets or {}
        self.client = client
        self.store = store
        self.outbox = outbox
        self.inbox = settings.folders.inbox
        self.budget = budget or Budget(settings.budget, store.spent_since)
        # Prompts waiting for a reference file, and its name (for status; main thread only).
        self.awaiting_references: dict[int, str] = {}
        self._upload_locks: dict[str, threading.Lock] = {}
        self._upload_locks_guard = threading.Lock()

    # -- accept (main thread) --------------------------------------------------------------------------

    def accept(self, prompt_id: int) -> Outcome:
        """Validate a claimed prompt locally: invalid input never reaches the API."""
        row = self.store.get(prompt_id)
        logs.bind(file=row.file)
        watch = self.settings.watch
        try:
            prompt = prepare(
                Path(row.claimed),
                find_preset(self.presets, row.preset),
                name=row.file,
                base_dir=prompt_folder(row, self.inbox, self.presets),
                rules=self.rules(),
            )
        except MissingReference as exc:
            waited = time.time() - row.claimed_at
            if waited < watch.reference_wait:
                # A prompt may arrive before its image: look again shortly, up to reference_wait.
                if prompt_id not in self.awaiting_references:
                    self.awaiting_references[prompt_id] = exc.problems[0].removeprefix("referenceImages: ")
                    log.info("prompt.awaiting_reference", missing=exc.problems[0], up_to=watch.reference_wait)
                return Outcome(Step.ACCEPT, delay=min(REFERENCE_RECHECK, watch.reference_wait - waited))
            self.awaiting_references.pop(prompt_id, None)
            error = f"{exc} (waited {watch.reference_wait:g} s for it)"
            return Outcome.ended(self.outbox.fail(row, "references", error, exc.hint))
        except PromptError as exc:
            return Outcome.ended(self.outbox.fail(row, "validate", f"invalid prompt file: {exc}", exc.hint))
        except OSError as exc:
            error = f"cannot read the prompt file: {exc.strerror}"
            return Outcome.ended(self.outbox.fail(row, "validate", error))
        except Exception as exc:  # whatever a file holds, it must end in failed/, never stop intake
            log.exception("prompt.unexpected_error")
            error = f"cannot use the prompt file: {exc!r}"
            return Outcome.ended(self.outbox.fail(row, "validate", error))
        self.awaiting_references.pop(prompt_id, None)
        inputs = dict(prompt.inputs)
        if prompt.references:
            inputs["referenceImages"] = [ref.entry for ref in prompt.references]
        self.store.set_prompt(prompt_id, inputs, prompt.stem)
        log.info("prompt.queued", prompt_id=prompt_id)
        return Outcome(Step.SUBMIT)

    def rules(self) -> PromptRules:
        """What prompts are checked against now: the model's current schema, [defaults], reference roots."""
        return rules_from_settings(self.settings, self.schemas.current)

    # -- submit (worker) -------------------------------------------------------------------------------

    def submit(self, prompt_id: int) -> Outcome:
        """Send a queued prompt: reconcile a lost answer first, upload references, record, POST."""
        row = self.store.get(prompt_id)
        logs.bind(file=row.file, job_id=row.job_id)
        if row.state not in (State.CLAIMED, State.SUBMITTING):
            return Outcome(Step.FINISHED)  # a step retried after it had already happened
        if row.state == State.SUBMITTING:
            found = self._find_lost_job(row)
            if found is not None:
                return found
        try:
            inputs = self._resolve_references(row)
        except PromptError as exc:
            return Outcome.ended(self.outbox.fail(row, "references", str(exc), exc.hint))
        except (TransientError, ApiError) as exc:
            failed = ("references", "uploading a reference failed", "check the image file")
            return self._api_fault(row, exc, "reference.upload_failed", *failed)
        refused = self._within_budget(row, inputs)
        if refused is not None:
            return refused
        try:
            return self._send(row, inputs)
        finally:
            self.budget.release(row.id)

    def _within_budget(self, row: Row, inputs: dict[str, Any]) -> Outcome | None:
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
            return Outcome.ended(self.outbox.fail(row, "budget", error, hint))
        assert verdict.resumes_at is not None
        # Not sent, not failed: it waits at the head of the queue for the next UTC day.
        return Outcome(Step.BUDGET, delay=max(0.0, verdict.resumes_at - self.budget.wall()))

    def _api_fault(
        self, row: Row, exc: TransientError | ApiError, event: str, stage: str, error: str, hint: str
    ) -> Outcome:
        """A call made for a submission failed: try later, wait for the credentials, or fail the prompt."""
        if isinstance(exc, TransientError | RateLimited):
            log.warning(event, error=str(exc))
            return Outcome(Step.SUBMIT, attempt=row.submit_attempts + 1)
        if isinstance(exc, AuthError):
            return Outcome(Step.AUTH, reason=f"HTTP {exc.status}: {exc.reason}")
        return Outcome.ended(self.outbox.fail(row, stage, f"{error}: {exc.reason}", hint))

    def _find_lost_job(self, row: Row) -> Outcome | None:
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
            return Outcome(Step.POLL)
        if verdict.wait is not None:
            waited = time.time() - (row.sent_at or row.claimed_at)
            if waited > self.settings.jobs.timeout:  # ambiguous for that long: a person must look
                hint = "check Scenario's job list: a job named may be this prompt's (it was not resent)"
                error = f"cannot tell whether the lost request created a job: {verdict.reason}"
                return Outcome.ended(self.outbox.fail(row, "submit", error, hint))
            log.info("job.reconcile_wait", reason=verdict.reason, again_in=round(verdict.wait, 1))
            return Outcome(Step.SUBMIT, delay=verdict.wait)
        assert row.submit_started is not None
        self.store.resending(row.id, row.submit_started)
        log.info("job.reconciled", found=False, note=f"{verdict.reason}: no job was created; sending again")
        return None

    def _send(self, row: Row, inputs: dict[str, Any]) -> Outcome:
        """Journal the intent, POST, and turn the answer (or the error) into the next step."""
        schema = self.schemas.current
        unknown = [key for key in inputs if key not in schema.inputs]
        if unknown:  # the schema changed since the prompt was accepted: nothing unlisted is ever sent
            error = unknown_input(schema, unknown[0])
            return Outcome.ended(self.outbox.fail(row, "validate", error, "fix the prompt file and retry it"))
        started = (datetime.now(UTC) - CLOCK_SKEW).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.store.submitting(row.id, inputs, started)  # the intent, before the request
        attempt = row.submit_attempts + 1
        try:
            with self.reconciler.sending(row.id, inputs):
                job, cost = self.client.generate(inputs)
                self.store.submitted(row.id, job.job_id, cost)  # recorded before a twin may reconcile
        except RateLimited as exc:
            self.store.back_to_claimed(row.id)
            log.warning("api.rate_limited", reason=exc.reason, retry_after=exc.retry_after, limit=exc.limit)
            return Outcome(Step.RATE_LIMITED, attempt=attempt, retry_after=exc.retry_after, limit=exc.limit)
        except AuthError as exc:
            self.store.back_to_claimed(row.id)
            return Outcome(Step.AUTH, reason=f"HTTP {exc.status}: {exc.reason}")
        except PlanError as exc:  # this model needs another plan: no retry clears it, other prompts go on
            hint = "this model is not available on the account's plan: upgrade it or set [api] model_id"
            error = f"the API refused this model: {exc.reason}"
            return Outcome.ended(self.outbox.fail(row, "submit", error, hint))
        except ApiError as exc:  # 400 (and 404: an unknown model_id) will not change by resending
            hint = "fix the prompt file and retry it"
            if exc.status != 400:
                hint = "check [api] model_id and base_url"
            elif any(name in exc.reason for name in (*schema.inputs, *inputs)) or "parameter" in exc.reason:
                self.schemas.refresh()  # the API named an input: the model's schema may have changed
            error = f"the API rejected the prompt: {exc.reason}"
            return Outcome.ended(self.outbox.fail(row, "submit", error, hint))
        except OutcomeUnknown as exc:
            # The job may exist: keep the SUBMITTING state, so the next attempt reconciles first.
            log.warning("job.outcome_unknown", error=str(exc))
            return Outcome(Step.SUBMIT, attempt=attempt)
        except TransientError as exc:
            self.store.back_to_claimed(row.id)  # never reached the server: safe to send again
            log.warning("job.submit_failed", error=str(exc))
            return Outcome(Step.SUBMIT, attempt=attempt)
        self.budget.learn(inputs, cost)  # what this shape really costs: the next estimate
        logs.bind(job_id=job.job_id)
        log.info("job.submitted", cost=cost)
        return Outcome(Step.POLL)

    # -- references ------------------------------------------------------------------------------------

    def _resolve_references(self, row: Row) -> dict[str, Any]:
        """The inputs to send: local reference files uploaded once per content (sha256)."""
        inputs = dict(row.inputs or {})
        entries = inputs.get("referenceImages")
        if not entries:
            return inputs
        resolved: list[str] = []
        records: list[dict[str, Any]] = []
        for entry in entries:
            folder = prompt_folder(row, self.inbox, self.presets)
            ref = check_reference(entry, folder, self.settings.watch.reference_roots)
            if ref.asset_id is not None:
                resolved.append(ref.asset_id)
                records.append({"assetId": ref.asset_id})
                continue
            assert ref.path is not None and ref.mime_type is not None
            data = read_regular(ref.path, MAX_REFERENCE_BYTES)  # never through a link swapped in since
            if len(data) > MAX_REFERENCE_BYTES:
                raise PromptError([f"referenceImages: {entry!r} grew past {MAX_REFERENCE_BYTES >> 20} MiB"])
            digest = hashlib.sha256(data).hexdigest()
            resolved.append(self._upload_once(digest, data, ref.path.name, ref.mime_type, entry))
            records.append({"file": entry, "sha256": digest, "size": len(data), "assetId": resolved[-1]})
        inputs["referenceImages"] = resolved
        if not row.references:  # a resend sees asset ids only: keep the first, fuller record
            self.store.set_references(row.id, records)
        return inputs

    def _upload_once(self, digest: str, data: bytes, name: str, mime_type: str, entry: str) -> str:
        """The asset id of this content, uploading it only if no earlier prompt did."""
        with self._upload_lock(digest):  # ten prompts editing one photo upload it once
            asset_id = self.store.uploaded_asset(digest)
            if asset_id is None:
                asset_id = self.client.upload_image(data, name, mime_type)
                self.store.remember_upload(digest, asset_id)
                log.info("reference.uploaded", reference=entry, asset_id=asset_id, size=len(data))
        return asset_id

    def _upload_lock(self, digest: str) -> threading.Lock:
        with self._upload_locks_guard:
            return self._upload_locks.setdefault(digest, threading.Lock())

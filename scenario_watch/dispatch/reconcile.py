"""Reconcile a lost generate answer: find the job it made in the team's job list, or decide it made none.

A generate POST whose answer was lost (a timeout, a reset, a 5xx) may or may not have created a
job, and the job listing is the only way to tell. On a team account that listing also holds
teammates' jobs, other models' jobs and upload jobs, and it may echo inputs with numbers as
strings. So a candidate is a custom job of this model, created since the attempt, not owned by the
journal, whose echoed input equals ours once normalised. Identical prompts of ours are matched one
to one (one lock; the adoption is journaled while it is held). And no "nothing was created" verdict
comes before a quiet period after the request was sent: a slow gateway may create the job late,
and resending then pays twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import Job
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.prepare.schema import ModelSchema

log = logs.get()

# Job types a generation of a custom model may carry (the SDK says "custom"; older docs and sandboxes
# said "custom-generation"); a job without a type is judged by its input alone.
GENERATION_TYPES = frozenset({"custom", "custom-generation"})
# While a verdict must wait (quiet period, an identical request in flight), list again this often.
LIST_AGAIN = 5.0
# A lost answer whose server did answer (a 5xx with a body; not a gateway's 504, behind which the
# server may still be at work) made its job already, or none: the quiet period only covers the
# listing's own lag, a listing or two this far apart.
ANSWERED_QUIET = 4.0
ANSWERED_LIST_AGAIN = 2.0


@dataclass(frozen=True)
class Verdict:
    """What the listing says about a lost answer: adopt a job, send again, or look again later."""

    job: Job | None = None  # found (and already journaled as this prompt's job)
    resend: bool = False  # certainly nothing was created: safe to send again
    wait: float | None = None  # too early to tell, or ambiguous: look again after this many seconds
    reason: str = ""


def normalise(value: Any) -> Any:
    """A value as compared across the echo: numeric strings are numbers, 5.0 is 5, lists elementwise."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, int | float):
        return int(value) if float(value).is_integer() else float(value)
    if isinstance(value, list | tuple):
        return [normalise(item) for item in value]
    return value


def same_input(sent: dict[str, Any], echo: dict[str, Any], schema: ModelSchema) -> bool:
    """Whether a job's echoed input is what we sent (key order, number shapes, filled-in defaults aside).

    A key we did not send may be echoed with its default; one without a default (a seed the server
    picked) says nothing. Keys that are not model inputs (an echoed modelId) are ignored.
    """
    for key in (set(sent) | set(echo)) & set(schema.inputs):
        default = schema.inputs[key].default
        if key not in sent and default is None:
            continue
        mine = sent.get(key, default)
        theirs = echo.get(key, default)
        if key == "prompt" and mine != theirs:  # text is compared as text
            return False
        if key != "prompt" and normalise(mine) != normalise(theirs):
            return False
    return True


class Reconciler:
    """Matches lost answers to jobs, one to one, and notes the jobs a resend paid for twice."""

    def __init__(
        self,
        client: ScenarioClient,
        store: Store,
        schema: Callable[[], ModelSchema],
        quiet: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.store = store
        self.schema = schema
        self.quiet = quiet  # seconds after sending before "no job" is believed
        self.clock = clock
        self._lock = threading.Lock()
        self._sending: dict[int, dict[str, Any]] = {}  # prompt id → inputs of a POST in flight now

    @contextmanager
    def sending(self, prompt_id: int, inputs: dict[str, Any]) -> Iterator[None]:
        """Mark a generate POST in flight (its twin's reconcile waits: the job may be this one's)."""
        with self._lock:
            self._sending[prompt_id] = inputs
        try:
            yield
        finally:
            with self._lock:
                self._sending.pop(prompt_id, None)

    def find(self, row: Row) -> Verdict:
        """Look for the job a lost answer created; adopt it (journaled) if it is certainly ours."""
        assert row.submit_started is not None and row.inputs is not None
        schema = self.schema()
        # Listed outside the lock (it may take a while); the lock covers the decision and the record.
        listed = list(self.client.list_jobs(row.submit_started))
        with self._lock:
            if any(same_input(row.inputs, other, schema) for other in self._sending.values()):
                return Verdict(
                    wait=LIST_AGAIN, reason="an identical request is in flight: its job may be listed"
                )
            known = self.store.known_job_ids([job.job_id for job in listed])
            candidates = sorted(
                (
                    job
                    for job in listed
                    if self._candidate(job, known) and same_input(row.inputs, job.input, schema)
                ),
                key=lambda job: job.created_at or "",
            )
            twins = [
                other
                for other in self.store.lost_answers()
                if other.inputs is not None and same_input(row.inputs, other.inputs, schema)
            ]
            if candidates and len(candidates) <= max(1, len(twins)):
                job = candidates[0]
                self.store.submitted(row.id, job.job_id, job.cost)  # while locked: no twin takes it too
                return Verdict(job=job)
            if candidates:
                reason = (
                    f"{len(candidates)} jobs ({', '.join(j.job_id for j in candidates[:5])}) have this input "
                    f"but only {len(twins)} of ours lost an answer: some are a teammate's"
                )
                return Verdict(wait=LIST_AGAIN, reason=reason)
        waited = self.clock() - (row.sent_at or 0.0)
        quiet, again = (self.quiet, LIST_AGAIN)
        if row.answered:
            quiet, again = min(quiet, ANSWERED_QUIET), ANSWERED_LIST_AGAIN
        if waited < quiet:
            reason = "the listing may lag behind" if row.answered else "the server may still be creating it"
            return Verdict(wait=min(again, quiet - waited), reason=reason)
        return Verdict(resend=True, reason=f"no job after {waited:.0f} s")

    def orphans(self, row: Row) -> list[Job]:
        """Jobs a lost answer created after all, though the prompt was sent again (paid twice): noted."""
        if row.lost_since is None or row.inputs is None:
            return []
        schema = self.schema()
        listed = list(self.client.list_jobs(row.lost_since))
        with self._lock:
            known = self.store.known_job_ids([job.job_id for job in listed])
            found = [
                job
                for job in listed
                if self._candidate(job, known) and same_input(row.inputs, job.input, schema)
            ]
            for job in found:
                self.store.add_orphan(job.job_id, row.id, job.cost)
        return found

    def _candidate(self, job: Job, known: set[str]) -> bool:
        """A generation of this model that no prompt of ours owns, with its input echoed."""
        if job.job_id in known or not job.input:
            return False
        if job.job_type is not None and job.job_type not in GENERATION_TYPES:
            return False  # an upload, a training, ...
        return job.model_id is None or job.model_id == self.client.model_id

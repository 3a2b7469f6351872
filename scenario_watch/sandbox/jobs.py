"""Generations and jobs: creating them (plan, validation, parallel limit), their timeline, the listing."""

from __future__ import annotations

import copy
from typing import Any

from scenario_watch.sandbox.account import Account
from scenario_watch.sandbox.models import (
    ASPECT_RATIOS,
    MODEL_ID,
    RESOLUTIONS,
    ApiError,
    estimate,
    validate_inputs,
)
from scenario_watch.sandbox.records import (
    ME,
    OWNER,
    TEAMMATE,
    JobRecord,
    iso,
    make_token,
    ms,
    parse_instant,
    read_token,
)

# The share of the generation time at which a job enters each running status.
TIMELINE = (
    ("pending", 0.0),
    ("queued", 0.05),
    ("warming-up", 0.15),
    ("in-progress", 0.25),
    ("finalizing", 0.85),
)


class Jobs(Account):
    """The job endpoints: generate, one job as it is now, the paginated listing (thread-safe)."""

    def fail_next_jobs(self, n: int, error: str, hint: str, status: str) -> None:
        """The next n generations end in `status` with this error and hint."""
        if status not in ("failure", "canceled"):
            raise ValueError("status must be 'failure' or 'canceled'")
        with self._lock:
            self._failures.extend([(status, error, hint or None)] * n)

    def generate_fate(self) -> tuple[float, bool]:
        """Draw what happens to one real generate: seconds to handle it late (0: on time), answer lost."""
        with self._lock:
            late = self._rngs["late"].random() < self.late_answer_rate
            lost = self._rngs["lost"].random() < self.lost_answer_rate
            return (self.late_answer_delay if late else 0.0), lost

    def generate(self, body: Any, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """Check the plan, validate, price and (unless a dry run) create a job; the HTTP status and answer."""
        with self._lock:
            if self.plan_required is not None:  # the credentials are fine: only this model is off-plan
                raise ApiError(403, self.plan_required)
            validate_inputs(body, self._assets.__contains__, self.seed_input)
            if dry_run:
                return 269, estimate(body, self.cost_per_output)
            running = self._running()
            if running >= self.parallel_limit:
                details = {"actionName": "custom-generation", "actionLimit": self.parallel_limit}
                raise ApiError(429, "Too many parallel jobs", details)
            job = self._new_job("custom", MODEL_ID, ME, body, self.generation_seconds)
            if self._failures:
                job.final_status, job.error, job.hint = self._failures.popleft()
            self._unfinished.add(job.job_id)
            self.generate_jobs.append(job.job_id)
            if self._rngs["noise"].random() < self.team_noise:
                self._team_noise(str(body.get("prompt")))
            return 200, {"job": self._render(job), **estimate(body, self.cost_per_output)}

    def _team_noise(self, our_prompt: str) -> None:
        """A teammate's generation (same model, another prompt) and a teammate's upload."""
        rng = self._rngs["team"]
        n = rng.randrange(1_000_000)
        prompt = f"teammate's idea #{n}"
        theirs = {
            "prompt": prompt if prompt != our_prompt else prompt + " (again)",
            "aspectRatio": rng.choice(ASPECT_RATIOS),
            "resolution": rng.choice(RESOLUTIONS),
            "numOutputs": rng.randint(1, 4),
        }
        self._new_job("custom", MODEL_ID, TEAMMATE, theirs, self.generation_seconds)
        self._upload_job(self._add_asset(None, "image/png", f"teammate upload {n}", TEAMMATE), TEAMMATE)

    def add_foreign_job(
        self, input: dict[str, Any], model_id: str = MODEL_ID, job_type: str = "custom"
    ) -> str:
        """Plant a teammate's job in the listing: a generation with this input, or an upload; its id."""
        if job_type not in ("custom", "upload"):
            raise ValueError("job_type must be 'custom' or 'upload'")
        with self._lock:
            if job_type == "upload":
                asset_id = self._add_asset(None, "image/png", f"foreign upload {self._next_seq}", TEAMMATE)
                return self._upload_job(asset_id, TEAMMATE).job_id
            return self._new_job("custom", model_id, TEAMMATE, input, self.generation_seconds).job_id

    def _running(self) -> int:
        now = self.clock()
        done = {j for j in self._unfinished if now - self._jobs[j].created >= self._jobs[j].duration}
        self._unfinished -= done  # each job leaves the set once, so this stays cheap with many jobs
        return len(self._unfinished)

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: the job as it is now."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, "Job not found")
            return self._render(job)

    def statuses(self) -> dict[str, str]:
        """Every job's current status."""
        with self._lock:
            return {job_id: self._render(job)["status"] for job_id, job in self._jobs.items()}

    def _render(self, job: JobRecord) -> dict[str, Any]:
        """The job as the API shows it now: status, progress and history follow the elapsed time."""
        elapsed, d = self.clock() - job.created, job.duration
        steps = TIMELINE if job.job_type == "custom" else TIMELINE[:1]  # an upload job just runs, then ends
        history = [(status, share * d) for status, share in steps if share * d <= elapsed or share == 0]
        if elapsed >= d:
            history.append((job.final_status, d))
        status = history[-1][0]
        if status == "success":
            progress = 1.0
        elif status == "in-progress":
            progress = round(0.9 * (elapsed - 0.25 * d) / (0.6 * d), 3)
        else:
            progress = 0.95 if status == "finalizing" else 0.0
        if status == "success" and not job.asset_ids and job.input is not None:
            job.asset_ids = [
                self._generated_asset(job, n) for n in range(int(job.input.get("numOutputs", 1)))
            ]
        metadata: dict[str, Any] = {"assetIds": list(job.asset_ids) if status == "success" else []}
        if job.input is not None:
            metadata["input"] = copy.deepcopy(job.input)
        if status in ("failure", "canceled"):
            metadata["error"] = job.error or "Generation failed"
            if job.hint:
                metadata["hint"] = job.hint
        stamps = [ms(job.created + offset) for _, offset in history]
        shown = list(zip(history, stamps, strict=True))
        if not self.terminal_history and elapsed >= d:
            shown = shown[:-1]  # the final status is in `status` only, as some live answers have it
        return {
            "jobId": job.job_id,
            "jobType": job.job_type,
            "status": status,
            "progress": progress,
            "statusHistory": [{"status": s, "date": iso(stamp)} for (s, _), stamp in shown],
            "createdAt": iso(ms(job.created)),
            "updatedAt": iso(stamps[-1]),
            "authorId": job.author,
            "ownerId": OWNER,
            "billing": {"cuCost": job.cost, "cuDiscount": 0},
            "metadata": metadata,
        }

    def list_jobs(
        self, created_after: str | None, page_size: str | None, token: str | None
    ) -> dict[str, Any]:
        """Jobs newest first. Before the last page comes one empty page with a token, as a real API may."""
        after_us = parse_instant(created_after) if created_after else None
        try:
            size = int(page_size) if page_size is not None else 10
        except ValueError:
            size = 0
        if not 1 <= size <= 100:
            raise ApiError(400, "pageSize must be an integer from 1 to 100")
        before, padded = read_token(token) if token else (None, False)
        with self._lock:
            jobs = [
                job
                for job in reversed(self._jobs.values())
                if (after_us is None or ms(job.created) * 1000 > after_us)
                and (before is None or job.seq < before)
            ]
            if before is not None and not padded and len(jobs) <= size:
                return {"jobs": [], "nextPaginationToken": make_token(before, padded=True)}
            page = jobs[:size]
            answer: dict[str, Any] = {"jobs": [self._render(job) for job in page]}
            if len(jobs) > size:
                answer["nextPaginationToken"] = make_token(page[-1].seq, padded=False)
            return answer

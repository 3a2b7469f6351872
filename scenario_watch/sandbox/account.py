"""The simulated account's memory: its records, knobs, lock and change flag, and adding a job or an asset."""

from __future__ import annotations

import copy
import hashlib
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from scenario_watch.sandbox.knobs import KNOBS, check_knobs
from scenario_watch.sandbox.models import cost_of, echoed
from scenario_watch.sandbox.records import AssetRecord, JobRecord, Signer, Snapshot

RNG_STREAMS = ("late", "lost", "noise", "team")


class Account:
    """What the sandbox remembers, under one lock; Jobs, Assets and Uploads add the endpoints."""

    # The knobs (see knobs.py), as plain attributes: read without the lock, set through set_knobs.
    generation_seconds: float
    parallel_limit: int
    url_ttl: float
    seed_input: bool
    cost_per_output: float
    echo_strings: bool
    echo_model_id: bool
    team_noise: float
    plan_required: str | None
    lost_answer_rate: float
    late_answer_rate: float
    late_answer_delay: float
    rng_seed: int
    terminal_history: bool

    def __init__(
        self, knobs: dict[str, Any], snapshot: Snapshot | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock  # wall seconds: a test may share a manual clock with the daemon it drives
        self._lock = threading.RLock()
        self.cdn_url = ""
        self.changed = threading.Event()  # set on every change a state file should keep
        for name, (_, default) in KNOBS.items():
            setattr(self, name, default)
        self._rngs: dict[str, random.Random] = {}
        self.set_knobs({"rng_seed": 0, **knobs})
        self._failures: deque[tuple[str, str, str | None]] = deque()  # (status, error, hint)
        self._images: dict[str, bytes] = {}
        snap = snapshot or Snapshot(secrets.token_bytes(32), 0, [], [], [], [])
        self.signer = Signer(snap.key, clock)
        self._next_seq = snap.next_seq
        self.generate_jobs: list[str] = list(snap.generate_jobs)
        self._jobs = {job.job_id: job for job in sorted(snap.jobs, key=lambda job: job.seq)}
        self._unfinished = set(self.generate_jobs)  # _running() prunes the finished ones
        self._assets = {asset.asset_id: asset for asset in snap.assets}
        self._uploads = {upload.upload_id: upload for upload in snap.uploads}

    def set_knobs(self, values: dict[str, Any]) -> None:
        """Check every value, then apply them all (ValueError names the first bad one)."""
        checked = check_knobs(values)
        with self._lock:
            for name, value in checked.items():
                setattr(self, name, value)
            if "rng_seed" in checked:  # one stream per purpose: turning one knob never shifts another's draws
                self._rngs = {name: random.Random(f"{self.rng_seed}:{name}") for name in RNG_STREAMS}

    def knobs(self) -> dict[str, Any]:
        """The current value of every knob."""
        with self._lock:
            return {name: getattr(self, name) for name in KNOBS}

    def export(self) -> Snapshot:
        """A copy of everything a state file keeps, taken atomically."""
        with self._lock:
            return Snapshot(
                self.signer.key,
                self._next_seq,
                list(self.generate_jobs),
                copy.deepcopy(list(self._jobs.values())),
                copy.deepcopy(list(self._assets.values())),
                copy.deepcopy(list(self._uploads.values())),
            )

    def _touch(self) -> None:
        self.changed.set()

    # -- adding records ---------------------------------------------------------------------------

    def _new_job(
        self,
        job_type: str,
        model_id: str | None,
        author: str,
        body: dict[str, Any] | None,
        duration: float,
        asset_ids: list[str] | None = None,
    ) -> JobRecord:
        """Create and list a job; a generation's input is stored as the API echoes it."""
        stored = None
        if body is not None:
            stored = echoed(body, self.echo_strings)
            if self.echo_model_id:
                stored["modelId"] = model_id
        job = JobRecord(
            job_id="job_" + secrets.token_hex(12),
            seq=self._next_seq,
            job_type=job_type,
            model_id=model_id,
            author=author,
            input=stored,
            created=self.clock(),
            duration=duration,
            cost=cost_of(body, self.cost_per_output) if body is not None else 0,
            asset_ids=asset_ids or [],
        )
        self._next_seq += 1
        self._jobs[job.job_id] = job
        self._touch()
        return job

    def _upload_job(self, asset_id: str, author: str) -> JobRecord:
        return self._new_job("upload", None, author, None, 0.0, [asset_id])

    def _add_asset(self, data: bytes | None, mime: str, seed: str, author: str, name: str = "") -> str:
        """A new uploaded asset: these bytes, or (None) an image drawn from the seed."""
        asset_id = "asset_" + secrets.token_hex(12)
        metadata = {"name": name} if name else {}
        self._assets[asset_id] = AssetRecord(
            asset_id, mime, data, seed or asset_id, self.clock(), author=author, metadata=metadata
        )
        self._touch()
        return asset_id

    def _generated_asset(self, job: JobRecord, n: int) -> str:
        asset_id = "asset_" + hashlib.sha256(f"{job.job_id}:{n}".encode()).hexdigest()[:24]
        assert job.input is not None
        prompt = str(job.input.get("prompt", ""))
        self._assets[asset_id] = AssetRecord(
            asset_id,
            "image/png",
            None,
            f"{asset_id}\n{prompt}",
            job.created + job.duration,
            source="img2img" if job.input.get("referenceImages") else "txt2img",
            author=job.author,
            metadata={"modelId": job.model_id, "prompt": prompt, "parentJobId": job.job_id},
        )
        self._touch()
        return asset_id

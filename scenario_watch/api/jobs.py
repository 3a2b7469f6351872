"""A Scenario job and asset as this daemon reads them from the API's JSON (tolerant of missing fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

FINAL_STATUSES = frozenset({"success", "failure", "canceled"})


@dataclass(frozen=True)
class Job:
    """The parts of a Scenario job this daemon acts on (tolerant of missing fields)."""

    job_id: str
    status: str
    progress: float = 0.0
    asset_ids: tuple[str, ...] = ()
    error: str | None = None
    hint: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    cost: float | None = None  # creative units: may be fractional
    duration: float | None = None  # seconds from creation to the final status, by the API's clock
    job_type: str | None = None  # "custom" for generations, "upload" for uploads, ...
    model_id: str | None = None  # where the listing says it (see _model_of): None when it does not

    @property
    def final(self) -> bool:
        """The job ended (success, failure or canceled)."""
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class Asset:
    """An asset's signed download URL and MIME type."""

    asset_id: str
    url: str
    mime_type: str


def parse_job(raw: Any) -> Job | None:
    """A Job from the API's JSON, reading `jobId` and falling back to `id`; None without an id."""
    if not isinstance(raw, dict):
        return None
    job_id = raw.get("jobId") or raw.get("id")
    if not isinstance(job_id, str) or not job_id:
        return None
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    asset_ids = meta.get("assetIds") if isinstance(meta.get("assetIds"), list) else []
    assert isinstance(asset_ids, list)
    billing = raw.get("billing") if isinstance(raw.get("billing"), dict) else {}
    assert isinstance(billing, dict)
    progress = as_number(raw.get("progress")) or 0.0
    return Job(
        job_id=job_id,
        status=str(raw.get("status") or "unknown"),
        progress=min(1.0, max(0.0, progress)),
        asset_ids=tuple(a for a in asset_ids if isinstance(a, str)),
        error=_text(meta.get("error")),
        hint=_text(meta.get("hint")),
        input=meta["input"] if isinstance(meta.get("input"), dict) else {},
        created_at=_text(raw.get("createdAt")),
        cost=as_number(billing.get("cuCost")),
        duration=_duration(raw),
        job_type=_text(raw.get("jobType")),
        model_id=_model_of(raw, meta),
    )


def _model_of(raw: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """The job's model: top-level `modelId`, else `metadata.input.modelId`, else `metadata.modelId`.

    GUESS (SCENARIO_API.md "The job's model"): the SDK's Job has no model id; the echo may carry it.
    """
    found = raw.get("modelId")
    echoed = meta.get("input")
    if not _text(found) and isinstance(echoed, dict):
        found = echoed.get("modelId")
    if not _text(found):
        found = meta.get("modelId")
    return _text(found)


def as_number(value: Any) -> float | None:
    """A JSON number as float (true and false are not numbers, nor NaN and infinities); else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def format_cost(cost: float | None) -> str:
    """Creative units for people: "5" rather than "5.0", "5.5", at most four decimals; "?" when unknown."""
    if cost is None:
        return "?"
    rounded = round(cost, 4)
    return str(int(rounded)) if rounded.is_integer() else str(rounded)


def _duration(raw: dict[str, Any]) -> float | None:
    """Creation to final status from `createdAt` and `statusHistory` (server clock: no skew)."""
    history = raw.get("statusHistory")
    if not isinstance(history, list) or not history or not isinstance(raw.get("createdAt"), str):
        return None
    last = history[-1]
    if not isinstance(last, dict) or last.get("status") not in FINAL_STATUSES:
        return None
    try:
        start = datetime.fromisoformat(raw["createdAt"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(last.get("date")).replace("Z", "+00:00"))
    except ValueError:
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None

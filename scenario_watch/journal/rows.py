"""One prompt as the journal knows it (Row): what the store hands out. Its states: lifecycle.py."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenario_watch.lifecycle import State


@dataclass(frozen=True)
class Row:
    """One prompt as the journal knows it."""

    id: int
    file: str
    claimed: str
    state: State
    inputs: dict[str, Any] | None
    stem: str | None
    out_stem: str | None
    job_id: str | None
    submit_started: str | None
    submit_attempts: int
    cost: float | None
    asset_ids: list[str]
    outputs: list[str]
    references: list[dict[str, Any]]
    stage: str | None
    error: str | None
    hint: str | None
    final_path: str | None
    progress: float | None
    sent_at: float | None
    lost_since: str | None
    download_attempts: int
    claimed_at: float
    submitted_at: float | None
    finished_at: float | None
    updated_at: float
    preset: str | None = None
    hook: str | None = None
    delivered: list[dict[str, Any]] = field(default_factory=list)  # outputs published so far
    answered: bool = False  # the lost attempt's server answered (a 5xx with a body): a short quiet period
    file_sha256: str | None = None  # the prompt file's content, for adopting a retried timeout's job

    def folder(self, inbox: Path) -> Path:
        """The inbox folder the prompt arrived in (`file` is relative to the inbox): its references too."""
        return inbox / Path(self.file).parent


def from_db(row: sqlite3.Row) -> Row:
    return Row(
        id=row["id"],
        file=row["file"],
        claimed=row["claimed"],
        state=State(row["state"]),
        inputs=_json(row["inputs"], None),
        stem=row["stem"],
        out_stem=row["out_stem"],
        job_id=row["job_id"],
        submit_started=row["submit_started"],
        submit_attempts=row["submit_attempts"],
        cost=row["cost"],
        asset_ids=_json(row["asset_ids"], []),
        outputs=_json(row["outputs"], []),
        references=_json(row["refs"], []),
        stage=row["stage"],
        error=row["error"],
        hint=row["hint"],
        final_path=row["final_path"],
        progress=row["progress"],
        sent_at=row["sent_at"],
        lost_since=row["lost_since"],
        download_attempts=row["download_attempts"],
        claimed_at=row["claimed_at"],
        submitted_at=row["submitted_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        preset=row["preset"],
        hook=row["hook"],
        delivered=_json(row["delivered"], []),
        answered=bool(row["answered"]),
        file_sha256=row["file_sha256"],
    )


def _json(text: str | None, default: Any) -> Any:
    """A JSON column's value, or `default` when it is empty."""
    return json.loads(text) if text else default


def json_object(text: str | None) -> dict[str, Any]:
    """A JSON object the journal keeps as text (a meta value): {} when absent, unreadable or no object."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

"""`scenario-watch status`: the journal plus what the running daemon publishes, as data and as text.

Whether a daemon runs is the journal's lock (instance.py), never a PID that may be stale; what it
waits for comes from its heartbeat (heartbeat.py), trusted only while it holds the lock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .budget import day_start
from .config import BudgetSettings
from .heartbeat import HEARTBEAT_EVERY, META_KEY, iso
from .instance import holder, lock_path
from .jobs import format_cost
from .lifecycle import State
from .rows import Row
from .store import Store

JOURNAL, SANDBOX_JOURNAL = "journal.sqlite3", "sandbox.sqlite3"
RECENT = 10
# Done prompts whose times make the typical job length (progress_estimate), newest first.
TYPICAL_OF = 20
# An estimated bar stops short of full: only the API's answer says a job is done.
ESTIMATE_CAP = 0.95
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# A heartbeat older than this while the lock is held: the daemon runs but does not answer.
STALE_AFTER = 3 * HEARTBEAT_EVERY
NOT_RUNNING = "the daemon to run"
CREDENTIALS_KEPT = "credentials (the API refuses them; the job is kept and delivered once they work)"


def pick_journal(state: Path, sandbox: bool) -> tuple[Path, str | None]:
    """The journal to show, and a note when it is the sandbox's without --sandbox having asked for it."""
    real, simulated = state / JOURNAL, state / SANDBOX_JOURNAL
    if sandbox or not simulated.exists():
        return (simulated if sandbox else real), None
    if not real.exists():
        return simulated, "only the sandbox journal exists: showing `run --sandbox`'s prompts"
    if holder(lock_path(state, SANDBOX_JOURNAL))[0] and not holder(lock_path(state, JOURNAL))[0]:
        return simulated, "a `run --sandbox` daemon is running: showing its journal (the real one: none runs)"
    return real, None


def build(store: Store, lock: Path, budget: BudgetSettings, now: float) -> dict[str, Any]:
    """The report: daemon, counts, jobs, budget, recent (the keys DESIGN.md promises)."""
    running, pid = holder(lock)
    meta = store.get_meta(META_KEY)
    published: dict[str, Any] = json.loads(meta[0]) if meta else {}
    beat = published.get("heartbeat")
    live = published if running else {}  # a dead daemon's pauses and waits say nothing any more
    budget_until = live.get("budget_until")
    done = store.recent(State.DONE, max(RECENT, TYPICAL_OF))
    # The running daemon's learned generation time, else the journal's recent jobs.
    learned = live.get("typical_s")
    typical = float(learned) if isinstance(learned, int | float) and learned > 0 else _typical_seconds(done)
    return {
        "daemon": {
            "running": running,
            "pid": (pid or published.get("pid")) if running else None,
            "heartbeat_age_s": round(now - beat, 1) if isinstance(beat, int | float) else None,
        },
        "counts": store.counts(),
        "jobs": [_job(row, live, running, now, typical) for row in store.active()],
        "budget": {
            "daily": budget.daily,
            "spent_today": round(store.spent_since(day_start(now)), 4),
            "resumes_at": iso(budget_until) if budget_until else None,
        },
        "recent": _recent(store, done[:RECENT]),
    }


def _job(row: Row, live: dict[str, Any], running: bool, now: float, typical: float | None) -> dict[str, Any]:
    submitted = row.state == State.SUBMITTED
    estimate = None
    if submitted and typical and row.submitted_at is not None:
        estimate = round(min(ESTIMATE_CAP, max(0.0, now - row.submitted_at) / typical), 3)
    return {
        "name": row.file,
        "state": row.state.value,
        "job_id": row.job_id,
        "progress": row.progress if submitted else None,
        "age_s": round(now - row.claimed_at, 1),
        "waiting_for": _waiting_for(row, live, running),
        # For the live page (pictures are served by this id, never by a path).
        "id": row.id,
        "preset": row.preset,
        "prompt": _prompt_text(row),
        # The time since submission against the typical job's (None: no job yet, or none done yet).
        "progress_estimate": estimate,
    }


def _typical_seconds(done: list[Row]) -> float | None:
    """The median time from submission to done of recent prompts (None when there are none)."""
    times = sorted(r.finished_at - r.submitted_at for r in done if r.finished_at and r.submitted_at)
    return max(times[len(times) // 2], 0.1) if times else None


def _prompt_text(row: Row) -> str | None:
    prompt = (row.inputs or {}).get("prompt")
    return prompt if isinstance(prompt, str) else None


def _waiting_for(row: Row, live: dict[str, Any], running: bool) -> str | None:
    """Why a prompt waits (None: it is being worked on, or runs at Scenario unhindered)."""
    if row.state in (State.SUBMITTED, State.DOWNLOADING):  # at Scenario, paid: only credentials hold it
        return CREDENTIALS_KEPT if running and live.get("auth_blocked") else None
    if not running:
        return NOT_RUNNING
    special = (live.get("waiting") or {}).get(str(row.id))
    if special:
        return str(special)
    if row.state == State.CLAIMED:
        return None  # being checked right now
    return str(live.get("queue") or "a free slot")


def _recent(store: Store, done: list[Row]) -> list[dict[str, Any]]:
    rows = done + store.recent(State.FAILED, RECENT)
    rows.sort(key=lambda row: row.finished_at or row.updated_at, reverse=True)
    return [
        {
            "name": row.file,
            "state": row.state.value,
            "at": iso(row.finished_at or row.updated_at),
            "job_id": row.job_id,
            "error": row.error,
            "hint": row.hint,
            # For the live page: /picture/<id>/<n> for n <= outputs, /reference/<id>/<n> likewise.
            "id": row.id,
            "preset": row.preset,
            "prompt": _prompt_text(row),
            "stage": row.stage,
            "outputs": sum(1 for name in row.outputs if name.lower().endswith(IMAGE_SUFFIXES)),
            "references": sum(1 for ref in row.references if ref.get("file")),  # asset ids: no picture
        }
        for row in rows[:RECENT]
    ]


def render(report: dict[str, Any], journal: Path, inbox_waiting: int) -> str:
    """The report for a person, one fact a line."""
    daemon, budget = report["daemon"], report["budget"]
    age = daemon["heartbeat_age_s"]
    if daemon["running"]:
        state = f"running, PID {daemon['pid']}"
        if age is not None:
            state += f", heartbeat {age:g} s ago"
            if age > STALE_AFTER:
                state += " (not answering: is it stuck?)"
    else:
        state = "not running" + (f" (last heartbeat {_duration(age)} ago)" if age is not None else "")
    spent = format_cost(budget["spent_today"])
    if budget["daily"]:
        money = f"{spent} of {format_cost(budget['daily'])} creative units spent today (UTC)"
    else:
        money = f"{spent} creative units spent today (UTC), no daily cap"
    if budget["resumes_at"]:
        money += f"; paused until {budget['resumes_at']}"
    counts = ", ".join(f"{name} {n}" for name, n in report["counts"].items())
    lines = [
        f"journal  {journal}",
        f"daemon   {state}",
        f"prompts  {counts}",
        f"budget   {money}",
        f"inbox    {inbox_waiting} file(s) not claimed yet",
    ]
    if report["jobs"]:
        lines.append("jobs")
    for job in report["jobs"]:
        progress = f"{job['progress']:.0%}" if job["progress"] is not None else "-"
        line = f"  {job['state']:<12} {job['name']}  job={job['job_id'] or '-'}  {progress}"
        line += f"  {job['age_s']:.0f} s"
        if job["waiting_for"]:
            line += f"  waiting for {job['waiting_for']}"
        lines.append(line)
    if report["recent"]:
        lines.append("recent")
    for item in report["recent"]:
        line = f"  {item['at']}  {item['state']:<6} {item['name']}"
        if item["error"]:
            line += f"  {item['error']}"
        lines.append(line)
        if item["hint"]:
            lines.append(f"      hint: {item['hint']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def inbox_waiting(inbox: Path) -> int:
    """Prompt files in the inbox not claimed yet (hidden files aside)."""
    try:
        return sum(1 for p in inbox.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))
    except OSError:
        return 0

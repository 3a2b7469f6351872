"""`scenario-watch status`: the journal plus what the running daemon publishes, as data and as text.

Whether a daemon runs is the journal's lock (instance.py), never a PID that may be stale; what it
waits for comes from its heartbeat (heartbeat.py), trusted only while it holds the lock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from scenario_watch.api.jobs import format_cost
from scenario_watch.config import BudgetSettings, Settings
from scenario_watch.dispatch.budget import day_start
from scenario_watch.intake import backlog
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import State
from scenario_watch.shell.heartbeat import HEARTBEAT_EVERY, iso, published
from scenario_watch.shell.instance import holder, lock_path

JOURNAL, SANDBOX_JOURNAL = "journal.sqlite3", "sandbox.sqlite3"
RECENT = 10
# A heartbeat older than this while the lock is held: the daemon runs but does not answer.
STALE_AFTER = 3 * HEARTBEAT_EVERY
NOT_RUNNING = "the daemon to run"
CREDENTIALS_KEPT = "credentials (the API refuses them; the job is kept and delivered once they work)"
ESTIMATE_CAP = 0.99  # an estimate never says "done"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
TYPICAL_OF = 20  # recent jobs whose median time stands in for a learned one
BAR_WIDTH = 20


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


def build(
    store: Store, lock: Path, budget: BudgetSettings, now: float, *, reference_wait: float | None = None
) -> dict[str, Any]:
    """The report: daemon, counts, jobs, budget, recent (the keys DESIGN.md promises), presets.

    `reference_wait` ([watch] reference_wait) says how long a prompt waits for a missing reference.
    """
    running, pid = holder(lock)
    last = published(store)
    beat = last.get("heartbeat")
    live = last if running else {}  # a dead daemon's pauses and waits say nothing any more
    budget_until = live.get("budget_until")
    active = store.active()
    done = store.recent(State.DONE, max(RECENT, TYPICAL_OF))  # read once: recent, and typical times
    if not live.get("typical"):  # nothing learned (or published) yet: the median of recent jobs
        live = {**live, "typical": _typical_seconds(done[:TYPICAL_OF])}
    return {
        "daemon": {
            "running": running,
            "pid": (pid or last.get("pid")) if running else None,
            "heartbeat_age_s": round(now - beat, 1) if isinstance(beat, int | float) else None,
        },
        "counts": store.counts(),
        "jobs": [_job(row, live, running, now, reference_wait) for row in active],
        "budget": {
            "daily": budget.daily,
            "spent_today": round(store.spent_since(day_start(now)), 4),
            "resumes_at": iso(budget_until) if budget_until else None,
        },
        "recent": _recent(store, done[:RECENT], active),
        # Per preset: the files there before it, left alone until `scenario-watch take` (backlog.py).
        "presets": backlog.counts(store),
    }


def _job(
    row: Row, live: dict[str, Any], running: bool, now: float, reference_wait: float | None
) -> dict[str, Any]:
    progress = row.progress if row.state == State.SUBMITTED else None
    return {
        "name": row.file,
        "state": row.state.value,
        "job_id": row.job_id,
        "progress": progress,
        "progress_estimate": _estimate(row, live.get("typical"), now) if progress is None else None,
        "age_s": round(now - row.claimed_at, 1),
        "waiting_for": _waiting_for(row, live, running, reference_wait),
        # For the live page (pictures are served by this id, never by a path).
        "id": row.id,
        "preset": row.preset,
        "prompt": _prompt_text(row),
    }


def _typical_seconds(done: list[Row]) -> float | None:
    """The median time from submission to done of recent prompts (None when there are none)."""
    times = sorted(r.finished_at - r.submitted_at for r in done if r.finished_at and r.submitted_at)
    return max(times[len(times) // 2], 0.1) if times else None


def _prompt_text(row: Row) -> str | None:
    prompt = (row.inputs or {}).get("prompt")
    return prompt if isinstance(prompt, str) else None


def _estimate(row: Row, typical: Any, now: float) -> float | None:
    """How far a running job should be by now, from the generation time the daemon learned.

    Learned polling asks once, when a job should be done, so until then the API's progress is unknown.
    Capped below 1: a job is done only when Scenario says so.
    """
    if row.state != State.SUBMITTED or row.submitted_at is None:
        return None
    if not isinstance(typical, int | float) or typical <= 0:
        return None
    return round(min(ESTIMATE_CAP, max(0.0, now - row.submitted_at) / typical), 2)


def _waiting_for(row: Row, live: dict[str, Any], running: bool, reference_wait: float | None) -> str | None:
    """Why a prompt waits (None: it is being worked on, or runs at Scenario unhindered)."""
    if row.state in (State.SUBMITTED, State.DOWNLOADING):  # at Scenario, paid: only credentials hold it
        return CREDENTIALS_KEPT if running and live.get("auth_blocked") else None
    if not running:
        return NOT_RUNNING
    special = (live.get("waiting") or {}).get(str(row.id))
    if special:  # a reference file that has not arrived (the only such wait the daemon publishes)
        return f"{special} (up to {reference_wait:g} s)" if reference_wait is not None else str(special)
    if row.state == State.CLAIMED:
        return None  # being checked right now
    return str(live.get("queue") or "a free slot")


def _recent(store: Store, done: list[Row], active: list[Row]) -> list[dict[str, Any]]:
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
            "retried": _retried(row, rows + active),
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


def _retried(row: Row, others: list[Row]) -> str | None:
    """For a failure: the state of the latest prompt of the same name since (`retry` puts it back), or None.

    Enough rows to see it: a later prompt that finished is newer than the failure, so it is among
    the RECENT latest of its state whenever the failure is among the RECENT latest of all.
    """
    if row.state != State.FAILED:
        return None
    later = [other for other in others if other.file == row.file and other.id > row.id]
    return max(later, key=lambda other: other.id).state.value if later else None


def render(report: dict[str, Any], journal: Path, inbox_waiting: int, *, bars: bool = False) -> str:
    """The report for a person, one fact a line (`bars`: a progress bar per running job, for --watch)."""
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
    take = "take --sandbox" if journal.name == SANDBOX_JOURNAL else "take"  # the journal shown is that one
    for name, preset in report.get("presets", {}).items():
        if preset["left_alone"]:
            lines.append(
                f"preset   {name}: {preset['left_alone']} file(s) left alone in {preset['folder']} (present"
                f" before the preset; `scenario-watch {take} {name} --all` takes them)"
            )
    if report["jobs"]:
        lines.append("jobs")
    for job in report["jobs"]:
        progress = _progress(job, bars)
        line = f"  {job['state']:<12} {job['name']}  job={job['job_id'] or '-'}  {progress}"
        line += f"  {job['age_s']:.0f} s"
        if job["waiting_for"]:
            line += f"  waiting for {job['waiting_for']}"
        lines.append(line)
    if report["recent"]:
        lines.append("recent")
    for item in report["recent"]:
        line = f"  {item['at']}  {item['state']:<6} {item['name']}"
        if item.get("retried"):  # the failure is history: say what became of it, not how to fix it
            lines.append(f"{line}  retried → {item['retried']}")
            continue
        if item["error"]:
            line += f"  {item['error']}"
        lines.append(line)
        if item["hint"]:
            lines.append(f"      hint: {item['hint']}")
    return "\n".join(lines)


def _progress(job: dict[str, Any], bar: bool) -> str:
    """ "40 %" as the API said at the last poll, "~40 %" as estimated, "-" when neither is known."""
    if job["progress"] is not None:
        fraction, text = job["progress"], f"{job['progress']:.0%}".replace("%", " %")
    elif job.get("progress_estimate") is not None:
        fraction, text = job["progress_estimate"], "~" + f"{job['progress_estimate']:.0%}".replace("%", " %")
    else:
        return "-"
    if not bar:
        return text
    filled = round(max(0.0, min(1.0, fraction)) * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"


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


def report_text(settings: Settings, journal: Path, *, json_lines: bool, watch: bool) -> str:
    """One look at the journal, as `status` prints it: a JSON line, or text (redrawn in place: --watch)."""
    store = Store(journal)
    try:
        report = build(
            store,
            lock_path(journal.parent, journal.name),
            settings.budget,
            time.time(),
            reference_wait=settings.watch.reference_wait,
        )
    finally:
        store.close()
    if json_lines:
        return json.dumps(report)
    clear = "\x1b[H\x1b[2J" if watch else ""  # clear the terminal: redraw in place
    return clear + render(report, journal, inbox_waiting(settings.folders.inbox), bars=watch)

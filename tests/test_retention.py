"""Journal retention ([journal] keep_days): what is pruned and what never is, totals, batches, v1 -> v2.

Real journals in temp folders, on a manual clock; the last test runs the daemon in-process.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, wait_for, write_config
from harness import HereDaemon, capture_logs

from scenario_watch.clock import ManualClock
from scenario_watch.config import load_settings
from scenario_watch.dispatch.budget import day_start
from scenario_watch.errors import ConfigError
from scenario_watch.journal.journal_schema import VERSION
from scenario_watch.journal.retention import BATCH, DAY, FIRST_PASS, PASS_EVERY, STEP_PAUSE, Retention
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import ACTIVE, State
from scenario_watch.sandbox import Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`

KEEP = 90 * DAY

# The journal as version 1 wrote it (journal_schema.py at user_version 1), for the migration test.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    file TEXT NOT NULL,              -- name as it arrived in the inbox (relative to the inbox)
    claimed TEXT NOT NULL,           -- its path under <inbox>/.processing/
    state TEXT NOT NULL,
    inputs TEXT,                     -- JSON body of the generate request, once known
    stem TEXT,                       -- requested output stem
    out_stem TEXT,                   -- the stem reserved in the outbox (after -2, -3 ...)
    job_id TEXT UNIQUE,
    submit_started TEXT,             -- ISO 8601 UTC: createdAfter for reconciling a lost answer
    submit_attempts INTEGER NOT NULL DEFAULT 0,
    cost REAL,                       -- creative units (may be fractional)
    asset_ids TEXT,                  -- JSON list
    outputs TEXT,                    -- JSON list of outbox file names
    refs TEXT,                       -- JSON list: each reference's file, sha256 and asset id
    stage TEXT, error TEXT, hint TEXT,
    final_path TEXT,                 -- where the prompt file ended (done/ or failed/)
    progress REAL,                   -- the job's progress (0..1) at the last poll
    preset TEXT,                     -- [presets.NAME] whose folder the file arrived in
    hook TEXT,                       -- 'pending' from filing until its hook ran, then 'ran'
    sent_at REAL,                    -- when the latest generate POST was sent (the quiet period's start)
    lost_since TEXT,                 -- createdAfter of a lost attempt that was resent (orphan check)
    download_attempts INTEGER NOT NULL DEFAULT 0,
    delivered TEXT,                  -- JSON list: the outputs published so far (a redo skips them)
    answered INTEGER,                -- 1: the lost attempt's server answered (a short quiet period)
    file_sha256 TEXT,                -- the prompt file's content (a retried timeout's job is adopted)
    claimed_at REAL NOT NULL,
    submitted_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS prompts_state ON prompts(state);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT PRIMARY KEY,
    asset_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS orphans (  -- jobs a lost answer created after all, once resent: paid twice
    job_id TEXT PRIMARY KEY,
    prompt_id INTEGER NOT NULL,
    cost REAL,
    found_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adoptions (  -- `retry` of a timed-out prompt: ask about this job before paying
    file TEXT NOT NULL,              -- the retried file's name, as it goes back into the inbox
    sha256 TEXT NOT NULL,            -- and its content
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (file, sha256)
);
CREATE TABLE IF NOT EXISTS meta (     -- small named values the daemon keeps (e.g. the model's schema)
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

T0 = 1_790_000_000.0


@pytest.fixture
def clock() -> ManualClock:
    """The journal's clock (a fixed start: 100 days are passed by hand)."""
    return ManualClock(wall=T0)


@pytest.fixture
def store(tmp_path: Path, clock: ManualClock) -> Any:
    journal = Store(tmp_path / "journal.sqlite3", clock)
    yield journal
    journal.close()


def in_flight(store: Store, name: str, state: State = State.SUBMITTED, cost: float = 2.0) -> int:
    """A prompt taken through the lifecycle up to `state` (any active one)."""
    pid = store.add(f"{name}.json", Path(f"/inbox/.processing/{name}.json"))
    steps = [
        (State.QUEUED, lambda: store.queued(pid, {"prompt": name}, name, f"sha-{name}")),
        (State.SUBMITTING, lambda: store.submitting(pid, {"prompt": name}, "2026-09-20T00:00:00Z")),
        (State.SUBMITTED, lambda: store.submitted(pid, f"job-{name}", cost)),
        (State.DOWNLOADING, lambda: store.downloading(pid, ["asset-1"], cost)),
    ]
    for reached, step in steps:
        if ACTIVE.index(state) < ACTIVE.index(reached):
            break
        step()
    return pid


def finished(
    store: Store,
    name: str,
    *,
    failed_at: str | None = None,
    cost: float = 2.0,
    filed: bool = True,
    hook: bool = False,
) -> int:
    """A prompt that ended (done, or failed at a stage after its job was paid), filed unless told."""
    pid = in_flight(store, name, State.SUBMITTED, cost)
    if failed_at is None:
        store.downloading(pid, ["asset-1"], cost)
        store.done(pid, [f"{name}_1.png"])
    else:
        store.failed(pid, failed_at, "it failed", None)
    if filed:
        store.filed(pid, Path(f"/done/{name}.json"), hook=hook)
    return pid


def files(store: Store) -> set[str]:
    """The prompt files the journal holds (read through a connection of its own)."""
    with sqlite3.connect(store.path) as db:
        return {row[0].removesuffix(".json") for row in db.execute("SELECT file FROM prompts")}


def pragma(store: Store, name: str) -> int:
    with sqlite3.connect(store.path) as db:
        return int(db.execute(f"PRAGMA {name}").fetchone()[0])


def prune_all(store: Store, clock: ManualClock, limit: int = BATCH) -> int:
    removed = 0
    while n := store.prune(clock.wall() - KEEP, limit):
        removed += n
    return removed


def test_only_old_finished_and_filed_prompts_are_pruned(store: Store, clock: ManualClock) -> None:
    finished(store, "old-done")
    finished(store, "old-failed", failed_at="validate")
    finished(store, "old-hook-owed", hook=True)
    finished(store, "old-not-filed", filed=False)
    store.hook_ran(finished(store, "old-hook-ran", hook=True))
    clock.advance(100 * DAY)
    finished(store, "recent")
    for state in ACTIVE:
        in_flight(store, f"active-{state.value}", state)
    assert store.prune(clock.wall() - KEEP, BATCH) == 3
    kept = {"old-hook-owed", "old-not-filed", "recent", *(f"active-{state.value}" for state in ACTIVE)}
    assert files(store) == kept
    assert store.prune(clock.wall() - KEEP, BATCH) == 0


def test_what_finished_after_a_prompt_in_flight_was_claimed_is_kept(store: Store, clock: ManualClock) -> None:
    stuck = in_flight(store, "stuck", State.SUBMITTING)  # a lost answer: reconcile lists jobs since
    clock.advance(DAY)
    finished(store, "after-it")
    clock.advance(100 * DAY)
    assert store.prune(clock.wall() - KEEP, BATCH) == 0  # its job must stay known to reconcile
    store.failed(stuck, "submit", "gave up", None)
    store.filed(stuck, Path("/failed/stuck.json"))
    clock.advance(100 * DAY)
    assert store.prune(clock.wall() - KEEP, BATCH) == 2
    assert files(store) == set()


def test_totals_survive_pruning(store: Store, clock: ManualClock, tmp_path: Path) -> None:
    from scenario_watch.config import BudgetSettings
    from scenario_watch.shell import status

    for k in range(3):
        finished(store, f"old-{k}", cost=2.0)
    finished(store, "refunded", failed_at="generation", cost=2.0)  # a failed generation is not paid
    finished(store, "twin", failed_at="submit", cost=3.0)  # paid, its job not told apart (reconcile): is
    clock.advance(100 * DAY)
    finished(store, "today", cost=1.5)
    in_flight(store, "running")
    counts, today = store.counts(), store.spent_since(day_start(clock.wall()))
    assert counts["done"] == 4 and counts["failed"] == 2 and counts["submitted"] == 1
    assert prune_all(store, clock) == 5
    assert files(store) == {"today", "running"}
    assert store.counts() == counts
    assert store.spent_since(day_start(clock.wall())) == today == 1.5 + 2.0  # done today, and running
    with sqlite3.connect(store.path) as db:
        pruned = {row[0]: row[1:] for row in db.execute("SELECT state, pruned, pruned_spent FROM totals")}
    assert pruned["done"] == (3, 6.0) and pruned["failed"] == (2, 3.0)
    report = status.build(store, tmp_path / "journal.lock", BudgetSettings(), clock.wall())
    assert report["counts"] == counts
    assert [item["name"] for item in report["recent"]] == ["today.json"]


def test_a_prompt_failed_after_its_job_was_paid_is_kept(store: Store, clock: ManualClock) -> None:
    """Timed out or not downloaded: its job may have succeeded, and `retry` delivers it instead of
    paying again only when the journal still knows the job."""
    finished(store, "timed-out", failed_at="timeout")
    finished(store, "not-downloaded", failed_at="download")
    finished(store, "refused", failed_at="validate")
    clock.advance(100 * DAY)
    assert prune_all(store, clock) == 1
    assert files(store) == {"timed-out", "not-downloaded"}
    assert store.owns_job("job-timed-out") and store.owns_job("job-not-downloaded")


def test_each_call_prunes_one_bounded_batch(store: Store, clock: ManualClock) -> None:
    for k in range(27):
        finished(store, f"old-{k:02d}")
    clock.advance(100 * DAY)
    assert [store.prune(clock.wall() - KEEP, 10) for _ in range(4)] == [10, 10, 7, 0]
    assert files(store) == set()


def test_orphans_are_kept_and_unused_uploads_go(store: Store, clock: ManualClock) -> None:
    store.remember_upload("a" * 64, "asset-unused")
    store.remember_upload("b" * 64, "asset-reused")
    old = finished(store, "old")
    store.add_orphan("job-paid-twice", old, 2.0)
    clock.advance(100 * DAY)
    assert store.uploaded_asset("b" * 64) == "asset-reused"  # used again today: kept
    assert prune_all(store, clock) == 2  # the prompt and one upload note
    assert store.uploaded_asset("a" * 64) is None
    assert store.uploaded_asset("b" * 64) == "asset-reused"
    assert store.orphans() == [("job-paid-twice", "old.json", 2.0, T0)]
    assert store.known_job_ids(["job-paid-twice", "job-old", "job-other"]) == {"job-paid-twice"}


def test_a_version_1_journal_is_migrated(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        for k, state in enumerate(["done", "done", "failed", "queued"], start=1):
            db.execute(
                "INSERT INTO prompts (id, file, claimed, state, job_id, final_path, claimed_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (k, f"p{k}.json", f"/c/p{k}.json", state, f"job-{k}", f"/done/p{k}.json", T0, T0),
            )
        db.execute("INSERT INTO orphans VALUES ('job-orphan', 1, 2.0, ?)", (T0,))
        db.execute("INSERT INTO uploads VALUES (?, 'asset-1', ?)", ("c" * 64, T0))
        db.execute("PRAGMA user_version = 1")
    db.close()
    store = Store(path, clock)
    try:
        assert pragma(store, "user_version") == VERSION == 2
        assert store.counts() == {**dict.fromkeys(State, 0), "done": 2, "failed": 1, "queued": 1}
        assert store.orphans() == [("job-orphan", "p1.json", 2.0, T0)]
        with sqlite3.connect(path) as db:
            indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            used = db.execute("SELECT used_at FROM uploads").fetchone()[0]
        assert {"prompts_state_updated", "prompts_unfiled", "prompts_finished"} <= indexes
        assert "prompts_state" not in indexes and used == T0
        store.add("new.json", Path("/c/new.json"))
        assert store.counts()["claimed"] == 1
    finally:
        store.close()
    again = Store(path, clock)  # the version is current: nothing is redone, the counts go on
    assert again.counts()["done"] == 2 and again.counts()["claimed"] == 1
    again.close()


def grow(store: Store, n: int) -> None:
    """n finished prompts with large inputs (so freeing them frees many pages)."""
    for k in range(n):
        pid = in_flight(store, f"big-{k:03d}", State.QUEUED)
        store.submitting(pid, {"prompt": "x" * 4000}, "2026-09-20T00:00:00Z")
        store.submitted(pid, f"job-big-{k}", 1.0)
        store.downloading(pid, ["asset"], 1.0)
        store.done(pid, ["out.png"])
        store.filed(pid, Path(f"/done/big-{k}.json"))


def test_the_space_is_given_back(store: Store, clock: ManualClock) -> None:
    assert pragma(store, "auto_vacuum") == 2  # a new journal: incremental
    grow(store, 300)
    store.give_back()  # a checkpoint: the WAL's pages are in the file
    full = store.path.stat().st_size
    clock.advance(100 * DAY)
    assert prune_all(store, clock) == 300
    steps = 1
    while store.give_back():
        steps += 1
    assert store.path.stat().st_size < full / 4
    assert pragma(store, "freelist_count") == 0


def test_an_old_journal_is_converted_once_when_small(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scenario_watch.journal import journal_prune

    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path) as db:  # auto_vacuum NONE, as every journal before version 2
        db.executescript(V1_SCHEMA)
        db.execute("PRAGMA user_version = 1")
    db.close()
    store = Store(path, clock)
    try:
        grow(store, 100)
        clock.advance(100 * DAY)
        assert prune_all(store, clock) == 100
        monkeypatch.setattr(journal_prune, "CONVERT_AT_MOST", 0)
        assert store.give_back() is False and pragma(store, "auto_vacuum") == 0  # too big: pages reused
        monkeypatch.undo()
        assert store.give_back() is False
        assert pragma(store, "auto_vacuum") == 2 and pragma(store, "freelist_count") == 0
    finally:
        store.close()


HOT_PATHS = ("active", "unfinished", "counts", "hooks_pending", "lost_answers")


def test_start_status_and_budget_read_no_finished_prompt(store: Store, clock: ManualClock) -> None:
    for k in range(50):
        finished(store, f"f-{k}", hook=k % 10 == 0)
    in_flight(store, "running")
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    for name in HOT_PATHS:
        getattr(store, name)()
    store.recent(State.DONE)
    store.spent_since(day_start(clock.wall()), [1, 2])
    store.known_job_ids(["job-f-1", "job-x"])
    store._db.set_trace_callback(None)
    with sqlite3.connect(store.path) as db:
        for sql in seen:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            # A partial index holds only unfiled or hook-owed prompts: walking it is not a scan.
            scans = [
                line
                for line in plan
                if line.startswith("SCAN prompts")
                and not line.endswith(("prompts_unfiled", "prompts_hook_pending"))
            ]
            assert not scans, (sql, plan)


def test_retention_steps_while_there_is_more_then_waits_an_hour(
    store: Store, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scenario_watch.journal import retention

    monkeypatch.setattr(retention, "BATCH", 3)
    for k in range(7):
        finished(store, f"old-{k}")
    clock.advance(100 * DAY)
    r = Retention(store, 90, clock)
    assert r.next_due() == clock.monotonic() + FIRST_PASS
    r.tick(clock.monotonic())  # not due yet
    assert len(files(store)) == 7
    clock.advance(FIRST_PASS)
    gaps = []
    # Captured (structlog's loggers are cached at first use: not under another test's configuration).
    with capture_logs() as logged:
        for _ in range(20):
            now = clock.monotonic()
            r.tick(now)
            due = r.next_due()
            assert due is not None
            gaps.append(round(due - now, 3))
            assert r.busy() == (gaps[-1] == STEP_PAUSE)  # `run --once` waits while a pass goes on
            if gaps[-1] == PASS_EVERY:
                break
            clock.advance(due - now)
    assert gaps[:3] == [STEP_PAUSE] * 3 and gaps[-1] == PASS_EVERY
    assert files(store) == set()
    assert [e["rows"] for e in logged.events() if e["event"] == "journal.pruned"] == [7]
    assert Retention(store, 0, clock).next_due() is None  # keep_days = 0: keep everything


def test_keep_days_is_a_day_at_least_or_zero(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    assert load_settings(None, env={"HOME": str(tmp_path)}).settings.journal.keep_days == 90
    for value, ok in ((0, True), (1, True), (365.5, True), (0.5, False), (-1, False)):
        config.write_text(f"[journal]\nkeep_days = {value}\n")
        if ok:
            assert load_settings(config, env={"HOME": str(tmp_path)}).settings.journal.keep_days == value
        else:
            with pytest.raises(ConfigError, match="keep_days"):
                load_settings(config, env={"HOME": str(tmp_path)})


def test_the_daemon_prunes_in_the_background(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    journal = folders.state / "journal.sqlite3"
    past = ManualClock(wall=clock.wall() - 100 * DAY)
    old = Store(journal, past)
    for k in range(5):
        finished(old, f"old-{k}")
    old.close()
    write_config(folders, sandbox.base_url, journal={"keep_days": 30})
    proc: HereDaemon = daemon()
    folders.drop("new.json", {"prompt": "a lighthouse at dusk"})
    wait_for(lambda: (folders.done / "new.json").exists(), what="the new prompt done")
    check = Store(journal)
    try:
        wait_for(lambda: files(check) == {"new"}, what="the old prompts pruned")
        assert check.counts()["done"] == 6
    finally:
        check.close()
    wait_for(lambda: proc.saw("journal.pruned", rows=5), what="the pass logged")
    assert json.loads((folders.outbox / "new.manifest.json").read_text())["jobId"]


def test_a_once_run_prunes_before_it_exits(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    journal = folders.state / "journal.sqlite3"
    old = Store(journal, ManualClock(wall=clock.wall() - 100 * DAY))
    for k in range(3):
        finished(old, f"old-{k}")
    old.close()
    folders.drop("new.json", {"prompt": "a lighthouse at dusk"})
    proc: HereDaemon = daemon("--once")
    wait_for(proc.finished.is_set, what="the --once run to end")
    assert proc.stop() == 0
    assert (folders.done / "new.json").exists()
    check = Store(journal)
    try:
        assert files(check) == {"new"} and check.counts()["done"] == 4
    finally:
        check.close()
    assert proc.saw("journal.pruned", rows=3)

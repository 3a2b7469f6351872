"""Retention inside the journal: old finished prompts removed in small transactions, their space given back.

The store calls these with its lock held; retention.py decides when. What is kept, and why:
- every prompt in flight, and every finished one not filed yet or whose hook is still owed;
- every prompt finished after the oldest one in flight was claimed: reconcile lists the jobs made
  since a lost answer's POST and must still know each of ours among them (`known_job_ids`);
- orphans (a job paid twice is worth knowing for good; a few rows) and `retry`'s adoption notes;
- a prompt failed after its job was paid (`PAID_STAGES`: poll, timeout, download): its job may have
  succeeded, and `retry` delivers it instead of paying again only for a job this journal knows;
- the upload cache, but for contents no prompt used since the cutoff (one row per photo otherwise).
The lifetime counts stay in `totals` (journal_schema.py), with how many were pruned and their spend.
"""

from __future__ import annotations

import sqlite3

from scenario_watch.lifecycle import ACTIVE, FINAL, PAID_STAGES, State

# A journal whose auto_vacuum is still NONE (created before version 2) is converted by one VACUUM,
# but only once what it holds is this small: VACUUM rewrites it all while the journal and the loop
# wait (110 MB/s here: 0.6 s; systemd's watchdog allows 30 s). A bigger one reuses its freed pages
# (the file stops growing); `PRAGMA auto_vacuum = INCREMENTAL; VACUUM` converts it, daemon stopped.
CONVERT_AT_MOST = 64 << 20
# Pages given back to the filesystem per call (1 MB of 4 KiB pages: 3 ms median, 130 ms at most with
# a checkpoint, for 1,000,000 prompts in journal_bench.py; 4 MB steps took 70 ms, up to 1.9 s).
GIVE_BACK_PAGES = 256

ACTIVE_MARKS = ", ".join("?" for _ in ACTIVE)
FINAL_MARKS = ", ".join("?" for _ in FINAL)
PAID_MARKS = ", ".join("?" for _ in PAID_STAGES)


def prune(db: sqlite3.Connection, before: float, limit: int, refunded_stage: str) -> int:
    """Remove up to `limit` prompts and up to `limit` upload notes older than `before`; rows removed."""
    db.execute("BEGIN IMMEDIATE")
    try:
        oldest = db.execute(
            f"SELECT MIN(claimed_at) FROM prompts WHERE state IN ({ACTIVE_MARKS})", ACTIVE
        ).fetchone()[0]
        cutoff = before if oldest is None else min(before, float(oldest))
        ids = [
            row[0]
            for row in db.execute(
                "SELECT id FROM prompts WHERE finished_at < ? AND final_path IS NOT NULL"
                # `+state`: walk prompts_finished oldest first, never every done prompt by state
                f" AND hook IS NOT 'pending' AND +state IN ({FINAL_MARKS})"
                f" AND NOT (+state = ? AND stage IN ({PAID_MARKS}) AND job_id IS NOT NULL)"
                " ORDER BY finished_at LIMIT ?",
                (cutoff, *FINAL, State.FAILED, *PAID_STAGES, limit),
            )
        ]
        if ids:
            marks = ", ".join("?" for _ in ids)
            # Spend as the budget counts it: a failed generation is refunded.
            db.execute(
                "INSERT INTO totals (state, pruned, pruned_spent) SELECT state, COUNT(*),"
                " COALESCE(SUM(CASE WHEN state = ? AND stage = ? THEN 0 ELSE cost END), 0)"
                f" FROM prompts WHERE id IN ({marks}) GROUP BY state"
                " ON CONFLICT (state) DO UPDATE SET pruned = pruned + excluded.pruned,"
                " pruned_spent = pruned_spent + excluded.pruned_spent",
                ("failed", refunded_stage, *ids),
            )
            db.execute(f"DELETE FROM prompts WHERE id IN ({marks})", ids)
        uploads = db.execute(
            "DELETE FROM uploads WHERE sha256 IN (SELECT sha256 FROM uploads WHERE used_at < ? LIMIT ?)",
            (before, limit),
        ).rowcount
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(ids) + uploads


def give_back(db: sqlite3.Connection) -> bool:
    """Return freed pages to the filesystem, a few at a time; whether some are left for another call."""
    mode = int(db.execute("PRAGMA auto_vacuum").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    if mode == 0 and free:
        size = int(db.execute("PRAGMA page_count").fetchone()[0]) - free
        if size * int(db.execute("PRAGMA page_size").fetchone()[0]) > CONVERT_AT_MOST:
            return False  # too big to rewrite in one go: its free pages take the next prompts
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("VACUUM")  # once in the journal's life: incremental from now on
    elif mode == 2 and free:
        # Through executescript: sqlite3's execute steps this pragma once, which frees a single page.
        db.executescript(f"PRAGMA incremental_vacuum({GIVE_BACK_PAGES})")
        if free > GIVE_BACK_PAGES:
            return True
    # The file shrinks when the WAL is checkpointed; TRUNCATE empties the WAL file as well.
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return False

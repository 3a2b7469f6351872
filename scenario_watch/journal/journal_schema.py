"""The journal's schema, its version, and the migration of journals written by earlier releases."""

from __future__ import annotations

import sqlite3

from scenario_watch.errors import ConfigError

# PRAGMA user_version. 0: releases up to 0.1 (no `queued` state: a checked prompt stayed `claimed`).
# 1: no retention (every prompt kept; counts, recent and recovery read all of them).
VERSION = 2

SCHEMA = """
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
-- Every query of a start, of `status` and of the budget reads through one of these, so none of them
-- grows with the finished prompts the journal holds (tests/benchmarks/journal_bench.py).
CREATE INDEX IF NOT EXISTS prompts_state_updated ON prompts(state, updated_at);  -- active, recent
CREATE INDEX IF NOT EXISTS prompts_unfiled ON prompts(id) WHERE final_path IS NULL;  -- recovery
CREATE INDEX IF NOT EXISTS prompts_hook_pending ON prompts(id) WHERE hook = 'pending';  -- owed hooks
CREATE INDEX IF NOT EXISTS prompts_submitted ON prompts(submitted_at);  -- spend today (budget)
CREATE INDEX IF NOT EXISTS prompts_finished ON prompts(finished_at);  -- retention, oldest first
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT PRIMARY KEY,
    asset_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    used_at REAL                     -- the last prompt that used it (retention drops long-unused ones)
);
CREATE INDEX IF NOT EXISTS uploads_used ON uploads(used_at);
CREATE TABLE IF NOT EXISTS orphans (  -- jobs a lost answer created after all, once resent: paid twice
    job_id TEXT PRIMARY KEY,
    prompt_id INTEGER NOT NULL,      -- may be pruned since: `file` keeps its name
    cost REAL,
    found_at REAL NOT NULL,
    file TEXT
);
-- Prompts per state over the journal's whole life, kept by the triggers below: pruning deletes rows
-- but never counts them down, so `status` and the page show lifetime totals without reading every
-- row. `pruned` and `pruned_spent` say how many of them (and their creative units) are gone.
CREATE TABLE IF NOT EXISTS totals (
    state TEXT PRIMARY KEY,
    prompts INTEGER NOT NULL DEFAULT 0,
    pruned INTEGER NOT NULL DEFAULT 0,
    pruned_spent REAL NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS prompts_count_insert AFTER INSERT ON prompts BEGIN
    INSERT INTO totals (state, prompts) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET prompts = prompts + 1;
END;
CREATE TRIGGER IF NOT EXISTS prompts_count_state AFTER UPDATE OF state ON prompts
WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE totals SET prompts = prompts - 1 WHERE state = OLD.state;
    INSERT INTO totals (state, prompts) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET prompts = prompts + 1;
END;
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


# Columns added since the first release: journals written by an older version get them at start.
ADDED_COLUMNS = {
    "prompts": {
        "progress": "REAL",
        "sent_at": "REAL",
        "lost_since": "TEXT",
        "preset": "TEXT",
        "hook": "TEXT",
        "delivered": "TEXT",
        "answered": "INTEGER",
        "file_sha256": "TEXT",
    },
    "uploads": {"used_at": "REAL"},
    "orphans": {"file": "TEXT"},
}

# Version 1 to 2: lifetime counts start from what the journal holds; orphans keep their prompt's name
# (the prompt may be pruned); the upload cache's use starts at the upload; one index replaces another.
TO_V2 = """
DELETE FROM totals;
INSERT INTO totals (state, prompts) SELECT state, COUNT(*) FROM prompts GROUP BY state;
UPDATE orphans SET file = (SELECT file FROM prompts WHERE id = orphans.prompt_id) WHERE file IS NULL;
UPDATE uploads SET used_at = created_at WHERE used_at IS NULL;
DROP INDEX IF EXISTS prompts_state;
"""


def migrate(db: sqlite3.Connection) -> int:
    """Bring a journal up to VERSION (in one transaction); the version it had. ConfigError if newer."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > VERSION:
        raise ConfigError(
            f"the journal was written by a newer scenario-watch (journal version {found}, this one knows "
            f"{VERSION}): upgrade scenario-watch, or point [folders] state elsewhere"
        )
    if found == VERSION:
        return found  # nothing to do: a start (or `status`) writes nothing here
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column, kind in columns.items() if have else ():  # no table yet: SCHEMA has them all
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        for statement in statements(SCHEMA):
            db.execute(statement)
        if found < 1:  # version 0 kept a checked prompt `claimed` with its inputs: that is `queued` now
            db.execute("UPDATE prompts SET state = 'queued' WHERE state = 'claimed' AND inputs IS NOT NULL")
        if found < 2:
            for statement in statements(TO_V2):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found


def statements(script: str) -> list[str]:
    """The statements of a script, one by one (executescript would commit the migration's transaction)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):  # a trigger's inner `;` does not end it
            found.append(pending.strip())
            pending = ""
    return found


def journal_problem(exc: sqlite3.Error) -> str:
    """What a journal error means for a person: full, locked, or something else."""
    text = str(exc).lower()
    if "full" in text:
        return "the journal's disk is full: free space where the journal is"
    if "locked" in text or "busy" in text:
        return "the journal is locked by another program: stop whatever holds it"
    return f"the journal cannot be written ({exc})"

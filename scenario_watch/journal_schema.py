"""The journal's schema, its version, and the migration of journals written by earlier releases."""

from __future__ import annotations

import sqlite3

from .errors import ConfigError

# PRAGMA user_version. 0: releases up to 0.1 (no `queued` state: a checked prompt stayed `claimed`).
VERSION = 1

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


# Columns added since the first release: journals written by an older version get them at start.
ADDED_COLUMNS = {
    "progress": "REAL",
    "sent_at": "REAL",
    "lost_since": "TEXT",
    "preset": "TEXT",
    "hook": "TEXT",
    "delivered": "TEXT",
    "answered": "INTEGER",
    "file_sha256": "TEXT",
}


def migrate(db: sqlite3.Connection) -> int:
    """Bring a journal up to VERSION (in one transaction); the version it had. ConfigError if newer."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > VERSION:
        raise ConfigError(
            f"the journal was written by a newer scenario-watch (journal version {found}, this one knows "
            f"{VERSION}): upgrade scenario-watch, or point [folders] state elsewhere"
        )
    db.executescript(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(prompts)")}
    db.execute("BEGIN IMMEDIATE")
    try:
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE prompts ADD COLUMN {column} {kind}")
        if found < 1:  # version 0 kept a checked prompt `claimed` with its inputs: that is `queued` now
            db.execute("UPDATE prompts SET state = 'queued' WHERE state = 'claimed' AND inputs IS NOT NULL")
        db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found

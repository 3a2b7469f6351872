"""The SQLite journal: every prompt's state, written before each side effect, through checked transitions."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from scenario_watch import logs
from scenario_watch.clock import SYSTEM, Clock
from scenario_watch.errors import TransitionRefused
from scenario_watch.journal.journal_prune import give_back, prune
from scenario_watch.journal.journal_schema import migrate
from scenario_watch.journal.rows import Row, from_db
from scenario_watch.lifecycle import ACTIVE, TRANSITIONS, State

log = logs.get()

# A job that failed at Scenario (this stage) is refunded: it does not count as spent.
REFUNDED_STAGE = "generation"


class Store:
    """A thread-safe journal over one SQLite connection in WAL mode."""

    def __init__(self, path: Path, clock: Clock = SYSTEM) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        # Taken only by a journal with no table yet, and before WAL (an older journal keeps its mode
        # until one VACUUM: journal_prune.py): pages freed by pruning can then go back bit by bit.
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only power loss may lose the last commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        migrate(self._db)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def _write(self, sql: str, *args: Any) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _update(self, prompt_id: int, **values: Any) -> None:
        """Columns that are not the state (the state changes only through _transition)."""
        values["updated_at"] = self.clock.wall()
        columns = ", ".join(f"{key} = ?" for key in values)
        self._write(f"UPDATE prompts SET {columns} WHERE id = ?", *values.values(), prompt_id)

    def _transition(self, prompt_id: int, to: State, sql: str = "", **values: Any) -> None:
        """Move a prompt to `to` from a state the lifecycle allows; TransitionRefused (logged) otherwise."""
        sources = TRANSITIONS[to]
        values = {"state": to.value, **values, "updated_at": self.clock.wall()}
        columns = ", ".join([*(f"{key} = ?" for key in values), *([sql] if sql else [])])
        marks = ", ".join("?" for _ in sources)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE prompts SET {columns} WHERE id = ? AND state IN ({marks})",
                (*values.values(), prompt_id, *sources),
            )
            if cur.rowcount == 1:
                return
            row = self._db.execute("SELECT state FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        found = None if row is None else str(row[0])
        log.error("journal.transition_refused", prompt_id=prompt_id, to=to.value, state=found)
        raise TransitionRefused(f"prompt {prompt_id}: {found} -> {to.value} is not an allowed transition")

    # -- transitions ----------------------------------------------------------------------------------

    def add(self, file: str, claimed: Path, preset: str | None = None) -> int:
        """Journal a claimed file; its prompt id."""
        now = self.clock.wall()
        cur = self._write(
            "INSERT INTO prompts (file, claimed, state, claimed_at, updated_at, preset)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            file,
            str(claimed),
            State.CLAIMED,
            now,
            now,
            preset,
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def queued(self, prompt_id: int, inputs: dict[str, Any], stem: str, file_sha256: str) -> None:
        """Checked: record the inputs, the output stem and the file's content hash; it waits for a slot."""
        inputs_json = json.dumps(inputs, sort_keys=True)
        self._transition(prompt_id, State.QUEUED, inputs=inputs_json, stem=stem, file_sha256=file_sha256)

    def submitting(self, prompt_id: int, inputs: dict[str, Any], started: str) -> None:
        """Record the intent to POST before sending it (crash-safety: reconcile, never resend blindly)."""
        self._transition(
            prompt_id,
            State.SUBMITTING,
            "submit_attempts = submit_attempts + 1",
            inputs=json.dumps(inputs, sort_keys=True),
            submit_started=started,
            sent_at=self.clock.wall(),
            answered=0,
        )

    def submitted(self, prompt_id: int, job_id: str, cost: float | None) -> None:
        """The job id is known: from now on the prompt is polled, never resent."""
        self._transition(prompt_id, State.SUBMITTED, job_id=job_id, cost=cost, submitted_at=self.clock.wall())

    def adopt(self, prompt_id: int, job_id: str, cost: float | None) -> None:
        """A retried prompt takes over its failed attempt's job (one transaction: in one row, never lost)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE prompts SET job_id = NULL WHERE job_id = ? AND state = ?", (job_id, State.FAILED)
                )
                self._db.execute("DELETE FROM adoptions WHERE job_id = ?", (job_id,))
                cur = self._db.execute(
                    "UPDATE prompts SET state = ?, job_id = ?, cost = ?, submitted_at = ?, updated_at = ?"
                    " WHERE id = ? AND state = ?",
                    (
                        State.SUBMITTED,
                        job_id,
                        cost,
                        self.clock.wall(),
                        self.clock.wall(),
                        prompt_id,
                        State.QUEUED,
                    ),
                )
                if cur.rowcount != 1:
                    raise TransitionRefused(f"prompt {prompt_id}: only a queued prompt adopts a job")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def back_to_queued(self, prompt_id: int) -> None:
        """The POST certainly created nothing: the prompt waits for its turn again."""
        self._transition(prompt_id, State.QUEUED)

    def downloading(self, prompt_id: int, asset_ids: list[str], cost: float | None) -> None:
        """The job succeeded: its assets are being written."""
        self._transition(prompt_id, State.DOWNLOADING, asset_ids=json.dumps(asset_ids), cost=cost)

    def done(self, prompt_id: int, outputs: list[str]) -> None:
        """Every output is written."""
        self._transition(prompt_id, State.DONE, outputs=json.dumps(outputs), finished_at=self.clock.wall())

    def failed(self, prompt_id: int, stage: str, error: str, hint: str | None) -> None:
        """The prompt failed at `stage`, with the error and hint a person reads."""
        self._transition(
            prompt_id, State.FAILED, stage=stage, error=error, hint=hint, finished_at=self.clock.wall()
        )

    # -- facts beside the state -----------------------------------------------------------------------

    def answered(self, prompt_id: int) -> None:
        """The lost attempt's server answered (a 5xx with a body): its work on the request is over."""
        self._write("UPDATE prompts SET answered = 1 WHERE id = ?", prompt_id)

    def resending(self, prompt_id: int, lost_since: str) -> None:
        """A lost answer created no job after the quiet period: the prompt is sent again (noted)."""
        self._write(
            "UPDATE prompts SET lost_since = COALESCE(lost_since, ?) WHERE id = ?", lost_since, prompt_id
        )

    def add_orphan(self, job_id: str, prompt_id: int, cost: float | None) -> None:
        """A job that a lost answer created although its prompt was resent (paid twice)."""
        # The file's name is copied: orphans are kept for good, their prompt may be pruned.
        self._write(
            "INSERT OR IGNORE INTO orphans (job_id, prompt_id, cost, found_at, file)"
            " SELECT ?, ?, ?, ?, file FROM prompts WHERE id = ?",
            job_id,
            prompt_id,
            cost,
            self.clock.wall(),
            prompt_id,
        )

    def orphans(self) -> list[tuple[str, str, float | None, float]]:
        """Every orphan job: (job id, the prompt's file, cost, when found)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, file, cost, found_at FROM orphans ORDER BY found_at"
            ).fetchall()
        return [(str(r[0]), str(r[1]), r[2], float(r[3])) for r in rows]

    def set_references(self, prompt_id: int, references: list[dict[str, Any]]) -> None:
        """Record each reference's file, sha256 and asset id (for the manifest)."""
        self._update(prompt_id, refs=json.dumps(references))

    def polled(self, prompt_id: int, progress: float) -> None:
        """The job's progress at the latest poll (for `status`)."""
        self._write("UPDATE prompts SET progress = ? WHERE id = ?", progress, prompt_id)

    def reserve_out_stem(self, prompt_id: int, out_stem: str) -> None:
        """Record the output stem chosen for the prompt."""
        self._update(prompt_id, out_stem=out_stem)

    def published(self, prompt_id: int, delivered: list[dict[str, Any]]) -> None:
        """The outputs published so far (a redo after a failure or a crash skips them)."""
        self._update(prompt_id, delivered=json.dumps(delivered))

    def download_failed(self, prompt_id: int) -> int:
        """Count one failed download attempt; the new count."""
        with self._lock:
            self._db.execute(
                "UPDATE prompts SET download_attempts = download_attempts + 1 WHERE id = ?", (prompt_id,)
            )
            row = self._db.execute(
                "SELECT download_attempts FROM prompts WHERE id = ?", (prompt_id,)
            ).fetchone()
        return int(row[0])

    def filed(self, prompt_id: int, final_path: Path, *, hook: bool = False) -> None:
        """The prompt file reached done/ or failed/: nothing is left to do for it but its hook, if any."""
        # One write for both: a crash after filing still knows the hook is owed (run at the next start).
        self._update(prompt_id, final_path=str(final_path), hook="pending" if hook else None)

    def hook_ran(self, prompt_id: int) -> None:
        """The prompt's hook finished (whatever its exit status): it is not run again."""
        self._write("UPDATE prompts SET hook = 'ran' WHERE id = ?", prompt_id)

    def hooks_pending(self) -> list[Row]:
        """Filed prompts whose hook has not run yet (a crash or a stop in between), oldest first."""
        return self._select("WHERE hook = 'pending' ORDER BY id")

    # -- retried timeouts -----------------------------------------------------------------------------

    def adopt_later(self, file: str, sha256: str, job_id: str) -> None:
        """`retry` of a timed-out prompt: when this file comes back, ask Scenario about its job first."""
        self._write(
            "INSERT OR REPLACE INTO adoptions (file, sha256, job_id, created_at) VALUES (?, ?, ?, ?)",
            file,
            sha256,
            job_id,
            self.clock.wall(),
        )

    def adoption_notes(self, sha256: str) -> list[tuple[str, str]]:
        """(file, job id) of each `retry` note for this content, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT file, job_id FROM adoptions WHERE sha256 = ? ORDER BY created_at", (sha256,)
            ).fetchall()
        return [(str(file), str(job_id)) for file, job_id in rows]

    def adopted(self, job_id: str) -> None:
        """The retried file's job was asked about: forget the note."""
        self._write("DELETE FROM adoptions WHERE job_id = ?", job_id)

    # -- reference uploads ----------------------------------------------------------------------------

    def uploaded_asset(self, sha256: str) -> str | None:
        """The asset id of content uploaded before (noted as used now: retention keeps it), or None."""
        with self._lock:
            row = self._db.execute("SELECT asset_id FROM uploads WHERE sha256 = ?", (sha256,)).fetchone()
            if row is not None:
                self._db.execute(
                    "UPDATE uploads SET used_at = ? WHERE sha256 = ?", (self.clock.wall(), sha256)
                )
        return None if row is None else str(row[0])

    def remember_upload(self, sha256: str, asset_id: str) -> None:
        """Keep the asset id an upload of this content got."""
        now = self.clock.wall()
        self._write(
            "INSERT OR REPLACE INTO uploads (sha256, asset_id, created_at, used_at) VALUES (?, ?, ?, ?)",
            sha256,
            asset_id,
            now,
            now,
        )

    # -- retention ------------------------------------------------------------------------------------

    def prune(self, before: float, limit: int) -> int:
        """Remove up to `limit` filed prompts finished before `before`, and upload notes unused since."""
        with self._lock:
            return prune(self._db, before, limit, REFUNDED_STAGE)

    def give_back(self) -> bool:
        """Return some of the pages freed by pruning to the filesystem; whether more are left."""
        with self._lock:
            return give_back(self._db)

    # -- named values ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> tuple[str, float] | None:
        """A named value and when it was written (unix time), or None."""
        with self._lock:
            row = self._db.execute("SELECT value, updated_at FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def set_meta(self, key: str, value: str) -> None:
        """Keep a named value (replacing the old one)."""
        self._write(
            "INSERT OR REPLACE INTO meta (key, value, updated_at) VALUES (?, ?, ?)",
            key,
            value,
            self.clock.wall(),
        )

    # -- queries --------------------------------------------------------------------------------------

    def get(self, prompt_id: int) -> Row:
        """One prompt by id (KeyError when unknown)."""
        rows = self._select("WHERE id = ?", prompt_id)
        if not rows:
            raise KeyError(prompt_id)
        return rows[0]

    def active(self) -> list[Row]:
        """Prompts not yet finished, oldest first: what a restart resumes."""
        marks = ", ".join("?" for _ in ACTIVE)
        return self._select(f"WHERE state IN ({marks}) ORDER BY id", *ACTIVE)

    def unfinished(self) -> list[Row]:
        """Prompts with something left to do (active, or finished but not filed), oldest first."""
        marks = ", ".join("?" for _ in ACTIVE)
        # One index each (prompts_unfiled, prompts_state_updated): no scan of the finished prompts.
        return self._select(
            f"WHERE id IN (SELECT id FROM prompts WHERE final_path IS NULL"
            f" UNION SELECT id FROM prompts WHERE state IN ({marks})) ORDER BY id",
            *ACTIVE,
        )

    def recent(self, state: State, limit: int = 20) -> list[Row]:
        """The latest prompts in a state, newest first."""
        return self._select("WHERE state = ? ORDER BY updated_at DESC LIMIT ?", state, limit)

    def last_done_at(self) -> float | None:
        """When the newest done prompts finished (Unix time), or None; cheap on a big journal."""
        # The newest rows by id, through the state index (no sort of every done row).
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(finished_at) FROM"
                " (SELECT finished_at FROM prompts WHERE state = ? ORDER BY id DESC LIMIT 100)",
                (State.DONE,),
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def known_job_ids(self, among: Collection[str]) -> set[str]:
        """Those of these job ids the journal owns: its prompts' jobs and the orphans it noted."""
        listed = json.dumps(list(among))  # one parameter, however many jobs a listing returned
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM prompts WHERE job_id IN (SELECT value FROM json_each(?))"
                " UNION SELECT job_id FROM orphans WHERE job_id IN (SELECT value FROM json_each(?))",
                (listed, listed),
            ).fetchall()
        return {str(row[0]) for row in rows}

    def owns_job(self, job_id: str) -> bool:
        """Whether a prompt of this journal made the job."""
        with self._lock:
            found = self._db.execute("SELECT 1 FROM prompts WHERE job_id = ?", (job_id,)).fetchone()
        return found is not None

    def lost_answers(self) -> list[Row]:
        """Prompts whose generate POST may have created a job nobody has recorded yet."""
        return self._select("WHERE state = ? ORDER BY id", State.SUBMITTING)

    def spent_since(self, since: float, exclude: Collection[int] = ()) -> float:
        """Creative units reported for the jobs submitted since a Unix time (refunded failures excluded).

        `exclude`: prompts counted elsewhere (the budget's reservations), so none is counted twice.
        """
        marks = ", ".join("?" for _ in exclude)
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(cost), 0) FROM prompts WHERE submitted_at >= ? AND cost IS NOT NULL"
                f" AND NOT (state = ? AND stage = ?) AND id NOT IN ({marks})",
                (since, State.FAILED, REFUNDED_STAGE, *exclude),
            ).fetchone()
        return float(row[0])

    def counts(self) -> dict[str, int]:
        """How many prompts are in each state, pruned ones included (the journal's triggers keep them)."""
        with self._lock:
            rows = self._db.execute("SELECT state, prompts FROM totals").fetchall()
        counts = {state.value: 0 for state in State}
        counts.update({str(row[0]): int(row[1]) for row in rows})
        return counts

    def _select(self, where: str, *args: Any) -> list[Row]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM prompts {where}", args).fetchall()
        return [from_db(row) for row in rows]

"""One owner for a prompt's life: the state table, checked transitions, the journal's migration, and the
situations that used to lose paid work (credentials refused while jobs run, an unwritable outbox, a
retried timeout, an answered 5xx). In-process on a manual clock shared with the sandbox."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, cli_env, generate_posts, run_cli, wait_for, write_config
from harness import capture_logs

from scenario_watch.api.client import ScenarioClient
from scenario_watch.clock import ManualClock
from scenario_watch.config import (
    MODEL_ID,
    BudgetSettings,
    FolderSettings,
    HookSettings,
    JobSettings,
    WatchSettings,
)
from scenario_watch.errors import TransitionRefused
from scenario_watch.finish.finisher import Finisher
from scenario_watch.finish.hooks import HookRunner
from scenario_watch.intake.intake import Intake
from scenario_watch.journal.journal_schema import VERSION, journal_problem
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import NEXT, TRANSITIONS, Advanced, Result, State, Task, next_task
from scenario_watch.sandbox import Fault, Sandbox
from scenario_watch.scheduler import Scheduler
from scenario_watch.shell.daemon import SPARE_WORKERS
from scenario_watch.shell.heartbeat import published
from scenario_watch.shell.instance import InstanceLock, lock_path
from scenario_watch.shell.recovery import recover
from scenario_watch.shell.status import build
from scenario_watch.shell.workers import FIRST

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


# -- the table ----------------------------------------------------------------------------------------


def put_in_state(store: Store, state: State, tmp: Path) -> int:
    """A prompt driven to `state` through the journal's own transitions."""
    prompt_id = store.add(f"{state}.json", tmp / f"{state}.json")
    path = {
        State.CLAIMED: [],
        State.QUEUED: ["queued"],
        State.SUBMITTING: ["queued", "submitting"],
        State.SUBMITTED: ["queued", "submitting", "submitted"],
        State.DOWNLOADING: ["queued", "submitting", "submitted", "downloading"],
        State.DONE: ["queued", "submitting", "submitted", "downloading", "done"],
        State.FAILED: ["failed"],
    }[state]
    steps = {
        "queued": lambda: store.queued(prompt_id, {"prompt": "p"}, "p", "0" * 64),
        "submitting": lambda: store.submitting(prompt_id, {"prompt": "p"}, "2026-01-01T00:00:00.000Z"),
        "submitted": lambda: store.submitted(prompt_id, f"job_{state}", 5.0),
        "downloading": lambda: store.downloading(prompt_id, ["asset_1"], 5.0),
        "done": lambda: store.done(prompt_id, ["p_1.png"]),
        "failed": lambda: store.failed(prompt_id, "validate", "bad", None),
    }
    for step in path:
        steps[step]()
    assert store.get(prompt_id).state == state
    return prompt_id


def test_recovery_and_the_live_path_read_one_state_to_task_table(tmp_path: Path) -> None:
    """Every state, walked through both: what recovery resumes is what the live path runs next."""
    folders = FolderSettings(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "out",
        done=tmp_path / "done",
        failed=tmp_path / "failed",
        state=tmp_path / "state",
    )
    for folder in (folders.inbox, folders.outbox, folders.done, folders.failed, folders.state):
        folder.mkdir()
    store = Store(folders.state / "journal.sqlite3")
    ids = {state: put_in_state(store, state, tmp_path) for state in State}
    assert set(NEXT) == set(State)  # the table covers every state
    scheduler = Scheduler(JobSettings())
    hooks = HookRunner(HookSettings(), store, folders.outbox, {"PATH": "/usr/bin"})
    recover(
        folders=folders,
        store=store,
        finisher=Finisher(folders, store, hook=hooks),
        scheduler=scheduler,
        intake=Intake(folders.inbox, folders.state, WatchSettings(), lambda path, moved: None, {}),
        hooks=hooks,
        now=0.0,
    )
    recovered = dict(scheduler.due(0.0)) | {pid: Task.SUBMIT for pid in scheduler.waiting}
    for state, prompt_id in ids.items():
        row = store.get(prompt_id)
        if state in (State.DONE, State.FAILED):  # filed by recovery (nothing was claimed): nothing left
            assert next_task(row) is None and row.final_path is not None
            continue
        assert recovered[prompt_id] == NEXT[state] == next_task(row), state
        live = Scheduler(JobSettings())  # the live path: the same row's next task after an Advanced
        live.busy.add(prompt_id)
        live.after(prompt_id, Task.ACCEPT, Advanced(), next_task(row), 0.0)
        handed = dict(live.due(10.0)) | {pid: Task.SUBMIT for pid in live.waiting}
        assert handed[prompt_id] == NEXT[state], state
    hooks.close(0.0)
    store.close()


def test_a_transition_the_table_does_not_allow_is_refused_and_logged(tmp_path: Path) -> None:
    store = Store(tmp_path / "journal.sqlite3")
    done = put_in_state(store, State.DONE, tmp_path)
    with capture_logs() as logs:
        with pytest.raises(TransitionRefused):
            store.failed(done, "timeout", "late", None)  # done is final: nothing may follow it
        with pytest.raises(TransitionRefused):
            store.downloading(put_in_state(store, State.QUEUED, tmp_path), [], None)  # skips submitting
    refused = [e for e in logs.events() if e["event"] == "journal.transition_refused"]
    assert [(e["state"], e["to"]) for e in refused] == [("done", "failed"), ("queued", "downloading")]
    assert store.get(done).state == State.DONE
    assert all(State.DONE not in sources and State.FAILED not in sources for sources in TRANSITIONS.values())
    store.close()


def test_journal_errors_say_full_locked_or_other() -> None:
    assert "full" in journal_problem(sqlite3.OperationalError("database or disk is full"))
    assert "locked" in journal_problem(sqlite3.OperationalError("database is locked"))
    assert "cannot be written" in journal_problem(sqlite3.OperationalError("disk I/O error"))


# -- paid work is never lost --------------------------------------------------------------------------


def test_credentials_refused_while_six_jobs_run_delays_them_and_loses_none(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    """401 for 20 s, [jobs] timeout = 12, 6 paid jobs running: all 6 delivered, none failed or paid twice."""
    write_config(
        folders, sandbox.base_url, jobs={"timeout": 12.0, "poll_interval": 1.0, "poll_max_interval": 3.0}
    )
    sandbox.generation_seconds = 5.0
    folders.state.mkdir()
    lock = InstanceLock.acquire(lock_path(folders.state, "journal.sqlite3"))  # status sees it running
    try:
        proc = daemon()
        for n in range(6):
            folders.drop(f"c{n}.json", {"prompt": f"credentials {n}"})
        wait_for(lambda: len(sandbox.generate_jobs) == 6, what="six jobs paid")
        sandbox.inject(Fault(route="any", kind="status", status=401, times=-1, reason="Unauthorized"))
        refused_at = clock.wall()
        wait_for(lambda: clock.wall() - refused_at > 20, what="20 s of refused credentials")
        report = build(
            Store(folders.state / "journal.sqlite3"),
            lock_path(folders.state, "journal.sqlite3"),
            BudgetSettings(),
            clock.wall(),
        )
        waits = [job["waiting_for"] or "" for job in report["jobs"]]
        assert len(waits) == 6 and all(w.startswith("credentials") for w in waits), report["jobs"]
        assert folders.names(folders.failed) == []
        sandbox.clear_faults()
        wait_for(lambda: len(folders.names(folders.done)) == 6, what="all six delivered")
        assert folders.names(folders.failed) == [] and len(sandbox.generate_jobs) == 6
        assert len(generate_posts(sandbox)) == 6  # nothing paid twice
        errors = [e for e in proc.events() if e.get("level") == "error"]
        assert [e["event"] for e in errors] == ["api.auth_failed"], errors  # one line names the cause
        assert proc.saw("api.auth_restored")
    finally:
        lock.release()


@pytest.fixture
def read_only_outbox(folders: Folders) -> Iterator[Callable[[str], None]]:
    """The outbox as a tmpfs that the test can remount read-only and back (root only)."""
    folders.outbox.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folders.outbox)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {mounted.stderr.decode().strip()}")

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(folders.outbox)], check=True)

    yield remount
    subprocess.run(["umount", "-l", str(folders.outbox)], check=False)


def test_an_outbox_made_read_only_pays_for_nothing_until_writable(
    folders: Folders, sandbox: Sandbox, daemon: Any, read_only_outbox: Any
) -> None:
    proc = daemon()
    read_only_outbox("ro")
    for n in range(3):
        folders.drop(f"ro{n}.json", {"prompt": f"read-only {n}"})
    wait_for(lambda: proc.saw("output.unwritable"), what="the outbox said unwritable")
    wait_for(lambda: len(proc.daemon.scheduler.waiting) == 3, what="three prompts held back")
    assert sandbox.generate_jobs == []  # 0 paid
    read_only_outbox("rw")
    wait_for(lambda: len(folders.names(folders.done)) == 3, what="three delivered")
    assert len(sandbox.generate_jobs) == 3 and folders.names(folders.failed) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # it really dies
def test_a_worker_that_dies_of_a_base_exception_is_replaced_and_its_prompt_goes_on(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """A task ending its thread with SystemExit (not an Exception, so no catch-all sees it): the prompt is
    not left busy, the loop starts another worker in the dead one's place, and the job is delivered."""
    proc = daemon()
    d = proc.daemon
    poll, died = d.runners[Task.POLL], threading.Event()

    def poll_dies_once(prompt_id: int) -> Result:
        if not died.is_set():
            died.set()
            raise SystemExit("a worker's thread ends")
        return poll(prompt_id)

    d.runners[Task.POLL] = poll_dies_once
    workers = len(d.workers.threads)
    folders.drop("p.json", {"prompt": "outlives its worker"})
    wait_for(lambda: (folders.done / "p.json").exists(), what="delivered by another worker")
    assert died.is_set() and proc.saw("worker.died")
    threads = d.workers.threads
    assert len(threads) == workers and all(worker.is_alive() for worker in threads)
    assert len({worker.name for worker in threads}) == workers  # the new one has a name of its own
    assert len(sandbox.generate_jobs) == 1


def test_workers_are_added_while_tasks_wait_for_one(folders: Folders, sandbox: Sandbox, daemon: Any) -> None:
    """Four workers at start. Sixteen submissions whose answers take 0.3 s each (a real API's pace)
    wait for a worker: more are started, up to max_in_flight + 4, and every prompt is paid once."""
    write_config(folders, sandbox.base_url, jobs={"max_in_flight": 16})
    sandbox.inject(Fault(route="generate", kind="delay", delay=0.3, after=True, times=16))
    proc = daemon()
    assert len(proc.daemon.workers.threads) == FIRST
    for n in range(16):
        folders.drop(f"w{n}.json", {"prompt": f"slow answer {n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 16, timeout=30, what="sixteen delivered")
    assert FIRST < len(proc.daemon.workers.threads) <= 16 + SPARE_WORKERS
    assert len(sandbox.generate_jobs) == 16


def test_retrying_a_timed_out_prompt_delivers_its_job_instead_of_paying_again(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    write_config(folders, sandbox.base_url, jobs={"timeout": 1.0})
    sandbox.generation_seconds = 60.0
    daemon()
    folders.drop("slow.json", {"prompt": "slower than the timeout"})
    wait_for(lambda: (folders.failed / "slow.json").exists(), what="timed out")
    report = json.loads((folders.failed / "slow.error.json").read_text())
    assert report["stage"] == "timeout" and report["jobId"] == sandbox.generate_jobs[0]
    clock.advance(60.0)  # meanwhile the job finished at Scenario
    retried = run_cli("retry", "-c", str(folders.config), "slow", env=cli_env())
    assert retried.returncode == 0 and "asked about first" in retried.stdout, retried.stdout
    wait_for(lambda: (folders.done / "slow.json").exists(), timeout=30, what="delivered from the first job")
    manifest = json.loads((folders.outbox / "slow.manifest.json").read_text())
    assert manifest["jobId"] == sandbox.generate_jobs[0] and len(sandbox.generate_jobs) == 1


def test_a_retried_prompt_back_under_another_name_still_adopts_its_job(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    """The inbox holds a new `slow.json` when the timed-out one is retried: it comes back as
    `slow-2.json`, and is still known by its content: its job is delivered, not paid again."""
    write_config(folders, sandbox.base_url, jobs={"timeout": 1.0})
    sandbox.generation_seconds = 60.0
    first = daemon()
    folders.drop("slow.json", {"prompt": "slower than the timeout"})
    wait_for(lambda: (folders.failed / "slow.json").exists(), what="timed out")
    first.stop()
    clock.advance(60.0)  # meanwhile the job finished at Scenario
    sandbox.generation_seconds = 0.3
    folders.drop("slow.json", {"prompt": "another prompt, the same name"})
    retried = run_cli("retry", "-c", str(folders.config), "slow", env=cli_env())
    assert "back in the inbox as slow-2.json" in retried.stdout, retried.stdout
    assert "asked about first" in retried.stdout, retried.stdout
    daemon()
    wait_for(lambda: {"slow.json", "slow-2.json"} <= set(folders.names(folders.done)), what="both done")
    adopted = json.loads((folders.outbox / "slow-2.manifest.json").read_text())
    assert adopted["jobId"] == sandbox.generate_jobs[0] and len(sandbox.generate_jobs) == 2


def test_a_timed_out_prompt_retried_after_the_journal_was_pruned_is_still_not_paid_twice(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    """[journal] keep_days prunes old prompts, but not one whose paid job may have succeeded: `retry`
    days later still asks Scenario about that job and delivers it."""
    write_config(folders, sandbox.base_url, jobs={"timeout": 1.0}, journal={"keep_days": 1.0})
    sandbox.generation_seconds = 60.0
    daemon()
    folders.drop("slow.json", {"prompt": "slower than the timeout"})
    folders.drop("bad.json", {"prompt": ""})  # failed before anything was paid: pruned in time
    wait_for(lambda: {"slow.json", "bad.json"} <= set(folders.names(folders.failed)), what="both failed")
    clock.advance(3 * 86400.0)  # the job finished long ago; retention's pass is due

    def journaled() -> set[str]:
        with sqlite3.connect(folders.state / "journal.sqlite3") as db:
            return {row[0] for row in db.execute("SELECT file FROM prompts")}

    wait_for(lambda: journaled() == {"slow.json"}, what="bad.json pruned, slow.json kept")
    retried = run_cli("retry", "-c", str(folders.config), "slow", env=cli_env())
    assert retried.returncode == 0 and "asked about first" in retried.stdout, retried.stdout
    wait_for(lambda: (folders.done / "slow.json").exists(), timeout=30, what="delivered from the first job")
    manifest = json.loads((folders.outbox / "slow.manifest.json").read_text())
    assert manifest["jobId"] == sandbox.generate_jobs[0] and len(sandbox.generate_jobs) == 1


@pytest.mark.parametrize(
    ("fault", "quiet"),
    [
        # The server answered (a 502 with a body): its work on the request is over; a listing settles it.
        (Fault(route="generate", kind="status", status=502), (0.0, 10.0)),
        # A reset after sending: a job may still be in the making; the long quiet period holds.
        (Fault(route="generate", kind="reset"), (180.0, 200.0)),
        # A gateway's 504: it stopped waiting, the server behind it may not have; the long one too.
        (Fault(route="generate", kind="status", status=504), (180.0, 200.0)),
    ],
)
def test_the_quiet_period_before_a_resend_fits_what_happened(
    folders: Folders,
    sandbox: Sandbox,
    daemon: Any,
    clock: ManualClock,
    fault: Fault,
    quiet: tuple[float, float],
) -> None:
    write_config(folders, sandbox.base_url, api={"lost_answer_wait": 180.0}, jobs={"timeout": 900.0})
    sandbox.inject(fault)  # not `after`: nothing was created, so the prompt must be sent again, once
    daemon()
    folders.drop("q.json", {"prompt": "lost once"})
    wait_for(lambda: (folders.done / "q.json").exists(), what="done")
    posts = generate_posts(sandbox)
    assert len(posts) == 2 and len(sandbox.generate_jobs) == 1
    gap = posts[1].at - posts[0].at
    assert quiet[0] <= gap <= quiet[1], gap


# -- the journal of the previous release ---------------------------------------------------------------

# The journal of release 0.1 (before `queued`), as it created it.
V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    claimed TEXT NOT NULL,
    state TEXT NOT NULL,
    inputs TEXT,
    stem TEXT,
    out_stem TEXT,
    job_id TEXT UNIQUE,
    submit_started TEXT,
    submit_attempts INTEGER NOT NULL DEFAULT 0,
    cost REAL,
    asset_ids TEXT,
    outputs TEXT,
    refs TEXT,
    stage TEXT, error TEXT, hint TEXT,
    final_path TEXT,
    progress REAL,
    preset TEXT,
    hook TEXT,
    sent_at REAL,
    lost_since TEXT,
    download_attempts INTEGER NOT NULL DEFAULT 0,
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
CREATE TABLE IF NOT EXISTS orphans (
    job_id TEXT PRIMARY KEY,
    prompt_id INTEGER NOT NULL,
    cost REAL,
    found_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


def test_a_journal_of_the_previous_release_opens_migrated_and_resumes(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """Release 0.1 kept a checked prompt `claimed` with its inputs: it opens as `queued` and is sent;
    a job it had submitted is polled and delivered, never sent again."""
    client = ScenarioClient(sandbox.base_url, sandbox.key, sandbox.secret, model_id=MODEL_ID)
    job, _ = client.generate({"prompt": "made by the old release"})
    client.close()
    claimed = folders.inbox / ".processing" / "old"
    claimed.mkdir(parents=True)
    folders.state.mkdir()
    db = sqlite3.connect(folders.state / "journal.sqlite3")
    db.executescript(V0_SCHEMA)
    for n, (state, job_id) in enumerate([("claimed", None), ("submitted", job.job_id)]):
        (claimed / f"old{n}.json").write_text(json.dumps({"prompt": f"old {n}"}))
        db.execute(
            "INSERT INTO prompts (file, claimed, state, inputs, stem, job_id, submit_attempts, claimed_at,"
            " submitted_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            (
                f"old{n}.json",
                str(claimed / f"old{n}.json"),
                state,
                json.dumps({"prompt": f"old {n}"}),
                f"old{n}",
                job_id,
                time.time(),
                time.time() if job_id else None,
                time.time(),
            ),
        )
    db.commit()
    db.close()
    store = Store(folders.state / "journal.sqlite3")
    assert [row.state for row in store.unfinished()] == [State.QUEUED, State.SUBMITTED]
    store.close()
    assert sqlite3.connect(folders.state / "journal.sqlite3").execute("PRAGMA user_version").fetchone() == (
        VERSION,
    )
    daemon()
    wait_for(lambda: len(folders.names(folders.done)) == 2, what="both resumed and delivered")
    assert len(sandbox.generate_jobs) == 2  # the old job, and one new job for the queued prompt
    manifest = json.loads((folders.outbox / "old1.manifest.json").read_text())
    assert manifest["jobId"] == job.job_id


def test_forty_prompts_through_a_quarter_of_failing_requests_are_each_paid_once(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """About a quarter of the requests fail (answered 5xx before and after a job is made, resets, failing
    polls): all 40 are delivered, each paid once. The slowest prompt's time is printed (`-s`)."""
    write_config(folders, sandbox.base_url, api={"lost_answer_wait": 180.0}, jobs={"max_in_flight": 8})
    for fault in (
        Fault(route="generate", kind="status", status=502, times=5),  # answered, nothing made
        Fault(route="generate", kind="status", status=500, after=True, times=4),  # answered, job made
        Fault(route="generate", kind="reset", times=2),  # no answer: the long quiet period
        Fault(route="job", kind="status", status=503, times=8),
        Fault(route="asset", kind="reset", times=4),
    ):
        sandbox.inject(fault)
    daemon()
    for n in range(40):
        folders.drop(f"f{n:02}.json", {"prompt": f"fault run {n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 40, timeout=60, what="40 delivered")
    assert folders.names(folders.failed) == [] and len(sandbox.generate_jobs) == 40
    store = Store(folders.state / "journal.sqlite3")
    try:
        times = sorted((row.finished_at or 0.0) - row.claimed_at for row in store.recent(State.DONE, 40))
    finally:
        store.close()
    print(
        f"\nfault run: slowest prompt {times[-1]:.1f} s, median {times[len(times) // 2]:.1f} s (daemon clock)"
    )


def test_a_restart_polls_its_first_job_when_the_last_run_learned_it_ends(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """The generation time a run learned is published, and the next run starts from it: its first job
    is polled once, when it should be done, not every 0.05-0.2 s while the interval grows."""
    sandbox.generation_seconds = 5.0
    first = daemon()
    folders.drop("teach.json", {"prompt": "how long a generation takes"})
    wait_for(lambda: (folders.done / "teach.json").exists(), what="the first job done")
    journal = Store(folders.state / "journal.sqlite3")
    try:
        wait_for(lambda: published(journal).get("typical"), what="the learned time published")
    finally:
        journal.close()
    first.stop()
    again = daemon()
    folders.drop("after.json", {"prompt": "polled once"})
    wait_for(lambda: (folders.done / "after.json").exists(), what="the job after the restart done")
    again.stop()
    job_id = json.loads((folders.outbox / "after.manifest.json").read_text())["jobId"]
    polls = [r for r in sandbox.requests if r.method == "GET" and r.path == f"/v1/jobs/{job_id}"]
    assert len(polls) == 1

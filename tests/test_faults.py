"""Faults injected into the sandbox for real: the daemon finishes every prompt, and pays once.

The daemon runs in-process (harness.py) on a manual clock shared with the sandbox: backoffs, quiet
periods and timeouts pass without waiting, while every request is real HTTP over loopback.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, cli_env, generate_posts, run_cli, wait_for, write_config
from harness import HereDaemon

from scenario_watch.clock import ManualClock
from scenario_watch.sandbox import Fault, Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


def finish_one(
    folders: Folders,
    daemon: Any,
    name: str = "p",
    body: dict[str, object] | None = None,
    timeout: float = 40.0,
) -> HereDaemon:
    proc = daemon()
    folders.drop(f"{name}.json", body or {"prompt": f"fault test {name}"})
    wait_for(
        lambda: (folders.done / f"{name}.json").exists() or (folders.failed / f"{name}.json").exists(),
        timeout=timeout,
        what=f"{name} finished",
    )
    return proc


def assert_done_once(folders: Folders, sandbox: Sandbox, name: str = "p") -> None:
    assert folders.names(folders.failed) == [], folders.names(folders.failed)
    assert (folders.done / f"{name}.json").exists()
    manifest = json.loads((folders.outbox / f"{name}.manifest.json").read_text())
    assert len(sandbox.generate_jobs) == 1, sandbox.generate_jobs
    assert manifest["jobId"] == sandbox.generate_jobs[0]
    assert manifest["files"], manifest  # never "done" without its images
    for entry in manifest["files"]:
        assert entry["originalSha256"] == hashlib.sha256(sandbox.asset_bytes(entry["assetId"])).hexdigest()


@pytest.mark.parametrize(
    "fault",
    [
        Fault(route="job", kind="status", status=500, times=3),
        Fault(route="job", kind="status", status=502, times=2),
        Fault(route="job", kind="status", status=503, times=2),
        Fault(route="job", kind="status", status=429, retry_after=0.5, times=2),
        Fault(route="job", kind="status", status=429, times=2),
        Fault(route="job", kind="status", status=404, times=2),  # a job just made, not listed yet
        Fault(route="job", kind="reset", times=3),
        Fault(route="job", kind="malformed", times=3),
        Fault(route="job", kind="truncated", times=2),
        Fault(route="job", kind="missing_fields", times=3),
        Fault(route="job", kind="no_metadata", times=6),  # a success that names no outputs, at first
        Fault(route="job", kind="id_shape", times=3),
        Fault(route="job", kind="delay", delay=1.0, times=2),
        Fault(route="asset", kind="status", status=500, times=4),
        Fault(route="asset", kind="reset", times=2),
        Fault(route="asset", kind="malformed", times=2),
        Fault(route="cdn", kind="status", status=403, times=1),
        Fault(route="cdn", kind="truncated", times=2),
        Fault(route="cdn", kind="reset", times=2),
        Fault(route="cdn", kind="status", status=500, times=5),
        Fault(route="generate", kind="id_shape"),
    ],
    ids=lambda f: f"{f.route}-{f.kind}-{f.status}",
)
def test_transient_faults_never_fail_a_prompt(
    folders: Folders, sandbox: Sandbox, daemon: Any, fault: Fault
) -> None:
    sandbox.inject(fault)
    finish_one(folders, daemon)
    assert_done_once(folders, sandbox)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(route="generate", kind="status", status=500, after=True),
        Fault(route="generate", kind="status", status=502, after=True),
        Fault(route="generate", kind="reset", after=True),
        Fault(route="generate", kind="malformed", after=True),
        Fault(route="generate", kind="truncated", after=True),
        Fault(route="generate", kind="delay", delay=7.0, after=True),  # longer than request_timeout
    ],
    ids=lambda f: f"after-{f.kind}-{f.status}",
)
def test_lost_generate_answer_is_reconciled_not_resent(
    folders: Folders, sandbox: Sandbox, daemon: Any, fault: Fault
) -> None:
    sandbox.inject(fault)
    proc = finish_one(folders, daemon)
    assert_done_once(folders, sandbox)
    assert proc.saw("job.adopted"), proc.output()
    assert any(r.path == "/v1/jobs" for r in sandbox.requests)  # it listed jobs before deciding


@pytest.mark.parametrize(
    "fault",
    [
        Fault(route="generate", kind="status", status=500),
        Fault(route="generate", kind="status", status=503, times=2),
        Fault(route="generate", kind="reset"),
    ],
    ids=lambda f: f"before-{f.kind}-{f.status}",
)
def test_generate_that_created_nothing_is_sent_again_once(
    folders: Folders, sandbox: Sandbox, daemon: Any, fault: Fault
) -> None:
    sandbox.inject(fault)
    finish_one(folders, daemon)
    assert_done_once(folders, sandbox)
    assert len(generate_posts(sandbox)) == 1 + fault.times


def test_reconcile_survives_a_failing_job_listing(folders: Folders, sandbox: Sandbox, daemon: Any) -> None:
    sandbox.inject(Fault(route="generate", kind="status", status=500, after=True))
    sandbox.inject(Fault(route="jobs", kind="status", status=500, times=6))
    finish_one(folders, daemon, timeout=60)
    assert_done_once(folders, sandbox)


def test_429_on_generate_pauses_submitting_and_resumes(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    sandbox.inject(Fault(route="generate", kind="status", status=429, retry_after=1.0, times=3))
    proc = daemon()
    for n in range(3):
        folders.drop(f"q{n}.json", {"prompt": f"queued {n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 3, timeout=40, what="3 done")
    assert len(sandbox.generate_jobs) == 3
    assert proc.saw("api.rate_limited")


def test_parallel_limit_429_is_backpressure_not_failure(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    sandbox.parallel_limit = 2
    write_config(folders, sandbox.base_url, jobs={"max_in_flight": 6})
    daemon()
    for n in range(8):
        folders.drop(f"l{n}.json", {"prompt": f"limited {n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 8, timeout=60, what="8 done")
    assert folders.names(folders.failed) == []
    assert len(sandbox.generate_jobs) == 8


def test_bad_credentials_stop_submitting_and_keep_prompts(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    proc = daemon(env=cli_env(SCENARIO_API_SECRET="wrong-secret"))
    for n in range(3):
        folders.drop(f"a{n}.json", {"prompt": f"auth {n}"})
    wait_for(lambda: proc.saw("api.auth_failed"), what="auth error")
    wait_for(lambda: len(folders.claimed()) == 3, what="3 claimed")
    assert folders.names(folders.failed) == []
    auth_errors = [e for e in proc.events() if e.get("event") == "api.auth_failed"]
    assert len(auth_errors) == 1  # one clear error, not one per prompt
    assert "SCENARIO_API_SECRET" in auth_errors[0]["hint"]
    posts = len(generate_posts(sandbox))
    assert posts <= 3
    folders.drop("later.json", {"prompt": "arrives while blocked"})
    wait_for(lambda: any(e.get("file") == "later.json" for e in proc.events()), what="later.json queued")
    time.sleep(0.5)  # asserting an absence: give a wrongly dispatched POST time to show up
    assert len(generate_posts(sandbox)) == posts  # submitting stopped
    assert "wrong-secret" not in proc.output()
    assert proc.stop() == 0
    daemon()  # with the right credentials, the queued prompts go through
    wait_for(
        lambda: len(folders.names(folders.done)) == 4, timeout=30, what="4 done after fixing credentials"
    )


def test_api_400_fails_with_the_reason(folders: Folders, sandbox: Sandbox, daemon: Any) -> None:
    finish_one(folders, daemon, body={"prompt": "edit", "referenceImages": ["asset_doesnotexist"]})
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert report["stage"] == "submit"
    assert "asset_doesnotexist" in report["error"]
    assert sandbox.generate_jobs == []


def test_canceled_job_fails_with_a_clear_error(folders: Folders, sandbox: Sandbox, daemon: Any) -> None:
    sandbox.fail_next_jobs(1, error="Canceled by an admin", hint="", status="canceled")
    finish_one(folders, daemon)
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert report["stage"] == "generation"
    assert "canceled" in report["error"]


def test_job_timeout_fails_with_stage_timeout(folders: Folders, sandbox: Sandbox, daemon: Any) -> None:
    sandbox.generation_seconds = 30.0
    write_config(folders, sandbox.base_url, jobs={"timeout": 1.0})
    finish_one(folders, daemon)
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert report["stage"] == "timeout"
    assert report["jobId"] == sandbox.generate_jobs[0]


@pytest.mark.parametrize(
    ("fault", "event", "error"),
    [
        (Fault(route="job", kind="status", status=404, times=-1), "job.poll_not_found", "did not know job"),
        (Fault(route="job", kind="no_metadata", times=-1), "job.success_without_outputs", "named no outputs"),
    ],
    ids=["404", "success-without-outputs"],
)
def test_a_paid_job_never_seen_ending_fails_at_its_timeout_and_retry_delivers_it(
    folders: Folders, sandbox: Sandbox, daemon: Any, fault: Fault, event: str, error: str
) -> None:
    """Scenario named the job, then, until [jobs] timeout, answered 404 for it (a proxy, a lagging
    replica) or called it a success naming no outputs: the prompt fails with the job's id, never
    "done" without images, and `retry` delivers that job once it is answered right: paid once."""
    sandbox.inject(fault)
    write_config(folders, sandbox.base_url, jobs={"timeout": 5.0})
    proc = finish_one(folders, daemon)
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert report["stage"] == "poll" and report["jobId"] == sandbox.generate_jobs[0], report
    assert error in report["error"] and "retry" in report["hint"]
    assert [e["event"] for e in proc.events()].count(event) == 1  # said once, however often asked
    sandbox.clear_faults()
    retried = run_cli("retry", "-c", str(folders.config), "p", env=cli_env())
    assert "asked about first" in retried.stdout, retried.stdout
    wait_for(lambda: (folders.done / "p.json").exists(), what="delivered from the first job")
    assert_done_once(folders, sandbox)


def test_download_that_keeps_failing_ends_in_failed_with_a_hint(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    sandbox.inject(Fault(route="cdn", kind="status", status=404, times=-1))
    write_config(folders, sandbox.base_url, jobs={"timeout": 3.0})  # also the bound on download failures
    proc = finish_one(folders, daemon, timeout=120)
    failures = [e for e in proc.events() if e.get("event") == "output.download_failed"]
    assert len(failures) >= 7  # at least 8 attempts in all, spread over the 3 s
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert report["stage"] == "download"
    assert "succeeded" in report["hint"]
    assert [n for n in folders.names(folders.outbox) if n.endswith(".png")] == []


def test_connection_refused_until_the_api_comes_up(folders: Folders, tmp_path: Path, daemon: Any) -> None:
    """Nothing listens at first (refused: certainly not sent); once the server is up, one job is made."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_config(folders, f"http://127.0.0.1:{port}/v1")
    proc = daemon()
    folders.drop("early.json", {"prompt": "sent before the API is up"})
    wait_for(lambda: proc.saw("job.submit_failed"), what="refused")
    with Sandbox(port=port, generation_seconds=0.2) as late:
        wait_for(lambda: (folders.done / "early.json").exists(), timeout=60, what="done once the API is up")
        assert len(late.generate_jobs) == 1
    assert folders.names(folders.failed) == []


def test_unknown_model_fails_with_a_hint_instead_of_looping(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    write_config(folders, sandbox.base_url, api={"model_id": "model_does-not-exist"})
    finish_one(folders, daemon)
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert report["stage"] == "submit" and "model_id" in report["hint"]
    assert sandbox.generate_jobs == []


def test_a_job_that_cannot_be_asked_about_is_kept_past_the_timeout(
    folders: Folders, sandbox: Sandbox, daemon: Any, clock: ManualClock
) -> None:
    """Only Scenario's answer ends a job: polls failing for 10 x [jobs] timeout do not fail a paid job."""
    sandbox.inject(Fault(route="job", kind="status", status=500, times=-1))
    write_config(
        folders, sandbox.base_url, jobs={"timeout": 1.0, "poll_interval": 2.0, "poll_max_interval": 5.0}
    )
    proc = daemon()
    folders.drop("p.json", {"prompt": "asked about later"})
    wait_for(lambda: proc.saw("job.submitted"), what="paid")  # the clock may jump before the file is seen
    start = clock.monotonic()
    wait_for(lambda: clock.monotonic() - start > 10, what="ten timeouts of failing polls")
    assert folders.names(folders.failed) == [] and not (folders.done / "p.json").exists()
    sandbox.clear_faults()
    wait_for(lambda: (folders.done / "p.json").exists(), what="delivered once the API answers")
    assert len(sandbox.generate_jobs) == 1 and proc.saw("job.poll_failed")


def test_twin_prompts_with_lost_answers_each_keep_their_own_job(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """Same text twice, both answers lost: each adopts its own job, none is paid twice or shared."""
    sandbox.inject(Fault(route="generate", kind="status", status=502, after=True, times=2))
    daemon()
    for name in ("twin-a", "twin-b"):
        folders.drop(f"{name}.json", {"prompt": "the very same words"})
    wait_for(lambda: len(folders.names(folders.done)) == 2, timeout=40, what="both done")
    jobs = {
        json.loads((folders.outbox / f"{n}.manifest.json").read_text())["jobId"] for n in ("twin-a", "twin-b")
    }
    assert jobs == set(sandbox.generate_jobs) and len(jobs) == 2
    assert all("seed" not in post.body for post in generate_posts(sandbox))  # matched one to one, no seed

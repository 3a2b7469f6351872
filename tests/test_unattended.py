"""Running unattended: one daemon per journal, a status that answers, the daily budget, sandbox resume."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from conftest import (
    DaemonProcess,
    Folders,
    StartDaemon,
    cli_env,
    generate_posts,
    run_cli,
    status_watch_until,
    wait_for,
    write_config,
)

from scenario_watch.sandbox import Sandbox


def status(folders: Folders, *extra: str) -> dict[str, Any]:
    result = run_cli("status", "--json", "-c", str(folders.config), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_a_second_daemon_exits_2_naming_the_first_which_goes_on(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    first = daemon()
    for extra in ((), ("--once",)):
        started = time.monotonic()
        second = run_cli("run", "-c", str(folders.config), *extra, timeout=20)
        assert second.returncode == 2, second.stdout + second.stderr
        assert time.monotonic() - started < 10  # at once, not after some timeout
        expected = f"another scenario-watch (PID {first.proc.pid}) is running on {folders.state}"
        assert expected in second.stderr
    assert generate_posts(sandbox) == []  # the second one touched nothing
    folders.drop("after.json", {"prompt": "the first daemon still works"})
    wait_for(lambda: (folders.done / "after.json").exists(), what="done by the first daemon")
    assert first.proc.poll() is None
    # status, retry and config never take the lock.
    assert run_cli("status", "-c", str(folders.config)).returncode == 0
    assert run_cli("config", "-c", str(folders.config)).returncode == 0
    assert run_cli("retry", "--all", "-c", str(folders.config)).returncode == 0


def test_status_says_whether_it_runs_and_how_far_a_job_is(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    sandbox.generation_seconds = 4.0
    proc = daemon()
    folders.drop("slow.json", {"prompt": "slow one"})

    def running_job() -> dict[str, Any] | None:
        report = status(folders)
        jobs = [job for job in report["jobs"] if job["progress"] and 0 < job["progress"] < 1]
        return report if jobs else None

    report = wait_for(running_job, what="a job with progress between 0 and 1")
    assert set(report) == {"daemon", "counts", "jobs", "budget", "recent", "presets"}
    assert report["presets"] == {}  # no preset, nothing left alone
    assert report["daemon"]["running"] is True and report["daemon"]["pid"] == proc.proc.pid
    assert 0 <= report["daemon"]["heartbeat_age_s"] < 10
    [job] = report["jobs"]
    assert set(job) == {
        "name",
        "state",
        "job_id",
        "progress",
        "progress_estimate",
        "age_s",
        "waiting_for",
        "id",
        "preset",
        "prompt",
    }
    assert (job["name"], job["state"], job["job_id"]) == ("slow.json", "submitted", sandbox.generate_jobs[0])
    assert report["budget"] == {"daily": 0.0, "spent_today": 5.0, "resumes_at": None}
    wait_for(lambda: (folders.done / "slow.json").exists(), what="done")
    [recent] = status(folders)["recent"]
    assert recent["name"] == "slow.json" and recent["state"] == "done" and recent["at"]
    text = run_cli("status", "-c", str(folders.config)).stdout
    assert f"running, PID {proc.proc.pid}" in text and "slow.json" in text
    assert proc.stop() == 0
    stopped = status(folders)["daemon"]
    assert stopped["running"] is False and stopped["pid"] is None
    assert "not running" in run_cli("status", "-c", str(folders.config)).stdout


def test_status_watch_redraws_until_interrupted(folders: Folders, sandbox: Sandbox) -> None:
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0  # a journal to show
    redrawn = lambda screen: screen.count("daemon   not running") >= 2  # noqa: E731 (each second)
    status_watch_until(folders, redrawn, what="two redraws")


def test_daily_budget_holds_prompts_until_lifted_and_never_fails_or_pays_them(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    assert sandbox.cost_per_output == 5
    write_config(folders, sandbox.base_url, budget={"daily": 22})
    proc = daemon()
    for n in range(8):
        folders.drop(f"b{n}.json", {"prompt": f"budget {n}", "numOutputs": 1})

    def four_done_four_waiting() -> dict[str, Any] | None:
        report = status(folders)
        waiting = [job for job in report["jobs"] if "budget" in (job["waiting_for"] or "")]
        return report if report["counts"]["done"] == 4 and len(waiting) == 4 else None

    report = wait_for(four_done_four_waiting, what="four paid, four waiting for the budget")
    assert len(generate_posts(sandbox)) == 4
    assert report["budget"]["daily"] == 22 and report["budget"]["spent_today"] == 20
    assert report["budget"]["resumes_at"].endswith("T00:00:00Z")
    assert all(
        job["waiting_for"] == f"budget until {report['budget']['resumes_at']}" for job in report["jobs"]
    )
    assert report["counts"]["failed"] == 0 and folders.names(folders.failed) == []
    assert [e["event"] for e in proc.events()].count("budget.paused") == 1
    paused = next(e for e in proc.events() if e["event"] == "budget.paused")
    assert paused["spent"] + paused["in_flight"] == 20 and paused["cap"] == 22
    assert proc.stop() == 0
    write_config(folders, sandbox.base_url, budget={"daily": 0})
    daemon()
    wait_for(lambda: len(folders.names(folders.done)) == 8, what="all eight done")
    assert len(sandbox.generate_jobs) == 8 and len(generate_posts(sandbox)) == 8
    assert folders.names(folders.failed) == []


def test_max_per_prompt_fails_a_dear_prompt_locally(folders: Folders, sandbox: Sandbox) -> None:
    write_config(folders, sandbox.base_url, budget={"max_per_prompt": 12})
    folders.drop("dear.json", {"prompt": "too many", "numOutputs": 3})
    folders.drop("cheap.json", {"prompt": "fine", "numOutputs": 2})
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert folders.names(folders.done) == ["cheap.json"]
    error = json.loads((folders.failed / "dear.error.json").read_text())
    assert error["stage"] == "budget" and "estimated at 15 creative units" in error["error"]
    assert len(generate_posts(sandbox)) == 1


def test_a_mistyped_environment_override_is_a_configuration_error(folders: Folders) -> None:
    result = run_cli("config", "-c", str(folders.config), env=cli_env(SCENARIO_WATCH_JOB__MAX_IN_FLIGHT="4"))
    assert result.returncode == 2
    assert "SCENARIO_WATCH_JOB__MAX_IN_FLIGHT" in result.stderr and "did you mean 'jobs'" in result.stderr
    result = run_cli(
        "run", "--once", "-c", str(folders.config), env=cli_env(SCENARIO_WATCH_JOBS__MAX_INFLIGHT="4")
    )
    assert result.returncode == 2 and "did you mean 'max_in_flight'" in result.stderr
    ok = run_cli("config", "-c", str(folders.config), env=cli_env(SCENARIO_WATCH_JOBS__MAX_IN_FLIGHT="4"))
    assert ok.returncode == 0, ok.stderr


def test_the_sandbox_remembers_its_jobs_across_a_restart(tmp_path: Path, folders: Folders) -> None:
    """Ctrl-C while the built-in sandbox's job runs (3 s), start again: the job resumes, nothing is resent."""
    proc = DaemonProcess(folders.config, tmp_path / "a.log", None, "--sandbox")
    try:
        folders.drop("resume.json", {"prompt": "survive a restart"})
        wait_for(lambda: proc.saw("job.submitted"), what="the job submitted")
        proc.proc.send_signal(signal.SIGINT)  # the daemon handles SIGINT itself, even if started ignoring it
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
    assert folders.names(folders.done) == []
    world = json.loads((folders.state / "sandbox-world.json").read_text())
    assert len(world["generate_jobs"]) == 1
    again = DaemonProcess(folders.config, tmp_path / "b.log", None, "--sandbox")
    try:
        wait_for(lambda: (folders.done / "resume.json").exists(), what="done after the restart")
        # `status` without --sandbox finds the sandbox daemon's journal by itself.
        result = run_cli("status", "--json", "-c", str(folders.config))
        assert json.loads(result.stdout)["daemon"]["running"] is True
        assert "sandbox journal" in result.stderr
    finally:
        assert again.stop() == 0
    assert not again.saw("job.submitted") and not again.saw("prompt.failed")
    world = json.loads((folders.state / "sandbox-world.json").read_text())
    assert len(world["generate_jobs"]) == 1
    assert (folders.outbox / "resume_1.png").exists()

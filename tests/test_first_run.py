"""What a new user meets first (issue 18): the sandbox, the commands' edges, the messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, StartDaemon, cli_env, run_cli, status_watch_until, wait_for, write_config

from scenario_watch.sandbox import Sandbox


def test_run_sandbox_ignores_real_credentials_from_every_source(
    tmp_path: Path, folders: Folders, sandbox: Sandbox
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "scenario-api-key").write_text("real-systemd-key\n")
    (creds / "scenario-api-secret").write_text("real-systemd-secret\n")
    write_config(folders, sandbox.base_url, api={"key": "real-toml-key", "secret": "real-toml-secret"})
    env = cli_env(
        SCENARIO_API_KEY="real-env-key",
        SCENARIO_API_SECRET="real-env-secret",
        SCENARIO_WATCH_API__KEY="real-nested-key",
        SCENARIO_WATCH_API__SECRET="real-nested-secret",
        CREDENTIALS_DIRECTORY=str(creds),
    )
    (folders.inbox / "p.json").write_text('{"prompt": "no account needed"}')
    result = run_cli("run", "--once", "--sandbox", "-c", str(folders.config), env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert (folders.done / "p.json").exists(), out
    assert out.count("ignoring real credentials: the sandbox needs none") == 1
    for source in ("SCENARIO_API_KEY", "SCENARIO_WATCH_API__SECRET", "[api] key", "scenario-api-secret"):
        assert source in out
    assert "real-" not in out  # where they came from, never what they are


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["config"],
        ["config", "--json"],
        ["validate", "{prompt}"],
        ["estimate", "--sandbox", "{prompt}"],
        ["retry", "--all"],
    ],
)
def test_a_reader_that_leaves_early_gets_no_traceback(folders: Folders, command: list[str]) -> None:
    """`status | head`: the pipe's reader is gone before the command writes (deterministically here)."""
    prompt = folders.root / "p.json"
    prompt.write_text('{"prompt": "x"}')
    args = [part.format(prompt=prompt) for part in command] + ["-c", str(folders.config)]
    read, write = os.pipe()
    os.close(read)  # nobody will ever read: the first write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "scenario_watch", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            env=cli_env(),
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 141, result.stderr


def test_retry_all_with_nothing_failed_says_so(folders: Folders) -> None:
    result = run_cli("retry", "--all", "-c", str(folders.config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nothing to retry in {folders.failed}"


def test_validate_reports_every_problem_of_a_file(tmp_path: Path) -> None:
    """numOutputs out of range used to hide the missing reference (found only after the first fix)."""
    path = tmp_path / "two.json"
    path.write_text('{"prompt": "x", "numOutputs": 9, "referenceImages": ["beach.jpg"]}')
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert "numOutputs: must be a whole number from 1 to 4 (got 9)" in result.stdout
    assert "'beach.jpg' does not exist" in result.stdout, result.stdout


def test_validate_shows_values_as_json(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text('{"prompt": "x", "useGoogleSearch": false, "aspectRatio": "16:9", "numOutputs": 2}')
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stdout
    assert 'aspectRatio="16:9", useGoogleSearch=false, numOutputs=2)' in result.stdout, result.stdout
    assert "False" not in result.stdout


def no_credentials() -> dict[str, str]:
    return {k: v for k, v in cli_env().items() if not k.startswith("SCENARIO_API")}


def test_estimate_and_validate_work_with_sandbox_and_no_account(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "x", "numOutputs": 2}')
    priced = run_cli("estimate", "--sandbox", str(path), env=no_credentials())
    assert priced.returncode == 0, priced.stdout + priced.stderr
    assert "p.json: 10 creative units" in priced.stdout
    checked = run_cli("validate", "--sandbox", str(path), env=no_credentials())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok -> p_N" in checked.stdout


def test_estimate_without_credentials_names_both_ways_out(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "x"}')
    result = run_cli("estimate", str(path), env=no_credentials())
    assert result.returncode == 2
    assert "SCENARIO_API_KEY and SCENARIO_API_SECRET" in result.stderr
    assert "scenario-watch estimate --sandbox" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def status_json(folders: Folders) -> dict[str, Any]:
    result = run_cli("status", "--json", "-c", str(folders.config))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_status_estimates_progress_from_the_learned_generation_time(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """Learned polling asks once, when a job should be done: until then status estimates, and says so."""
    sandbox.generation_seconds = 6.0
    daemon()
    folders.drop("first.json", {"prompt": "teach the daemon how long a generation takes"})
    wait_for(lambda: (folders.done / "first.json").exists(), timeout=30, what="the first job done")
    folders.drop("second.json", {"prompt": "now estimate me"})

    def estimated() -> dict[str, Any] | None:
        jobs = [job for job in status_json(folders)["jobs"] if job["progress_estimate"] is not None]
        return jobs[0] if jobs else None

    job = wait_for(estimated, timeout=10, what="a progress estimate")
    assert job["name"] == "second.json" and job["state"] == "submitted"
    assert job["progress"] is None  # the API's value: not asked yet
    assert 0 <= job["progress_estimate"] <= 0.99
    text = run_cli("status", "-c", str(folders.config)).stdout
    assert re.search(r"second\.json  job=job_\w+  ~\d+ %", text), text
    bar = re.compile(r"second\.json  job=job_\w+  \[#*\.*\] ~\d+ %")
    screen = status_watch_until(folders, bar.search, what="a progress bar", timeout=10)
    assert re.search(r"\[[#.]{20}\]", screen)


def test_status_names_the_reference_a_prompt_waits_for(folders: Folders, daemon: StartDaemon) -> None:
    daemon()
    folders.drop("later.json", {"prompt": "x", "referenceImages": ["beach.jpg"]})

    def waiting() -> str | None:
        jobs = [job["waiting_for"] for job in status_json(folders)["jobs"]]
        return jobs[0] if jobs and (jobs[0] or "").startswith("reference") else None

    assert wait_for(waiting, what="the wait for beach.jpg") == "reference beach.jpg (up to 60 s)"
    text = run_cli("status", "-c", str(folders.config)).stdout
    assert "waiting for reference beach.jpg (up to 60 s)" in text, text


def test_recent_marks_a_failure_that_was_retried_and_since_done(folders: Folders) -> None:
    (folders.inbox / "bad.json").write_text('{"prompt": "x", "numOutputs": 7}')
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    [failed] = status_json(folders)["recent"]
    assert failed["state"] == "failed" and failed["retried"] is None
    (folders.failed / "bad.json").write_text('{"prompt": "x", "numOutputs": 2}')  # the person fixes it
    assert run_cli("retry", "bad", "-c", str(folders.config)).returncode == 0
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    recent = status_json(folders)["recent"]
    assert [(item["name"], item["state"], item["retried"]) for item in recent] == [
        ("bad.json", "done", None),
        ("bad.json", "failed", "done"),
    ]
    text = run_cli("status", "-c", str(folders.config)).stdout
    assert re.search(r"failed bad\.json  retried → done$", text, re.M), text
    assert "numOutputs" not in text and "hint:" not in text  # nothing left to fix

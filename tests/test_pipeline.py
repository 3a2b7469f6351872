"""End to end: the real daemon process, the real observer, real files, the sandbox over loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from conftest import SECRET, Folders, StartDaemon, cli_env, generate_posts, run_cli, wait_for

from scenario_watch.deliver import provenance
from scenario_watch.sandbox import Sandbox


def manifest(folders: Folders, stem: str) -> dict:
    return json.loads((folders.outbox / f"{stem}.manifest.json").read_text())


def assert_outputs_match(folders: Folders, sandbox: Sandbox, stem: str, count: int) -> dict:
    """Each outbox image is byte-for-byte what the server served, and the manifest says so."""
    m = manifest(folders, stem)
    assert len(m["files"]) == count
    assert len(m["assetIds"]) == count
    for n, entry in enumerate(m["files"], start=1):
        path = folders.outbox / f"{stem}_{n}.png"
        assert entry["file"] == path.name
        data = path.read_bytes()
        # Scenario's bytes, with provenance inserted ([outbox] metadata, on by default)
        assert hashlib.sha256(sandbox.asset_bytes(entry["assetId"])).hexdigest() == entry["originalSha256"]
        assert (provenance.read(data) or {}).get("job_id") == m["jobId"]
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["jobId"] in sandbox.generate_jobs
    return m


def test_moved_in_prompt_becomes_images_manifest_and_done(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    proc = daemon()
    body = {"prompt": "a lighthouse at dusk", "aspectRatio": "16:9", "seed": 7}
    original = json.dumps(body).encode()
    folders.drop("lighthouse.json", None, raw=original)

    wait_for(lambda: (folders.done / "lighthouse.json").exists(), what="the prompt in done/")
    assert (folders.done / "lighthouse.json").read_bytes() == original
    m = assert_outputs_match(folders, sandbox, "lighthouse", 1)
    assert m["prompt"] == "a lighthouse at dusk"
    assert m["parameters"] == {"aspectRatio": "16:9", "seed": 7}
    assert m["source"] == "lighthouse.json"
    assert m["creativeUnitsCost"] == 5
    posts = generate_posts(sandbox)
    assert [p.body for p in posts] == [body]
    assert folders.names(folders.inbox) == []
    assert folders.names(folders.failed) == []
    # The CDN never saw credentials; the API always did.
    assert all(not r.has_auth for r in sandbox.requests if r.server == "cdn")
    assert any(r.server == "cdn" for r in sandbox.requests)
    events = proc.events()
    submitted = [e for e in events if e.get("event") == "job.submitted"]
    assert submitted and submitted[0]["file"] == "lighthouse.json" and submitted[0]["job_id"] == m["jobId"]
    assert SECRET not in proc.output()
    assert proc.stop() == 0
    crashes = ("watch.handler_error", "worker.task_failed", "daemon.tick_failed")
    assert [e for e in proc.events() if e.get("event") in crashes] == []


def test_written_in_place_slowly_with_several_outputs(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    text = json.dumps({"prompt": "three foxes in the snow", "numOutputs": 3})
    path = folders.inbox / "foxes.json"
    # A writer that opens, writes half, closes, pauses, reopens and appends (scanners, FTP clients).
    with path.open("w") as handle:
        handle.write(text[:10])
    time.sleep(0.2)
    with path.open("a") as handle:
        handle.write(text[10:])

    wait_for(lambda: (folders.done / "foxes.json").exists(), what="foxes done")
    assert (folders.done / "foxes.json").read_text() == text
    assert_outputs_match(folders, sandbox, "foxes", 3)
    assert len(generate_posts(sandbox)) == 1


def test_several_prompts_each_submitted_exactly_once(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    for n in range(12):
        folders.drop(f"p{n:02}.json", {"prompt": f"prompt number {n}", "numOutputs": 1 + n % 2})
    wait_for(lambda: len(folders.names(folders.done)) == 12, timeout=40, what="12 prompts done")
    posts = generate_posts(sandbox)
    assert sorted(p.body["prompt"] for p in posts) == sorted(f"prompt number {n}" for n in range(12))
    for n in range(12):
        assert_outputs_match(folders, sandbox, f"p{n:02}", 1 + n % 2)


def test_outbox_never_shows_a_partial_file(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    """A separate reader watching the outbox only ever sees complete images and manifests."""
    daemon()
    seen_bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for entry in os.scandir(folders.outbox) if folders.outbox.exists() else []:
                if entry.name.startswith("."):
                    continue
                data = Path(entry.path).read_bytes() if entry.is_file() else b""
                if entry.name.endswith(".png") and not data.endswith(b"IEND\xaeB`\x82"):
                    seen_bad.append(entry.name)
                if entry.name.endswith(".manifest.json"):
                    json.loads(data)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(6):
            folders.drop(f"r{n}.json", {"prompt": f"reader test {n}", "numOutputs": 4})
        wait_for(lambda: len(folders.names(folders.done)) == 6, timeout=40, what="6 prompts done")
    finally:
        stop.set()
        thread.join()
    assert seen_bad == []
    assert len([n for n in folders.names(folders.outbox) if n.endswith(".png")]) == 24


def test_same_name_twice_never_overwrites(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    daemon()
    folders.drop("same.json", {"prompt": "first"})
    wait_for(lambda: (folders.done / "same.json").exists(), what="first done")
    folders.drop("same.json", {"prompt": "second"})
    wait_for(lambda: (folders.done / "same-2.json").exists(), what="second done")
    assert manifest(folders, "same")["prompt"] == "first"
    assert manifest(folders, "same-2")["prompt"] == "second"
    assert (folders.outbox / "same_1.png").exists() and (folders.outbox / "same-2_1.png").exists()


def test_name_key_sets_the_output_stem(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    daemon()
    folders.drop("x.json", {"prompt": "named", "name": "aurora beach"})
    wait_for(lambda: (folders.done / "x.json").exists(), what="done")
    assert_outputs_match(folders, sandbox, "aurora beach", 1)


def test_failed_job_lands_in_failed_with_the_apis_message(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    sandbox.fail_next_jobs(1, error="Content blocked by safety filter", hint="Rephrase the prompt")
    original = b'{"prompt": "something the filter dislikes"}'
    folders.drop("blocked.json", None, raw=original)
    wait_for(lambda: (folders.failed / "blocked.json").exists(), what="failed/")
    assert (folders.failed / "blocked.json").read_bytes() == original
    report = json.loads((folders.failed / "blocked.error.json").read_text())
    assert report["stage"] == "generation"
    assert "Content blocked by safety filter" in report["error"]
    assert report["hint"] == "Rephrase the prompt"
    assert report["jobId"] == sandbox.generate_jobs[0]
    assert folders.names(folders.outbox) == []


def test_invalid_prompt_fails_without_reaching_the_api(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    proc = daemon()
    folders.drop("typo.json", {"promt": "a cat"})
    folders.drop("good.json", {"prompt": "a dog"})
    wait_for(lambda: (folders.failed / "typo.json").exists(), what="typo failed")
    wait_for(lambda: (folders.done / "good.json").exists(), what="good done")
    report = json.loads((folders.failed / "typo.error.json").read_text())
    assert report["stage"] == "validate"
    assert "did you mean 'prompt'" in report["error"]
    [post] = generate_posts(sandbox)
    assert post.body == {"prompt": "a dog"}  # nothing the prompt did not ask for (no seed: issue 12)
    assert proc.proc.poll() is None


def test_run_once_drains_and_exits_zero(folders: Folders, sandbox: Sandbox) -> None:
    for n in range(3):
        (folders.inbox / f"batch{n}.json").write_text(json.dumps({"prompt": f"batch {n}"}))
    result = run_cli("run", "--once", "-c", str(folders.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert folders.names(folders.done) == ["batch0.json", "batch1.json", "batch2.json"]
    assert len(generate_posts(sandbox)) == 3
    for n in range(3):
        assert_outputs_match(folders, sandbox, f"batch{n}", 1)
    status = run_cli("status", "--json", "-c", str(folders.config))
    assert status.returncode == 0
    counts = json.loads(status.stdout)["counts"]
    assert counts["done"] == 3 and counts["failed"] == 0


def test_defaults_fill_what_a_prompt_omits(folders: Folders, sandbox: Sandbox) -> None:
    from conftest import write_config

    write_config(folders, sandbox.base_url, defaults={"resolution": "1K", "numOutputs": 2})
    (folders.inbox / "d.json").write_text(json.dumps({"prompt": "defaults", "numOutputs": 1}))
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    [post] = generate_posts(sandbox)
    assert post.body == {"prompt": "defaults", "numOutputs": 1, "resolution": "1K"}
    manifest = json.loads((folders.outbox / "d.manifest.json").read_text())
    assert manifest["parameters"] == {"numOutputs": 1, "resolution": "1K"}


def test_sigterm_stops_quickly_with_exit_zero(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    proc = daemon()
    folders.drop("a.json", {"prompt": "in flight while we stop"})
    wait_for(lambda: generate_posts(sandbox), what="the POST")
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 5


def test_pending_job_resumes_after_restart_without_resubmitting(
    folders: Folders, sandbox: Sandbox, daemon
) -> None:
    sandbox.generation_seconds = 2.0
    proc = daemon()
    folders.drop("slow.json", {"prompt": "slow one"})
    wait_for(lambda: sandbox.generate_jobs, what="the job")
    # `status` reads the running daemon's journal (SQLite WAL: readers never block the writer).

    def active() -> list[dict[str, object]]:
        rows = json.loads(run_cli("status", "--json", "-c", str(folders.config)).stdout)["jobs"]
        return rows if rows and rows[0]["state"] == "submitted" else []

    [row] = wait_for(active, what="status shows the submitted job")
    assert (row["name"], row["job_id"]) == ("slow.json", sandbox.generate_jobs[0])
    assert proc.stop() == 0
    assert folders.names(folders.done) == []
    daemon()
    wait_for(lambda: (folders.done / "slow.json").exists(), what="slow done after restart")
    assert len(generate_posts(sandbox)) == 1


def test_run_sandbox_quick_start(tmp_path: Path) -> None:
    """`scenario-watch run --sandbox` with no account processes a dropped prompt within seconds."""
    env = cli_env(HOME=str(tmp_path))
    for key in ("SCENARIO_API_KEY", "SCENARIO_API_SECRET"):
        env.pop(key)
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scenario_watch", "run", "--sandbox"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        inbox = tmp_path / "scenario-watch" / "inbox"
        wait_for(inbox.exists, what="the inbox")
        (tmp_path / "p.json").write_text('{"prompt": "hello sandbox"}')
        os.replace(tmp_path / "p.json", inbox / "p.json")
        done = tmp_path / "scenario-watch" / "done" / "p.json"
        wait_for(done.exists, timeout=30, what="done/p.json")
        assert (tmp_path / "scenario-watch" / "outbox" / "p_1.png").exists()
        # The quick start's `status` (no --sandbox) finds the sandbox daemon and says it runs.
        shown = run_cli("status", env=env, cwd=tmp_path)
        assert f"running, PID {proc.pid}" in shown.stdout, shown.stdout + shown.stderr
        # The live page, at a loopback address printed as a plain line (stderr) and logged.
        [url] = re.findall(r"^live page: (http://127\.0\.0\.1:\d+/)$", log.read_text(), re.MULTILINE)
        assert any(e.get("event") == "daemon.page" and e.get("url") == url for e in json_lines(log))
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"scenario-watch" in page.read()
        with urllib.request.urlopen(f"{url}metrics", timeout=10) as metrics:
            assert (
                b'scenario_watch_prompts_finished_total{outcome="done",preset="",stage=""} 1.0'
                in metrics.read()
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0, log.read_text()


def json_lines(path: Path) -> list[dict[str, object]]:
    """The JSON log lines of a file (other lines skipped)."""
    found = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found

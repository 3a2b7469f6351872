"""kill -9 at random moments, two daemons on one inbox, leftovers, an unwritable outbox."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    DaemonProcess,
    Folders,
    StartDaemon,
    cli_env,
    generate_posts,
    run_cli,
    wait_for,
    write_config,
)

from scenario_watch import health
from scenario_watch.sandbox import Sandbox


def jobs_per_prompt(sandbox: Sandbox) -> Counter[str]:
    return Counter(sandbox.job(job_id)["metadata"]["input"]["prompt"] for job_id in sandbox.generate_jobs)


def assert_each_finished_once(folders: Folders, sandbox: Sandbox, prompts: dict[str, int]) -> None:
    """Every prompt: one job at Scenario, its outputs once, its file in done/ once; no leftovers."""
    assert folders.names(folders.done) == sorted(f"{name}.json" for name in prompts)
    assert jobs_per_prompt(sandbox) == Counter({f"crash {name}": 1 for name in prompts})
    expected = set()
    for name, outputs in prompts.items():
        expected.add(f"{name}.manifest.json")
        expected.update(f"{name}_{n}.png" for n in range(1, outputs + 1))
        manifest = json.loads((folders.outbox / f"{name}.manifest.json").read_text())
        for entry in manifest["files"]:
            scenario = hashlib.sha256(sandbox.asset_bytes(entry["assetId"])).hexdigest()
            assert entry["originalSha256"] == scenario
    everything = sorted(p.name for p in folders.outbox.iterdir())
    assert everything == sorted(expected)  # no second copies (-2), no temp files
    assert folders.claimed() == []
    assert folders.names(folders.failed) == []


def test_kill_9_again_and_again_then_everything_finishes_exactly_once(
    folders: Folders, sandbox: Sandbox
) -> None:
    sandbox.generation_seconds = 0.6
    write_config(folders, sandbox.base_url, jobs={"max_in_flight": 6, "poll_interval": 0.05})
    prompts = {f"k{n:02}": 1 + n % 3 for n in range(36)}
    for name, outputs in prompts.items():
        folders.drop(f"{name}.json", {"prompt": f"crash {name}", "numOutputs": outputs})
    rng = random.Random(20261124)
    kills = 0
    log = (folders.root / "crash.log").open("w")
    for _ in range(40):
        if len(folders.names(folders.done)) == len(prompts):
            break
        proc = subprocess.Popen(
            [sys.executable, "-m", "scenario_watch", "run", "-c", str(folders.config)],
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(rng.uniform(0.2, 1.2))  # the crash point: any moment, on purpose
        proc.kill()
        proc.wait()
        kills += 1
    log.close()
    assert kills >= 5
    result = run_cli("run", "--once", "-c", str(folders.config), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_each_finished_once(folders, sandbox, prompts)


def second_config(folders: Folders, tmp_path: Path) -> Path:
    """The folders' config for a second daemon: the same inbox, outbox, done/ and failed/, its own state."""
    second = tmp_path / "second.toml"
    second.write_text(folders.config.read_text().replace(str(folders.state), str(tmp_path / "state-b")))
    return second


def test_two_daemons_sharing_one_inbox_never_take_the_same_file(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    write_config(folders, sandbox.base_url)
    second = second_config(folders, tmp_path)
    a = DaemonProcess(folders.config, tmp_path / "a.log")
    b = DaemonProcess(second, tmp_path / "b.log")
    try:
        prompts = {f"t{n:02}": 1 for n in range(40)}
        for name in prompts:
            folders.drop(f"{name}.json", {"prompt": f"crash {name}"})
        wait_for(lambda: len(folders.names(folders.done)) == 40, timeout=60, what="40 done")
        claims = [e["file"] for proc in (a, b) for e in proc.events() if e.get("event") == "prompt.queued"]
        assert sorted(claims) == sorted(f"{name}.json" for name in prompts)  # each claimed by one daemon
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    assert_each_finished_once(folders, sandbox, prompts)


def test_two_daemons_on_one_outbox_deliver_every_paid_prompt_of_one_name(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    """One file name dropped 12 times (each a new prompt) into an inbox two daemons share: 12/12 paid
    prompts have all their images in the outbox, under names no other daemon took; 0 paid twice."""
    write_config(folders, sandbox.base_url)
    second = second_config(folders, tmp_path)
    a = DaemonProcess(folders.config, tmp_path / "a.log")
    b = DaemonProcess(second, tmp_path / "b.log")
    try:
        for n in range(12):
            folders.drop("same.json", {"prompt": f"crash same {n}", "numOutputs": 2})
            wait_for(lambda: not (folders.inbox / "same.json").exists(), what="claimed before the next")
        wait_for(lambda: len(folders.names(folders.done)) == 12, timeout=60, what="12 done")
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    assert len(sandbox.generate_jobs) == 12 and len(generate_posts(sandbox)) == 12  # 0 paid twice
    manifests = [json.loads(p.read_text()) for p in folders.outbox.glob("*.manifest.json")]
    assert sorted(m["jobId"] for m in manifests) == sorted(sandbox.generate_jobs)  # 12/12 delivered
    listed = set()
    for manifest in manifests:
        assert len(manifest["files"]) == 2
        for entry in manifest["files"]:  # each file the manifest names is there, made of that job's image
            delivered = hashlib.sha256((folders.outbox / entry["file"]).read_bytes()).hexdigest()
            scenario = hashlib.sha256(sandbox.asset_bytes(entry["assetId"])).hexdigest()
            assert delivered == entry["sha256"] and entry.get("originalSha256", entry["sha256"]) == scenario
            listed.add(entry["file"])
    assert len(listed) == 24 and folders.names(folders.failed) == []
    assert sorted(
        p.name for p in folders.outbox.iterdir() if not p.name.endswith(".manifest.json")
    ) == sorted(listed)  # nothing else, no temp or marker left


def test_leftover_temp_files_are_removed_at_start(folders: Folders, sandbox: Sandbox) -> None:
    folders.outbox.mkdir()
    leftover = folders.outbox / ".x_1.png.deadbeef.part"
    leftover.write_bytes(b"half an image")
    keep = folders.outbox / "unrelated.png"
    keep.write_bytes(b"not ours")
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert not leftover.exists()
    assert keep.read_bytes() == b"not ours"


def test_unwritable_outbox_keeps_the_prompt_pending_until_fixed(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    proc = daemon()
    folders.outbox.rmdir()
    folders.outbox.write_text("a file where the outbox folder should be")
    folders.drop("w.json", {"prompt": "write me later"})
    wait_for(lambda: proc.saw("output.unwritable"), what="the outbox said unwritable")
    assert folders.names(folders.failed) == []
    assert folders.names(folders.done) == []
    assert sandbox.generate_jobs == []  # nothing paid that could not be delivered
    folders.outbox.unlink()
    folders.outbox.mkdir()
    wait_for(lambda: (folders.done / "w.json").exists(), what="done once the outbox is back")
    assert len(sandbox.generate_jobs) == 1
    assert (folders.outbox / "w_1.png").exists()


def mount_tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with `options` (root only: skipped with the reason otherwise), unmount after."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB tmpfs (root only): a disk that can fill up, on another filesystem than the inbox."""
    yield from mount_tmpfs(tmp_path / "tiny", "size=512k")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs (root only): room for two outputs as large as a 2K image may be (the daemon checks
    before paying), and quick to fill."""
    yield from mount_tmpfs(tmp_path / "small", "size=48m")


@pytest.fixture
def journal_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only): room for SQLite's write-ahead log (about 4 MB at most) once emptied."""
    yield from mount_tmpfs(tmp_path / "journal", "size=16m")


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs: a folder nobody may write, not even root (who ignores permissions)."""
    yield from mount_tmpfs(tmp_path / "ro", "ro")


def fill(disk: Path) -> Path:
    """Fill a disk to the last block; the filler file (unlink it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def test_an_unwritable_outbox_stops_the_start_naming_folder_user_and_fix(
    folders: Folders, sandbox: Sandbox, read_only_disk: Path
) -> None:
    folders.outbox = read_only_disk
    write_config(folders, sandbox.base_url)
    folders.drop("never.json", {"prompt": "must not be paid for"})
    result = run_cli("run", "--once", "-c", str(folders.config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the folder {read_only_disk} is not writable by the user" in result.stderr
    assert "Read-only file system" in result.stderr and f"chown {health.user_name()} " in result.stderr
    assert generate_posts(sandbox) == [] and folders.names(folders.inbox) == ["never.json"]


def test_full_disk_stops_submissions_and_delivers_everything_once_space_is_freed(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, small_disk: Path
) -> None:
    folders.outbox, folders.done = small_disk / "outbox", small_disk / "done"  # done/ across filesystems too
    write_config(folders, sandbox.base_url, jobs={"poll_interval": 0.5, "poll_max_interval": 1.0})
    proc = daemon()
    # The disk fills up between the payment and the download (the job takes a second at Scenario).
    sandbox.generation_seconds = 1.0
    folders.drop("full.json", {"prompt": "no room for me yet", "numOutputs": 2})
    wait_for(lambda: proc.saw("job.submitted"), what="submitted")
    filler = fill(small_disk)
    wait_for(lambda: proc.saw("output.write_failed"), what="ENOSPC logged")
    assert (
        "No space left" in next(e for e in proc.events() if e.get("event") == "output.write_failed")["error"]
    )
    # Paid for already: it waits. A new prompt is not sent (paid) while the outbox cannot be written.
    folders.drop("later.json", {"prompt": "wait for room", "numOutputs": 1})

    def later_waits() -> str | None:
        report = json.loads(run_cli("status", "--json", "-c", str(folders.config)).stdout)
        waits = [job["waiting_for"] for job in report["jobs"] if job["name"] == "later.json"]
        return waits[0] if waits and waits[0] != "a free slot" else None

    assert wait_for(later_waits, what="status saying why").startswith("outbox not writable: ")
    time.sleep(1.0)
    assert len(sandbox.generate_jobs) == 1
    assert folders.names(folders.failed) == []
    filler.unlink()
    wait_for(lambda: (folders.done / "later.json").exists(), what="both done once space is free")
    wait_for(lambda: (folders.done / "full.json").exists(), what="both done once space is free")
    assert proc.saw("output.writable")
    assert sorted(p.name for p in folders.outbox.iterdir()) == [
        "full.manifest.json",
        "full_1.png",
        "full_2.png",
        "later.manifest.json",
        "later_1.png",
    ]
    assert len(sandbox.generate_jobs) == 2


def test_a_full_journal_disk_stops_intake_and_loses_nothing(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, journal_disk: Path
) -> None:
    folders.state = journal_disk / "state"
    write_config(folders, sandbox.base_url)
    proc = daemon()
    filler = fill(journal_disk)
    prompts = {f"j{n}": 1 for n in range(6)}
    for name in prompts:
        folders.drop(f"{name}.json", {"prompt": f"crash {name}"})
    wait_for(lambda: proc.saw("journal.write_failed"), what="the full journal said")
    assert folders.names(folders.failed) == []
    filler.unlink()
    wait_for(lambda: len(folders.names(folders.done)) == len(prompts), timeout=60, what="all done")
    assert proc.proc.poll() is None
    assert_each_finished_once(folders, sandbox, prompts)


def test_a_restarted_daemon_never_adopts_another_daemons_claims(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Two daemons share an inbox; one restarts while the other has jobs in flight: nothing is redone."""
    sandbox.generation_seconds = 1.5
    second = second_config(folders, tmp_path)
    a = DaemonProcess(folders.config, tmp_path / "a.log")
    b = DaemonProcess(second, tmp_path / "b.log")
    try:
        for n in range(8):
            folders.drop(f"s{n}.json", {"prompt": f"crash s{n}"})
        wait_for(lambda: len(sandbox.generate_jobs) == 8, what="8 jobs")
        assert a.stop() == 0
        a = DaemonProcess(folders.config, tmp_path / "a2.log")  # restarts while b's jobs are running
        wait_for(lambda: len(folders.names(folders.done)) == 8, timeout=40, what="8 done")
    finally:
        a.stop()
        b.stop()
    assert_each_finished_once(folders, sandbox, {f"s{n}": 1 for n in range(8)})

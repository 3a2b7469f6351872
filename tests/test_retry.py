"""`retry` covers all of failed/: a preset's items go back to its folder, each item has its own report."""

from __future__ import annotations

import json
import os
from typing import Any

from conftest import Folders, run_cli, wait_for, write_config

from scenario_watch.sandbox import Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


def test_a_failed_preset_image_goes_back_to_its_presets_folder(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    photos = folders.root / "photos"  # outside the inbox
    write_config(folders, sandbox.base_url, presets={"recolor": {"prompt": "red", "folder": str(photos)}})
    proc = daemon()
    wait_for(photos.is_dir, 10, "the preset's folder")
    (photos / "car.png").write_text("not an image")  # and car.json, failing together: two reports
    (photos / "car.json").write_text('{"prompt": ')
    failed = folders.failed / "recolor"
    wait_for(lambda: (failed / "car.png").exists() and (failed / "car.json").exists(), 30, "both failed")
    proc.stop()
    assert json.loads((failed / "car.png.error.json").read_text())["file"] == "recolor/car.png"
    assert json.loads((failed / "car.error.json").read_text())["file"] == "recolor/car.json"
    status = run_cli("status", "-c", str(folders.config))
    assert "recolor/car.png" in status.stdout, status.stdout

    result = run_cli("retry", "recolor/car.png", "-c", str(folders.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (photos / "car.png").exists() and not (folders.inbox / "recolor" / "car.png").exists()
    assert "[presets.recolor]" in result.stdout
    assert not (failed / "car.png.error.json").exists() and (failed / "car.error.json").exists()


def test_retry_all_takes_preset_items_and_non_regular_files(folders: Folders, sandbox: Sandbox) -> None:
    photos = folders.root / "photos"
    write_config(folders, sandbox.base_url, presets={"recolor": {"prompt": "red", "folder": str(photos)}})
    (folders.failed / "recolor").mkdir(parents=True)
    (folders.failed / "recolor" / "fake.png").write_text("x")
    (folders.failed / "recolor" / "fake.png.error.json").write_text('{"stage": "validate"}')
    (folders.failed / "car.json").write_text("{}")
    (folders.failed / "car.error.json").write_text('{"stage": "validate"}')
    os.mkfifo(folders.failed / "pipe.json")  # refused unread, filed as it was
    (folders.failed / "pipe.error.json").write_text('{"stage": "validate"}')
    result = run_cli("retry", "--all", "-c", str(folders.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (photos / "fake.png").exists()
    assert (folders.inbox / "car.json").exists() and (folders.inbox / "pipe.json").is_fifo()
    assert [p.name for p in folders.failed.rglob("*") if not p.is_dir()] == []


def test_an_error_file_naming_a_job_this_journal_never_made_is_not_adopted(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """A report copied from another state folder, or written by hand, names any job: it is not taken
    for this prompt's (its outputs would be someone else's), and `retry` says it is sent anew."""
    proc = daemon()
    folders.drop("mine.json", {"prompt": "made here"})
    wait_for(lambda: (folders.done / "mine.json").exists(), what="a job this journal made")
    (folders.failed / "stray.json").write_text(json.dumps({"prompt": "a stray prompt"}))
    (folders.failed / "stray.error.json").write_text(
        json.dumps({"stage": "timeout", "jobId": "job_made_elsewhere"})
    )
    result = run_cli("retry", "stray", "-c", str(folders.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job_made_elsewhere is not in this daemon's journal" in result.stdout, result.stdout
    assert "asked about first" not in result.stdout
    wait_for(lambda: (folders.done / "stray.json").exists(), what="the stray prompt sent as a new job")
    proc.stop()
    assert len(sandbox.generate_jobs) == 2


def test_a_retry_note_is_taken_only_by_the_same_prompt() -> None:
    """By content, but never across folders (a preset's image is that preset's prompt) nor by another
    `.txt` (its image is part of its prompt): those pay anew instead of taking another prompt's job."""
    from scenario_watch.dispatch.dispatcher import adoption

    notes = [
        ("red/car.png", "job_red"),
        ("slow.json", "job_slow"),
        ("sub/p.json", "job_sub"),
        ("a.txt", "job_a"),
    ]
    assert adoption("red/car.png", notes) == "job_red"
    assert adoption("blue/car.png", notes) is None  # the same photo in another preset's folder
    assert adoption("slow-2.json", notes) == "job_slow"  # back under another name: the same prompt
    assert adoption("other/slow.json", notes) is None  # its references would be another folder's
    assert adoption("a.txt", notes) == "job_a" and adoption("b.txt", notes) is None

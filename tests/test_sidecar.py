"""Sidecar prompts: `photo.txt` + `photo.jpg` make one job; a preset folder adds the text to its prompt."""

from __future__ import annotations

import json

import pytest
from conftest import Folders, StartDaemon, generate_posts, move_in, wait_for, write_config
from imagemaker import encode, photo

from scenario_watch.clock import ManualClock
from scenario_watch.config import load_settings
from scenario_watch.sandbox import Sandbox
from scenario_watch.shell import retry

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`

JPEG = encode(photo(48, 32), "JPEG")


def two_seconds_later(clock: ManualClock, since: float) -> None:
    """Wait (real time) until the daemon's clock has moved two seconds past `since`."""
    wait_for(lambda: clock.wall() >= since + 2.0, what="two seconds on the daemon's clock")


def error_of(folders: Folders, name: str) -> dict[str, str]:
    report: dict[str, str] = json.loads((folders.failed / f"{name}.error.json").read_text())
    return report


@pytest.mark.parametrize("first", ["txt", "jpg"])
def test_photo_and_text_in_either_order_make_one_job(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, clock: ManualClock, first: str
) -> None:
    # Room to wait: the manual clock runs far faster than the test thread while the pair waits.
    write_config(
        folders, sandbox.base_url, watch={"settle": 0.5, "reference_wait": 600}, defaults={"numOutputs": 2}
    )
    daemon()
    files = {"txt": b"make it dusk\n", "jpg": JPEG}
    since = clock.wall()
    move_in(folders, folders.inbox, f"photo.{first}", files[first])
    two_seconds_later(clock, since)
    second = "jpg" if first == "txt" else "txt"
    move_in(folders, folders.inbox, f"photo.{second}", files[second])
    wait_for(lambda: folders.names(folders.done) == ["photo.jpg", "photo.txt"], what="the pair in done/")
    assert len(sandbox.generate_jobs) == 1
    [post] = generate_posts(sandbox)
    assert post.body["prompt"] == "make it dusk"  # the text, stripped
    assert post.body["numOutputs"] == 2  # [defaults] apply
    assert sandbox.asset_bytes(post.body["referenceImages"][0]) == JPEG  # the photo, first reference
    manifest = json.loads((folders.outbox / "photo.manifest.json").read_text())
    assert manifest["source"] == "photo.txt" and manifest["references"][0]["file"] == "photo.jpg"
    assert folders.names(folders.inbox) == [] and folders.names(folders.failed) == []
    assert (folders.done / "photo.jpg").read_bytes() == JPEG


def test_a_text_whose_image_never_comes_fails_naming_it(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    write_config(folders, sandbox.base_url, watch={"settle": 0.5, "reference_wait": 5})
    proc = daemon()
    move_in(folders, folders.inbox, "lonely.txt", b"make it dusk")
    wait_for(lambda: (folders.failed / "lonely.txt").exists(), what="lonely.txt failed")
    report = error_of(folders, "lonely.txt")
    assert report["stage"] == "references"
    assert "the image of lonely.txt (lonely.<" in report["error"] and "waited 5 s" in report["error"], report
    assert "lonely.jpg" in report["hint"]
    assert len(sandbox.generate_jobs) == 0
    assert proc.saw("prompt.awaiting_reference")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b"caf\xe9 au lait", "photo.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
        (b"", "photo.txt is empty"),
        (b"  \n\t\n", "photo.txt is empty"),
    ],
    ids=["latin-1", "empty", "blank"],
)
def test_a_bad_text_fails_unpaid_and_its_image_goes_with_it(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, text: bytes, says: str
) -> None:
    proc = daemon()
    move_in(folders, folders.inbox, "photo.jpg", JPEG)
    move_in(folders, folders.inbox, "photo.txt", text)
    # Filed in this order: the image, the error file, the prompt (.txt) itself, last.
    wait_for(lambda: (folders.failed / "photo.txt").exists(), what="photo.txt failed")
    assert (folders.failed / "photo.jpg").exists()  # its image filed with it
    report = error_of(folders, "photo.txt")
    assert says in report["error"] and report["stage"] == "validate", report
    assert len(sandbox.generate_jobs) == 0 and not generate_posts(sandbox)
    assert (folders.failed / "photo.txt").read_bytes() == text
    assert folders.names(folders.inbox) == []
    assert proc.daemon.started and not proc.daemon.closed  # type: ignore[attr-defined]


def test_an_image_alone_in_the_inbox_starts_nothing(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, clock: ManualClock
) -> None:
    proc = daemon()
    move_in(folders, folders.inbox, "photo.jpg", JPEG)
    since = clock.wall()
    wait_for(lambda: clock.wall() > since + 120, what="two minutes on the daemon's clock")
    assert folders.names(folders.inbox) == ["photo.jpg"] and not sandbox.generate_jobs
    assert not [p for p in (folders.inbox / ".processing").rglob("*") if p.is_file()]
    assert proc.saw("watch.skipped", reason="not a .json prompt file or a .txt beside an image")


def test_a_text_with_two_images_fails_asking_which(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    move_in(folders, folders.inbox, "photo.jpg", JPEG)
    move_in(folders, folders.inbox, "photo.png", encode(photo(8, 8), "PNG"))
    move_in(folders, folders.inbox, "photo.txt", b"which one?")
    wait_for(lambda: (folders.failed / "photo.txt.error.json").exists(), what="photo.txt failed")
    assert "2 images beside it (photo.jpg, photo.png)" in error_of(folders, "photo.txt")["error"]
    assert len(sandbox.generate_jobs) == 0
    assert folders.names(folders.inbox) == ["photo.jpg", "photo.png"]  # neither is the pair's


@pytest.mark.parametrize(
    ("preset_prompt", "expected"),
    [
        ("make it a watercolour.", "make it a watercolour. keep the red car"),
        ("a watercolour where {text}, soft light", "a watercolour where keep the red car, soft light"),
    ],
    ids=["after", "token"],
)
def test_a_text_beside_a_preset_image_joins_the_presets_prompt(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, preset_prompt: str, expected: str
) -> None:
    write_config(folders, sandbox.base_url, presets={"paint": {"prompt": preset_prompt}})
    daemon()
    folder = folders.inbox / "paint"
    move_in(folders, folder, "car.jpg", JPEG)
    move_in(folders, folder, "car.txt", b"keep the red car\n")
    move_in(folders, folder, "bike.jpg", JPEG)  # no text: the preset's prompt alone
    done = folders.done / "paint"
    wait_for(lambda: folders.names(done) == ["bike.jpg", "car.jpg", "car.txt"], what="all filed")
    prompts = sorted(post.body["prompt"] for post in generate_posts(sandbox))
    alone = preset_prompt.replace("{text}", "").strip()
    assert prompts == sorted([expected, alone])
    assert len(sandbox.generate_jobs) == 2 and folders.names(folder) == []


def test_a_bad_text_beside_a_preset_image_fails_both(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    write_config(folders, sandbox.base_url, presets={"paint": {"prompt": "paint it"}})
    daemon()
    folder = folders.inbox / "paint"
    move_in(folders, folder, "car.txt", b"\xff\xfe not utf-8")
    move_in(folders, folder, "car.jpg", JPEG)
    failed = folders.failed / "paint"
    wait_for(lambda: (failed / "car.jpg.error.json").exists(), what="car.jpg failed")
    wait_for(lambda: (failed / "car.txt").exists(), what="its text filed with it")
    report = json.loads((failed / "car.jpg.error.json").read_text())
    assert "car.txt is not UTF-8 text" in report["error"], report
    assert len(sandbox.generate_jobs) == 0


def test_retry_sends_a_failed_pair_back_together(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    move_in(folders, folders.inbox, "photo.jpg", JPEG)
    move_in(folders, folders.inbox, "photo.txt", b"caf\xe9")
    wait_for(lambda: (folders.failed / "photo.txt").exists(), what="the pair failed")  # the prompt: last
    (folders.failed / "photo.txt").write_text("café, now in UTF-8")
    failed = load_settings(folders.config, env={"HOME": str(folders.root)}).settings.folders
    assert retry.everything(folders.failed) == ["photo.txt"]  # the image goes with its text
    assert retry.name_in(folders.failed, "photo") == "photo.txt"  # the stem, as for a .json prompt
    lines = retry.send_back(failed, "photo.txt")
    assert lines == ["photo.txt: back in the inbox as photo.txt", "photo.jpg: back in the inbox as photo.jpg"]
    assert folders.names(folders.failed) == []
    wait_for(lambda: folders.names(folders.done) == ["photo.jpg", "photo.txt"], what="the pair done")
    assert [post.body["prompt"] for post in generate_posts(sandbox)] == ["café, now in UTF-8"]

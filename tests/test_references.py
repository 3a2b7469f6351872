"""Reference images from the inbox: uploads (small and multipart), dedup, late arrivals, chaining, and
what the upload says of a reference that went missing or changed after it was checked."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Folders, StartDaemon, generate_posts, make_dispatcher, run_cli, wait_for
from conftest import write_config as _write_config

from scenario_watch.lifecycle import Advanced, Again, Failed
from scenario_watch.prepare.reference import MISSING
from scenario_watch.sandbox import Sandbox

README = Path(__file__).resolve().parent.parent / "README.md"


def write_config(folders: Folders, base_url: str, **sections: dict[str, Any]) -> None:
    """The test config with [images] normalize off: these tests' PNGs are sized bytes, not pictures."""
    _write_config(folders, base_url, images={"normalize": False}, **sections)


@pytest.fixture(autouse=True)
def _opaque_images(folders: Folders, sandbox: Sandbox) -> None:
    write_config(folders, sandbox.base_url)


def png(size: int, seed: int = 0) -> bytes:
    """Bytes the sandbox accepts as a PNG (it sniffs the signature), of a chosen size."""
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return (b"\x89PNG\r\n\x1a\n" + body)[:size]


def written_long_ago(path: Path) -> None:
    """Date a file an hour back: not one a writer may still be at (accept waits for those)."""
    then = time.time() - 3600
    os.utime(path, (then, then))


def uploads(sandbox: Sandbox) -> list[str]:
    return [
        f"{r.method} {r.path}"
        for r in sandbox.requests
        if r.server == "api" and r.method == "POST" and (r.path == "/v1/assets" or r.path == "/v1/uploads")
    ]


def test_small_reference_is_uploaded_and_recorded(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    photo = png(40_000)
    (folders.inbox / "beach.png").write_bytes(photo)
    daemon()
    folders.drop(
        "beach-aurora.json", {"prompt": "purple aurora", "referenceImages": ["beach.png", "asset_keep"]}
    )
    wait_for(lambda: (folders.failed / "beach-aurora.json").exists(), what="fails: asset_keep is unknown")
    # asset_keep is not an asset the sandbox knows: the API's 400 names it. Now with a real id:
    (folders.failed / "beach-aurora.json").unlink()
    folders.drop("beach-aurora.json", {"prompt": "purple aurora", "referenceImages": ["beach.png"]})
    wait_for(lambda: (folders.done / "beach-aurora.json").exists(), what="done")
    assert uploads(sandbox) == ["POST /v1/assets"]  # the second prompt reused the first upload
    manifest = json.loads((folders.outbox / "beach-aurora.manifest.json").read_text())
    [ref] = manifest["references"]
    assert ref["file"] == "beach.png"
    assert ref["sha256"] == hashlib.sha256(photo).hexdigest()
    assert sandbox.asset_bytes(ref["assetId"]) == photo
    assert generate_posts(sandbox)[-1].body["referenceImages"] == [ref["assetId"]]
    assert (folders.inbox / "beach.png").read_bytes() == photo  # references stay for later prompts


def test_reference_of_6_mb_and_more_goes_through_multipart_upload(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    big = png(13 * 1024 * 1024, seed=1)
    (folders.inbox / "big.png").write_bytes(big)
    daemon()
    folders.drop("big.json", {"prompt": "edit the big one", "referenceImages": ["big.png"]})
    wait_for(lambda: (folders.done / "big.json").exists(), timeout=60, what="done")
    assert uploads(sandbox) == ["POST /v1/uploads"]
    puts = [r for r in sandbox.requests if r.server == "cdn" and r.method == "PUT"]
    assert len(puts) == 3  # 5 MB parts
    assert not any(r.has_auth for r in puts)
    assert any(r.path.endswith("/action") for r in sandbox.requests)
    [ref] = json.loads((folders.outbox / "big.manifest.json").read_text())["references"]
    assert sandbox.asset_bytes(ref["assetId"]) == big


def test_same_photo_is_uploaded_once_across_prompts_and_restarts(folders: Folders, sandbox: Sandbox) -> None:
    (folders.inbox / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + png(5000)[4:])
    for n in range(4):
        (folders.inbox / f"e{n}.json").write_text(
            json.dumps({"prompt": f"edit {n}", "referenceImages": ["photo.jpg"]})
        )
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert len(folders.names(folders.done)) == 4
    (folders.inbox / "e9.json").write_text(
        json.dumps({"prompt": "after restart", "referenceImages": ["photo.jpg"]})
    )
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert (folders.done / "e9.json").exists()
    assert uploads(sandbox) == ["POST /v1/assets"]
    asset_ids = {tuple(p.body["referenceImages"]) for p in generate_posts(sandbox)}
    assert len(asset_ids) == 1


def test_prompt_waits_for_a_late_image(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    proc = daemon()
    folders.drop("late.json", {"prompt": "the image comes later", "referenceImages": ["late.png"]})
    wait_for(lambda: proc.saw("prompt.awaiting_reference"), what="waiting")
    assert generate_posts(sandbox) == []
    folders.drop("late.png", None, raw=png(2000))
    wait_for(lambda: (folders.done / "late.json").exists(), what="done once the image arrived")
    assert len(generate_posts(sandbox)) == 1


def test_an_image_written_in_place_is_uploaded_only_once_complete(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """The prompt is there while its image is still being written (cp, a camera's upload): the image is
    sent once it stopped changing for [watch] settle (0.5 s here), whole, never its first half."""
    proc = daemon()
    data = png(60_000, seed=3)
    image = folders.inbox / "slow.png"
    with image.open("wb") as out:
        out.write(data[:10_000])
        out.flush()
        folders.drop("slow.json", {"prompt": "wait for the whole picture", "referenceImages": ["slow.png"]})
        for start in range(10_000, len(data), 10_000):  # written on for about a second
            time.sleep(0.2)
            out.write(data[start : start + 10_000])
            out.flush()
    wait_for(lambda: (folders.done / "slow.json").exists(), what="done")
    [post] = generate_posts(sandbox)
    assert sandbox.asset_bytes(post.body["referenceImages"][0]) == data
    assert folders.names(folders.failed) == [] and proc.saw("job.submitted")


def test_missing_image_fails_after_reference_wait_naming_it(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    write_config(folders, sandbox.base_url, watch={"reference_wait": 1.0})
    daemon()
    folders.drop("never.json", {"prompt": "x", "referenceImages": ["never.png"]})
    wait_for(lambda: (folders.failed / "never.error.json").exists(), what="failed")
    report = json.loads((folders.failed / "never.error.json").read_text())
    assert report["stage"] == "references"
    assert "'never.png' does not exist" in report["error"] and "waited 1 s" in report["error"]
    assert report["hint"]
    assert generate_posts(sandbox) == [] and uploads(sandbox) == []


def test_images_alone_never_start_work(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    daemon()
    folders.drop("lonely.png", None, raw=png(1000))
    folders.drop("trigger.json", {"prompt": "no references"})
    wait_for(lambda: (folders.done / "trigger.json").exists(), what="done")
    assert (folders.inbox / "lonely.png").exists()
    assert len(generate_posts(sandbox)) == 1 and uploads(sandbox) == []


def test_move_references_moves_the_image_with_the_last_prompt(folders: Folders, sandbox: Sandbox) -> None:
    write_config(folders, sandbox.base_url, watch={"move_references": True})
    (folders.inbox / "shared.png").write_bytes(png(3000))
    for n in range(3):
        (folders.inbox / f"m{n}.json").write_text(
            json.dumps({"prompt": f"m {n}", "referenceImages": ["shared.png"]})
        )
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert folders.names(folders.done) == ["m0.json", "m1.json", "m2.json", "shared.png"]
    assert folders.names(folders.inbox) == []


def test_reference_roots_allow_absolute_paths_inside_them(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    library = tmp_path / "library"
    library.mkdir()
    (library / "logo.png").write_bytes(png(800))
    (tmp_path / "elsewhere.png").write_bytes(png(800))
    write_config(folders, sandbox.base_url, watch={"reference_roots": [str(library)]})
    (folders.inbox / "in.json").write_text(
        json.dumps({"prompt": "x", "referenceImages": [str(library / "logo.png")]})
    )
    (folders.inbox / "out.json").write_text(
        json.dumps({"prompt": "x", "referenceImages": [str(tmp_path / "elsewhere.png")]})
    )
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert folders.names(folders.done) == ["in.json"]
    report = json.loads((folders.failed / "out.error.json").read_text())
    assert "absolute path outside the inbox and [watch] reference_roots" in report["error"]


def chain_script() -> str:
    """The chaining script exactly as README.md shows it."""
    match = re.search(r"<!-- chain-script -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its chaining script"
    return match.group(1)


def test_two_stage_pipeline_from_the_readme(folders: Folders, sandbox: Sandbox, tmp_path: Path) -> None:
    """Stage one's outbox images become stage two's references through the README's script."""
    stage2 = Folders(
        root=tmp_path / "s2",
        inbox=tmp_path / "s2" / "inbox",
        outbox=tmp_path / "s2" / "outbox",
        done=tmp_path / "s2" / "done",
        failed=tmp_path / "s2" / "failed",
        state=tmp_path / "s2" / "state",
        config=tmp_path / "s2.toml",
    )
    stage2.inbox.mkdir(parents=True)
    write_config(stage2, sandbox.base_url, watch={"reference_roots": [str(folders.outbox)]})
    script = tmp_path / "chain.py"
    script.write_text(chain_script())
    second = DaemonProcess(stage2.config, tmp_path / "s2.log")
    try:
        (folders.inbox / "sketch.json").write_text(json.dumps({"prompt": "a pencil sketch", "numOutputs": 2}))
        assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
        ledger = tmp_path / "chained.txt"
        args = [
            sys.executable,
            str(script),
            str(folders.outbox),
            str(stage2.inbox),
            "colour it in",
            str(ledger),
        ]
        subprocess.run(args, check=True, timeout=30)
        subprocess.run(args, check=True, timeout=30)  # a second run chains nothing twice
        wait_for(lambda: stage2.names(stage2.done), timeout=30, what="stage two done")
    finally:
        assert second.stop() == 0
    assert stage2.names(stage2.done) == ["sketch-stage2.json"]
    stage1 = json.loads((folders.outbox / "sketch.manifest.json").read_text())
    final = json.loads((stage2.outbox / "sketch-stage2.manifest.json").read_text())
    assert [os.path.basename(r["file"]) for r in final["references"]] == ["sketch_1.png", "sketch_2.png"]
    for ref, out in zip(final["references"], stage1["files"], strict=True):
        assert sandbox.asset_bytes(ref["assetId"]) == (folders.outbox / out["file"]).read_bytes()
    assert final["prompt"] == "colour it in"


# -- checked once, at accept: what submit does with a file that changed since --------------------------


def test_what_a_prompt_waits_for_follows_its_reference_from_missing_to_being_written(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    """What status shows a prompt waiting for: the reference while it is missing, then while it is still
    being written, then nothing once it is complete and the prompt is queued."""
    d = make_dispatcher(folders, sandbox, tmp_path / "journal.sqlite3")
    prompt = folders.inbox / "p.json"
    prompt.write_text(json.dumps({"prompt": "x", "referenceImages": ["photo.png"]}))
    prompt_id = d.store.add(prompt.name, prompt)
    assert isinstance(d.accept(prompt_id), Again)
    assert d.awaiting_references[prompt_id] == f"'photo.png' {MISSING} {folders.inbox}"
    (folders.inbox / "photo.png").write_bytes(png(2000))  # arriving: just written
    assert isinstance(d.accept(prompt_id), Again)
    assert d.awaiting_references[prompt_id] == "photo.png to be written whole"
    (folders.inbox / "photo.png").unlink()  # the writer gave up and removed it: missing again
    assert isinstance(d.accept(prompt_id), Again)
    assert d.awaiting_references[prompt_id] == f"'photo.png' {MISSING} {folders.inbox}"
    (folders.inbox / "photo.png").write_bytes(png(2000))
    written_long_ago(folders.inbox / "photo.png")
    assert isinstance(d.accept(prompt_id), Advanced)
    assert prompt_id not in d.awaiting_references
    d.store.close()


def test_a_reference_gone_or_changed_after_accept_fails_unpaid_saying_what_happened(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Accept checks a reference once; the upload opens it safely and says what became of it since."""
    journal = tmp_path / "journal.sqlite3"
    d = make_dispatcher(folders, sandbox, journal)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "photo.png").write_bytes(png(2000, seed=9))
    ids = {}
    (folders.inbox / "sub").mkdir()
    (folders.inbox / "sub" / "deep.png").write_bytes(png(2000, seed=7))
    written_long_ago(folders.inbox / "sub" / "deep.png")  # accept waits for a file still being written
    (outside / "deep.png").write_bytes(png(2000, seed=8))
    deep = folders.inbox / "deep.json"
    deep.write_text(json.dumps({"prompt": "deep", "referenceImages": ["sub/deep.png"]}))
    ids["deep"] = d.store.add(deep.name, deep)
    assert isinstance(d.accept(ids["deep"]), Advanced)
    for name in ("gone", "linked", "text", "kept", "restart"):
        (folders.inbox / f"{name}.png").write_bytes(png(2000, seed=len(name)))
        written_long_ago(folders.inbox / f"{name}.png")
        prompt = folders.inbox / f"{name}.json"
        prompt.write_text(json.dumps({"prompt": name, "referenceImages": [f"{name}.png"]}))
        ids[name] = d.store.add(prompt.name, prompt)
        assert isinstance(d.accept(ids[name]), Advanced)
    (folders.inbox / "gone.png").unlink()
    (folders.inbox / "linked.png").unlink()
    (folders.inbox / "linked.png").symlink_to(outside / "photo.png")  # an image, but through a link
    (folders.inbox / "text.png").write_text("not an image any more")
    (folders.inbox / "restart.png").unlink()
    (folders.inbox / "sub").rename(tmp_path / "sub-was")
    (folders.inbox / "sub").symlink_to(outside)  # a folder on the way swapped for a link to an image
    expected = {
        "gone": f"referenceImages: 'gone.png' does not exist in {folders.inbox}",
        "linked": "referenceImages: 'linked.png' is a symbolic link: refused (name an image file)",
        "text": "referenceImages: 'text.png' is not a PNG, JPEG, GIF, WebP, TIFF, AVIF or HEIC image",
        "deep": "referenceImages: 'sub/deep.png' is reached through a symbolic link now: refused",
    }
    for name, error in expected.items():
        result = d.submit(ids[name])
        assert isinstance(result, Failed) and result.stage == "references", result
        assert result.error == error
    assert isinstance(d.submit(ids["kept"]), Advanced)  # unchanged: uploaded and sent
    d.store.close()
    # After a restart the journaled entries are checked again (nothing watched them meanwhile) and opened
    # the same way: a folder on the way swapped for a link while the daemon was stopped is not followed.
    (folders.inbox / "away").mkdir()
    (folders.inbox / "away" / "pic.png").write_bytes(png(2000, seed=5))
    written_long_ago(folders.inbox / "away" / "pic.png")
    away = folders.inbox / "away.json"
    away.write_text(json.dumps({"prompt": "away", "referenceImages": ["away/pic.png"]}))
    again = make_dispatcher(folders, sandbox, journal)
    ids_away = again.store.add(away.name, away)
    assert isinstance(again.accept(ids_away), Advanced)
    again.store.close()
    (outside / "pic.png").write_bytes(png(2000, seed=6))  # an image outside the inbox, same name
    (folders.inbox / "away").rename(tmp_path / "away-was")
    (folders.inbox / "away").symlink_to(outside)
    again = make_dispatcher(folders, sandbox, journal)
    result = again.submit(ids["restart"])
    assert isinstance(result, Failed) and result.stage == "references"
    assert result.error == f"referenceImages: 'restart.png' does not exist in {folders.inbox}"
    result = again.submit(ids_away)
    assert isinstance(result, Failed), result
    outside_the_rules = "is a symlink that points outside the inbox and [watch] reference_roots"
    assert result.error == f"referenceImages: 'away/pic.png' {outside_the_rules}"
    again.store.close()
    assert uploads(sandbox) == ["POST /v1/assets"] and len(generate_posts(sandbox)) == 1

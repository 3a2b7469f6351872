"""Images through the running daemon: references normalised on the way in, outputs named and marked."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
from pathlib import Path

from conftest import Folders, generate_posts, wait_for, write_config
from imagemaker import decode, encode, exif_block, photo
from PIL import Image

from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import Job
from scenario_watch.clock import ManualClock
from scenario_watch.config import MODEL_ID
from scenario_watch.deliver import provenance
from scenario_watch.deliver.outbox import Outbox
from scenario_watch.journal.store import Store
from scenario_watch.sandbox import Sandbox
from scenario_watch.sections import FolderSettings

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


def run(folders: Folders, daemon: object, name: str, body: dict[str, object]) -> dict | None:
    """Drop one prompt and wait until it is done (its manifest) or failed (None)."""
    daemon()  # type: ignore[operator]
    folders.drop(f"{name}.json", body)
    wait_for(
        lambda: (folders.done / f"{name}.json").exists() or (folders.failed / f"{name}.json").exists(),
        timeout=40.0,
        what=f"{name} finished",
    )
    if (folders.failed / f"{name}.json").exists():
        return None
    return json.loads((folders.outbox / f"{name}.manifest.json").read_text())


def uploaded(sandbox: Sandbox) -> bytes:
    [post] = generate_posts(sandbox)
    return sandbox.asset_bytes(post.body["referenceImages"][0])


def test_sideways_phone_jpeg_is_uploaded_upright_without_gps(
    folders: Folders, sandbox: Sandbox, daemon: object
) -> None:
    original = encode(photo(64, 32), "JPEG", exif=exif_block(orientation=6, gps=True))
    (folders.inbox / "phone.jpg").write_bytes(original)
    m = run(folders, daemon, "p", {"prompt": "make it dusk", "referenceImages": ["phone.jpg"]})
    assert m is not None
    img = decode(uploaded(sandbox))
    assert img.size == (32, 64)  # the orientation is in the pixels now
    exif = img.getexif()
    assert 0x0112 not in exif and not exif.get_ifd(0x8825)
    [ref] = m["references"]
    assert ref["sha256"] != ref["uploadedSha256"] and ref["changes"]
    assert (folders.inbox / "phone.jpg").read_bytes() == original  # the person's file is never touched


def test_clean_png_is_uploaded_byte_for_byte(folders: Folders, sandbox: Sandbox, daemon: object) -> None:
    clean = encode(photo(48, 48), "PNG")
    (folders.inbox / "clean.png").write_bytes(clean)
    m = run(folders, daemon, "p", {"prompt": "more blue", "referenceImages": ["clean.png"]})
    assert m is not None
    assert uploaded(sandbox) == clean
    [ref] = m["references"]
    assert "uploadedSha256" not in ref and ref["changes"] == []


def test_output_carries_prompt_and_job_id(folders: Folders, sandbox: Sandbox, daemon: object) -> None:
    m = run(folders, daemon, "p", {"prompt": "a lighthouse at dusk"})
    assert m is not None
    entry = m["files"][0]
    with Image.open(folders.outbox / entry["file"]) as img:
        text = dict(img.text)  # type: ignore[attr-defined]
    assert "a lighthouse at dusk" in text[provenance.PARAMETERS]
    record = json.loads(text[provenance.KEYWORD])
    assert (record["prompt"], record["job_id"]) == ("a lighthouse at dusk", m["jobId"])
    assert entry["sha256"] != entry["originalSha256"]


def test_metadata_off_keeps_scenarios_bytes(folders: Folders, sandbox: Sandbox, daemon: object) -> None:
    write_config(folders, sandbox.base_url, outbox={"metadata": False})
    m = run(folders, daemon, "p", {"prompt": "plain"})
    assert m is not None
    for entry in m["files"]:
        assert (folders.outbox / entry["file"]).read_bytes() == sandbox.asset_bytes(entry["assetId"])
        assert "originalSha256" not in entry


def test_template_with_folders_and_webp(folders: Folders, sandbox: Sandbox, daemon: object) -> None:
    write_config(
        folders,
        sandbox.base_url,
        outbox={"name": "{date}/{preset}/{stem}_{index}", "format": "webp", "quality": 80},
    )
    m = run(folders, daemon, "p", {"prompt": "as webp"})
    assert m is not None
    entry = m["files"][0]
    path = folders.outbox / entry["file"]
    assert Path(entry["file"]).parent.name.count("-") == 2  # {date}; an empty {preset} folder is left out
    assert path.name == "p_1.webp" and entry["mimeType"] == "image/webp"
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        assert img.format == "WEBP"
    assert (provenance.read(path.read_bytes()) or {}).get("job_id") == m["jobId"]


def test_truncated_jpeg_reference_fails_unpaid(folders: Folders, sandbox: Sandbox, daemon: object) -> None:
    data = encode(photo(64, 64), "JPEG")
    (folders.inbox / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert run(folders, daemon, "p", {"prompt": "x", "referenceImages": ["cut.jpg"]}) is None
    assert len(sandbox.generate_jobs) == 0
    report = json.loads((folders.failed / "p.error.json").read_text())
    assert "cut.jpg" in report["error"] and "truncated" in report["error"], report


def finished_job(
    folders: Folders, sandbox: Sandbox, clock: ManualClock, outputs: int
) -> tuple[ScenarioClient, Store, int, Job, Outbox]:
    """A job of `outputs` images done at Scenario, its prompt journaled as downloading, and an Outbox."""
    client = ScenarioClient(sandbox.base_url, sandbox.key, sandbox.secret, model_id=MODEL_ID)
    job, cost = client.generate({"prompt": "made once", "numOutputs": outputs})
    clock.advance(5.0)
    job = client.get_job(job.job_id)
    assert job.status == "success" and len(job.asset_ids) == outputs
    store = Store(folders.state / "journal.sqlite3", clock)
    prompt = store.add("made.json", folders.inbox / "made.json")
    store.queued(prompt, {"prompt": "made once", "numOutputs": outputs}, "made", "0" * 64)
    store.submitting(prompt, {"prompt": "made once", "numOutputs": outputs}, "2026-12-01T00:00:00.000Z")
    store.submitted(prompt, job.job_id, cost)
    store.downloading(prompt, list(job.asset_ids), cost)
    folder_settings = FolderSettings(
        inbox=folders.inbox,
        outbox=folders.outbox,
        done=folders.done,
        failed=folders.failed,
        state=folders.state,
    )
    return client, store, prompt, job, Outbox(folder_settings, client, store, clock)


def test_a_redo_after_a_crash_knows_the_output_it_published_with_provenance(
    folders: Folders, sandbox: Sandbox, clock: ManualClock
) -> None:
    """Killed after an output's rename, before the journal heard of it: the redo (a minute later) writes
    the very same bytes, provenance included, so it finds its own file instead of publishing a copy."""
    client, store, prompt, job, outbox = finished_job(folders, sandbox, clock, 2)  # metadata: the default
    first = outbox.deliver(store.get(prompt), job)
    written = {name: (folders.outbox / name).read_bytes() for name in first}
    assert provenance.read(written["made_1.png"]) is not None
    # The crash: the journal lost the outputs (and no manifest was written); the redo comes later.
    (folders.outbox / "made.manifest.json").unlink()
    crashed = dataclasses.replace(store.get(prompt), delivered=[])
    clock.advance(60.0)
    again = outbox.deliver(crashed, job)
    assert again == first
    assert sorted(p.name for p in folders.outbox.iterdir()) == sorted(first)  # no made_1-2.png
    assert all((folders.outbox / name).read_bytes() == data for name, data in written.items() if "_" in name)
    store.close()
    client.close()


def test_the_manifest_is_written_into_the_stems_marker_never_through_a_link_put_there(
    folders: Folders, sandbox: Sandbox, clock: ManualClock, tmp_path: Path
) -> None:
    """The marker that holds a stem becomes the manifest (nothing is left to delete). A link that took
    the marker's name meanwhile is not written through: the manifest comes from a fresh temp file."""
    client, store, prompt, job, outbox = finished_job(folders, sandbox, clock, 1)
    assert outbox.reserve_stem(store.get(prompt)) == "made"
    marker = folders.outbox / ".made.sw-stem.part"
    assert marker.is_file()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the daemon's")
    marker.unlink()
    marker.symlink_to(outside)
    outputs = outbox.deliver(store.get(prompt), job)
    assert outputs == ("made_1.png", "made.manifest.json")
    assert json.loads((folders.outbox / "made.manifest.json").read_text())["jobId"] == job.job_id
    assert outside.read_bytes() == b"not the daemon's" and marker.is_symlink()
    # A folder at the marker's name: the same, not a stalled delivery.
    marker.unlink()
    marker.mkdir()
    (folders.outbox / "made.manifest.json").unlink()
    redo = dataclasses.replace(store.get(prompt), delivered=[])
    assert outbox.deliver(redo, job) == outputs and marker.is_dir()
    # Without anything there, the marker is made again and renamed to the manifest: nothing is left over.
    marker.rmdir()
    (folders.outbox / "made.manifest.json").unlink()
    assert outbox.deliver(redo, job) == outputs
    assert sorted(p.name for p in folders.outbox.iterdir()) == ["made.manifest.json", "made_1.png"]
    store.close()
    client.close()


def test_a_manifest_has_the_mode_of_a_file_not_of_a_program(
    folders: Folders, sandbox: Sandbox, clock: ManualClock
) -> None:
    """The stem's marker becomes the manifest: it is created as a file (0666 less the umask), like the
    images, never executable."""
    client, store, prompt, job, outbox = finished_job(folders, sandbox, clock, 1)
    umask = os.umask(0o022)
    try:
        outputs = outbox.deliver(store.get(prompt), job)
    finally:
        os.umask(umask)
    modes = {name: stat.S_IMODE((folders.outbox / name).stat().st_mode) for name in outputs}
    assert modes == {"made_1.png": 0o644, "made.manifest.json": 0o644}
    store.close()
    client.close()

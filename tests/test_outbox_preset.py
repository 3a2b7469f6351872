"""A preset on the outbox keeps stage one's files where its manifest says (a hard link, not a move)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from conftest import Folders, generate_posts, wait_for, write_config

from scenario_watch.journal.store import Store
from scenario_watch.sandbox import Sandbox
from scenario_watch.sandbox.images import make_png

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`

STAGE_TWO = ["sketch_1.manifest.json", "sketch_1_1.png", "sketch_2.manifest.json", "sketch_2_1.png"]


def test_stage_ones_manifest_stays_true_and_nothing_is_taken_twice(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    write_config(
        folders, sandbox.base_url, presets={"colour": {"prompt": "colour it", "folder": str(folders.outbox)}}
    )
    proc = daemon()
    folders.drop("sketch.json", {"prompt": "a pencil sketch", "numOutputs": 2})
    final = folders.outbox / "colour"
    wait_for(lambda: folders.names(final) == STAGE_TWO, timeout=30, what="stage two's outputs")
    # Each image is filed after its outputs and manifest are published: wait for both filings.
    wait_for(lambda: len(folders.names(folders.done / "colour")) == 2, timeout=30, what="both filed")
    stage1 = json.loads((folders.outbox / "sketch.manifest.json").read_text())
    for out in stage1["files"]:  # where the manifest (and SW_FILES) said, byte for byte
        kept = folders.outbox / out["file"]
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == out["sha256"]
        filed = folders.done / "colour" / out["file"]  # and filed as stage two's original: one inode
        assert os.path.samefile(kept, filed)
    time.sleep(1.0)  # rescans pass (the manual clock jumps while idle): the kept files are not taken again
    proc.stop()
    again = daemon()  # nor after a restart
    time.sleep(1.0)
    again.stop()
    assert len(generate_posts(sandbox)) == 3
    assert not again.saw("preset.backlog_left")  # stage one's kept files are no backlog either


def test_a_kept_file_replaced_by_a_new_one_is_taken(folders: Folders, sandbox: Sandbox, daemon: Any) -> None:
    write_config(
        folders, sandbox.base_url, presets={"colour": {"prompt": "colour it", "folder": str(folders.outbox)}}
    )
    daemon()
    folders.drop("sketch.json", {"prompt": "a pencil sketch"})
    final = folders.outbox / "colour"
    wait_for(lambda: (final / "sketch_1.manifest.json").exists(), timeout=30, what="stage two")
    done = folders.done / "colour"
    replacement = folders.root / "new.png"
    replacement.write_bytes((folders.outbox / "sketch_1.png").read_bytes() + b"")
    os.utime(replacement, ns=(1_000_000_000, 1_000_000_000))  # another file: another mtime
    os.replace(replacement, folders.outbox / "sketch_1.png")
    wait_for(lambda: len(generate_posts(sandbox)) == 3, timeout=30, what="the new file taken")
    assert done.is_dir()


def test_a_crash_between_the_claim_and_the_link_back_leaves_the_image_in_the_outbox(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """Killed after claiming stage one's image and before linking it back: at the next start the image
    is linked back under its name (stage one's manifest stays true) and edited once."""
    write_config(
        folders, sandbox.base_url, presets={"colour": {"prompt": "colour it", "folder": str(folders.outbox)}}
    )
    daemon().stop()  # the preset is known (its baseline taken), the instance named
    instance = (folders.state / "instance-id").read_text().strip()
    image = make_png("stage one", width=24, height=24)
    claimed = folders.outbox / ".processing" / instance / "photo_1.png"
    claimed.write_bytes(image)  # as the claim's rename left it: no link back, no journal row
    again = daemon()
    wait_for(lambda: (folders.done / "colour" / "photo_1.png").exists(), timeout=30, what="edited and filed")
    again.stop()
    assert (folders.outbox / "photo_1.png").read_bytes() == image  # back where stage one published it
    assert os.path.samefile(folders.outbox / "photo_1.png", folders.done / "colour" / "photo_1.png")
    assert again.saw("recover.kept_restored", count=1)
    assert len(generate_posts(sandbox)) == 1  # edited once: the restored name is not taken again


def test_an_image_moved_out_of_the_outbox_while_its_prompt_ran_is_not_brought_back(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """A claim the journal knows was linked back when it was taken: if its name is empty at the next
    start, someone moved the image away since, and it stays away (only an unjournaled claim is relinked)."""
    write_config(
        folders, sandbox.base_url, presets={"colour": {"prompt": "colour it", "folder": str(folders.outbox)}}
    )
    daemon().stop()
    instance = (folders.state / "instance-id").read_text().strip()
    claimed = folders.outbox / ".processing" / instance / "photo_1.png"
    claimed.write_bytes(make_png("moved away", width=24, height=24))
    store = Store(folders.state / "journal.sqlite3")
    store.add("colour/photo_1.png", claimed, "colour")  # journaled: its link back was made, then moved
    store.close()
    again = daemon()
    wait_for(lambda: (folders.done / "colour" / "photo_1.png").exists(), timeout=30, what="edited and filed")
    again.stop()
    assert not (folders.outbox / "photo_1.png").exists()
    assert not again.saw("recover.kept_restored")

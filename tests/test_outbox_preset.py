"""A preset on the outbox keeps stage one's files where its manifest says (a hard link, not a move)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from conftest import Folders, generate_posts, wait_for, write_config

from scenario_watch.sandbox import Sandbox

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

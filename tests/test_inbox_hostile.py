"""Entries in the inbox that are not regular files: claimed, never read, filed in failed/ with the reason."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from conftest import Folders, StartDaemon, generate_posts, wait_for

from scenario_watch.sandbox import Sandbox

SECRET = "SECRET-do-not-leak-7f3a9c"

# name stem -> what its error file must say
KINDS = {"leak": "is a symbolic link: refused", "pipe": "is a FIFO", "dir": "is a directory"}


def plant(inbox: Path, suffix: str, secret: Path) -> None:
    """A symlink to a prompt outside the inbox, a FIFO and a folder, all named *.json."""
    (inbox / f"leak{suffix}.json").symlink_to(secret)
    os.mkfifo(inbox / f"pipe{suffix}.json")
    (inbox / f"dir{suffix}.json").mkdir()
    (inbox / f"dir{suffix}.json" / "inner.json").write_text(json.dumps({"prompt": "inside a folder"}))


def test_symlinks_fifos_and_folders_fail_unread_and_the_daemon_goes_on(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, tmp_path: Path
) -> None:
    secret = tmp_path / "private" / "secret.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"prompt": f"publish {SECRET}", "numOutputs": 1}))
    plant(folders.inbox, "0", secret)  # found by the startup scan
    proc = daemon()
    plant(folders.inbox, "1", secret)  # found by watch events
    folders.drop("after.json", {"prompt": "an ordinary prompt after them"})
    folders.drop("later.json", {"prompt": "and another"})

    wait_for(lambda: folders.names(folders.done) == ["after.json", "later.json"], what="the good prompts")
    reports = [f"{kind}{n}.error.json" for kind in KINDS for n in "01"]
    wait_for(lambda: set(reports) <= set(folders.names(folders.failed)), what="every bad entry in failed/")

    for kind, message in KINDS.items():
        for n in "01":
            report = json.loads((folders.failed / f"{kind}{n}.error.json").read_text())
            assert message in report["error"] and f"{kind}{n}.json" in report["error"], report
            assert report["stage"] == "validate"
    # Each was moved as itself: the link (still pointing where it did), the FIFO, the whole folder.
    for n in "01":
        assert os.readlink(folders.failed / f"leak{n}.json") == str(secret)
        assert stat.S_ISFIFO(os.lstat(folders.failed / f"pipe{n}.json").st_mode)
        assert (folders.failed / f"dir{n}.json" / "inner.json").is_file()
    assert secret.read_text().startswith('{"prompt": "publish')

    # The secret went nowhere: not in a request, not in a written file, not in the log.
    assert SECRET not in repr([(r.path, r.query, r.body) for r in sandbox.requests])
    prompts = sorted(p.body["prompt"] for p in generate_posts(sandbox))
    assert prompts == ["an ordinary prompt after them", "and another"]
    for folder in (folders.outbox, folders.done, folders.failed, folders.inbox):
        for root, _, names in os.walk(folder):  # os.walk does not follow symlinks
            for name in names:
                path = Path(root) / name
                if stat.S_ISREG(os.lstat(path).st_mode):
                    assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in proc.output()
    assert folders.names(folders.inbox) == []
    assert folders.claimed() == []
    assert proc.proc.poll() is None  # the FIFO did not hang it
    crashes = ("watch.handler_error", "worker.task_failed", "daemon.tick_failed", "prompt.claim_failed")
    assert [e for e in proc.events() if e.get("event") in crashes] == []

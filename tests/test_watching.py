"""The watcher with real files and the real observer: every writer's habits, lost events, self-healing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Folders, StartDaemon, generate_posts, wait_for, write_config

from scenario_watch.intake.names import classify
from scenario_watch.intake.watcher import filesystem_type
from scenario_watch.sandbox import Sandbox

PROMPT = json.dumps({"prompt": "watch me"})


@contextlib.contextmanager
def sysctl(name: str, value: str) -> Iterator[None]:
    """Set a kernel knob for the duration of a test (root only; skip where it cannot be set)."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        old = path.read_text()
        path.write_text(value)
    except OSError as exc:
        pytest.skip(f"cannot set {name}: {exc.strerror}")
    try:
        yield
    finally:
        path.write_text(old)


def test_a_file_still_changing_is_never_declared_bad(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    write_config(folders, sandbox.base_url, watch={"settle": 2.0})  # 10 x the writer's pauses: load-proof
    daemon()
    path = folders.inbox / "slow.json"
    text = json.dumps({"prompt": "written slowly by a scanner over two seconds " + "x" * 40})
    chunks = [text[i : i + 8] for i in range(0, len(text), 8)]
    for chunk in chunks:  # reopen, append, close, pause: never valid JSON until the end
        with path.open("a") as handle:
            handle.write(chunk)
        time.sleep(0.2)
    wait_for(lambda: (folders.done / "slow.json").exists(), what="done")
    assert (folders.done / "slow.json").read_text() == text
    assert folders.names(folders.failed) == []
    assert len(generate_posts(sandbox)) == 1


def test_writers_of_every_kind_each_processed_once(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    source = folders.root / "source.json"
    source.write_text(json.dumps({"prompt": "copied in"}))
    # create + write + close. Not shutil.copy: it sets the mode by path *after* closing, and the daemon
    # may already have taken the complete file by then (the README says so under "Which writers").
    shutil.copyfile(source, folders.inbox / "copied.json")
    editor_temp = folders.inbox / ".saved.json.swp"  # an editor's atomic save: temp, then rename
    editor_temp.write_text(json.dumps({"prompt": "saved by an editor"}))
    os.replace(editor_temp, folders.inbox / "saved.json")
    synced = folders.inbox / ".synced.json.Xa81Qz"  # rsync / Syncthing style hidden temp name
    synced.write_text(json.dumps({"prompt": "synced"}))
    os.replace(synced, folders.inbox / "synced.json")
    browser = folders.inbox / "download.json.crdownload"  # never finished: must stay untouched
    browser.write_text(json.dumps({"prompt": "half downloaded"}))
    folders.drop("moved.json", {"prompt": "moved in"})
    wait_for(lambda: len(folders.names(folders.done)) == 4, what="4 done")
    assert folders.names(folders.done) == ["copied.json", "moved.json", "saved.json", "synced.json"]
    assert sorted(p.body["prompt"] for p in generate_posts(sandbox)) == [
        "copied in",
        "moved in",
        "saved by an editor",
        "synced",
    ]
    assert browser.read_text() == json.dumps({"prompt": "half downloaded"})


def test_default_ignores_are_left_alone(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    write_config(folders, sandbox.base_url, watch={"settle": 0.3, "ignore": ["draft-*"]})
    daemon()
    ignored = [
        ".hidden.json",
        "x.json.tmp",
        "x.json.part",
        "x.json.filepart",
        "x.json.crdownload",
        "x.json.swp",
        "x.json~",
        "~$x.json",
        ".DS_Store",
        "y.manifest.json",
        "draft-1.json",
        "picture.png",
        "notes.md",
    ]
    for name in ignored:
        (folders.inbox / name).write_text(PROMPT)
    (folders.inbox / "@eaDir").mkdir()
    (folders.inbox / "@eaDir" / "thumb.json").write_text(PROMPT)
    folders.drop("real.json", {"prompt": "the only real one"})
    wait_for(lambda: (folders.done / "real.json").exists(), what="done")
    assert [p.body["prompt"] for p in generate_posts(sandbox)] == ["the only real one"]
    for name in ignored:
        assert (folders.inbox / name).read_text() == PROMPT, name


def test_zero_byte_file_waits_for_settle_then_fails_as_empty(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    (folders.inbox / "empty.json").touch()
    filled = folders.inbox / "filled.json"
    filled.touch()  # created empty, filled before settle ends: a normal in-place writer
    filled.write_text(json.dumps({"prompt": "filled in time"}))
    wait_for(lambda: (folders.failed / "empty.error.json").exists(), what="empty failed")
    wait_for(lambda: (folders.done / "filled.json").exists(), what="filled done")
    assert "the file is empty" in json.loads((folders.failed / "empty.error.json").read_text())["error"]


def test_subfolders_are_ignored_unless_recursive(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    (folders.inbox / "sub").mkdir()
    (folders.inbox / "sub" / "x.json").write_text(json.dumps({"prompt": "in a subfolder"}))
    proc = daemon()
    folders.drop("top.json", {"prompt": "top level"})
    wait_for(lambda: (folders.done / "top.json").exists(), what="top done")
    assert (folders.inbox / "sub" / "x.json").exists()
    assert proc.stop() == 0

    write_config(folders, sandbox.base_url, watch={"recursive": True, "settle": 0.5})
    daemon()
    wait_for(lambda: (folders.done / "sub" / "x.json").exists(), what="sub/x.json done")
    (folders.inbox / "sub" / "deeper").mkdir()
    (folders.inbox / "sub" / "deeper" / "y.json").write_text(
        json.dumps({"prompt": "deeper", "numOutputs": 2})
    )
    wait_for(lambda: (folders.done / "sub" / "deeper" / "y.json").exists(), what="deeper done")
    assert (folders.outbox / "sub" / "x_1.png").exists()
    assert (folders.outbox / "sub" / "x.manifest.json").exists()
    assert sorted(p.name for p in (folders.outbox / "sub" / "deeper").iterdir()) == [
        "y.manifest.json",
        "y_1.png",
        "y_2.png",
    ]
    assert len(generate_posts(sandbox)) == 3


def test_replaced_inbox_folder_is_noticed_and_rewatched(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """A watch follows the old folder: files in the new one are found (observer restart, rescan)."""
    write_config(folders, sandbox.base_url, watch={"settle": 0.3, "rescan_interval": 2.0})
    proc = daemon()
    os.rename(folders.inbox, folders.root / "inbox.old")
    folders.inbox.mkdir()
    folders.drop("after.json", {"prompt": "dropped into the new inbox"})
    wait_for(lambda: (folders.done / "after.json").exists(), timeout=30, what="done")
    assert any(e.get("event") in ("watch.observer_died", "watch.rescan_found") for e in proc.events())


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_inbox_deleted_and_recreated_self_heals(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, polling: bool
) -> None:
    """The inbox vanishes (deleted, a share gone): the dead observer is noticed and restarted."""
    write_config(folders, sandbox.base_url, watch={"polling": polling, "settle": 0.3, "rescan_interval": 2.0})
    proc = daemon()
    assert proc.saw("watch.started", observer="polling" if polling else "inotify")
    folders.drop("p1.json", {"prompt": "before the folder went"})
    wait_for(lambda: (folders.done / "p1.json").exists(), what="p1 done")
    shutil.rmtree(folders.inbox)
    wait_for(lambda: proc.saw("watch.observer_died"), what="noticed")
    wait_for(folders.inbox.exists, what="inbox recreated by the restart")
    folders.drop("p2.json", {"prompt": "after the folder came back"})
    wait_for(lambda: (folders.done / "p2.json").exists(), timeout=30, what="p2 done")


@pytest.mark.system_wide
def test_lost_events_are_caught_by_the_rescan(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """A tiny inotify queue overflows for real; the periodic rescan still finds every file."""
    write_config(
        folders, sandbox.base_url, watch={"settle": 0.3, "rescan_interval": 1.0}, jobs={"max_in_flight": 16}
    )
    with sysctl("fs.inotify.max_queued_events", "4"):
        daemon()
        for n in range(80):
            (folders.inbox / f"burst{n:02}.json").write_text(json.dumps({"prompt": f"burst {n}"}))
        wait_for(lambda: len(folders.names(folders.done)) == 80, timeout=60, what="80 done")
    assert len(generate_posts(sandbox)) == 80


@pytest.mark.system_wide
@pytest.mark.parametrize("knob", ["fs.inotify.max_user_instances", "fs.inotify.max_user_watches"])
def test_inotify_limit_names_the_sysctl_and_falls_back_to_polling(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, knob: str
) -> None:
    with sysctl(knob, "0"):
        proc = daemon()
    errors = [e for e in proc.events() if e.get("event") == "watch.inotify_limit"]
    assert len(errors) == 1 and knob in errors[0]["hint"]
    assert any(e.get("event") == "watch.started" and e.get("observer") == "polling" for e in proc.events())
    folders.drop("limited.json", {"prompt": "still processed"})
    wait_for(lambda: (folders.done / "limited.json").exists(), what="done via polling")


def test_network_filesystem_detected_from_the_mount_table(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "inbox").mkdir(parents=True)
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"server:/export {share} nfs4 rw,relatime 0 0\n"
        f"//nas/drop\\040box {tmp_path}/smb\\040share cifs rw 0 0\n"
    )
    (tmp_path / "smb share").mkdir()
    assert filesystem_type(share / "inbox", mounts) == "nfs4"
    assert filesystem_type(tmp_path / "smb share", mounts) == "cifs"
    assert filesystem_type(tmp_path, mounts) == "ext4"


def inbox_relative(path: str, inbox: str, recursive: bool) -> str | None:
    """The inbox-relative name the watcher takes `path` as, or None when it skips it."""
    rel = classify(path, inbox, recursive)
    return rel if isinstance(rel, str) else None


def test_inbox_relative_rules() -> None:
    assert inbox_relative("/in/a.json", "/in", recursive=False) == "a.json"
    assert inbox_relative("/in/sub/a.json", "/in", recursive=False) is None
    assert inbox_relative("/in/sub/a.json", "/in", recursive=True) == "sub/a.json"
    assert inbox_relative("/in/.processing/a.json", "/in", recursive=True) is None
    assert inbox_relative("/in/@eaDir/a.json", "/in", recursive=True) is None
    assert inbox_relative("/elsewhere/a.json", "/in", recursive=True) is None


def test_files_moved_out_of_the_inbox_are_no_trouble(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    proc = daemon()
    part = folders.inbox / "a.json.part"
    part.write_text(PROMPT)
    os.rename(part, folders.root / "moved-away.json")  # an unpaired move event (destination outside)
    folders.drop("next.json", {"prompt": "queued behind the move event"})
    wait_for(lambda: (folders.done / "next.json").exists(), what="done")
    assert [e for e in proc.events() if e.get("event") == "watch.handler_error"] == []

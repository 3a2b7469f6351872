"""Entries in the inbox that are not regular files: claimed, never read, filed in failed/ with the reason."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import Folders, StartDaemon, generate_posts, run_cli, wait_for

from scenario_watch.config import WatchSettings
from scenario_watch.errors import PromptError, UnsafeFile
from scenario_watch.intake.watcher import Arrivals, Watcher, claim
from scenario_watch.prepare.prompt import read_prompt_bytes
from scenario_watch.prepare.reference import check_reference, read_reference
from scenario_watch.sandbox import Sandbox

SECRET = "SECRET-do-not-leak-7f3a9c"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

# name stem -> what its error file must say
KINDS = {"leak": "is a symbolic link: refused", "pipe": "is a FIFO", "dir": "is a directory"}


def plant(inbox: Path, suffix: str, secret: Path) -> None:
    """A symlink to a prompt outside the inbox, a FIFO and a folder, all named *.json."""
    (inbox / f"leak{suffix}.json").symlink_to(secret)
    os.mkfifo(inbox / f"pipe{suffix}.json")
    # Filled beside the inbox and moved in whole: a running daemon may claim the folder at once.
    folder = inbox.parent / f".dir{suffix}.json"
    folder.mkdir()
    (folder / "inner.json").write_text(json.dumps({"prompt": "inside a folder"}))
    folder.rename(inbox / f"dir{suffix}.json")


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


def test_scan_and_arrivals_take_any_entry_named_json_but_never_open_it(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plant(inbox, "", tmp_path / "nowhere.json")  # a dangling link takes the name as well
    (inbox / "plain.json").write_text('{"prompt": ')  # still being written
    (inbox / "sub").mkdir()
    (inbox / "sub" / "deep.json").write_text("{}")
    flat = Watcher(inbox, WatchSettings(polling=False), lambda *_: None)
    names = ["dir.json", "leak.json", "pipe.json", "plain.json"]
    assert [os.path.basename(p) for p in flat.scan()] == names
    # Recursive: a folder is a subfolder to look into, whatever its name.
    deep = Watcher(inbox, WatchSettings(polling=False, recursive=True), lambda *_: None)
    assert [os.path.relpath(p, inbox) for p in deep.scan()] == [
        "dir.json/inner.json", "leak.json", "pipe.json", "plain.json", "sub/deep.json"
    ]  # fmt: skip
    arrivals = Arrivals(settle=60)
    for path in flat.scan():
        arrivals.note(path, moved=False)
    # Written in place and not settled: only the regular file waits; the FIFO is not opened (no hang).
    assert sorted(os.path.basename(p) for p in arrivals.ready(0.0, limit=10)) == names[:3]


def test_prompt_reads_and_references_refuse_links_and_fifos(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "photo.png").write_bytes(PNG)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "real.png").write_bytes(PNG)
    (inbox / "alias.png").symlink_to(inbox / "real.png")  # inside the inbox, but still a link
    os.mkfifo(inbox / "pipe.png")
    os.mkfifo(inbox / "p.json")
    with pytest.raises(UnsafeFile, match=re.escape("p.json is a FIFO")):
        read_prompt_bytes(inbox / "p.json")
    assert check_reference("real.png", inbox).mime_type == "image/png"
    with pytest.raises(PromptError, match=re.escape("'alias.png' is a symbolic link: refused")):
        check_reference("alias.png", inbox)
    with pytest.raises(PromptError, match=re.escape("'pipe.png' is a FIFO")):
        check_reference("pipe.png", inbox)
    (inbox / "real").mkdir()
    (inbox / "real" / "pic.png").write_bytes(PNG)
    (inbox / "alias").symlink_to(inbox / "real")  # a folder link, even one that stays inside
    with pytest.raises(PromptError, match=re.escape("'alias/pic.png' is reached through a symbolic link")):
        check_reference("alias/pic.png", inbox)
    assert check_reference("real/pic.png", inbox).mime_type == "image/png"
    for folder in (".", "./", "real", "real/."):  # a folder, the prompt's own among them: a clear refusal
        with pytest.raises(PromptError, match=re.escape(f"{folder!r} is a directory: refused")):
            check_reference(folder, inbox)
    # Under a reference root a symlink may be used as long as it resolves inside the roots.
    library = tmp_path / "library"
    library.mkdir()
    (library / "linked.png").symlink_to(outside / "photo.png")
    (library / "escape.png").symlink_to(outside / "photo.png")
    roots = [library, outside]
    assert check_reference(str(library / "linked.png"), inbox, roots).mime_type == "image/png"
    with pytest.raises(PromptError, match="points outside the inbox"):
        check_reference(str(library / "escape.png"), inbox, [library])


def test_a_folder_flipped_to_a_link_and_back_during_uploads_never_yields_the_outside_file(
    tmp_path: Path,
) -> None:
    """Whoever writes the inbox swaps a folder for a link out of it and back, as fast as it can, while
    the daemon checks (accept) and reads (upload) a reference below it: every check and read sees the
    inbox's image or refuses, never the image outside (both open one folder at a time, no link followed)."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "sub").mkdir(parents=True)
    outside.mkdir()
    mine, theirs = PNG + b"inbox" * 1000, b"\xff\xd8\xff" + b"secret" * 1000  # a PNG in, a JPEG out
    (inbox / "sub" / "pic.png").write_bytes(mine)
    (outside / "pic.png").write_bytes(theirs)
    (tmp_path / "link").symlink_to(outside)
    ref = check_reference("sub/pic.png", inbox)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.rename(inbox / "sub", tmp_path / "real")
            os.rename(tmp_path / "link", inbox / "sub")  # now a link out of the inbox
            os.rename(inbox / "sub", tmp_path / "link")
            os.rename(tmp_path / "real", inbox / "sub")  # and back

    flipper = threading.Thread(target=flip)
    flipper.start()
    seen: set[bytes | str] = set()
    try:
        for _ in range(3000):
            try:
                seen.add(read_reference(ref, inbox)[0])
                seen.add(check_reference("sub/pic.png", inbox).mime_type or "")
            except PromptError as exc:
                seen.add(str(exc).split(": ", 2)[-1])
    finally:
        stop.set()
        flipper.join()
    assert theirs not in seen and "image/jpeg" not in seen
    assert mine in seen and "image/png" in seen  # and it did get through between the flips


def test_a_name_that_is_not_utf8_is_taken_under_a_journal_safe_name(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """Bytes that are not UTF-8 in a file name (a Latin-1 system, a Windows share) cannot go into the
    journal as they are: the file is taken as `%E9t%E9.json`, delivered, filed. One claimed that way
    by an older release, left in the claim folder, no longer stops the start (it did, every time)."""
    proc = daemon()
    staged = folders.root / os.fsdecode(b"\xe9t\xe9.json")
    staged.write_text(json.dumps({"prompt": "a summer day"}))
    staged.rename(folders.inbox / staged.name)
    wait_for(lambda: (folders.done / "%E9t%E9.json").exists(), what="the prompt done under a safe name")
    assert (folders.outbox / "_E9t_E9_1.png").exists()  # output names keep to a safe set of characters
    assert proc.stop() == 0
    instance = (folders.state / "instance-id").read_text().strip()
    stuck = folders.inbox / ".processing" / instance / os.fsdecode(b"caf\xe9.json")
    stuck.write_text(json.dumps({"prompt": "left claimed"}))
    again = daemon()
    wait_for(lambda: (folders.done / "caf%E9.json").exists(), what="the old claim done at the next start")
    again.stop()
    assert folders.names(folders.failed) == [] and len(sandbox.generate_jobs) == 2
    crashes = ("daemon.tick_failed", "worker.task_failed", "prompt.claim_failed")
    assert [e for e in proc.events() + again.events() if e.get("event") in crashes] == []


def test_names_of_255_bytes_are_filed_and_delivered_and_hold_up_nothing(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """A legal name of 255 bytes leaves no room for `.error.json`, `_1.png` or a temp name: those are
    cut short with a hash, so a bad one fails with its report, a good one is delivered, and neither
    stalls the queue (a failed filing paused every submission, and was tried again for ever)."""
    bad, good = "a" * 250 + ".json", "b" * 250 + ".json"
    proc = daemon()
    folders.drop(bad, {"prompt": 5})
    folders.drop(good, {"prompt": "a long name"})
    folders.drop("after.json", {"prompt": "right after them"})
    wait_for(lambda: {good, "after.json"} <= set(folders.names(folders.done)), what="the good ones done")
    reports = lambda: [n for n in folders.names(folders.failed) if n.endswith(".error.json")]  # noqa: E731
    wait_for(lambda: bad in folders.names(folders.failed) and reports(), what="the bad one failed, reported")
    [report] = reports()
    assert len(report.encode()) <= 255 and report.startswith("a" * 200)
    assert "prompt" in json.loads((folders.failed / report).read_text())["error"]
    manifests = [
        n for n in folders.names(folders.outbox) if n.startswith("b") and n.endswith(".manifest.json")
    ]
    assert len(manifests) == 1 and len(manifests[0].encode()) <= 255
    assert len(sandbox.generate_jobs) == 2
    stalls = ("prompt.filing_failed", "output.unwritable", "output.download_failed")
    assert [e for e in proc.events() if e.get("event") in stalls] == []


def test_a_claim_folder_swapped_for_a_link_moves_nothing_from_outside_and_stops_the_start(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, tmp_path: Path
) -> None:
    """Whoever may write the inbox may rename `.processing` away and put a link to another folder at
    `.processing/<instance>`: a file there named as a running prompt's claim is not filed (moved to
    done/), nothing more is claimed into it, and the next start refuses (exit 2) instead of taking the
    folder's files for claims of its own (with done/ linked there, it paid for every prompt again)."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "running.json").write_text(json.dumps({"prompt": f"publish {SECRET}"}))
    sandbox.generation_seconds = 2.0
    proc = daemon()
    folders.drop("running.json", {"prompt": "a job running while the folder is swapped"})
    wait_for(lambda: len(sandbox.generate_jobs) == 1, what="the job paid")
    processing = folders.inbox / ".processing"
    [instance] = [p.name for p in processing.iterdir()]
    processing.rename(folders.inbox / ".old-processing")
    processing.mkdir()
    (processing / instance).symlink_to(private)
    folders.drop("after.json", {"prompt": "dropped after the swap"})
    wait_for(lambda: proc.saw("intake.claim_folder_replaced"), what="the swap noticed")
    wait_for(lambda: proc.saw("prompt.held", task="download"), what="the paid job delivered, not filed")
    assert (folders.outbox / "running.manifest.json").exists()
    # The file left waiting in the inbox is not looped on: no busy loop (it spun a whole core).
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = lambda: sum(map(int, Path(f"/proc/{proc.proc.pid}/stat").read_text().rsplit(")")[1].split()[11:13]))  # noqa: E731
    before, start = cpu(), time.monotonic()
    time.sleep(2.0)  # a window to measure in, not a wait for an event
    assert (cpu() - before) / ticks < 0.5 * (time.monotonic() - start)
    assert [p.name for p in private.iterdir()] == ["running.json"]
    assert folders.names(folders.done) == [] and (folders.inbox / "after.json").exists()
    assert proc.stop() == 0
    again = run_cli("run", "-c", str(folders.config), timeout=30)
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"{processing / instance} is not a folder" in again.stderr
    assert [p.name for p in private.iterdir()] == ["running.json"] and len(sandbox.generate_jobs) == 1


def test_a_subfolder_swapped_for_a_link_after_its_file_was_seen_is_not_claimed_through(
    tmp_path: Path,
) -> None:
    """With [watch] recursive, `sub/secret.json` is seen, then `sub` becomes a link to a private folder:
    the claim refuses the path instead of renaming the private file into the claim folder."""
    inbox, private = tmp_path / "inbox", tmp_path / "private"
    (inbox / "sub").mkdir(parents=True)
    private.mkdir()
    seen = str(inbox / "sub" / "secret.json")
    (private / "secret.json").write_text(json.dumps({"prompt": f"publish {SECRET}"}))
    (inbox / "sub").rename(inbox / ".sub-old")
    (inbox / "sub").symlink_to(private)
    assert claim(seen, inbox, inbox / ".processing" / "me") is None
    assert [p.name for p in private.iterdir()] == ["secret.json"]


def test_a_long_subfolder_name_that_is_not_utf8_is_claimed_under_a_name_that_fits(tmp_path: Path) -> None:
    """Each byte that is not UTF-8 becomes three (`%E9`): a 100-byte folder name would become 300, too
    long for a folder of the claim (it failed at every rescan and stayed in the inbox)."""
    inbox = tmp_path / "inbox"
    sub = inbox / os.fsdecode(b"\xe9" * 100)
    sub.mkdir(parents=True)
    (sub / "p.json").write_text("{}")
    dest = claim(str(sub / "p.json"), inbox, inbox / ".processing" / "me")
    assert dest is not None and dest.read_text() == "{}" and len(dest.parent.name.encode()) <= 255

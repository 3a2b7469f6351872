"""files.py on real files: no clobbering, arrival by rename (what folder watchers see), safe reads."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Folders, StartDaemon, inotify_lines, wait_for
from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent
from watchdog.observers.inotify import InotifyObserver

from scenario_watch import files
from scenario_watch.errors import UnsafeFile
from scenario_watch.files import (
    NAME_MAX,
    TEMP_ROOM,
    TEMP_SUFFIX,
    fit_name,
    move_no_clobber,
    open_own,
    open_regular,
    read_regular,
    rename_into,
    rename_noreplace,
    write_atomic,
)


@pytest.fixture(params=["renameat2", "reservation"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the kernel's RENAME_NOREPLACE, and again with the portable fallback."""
    if request.param == "renameat2" and not files.use_renameat2:
        pytest.skip("renameat2 is not available here (not Linux, or glibc before 2.28)")
    monkeypatch.setattr(files, "use_renameat2", request.param == "renameat2")
    return str(request.param)


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


# -- no clobbering -----------------------------------------------------------------------------------


def test_rename_noreplace_never_overwrites(tmp_path: Path, mode: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert dst.read_bytes() == b"old" and src.read_bytes() == b"new"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):  # a dangling symlink is a taken name too
        rename_noreplace(src, dangling)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free").read_bytes() == b"new" and not src.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "dst", "free"]  # no reservation left


def test_rename_noreplace_moves_links_fifos_and_folders_as_themselves(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "target.json"
    target.write_text("the target")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inner.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("link", "fifo", "folder"):
        rename_noreplace(tmp_path / name, out / name)
    assert os.readlink(out / "link") == str(target)
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
    assert (out / "folder" / "inner.json").read_text() == "{}"
    (tmp_path / "folder2").mkdir()
    with pytest.raises(FileExistsError):  # an empty folder is not replaced either
        rename_noreplace(tmp_path / "folder2", out / "folder")


def test_rename_noreplace_of_a_missing_source_leaves_nothing_behind(tmp_path: Path, mode: str) -> None:
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "gone", tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_keeps_an_existing_file_and_leaves_no_temp(tmp_path: Path, mode: str) -> None:
    dest = tmp_path / "x.png"
    assert write_atomic(dest, lambda out: out.write(b"first"))
    assert not write_atomic(dest, lambda out: out.write(b"second"))
    assert dest.read_bytes() == b"first"
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "y.png", lambda out: (out.write(b"half"), _fail()))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def _fail() -> None:
    raise RuntimeError("the download broke")


def test_move_no_clobber_takes_the_next_free_name(tmp_path: Path, mode: str) -> None:
    folder = tmp_path / "done"
    folder.mkdir()
    (folder / "a.json").write_text("taken")
    (folder / "a-2.json").symlink_to(tmp_path / "nowhere")
    for n in range(2):
        (tmp_path / f"src{n}").write_text(f"mine {n}")
    assert move_no_clobber(tmp_path / "src0", folder, "a.json") == folder / "a-3.json"
    new = tmp_path / "new" / "sub"
    assert move_no_clobber(tmp_path / "src1", new, "a.json") == new / "a.json"
    assert (folder / "a.json").read_text() == "taken" and (folder / "a-3.json").read_text() == "mine 0"
    assert (new / "a.json").read_text() == "mine 1"


def test_rename_into_from_many_threads_never_loses_a_file(tmp_path: Path, mode: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    sources = []
    for n in range(40):
        src = tmp_path / f"s{n}"
        src.write_text(str(n))
        sources.append(src)
    threads = [threading.Thread(target=rename_into, args=(src, folder, "same.json")) for src in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.read_text() for p in folder.iterdir()) == sorted(str(n) for n in range(40))


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (/dev/shm), or skip saying why."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm: no second filesystem to move across")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and the temp folder are one filesystem here")
    folder = shm / f"scenario-watch-test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_move_no_clobber_across_filesystems_copies_then_renames(
    tmp_path: Path, other_filesystem: Path, mode: str
) -> None:
    data = os.urandom(3 << 20)
    src = tmp_path / "big.json"
    src.write_bytes(data)
    (other_filesystem / "big.json").write_text("taken")
    dest = move_no_clobber(src, other_filesystem, "big.json")
    assert dest == other_filesystem / "big-2.json"
    assert dest.read_bytes() == data and not src.exists()
    assert sorted(p.name for p in other_filesystem.iterdir()) == ["big-2.json", "big.json"]  # no temp


def test_move_no_clobber_across_filesystems_refuses_what_is_not_a_regular_file(
    tmp_path: Path, other_filesystem: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("never copied")
    (tmp_path / "leak.json").symlink_to(secret)
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "dir.json").mkdir()
    for name, kind in (("leak.json", "symbolic link"), ("pipe.json", "FIFO"), ("dir.json", "directory")):
        with pytest.raises(OSError, match=kind) as info:
            move_no_clobber(tmp_path / name, other_filesystem, name)
        assert info.value.errno == errno.EXDEV
        assert os.path.lexists(tmp_path / name)  # left where it was, for a person
    assert list(other_filesystem.iterdir()) == []


# -- safe reads ---------------------------------------------------------------------------------------


def test_read_regular_reads_a_regular_file_up_to_limit_plus_one(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, 1000) == b"x" * 100
    assert read_regular(path, 10) == b"x" * 11  # more than the limit: the caller refuses it
    with open_regular(path) as handle:
        assert handle.read() == b"x" * 100


def test_read_regular_refuses_a_symlink_without_reading_its_target(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"prompt": "secret"}')
    for name, target in (("leak.json", secret), ("dangling.json", tmp_path / "nowhere")):
        (tmp_path / name).symlink_to(target)
        with pytest.raises(UnsafeFile, match="is a symbolic link: refused") as info:
            read_regular(tmp_path / name, 1000)
        assert info.value.kind == "a symbolic link"
        assert 'secret"' not in str(info.value)


def test_read_regular_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_regular(fifo, 1000))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # blocked in open(): give it a writer so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert time.monotonic() - started < 1
    assert isinstance(outcome[0], UnsafeFile) and "is a FIFO" in str(outcome[0])


def test_read_regular_refuses_folders_sockets_and_devices(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UnsafeFile, match="is a directory"):
        read_regular(tmp_path / "dir.json", 1000)
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "s.json"))
        with pytest.raises(UnsafeFile, match="is a socket"):
            read_regular(tmp_path / "s.json", 1000)
    finally:
        server.close()
    with pytest.raises(UnsafeFile, match="is a device"):
        read_regular("/dev/zero", 1000)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing.json", 1000)


def test_open_own_writes_anew_a_file_of_ours_and_nothing_else(tmp_path: Path) -> None:
    ours = tmp_path / ".x.part"
    ours.write_bytes(b"old and longer")
    with open_own(ours) as out:
        out.write(b"new")
    assert ours.read_bytes() == b"new"  # truncated, not appended
    ours.unlink()
    with open_own(ours) as out:  # gone (a restart removed it): made again
        out.write(b"again")
    assert ours.read_bytes() == b"again"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    link, hard, fifo = tmp_path / ".link.part", tmp_path / ".hard.part", tmp_path / ".fifo.part"
    link.symlink_to(outside)
    os.link(outside, hard)
    os.mkfifo(fifo)
    for path, kind in ((link, "a symbolic link"), (hard, "a hard link"), (fifo, "FIFO")):
        with pytest.raises(UnsafeFile, match=kind):
            open_own(path)
    assert outside.read_bytes() == b"keep me"  # never truncated or written through a name
    with pytest.raises(UnsafeFile, match="a symbolic link"):  # dangling: nothing created at the target
        (tmp_path / ".dangling.part").symlink_to(tmp_path / "made")
        open_own(tmp_path / ".dangling.part")
    assert not (tmp_path / "made").exists()


# -- what a program watching the folder sees ---------------------------------------------------------


class Recorder(FileSystemEventHandler):
    """Records moved-to and close-write events, reading each file's sha256 as the event arrives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.moved: list[tuple[str, str | None]] = []
        self.closed: list[tuple[str, str | None]] = []

    def on_moved(self, event: FileSystemEvent) -> None:
        assert isinstance(event, FileSystemMovedEvent)
        self._record(self.moved, os.fsdecode(event.dest_path))

    def on_closed(self, event: FileSystemEvent) -> None:
        assert isinstance(event, FileClosedEvent)
        self._record(self.closed, os.fsdecode(event.src_path))

    def _record(self, into: list[tuple[str, str | None]], path: str) -> None:
        try:
            digest: str | None = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            digest = None  # a temp already renamed away
        with self.lock:
            into.append((os.path.basename(path), digest))

    def final(self, events: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
        with self.lock:
            return sorted(e for e in events if not is_temp(e[0]))


def watch(folder: Path) -> tuple[InotifyObserver, Recorder]:
    recorder = Recorder()
    # Full events: a file moved in from another folder is a move (dest_path), not a creation.
    observer = InotifyObserver(generate_full_events=True)
    observer.schedule(recorder, str(folder), recursive=True)
    observer.daemon = True
    observer.start()
    return observer, recorder


def stop(observer: InotifyObserver) -> None:
    observer.stop()
    observer.join(timeout=5)


def test_a_folder_watcher_sees_each_published_file_once_complete_by_rename(tmp_path: Path, mode: str) -> None:
    outbox, elsewhere = tmp_path / "outbox", tmp_path / "elsewhere"
    outbox.mkdir()
    elsewhere.mkdir()
    observer, recorder = watch(outbox)
    expected: dict[str, str] = {}
    try:
        for n in range(30):
            data = os.urandom(50_000 + n * 1000)
            assert write_atomic(outbox / f"img_{n}.png", lambda out, data=data: out.write(data))
            expected[f"img_{n}.png"] = hashlib.sha256(data).hexdigest()
        for n in range(10):
            data = os.urandom(20_000)
            (elsewhere / f"p{n}.json").write_bytes(data)
            name = "img_3.png" if n == 9 else f"p{n}.json"  # a taken name: filed as img_3-2.png
            dest = move_no_clobber(elsewhere / f"p{n}.json", outbox, name)
            expected[dest.name] = hashlib.sha256(data).hexdigest()
        assert "img_3-2.png" in expected
        want = sorted(expected.items())
        wait_for(lambda: recorder.final(recorder.moved) == want, timeout=10, what="every moved-to event")
        time.sleep(0.3)  # time for a duplicate to show up
    finally:
        stop(observer)
    # Each name once, as a move, with its full content when the event came; no close-write on a final
    # name (a file written in place would make one), so no reader ever sees a partial file.
    assert recorder.final(recorder.moved) == want
    assert recorder.final(recorder.closed) == []
    assert all(is_temp(name) for name, _ in recorder.closed)
    assert sorted(p.name for p in outbox.iterdir()) == sorted(expected)


def test_inotifywait_sees_every_published_name(tmp_path: Path, mode: str) -> None:
    if shutil.which("inotifywait") is None:
        pytest.skip("inotifywait is not installed (Debian: apt-get install inotify-tools)")
    outbox, elsewhere = tmp_path / "outbox", tmp_path / "elsewhere"
    outbox.mkdir()
    elsewhere.mkdir()
    published: list[str] = []
    with inotify_lines(
        ["inotifywait", "-m", "-e", "close_write,moved_to", "--format", "%f", str(outbox)]
    ) as lines:
        for n in range(20):
            assert write_atomic(outbox / f"o_{n}.png", lambda out: out.write(b"x" * 10_000))
            published.append(f"o_{n}.png")
        for n in range(5):
            (elsewhere / f"d{n}.json").write_text("{}")
            published.append(move_no_clobber(elsewhere / f"d{n}.json", outbox, "o_1.png").name)
        wait_for(
            lambda: sorted(line for line in lines if not is_temp(line)) == sorted(published),
            timeout=10,
            what="inotifywait to print every name",
        )
    assert sorted(line for line in lines if not is_temp(line)) == sorted(published)  # each exactly once


# -- through the daemon -------------------------------------------------------------------------------


def test_the_daemon_publishes_outputs_and_files_prompts_by_rename(
    folders: Folders, daemon: StartDaemon
) -> None:
    for folder in (folders.outbox, folders.done):
        folder.mkdir()
    out_observer, out_events = watch(folders.outbox)
    done_observer, done_events = watch(folders.done)
    try:
        daemon()
        stems = ["alpha", "beta", "gamma"]
        for stem in stems:
            folders.drop(f"{stem}.json", {"prompt": f"the {stem} picture", "numOutputs": 2})
        outputs = sorted(
            name for stem in stems for name in (f"{stem}_1.png", f"{stem}_2.png", f"{stem}.manifest.json")
        )
        wait_for(lambda: [n for n, _ in out_events.final(out_events.moved)] == outputs, what="the outputs")
        wait_for(lambda: [n for n, _ in done_events.final(done_events.moved)] == [f"{s}.json" for s in stems])
        time.sleep(0.3)
    finally:
        stop(out_observer)
        stop(done_observer)
    assert sorted(folders.names(folders.outbox)) == outputs
    for events, folder in ((out_events, folders.outbox), (done_events, folders.done)):
        moved = events.final(events.moved)
        assert [n for n, _ in moved] == sorted(folders.names(folder))  # each exactly once
        for name, digest in moved:  # complete when the event came
            assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
        assert events.final(events.closed) == []


def test_fit_name_cuts_a_long_name_keeping_its_extensions_and_apart_from_others(tmp_path: Path) -> None:
    assert fit_name("car.error.json") == "car.error.json"
    long_a, long_b = "é" * 120 + "a.error.json", "é" * 120 + "b.error.json"  # 253 bytes each
    fitted = [fit_name(name, room=TEMP_ROOM) for name in (long_a, long_b)]
    assert all(len(f.encode()) <= NAME_MAX - TEMP_ROOM and f.endswith(".error.json") for f in fitted)
    assert fitted[0] != fitted[1] and fit_name(long_a, room=TEMP_ROOM) == fitted[0]  # apart, always the same
    for name in fitted:  # a real filesystem takes each as a temp name's part: the room was enough
        (tmp_path / f".{name}.0123abcd{TEMP_SUFFIX}").write_text("x")

"""A downstream reader of a templated, converted outbox: `inotifywait -r` sees each output once, complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import Folders, StartDaemon, wait_for, write_config
from imagemaker import encode, photo
from PIL import Image

from scenario_watch.sandbox import Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


class Reader:
    """`inotifywait -r -m -e close_write,moved_to` on a folder, reading each file as its name is printed."""

    def __init__(self, folder: Path) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, sha256 of what was there at that moment)
        self.proc = subprocess.Popen(
            ["inotifywait", "-r", "-m", "-e", "close_write,moved_to", "--format", "%w%f", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        while "Watches established" not in self.proc.stderr.readline():
            assert self.proc.poll() is None, "inotifywait stopped"
        self.thread = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stdout: object) -> None:
        for line in stdout:  # type: ignore[attr-defined]
            path = line.rstrip("\n")
            try:
                digest: str | None = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except OSError:
                digest = None  # gone already (a temp file renamed away)
            self.seen.append((path, digest))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=5)
        self.thread.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def published(outbox: Path) -> dict[str, str | None]:
    """Every file the manifests say was published (path → sha256; None for the manifests themselves)."""
    files: dict[str, str | None] = {}
    for manifest in outbox.rglob("*.manifest.json"):
        files[str(manifest)] = None
        for entry in json.loads(manifest.read_text())["files"]:
            files[str(manifest.parent / entry["file"])] = entry["sha256"]
    return files


def test_inotifywait_sees_each_templated_webp_output_once_and_complete(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    if shutil.which("inotifywait") is None:
        pytest.skip("inotifywait is not installed (Debian: apt-get install inotify-tools)")
    write_config(
        folders,
        sandbox.base_url,
        outbox={"name": "{date}/{preset}/{stem}_{index}", "format": "webp"},
        defaults={"numOutputs": 2},
        presets={"paint": {"prompt": "paint it"}},
    )
    daemon()
    reader = Reader(folders.outbox)
    try:
        for n in range(3):
            folders.drop(f"p{n}.json", {"prompt": f"picture {n}"})
        (folders.inbox / "paint").mkdir(exist_ok=True)
        (folders.inbox / "paint" / "car.png").write_bytes(encode(photo(16, 16), "PNG"))
        wait_for(
            lambda: len(list(folders.done.rglob("*.*"))) == 4 and len(published(folders.outbox)) == 12,
            timeout=40,
            what="four prompts delivered",
        )
        expected = published(folders.outbox)
        wait_for(lambda: {path for path, _ in reader.seen} >= set(expected), timeout=10, what="the reader")
    finally:
        reader.stop()

    visible = [(p, d) for p, d in reader.seen if not Path(p).name.startswith(".")]
    hidden = {Path(p).name for p, _ in reader.seen} - {Path(p).name for p, _ in visible}
    assert sorted(p for p, _ in visible) == sorted(expected)  # each output and manifest, exactly once
    for path, digest in visible:
        if expected[path] is not None:
            assert digest == expected[path], path  # complete when it was seen
    assert all(name.endswith(".part") for name in hidden), hidden  # only temp files, which readers skip
    outputs = [Path(p) for p, sha in expected.items() if sha is not None]
    assert {p.suffix for p in outputs} == {".webp"}
    # {date}/{preset}/: the inbox's outputs in <date>/, the preset's in paint/<date>/paint/.
    relative = sorted(str(p.relative_to(folders.outbox).parent) for p in outputs)
    date = relative[0]
    assert relative == [date] * 6 + [f"paint/{date}/paint"] * 2
    with Image.open(outputs[0]) as img:
        assert img.format == "WEBP"

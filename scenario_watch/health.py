"""Whether the daemon can write where it delivers: a probe file, at start and while writes fail.

A job is paid for when it is submitted, so an outbox the daemon cannot write must stop submissions
(not only downloads). Permissions are checked once at start (a configuration error); a disk that
is full, or a share that went away, is a pause: probed again until it can be written.
"""

from __future__ import annotations

import errno
import os
import pwd
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scenario_watch import logs
from scenario_watch.errors import ConfigError
from scenario_watch.files import temp_path

log = logs.get()

# The probe writes this much: an empty file can still be created on a disk with no block left.
PROBE_BYTES = 4096
# Room an output may take, by resolution (a 4K PNG is about 25 MB), until outputs have shown their size.
OUTPUT_BYTES = {"1K": 4 << 20, "2K": 12 << 20, "4K": 40 << 20}
# Errors that pass by themselves (space freed): at start these pause submissions instead of exiting.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def make_folders(folders: Sequence[Path]) -> None:
    """Create the daemon's folders if missing; ConfigError naming one that cannot be made."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the folder {folder}: {exc.strerror}") from exc


def probe(folder: Path) -> None:
    """Create, fill, fsync and remove a hidden temp file in `folder`; OSError if any step fails."""
    # A temp name (hidden, .part): watchers of the folder ignore it, and a crash's leftover is removed.
    path = temp_path(folder / ".write-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, bytes(PROBE_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def output_bytes(inputs: Mapping[str, Any], learned: int | None) -> int:
    """The free space a submission's outputs may need in the outbox: the largest recent output's size
    (learned from what Scenario delivered), else a generous PNG size for the resolution, each."""
    outputs, resolution = inputs.get("numOutputs"), inputs.get("resolution")
    count = outputs if isinstance(outputs, int) and not isinstance(outputs, bool) and outputs > 0 else 4
    if learned is not None:
        return count * learned
    # Without a resolution the API makes 2K images (its documented default).
    return count * OUTPUT_BYTES.get(resolution if isinstance(resolution, str) else "2K", OUTPUT_BYTES["4K"])


def deliverable(folders: Sequence[Path], outbox_bytes: int) -> str | None:
    """Why the outputs of a submission could not be delivered now (None: they can), before paying.

    access() and statvfs() only: a few system calls, no file written (that is `probe`'s, while a pause
    lasts). The outbox (the first folder) needs room for the outputs, done/ and failed/ a little.
    """
    for n, folder in enumerate(folders):
        try:
            fs = os.statvfs(folder)
        except OSError as exc:
            return unwritable(folder, exc)
        if fs.f_flag & os.ST_RDONLY:
            return f"{folder.name or folder} not writable: read-only file system"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder.name or folder} not writable: permission denied"
        need = outbox_bytes if n == 0 else PROBE_BYTES
        if fs.f_bavail * fs.f_frsize < need:
            return f"{folder.name or folder} not writable: less than {max(1, need >> 20)} MiB free"
    return None


def user_name() -> str:
    """The name of the user the daemon runs as (for messages about permissions)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a UID without a passwd entry (containers, systemd DynamicUser)
        return f"UID {os.geteuid()}"


def unwritable(folder: Path, exc: OSError) -> str:
    """Why submitting waits, as status shows it: '<folder> not writable: <reason>'."""
    return f"{folder.name or folder} not writable: {exc.strerror or exc}"


def first_problem(folders: Sequence[Path]) -> str | None:
    """The first folder that cannot be written now, and why; None when every probe succeeds."""
    for folder in folders:
        try:
            probe(folder)
        except OSError as exc:
            return unwritable(folder, exc)
    return None


def recheck(folders: Sequence[Path]) -> str | None:
    """Probe folders that could not be written; log when they can be again (submissions resume)."""
    problem = first_problem(folders)
    if problem is None:
        log.info("output.writable", note="the output folders can be written again; submitting resumes")
    return problem


def check_at_start(folders: Sequence[Path]) -> str | None:
    """ConfigError naming the folder, the user and the fix; a full disk is returned (a pause) instead."""
    full = None
    for folder in folders:
        try:
            probe(folder)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                full = full or unwritable(folder, exc)
                log.error(
                    "output.unwritable", folder=str(folder), error=str(exc), note="nothing is sent until then"
                )
                continue
            raise ConfigError(cannot_write(folder, exc)) from exc
    return full


def cannot_write(folder: Path, exc: OSError) -> str:
    """The start-up error for a folder the daemon's user may not write."""
    user = user_name()
    return (
        f"the folder {folder} is not writable by the user {user} ({exc.strerror or exc}): "
        f"fix it with `chown {user} {folder}` or `chmod u+w {folder}` "
        "(or a group the user is in, and chmod g+w), or choose another folder in [folders]"
    )

"""Atomic, no-clobber file operations and safe reads of files an untrusted party may place.

Every file this package publishes arrives under its final name by a rename, never a hard link:
a rename is the one event (inotify `IN_MOVED_TO`) that every folder watcher understands, and
the file is complete when its name appears. Nothing is ever overwritten.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO, TypeAlias

from scenario_watch.errors import UnsafeFile

TEMP_SUFFIX = ".part"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, NFS)
TEMP_ROOM = len(f"..{'0' * 8}{TEMP_SUFFIX}")  # what temp_path adds to a name
StrPath: TypeAlias = str | os.PathLike[str]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# How a filesystem says it does not do renameat2's flags (as opposed to the rename itself failing).
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def _find_renameat2() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2  # Linux, glibc 2.28+
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _find_renameat2()
# Whether rename_noreplace asks the kernel first; False takes the portable fallback (tests set it).
use_renameat2 = _renameat2 is not None
# Filesystems (st_dev) that refused RENAME_NOREPLACE: go straight to the fallback there.
_refused_devices: set[int] = set()


def _parent_device(path: StrPath) -> int:
    return os.stat(os.path.dirname(os.path.abspath(path))).st_dev


def rename_noreplace(src: StrPath, dst: StrPath) -> None:
    """Rename `src` (any kind of entry, never followed) to `dst`; FileExistsError if `dst` exists.

    On Linux this is one `renameat2(RENAME_NOREPLACE)`. Without it (another OS, glibc before 2.28,
    a filesystem that refuses the flag) the name is first reserved exclusively, then renamed over:
    still atomic for readers and still no clobbering, but the reservation is visible as an empty
    file (an empty folder when moving a folder) for an instant, with an `IN_CREATE` before the
    `IN_MOVED_TO`.
    """
    refused = bool(_refused_devices) and _parent_device(dst) in _refused_devices
    if not use_renameat2 or _renameat2 is None or refused:
        _rename_over_reservation(src, dst)
        return
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    _rename_over_reservation(src, dst)
    # Only now is it sure the flag was refused (EINVAL also means "a folder into itself").
    _refused_devices.add(_parent_device(dst))


def _rename_over_reservation(src: StrPath, dst: StrPath) -> None:
    is_dir = stat.S_ISDIR(os.lstat(src).st_mode)
    if is_dir:
        os.mkdir(dst, 0o700)  # a folder may only be renamed over an empty folder
    else:
        # O_RDONLY: closing it makes no IN_CLOSE_WRITE, so close_write readers never see it.
        os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_CLOEXEC, 0o600))
    try:
        os.rename(src, dst)
    except BaseException:
        (os.rmdir if is_dir else os.unlink)(dst)
        raise


def fsync_dir(path: StrPath) -> None:
    """Make a folder's entries (a rename, a new name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fit_name(name: str, room: int = 0) -> str:
    """`name`, or a shorter one leaving `room` bytes under NAME_MAX: the stem cut short and a hash of
    the whole name put after it (two long names stay apart, the same one always fits the same way),
    the extension kept. A name of 255 bytes is legal in the inbox; `x.error.json` beside it is not."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) + room <= NAME_MAX:
        return name
    ext = ""  # the extensions kept whole: `.error.json`, `.manifest.json`, `.png`
    for suffix in reversed(Path(name).suffixes):
        if len(ext) + len(suffix) > 24:
            break
        ext = suffix + ext
    stem = name[: len(name) - len(ext)]
    tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
    keep = NAME_MAX - room - len(ext.encode("utf-8", "surrogateescape")) - len(tag)
    return stem.encode("utf-8", "surrogateescape")[: max(keep, 1)].decode("utf-8", "ignore") + tag + ext


def temp_path(dest: Path) -> Path:
    """A hidden temp name beside `dest`: same filesystem, ignored by anyone watching the folder."""
    return dest.with_name(f".{fit_name(dest.name, TEMP_ROOM)}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_atomic(dest: Path, fill: Callable[[IO[bytes]], object]) -> bool:
    """Write via a temp name, fsync, then rename into place; False (nothing written) if `dest` exists."""
    temp = temp_path(dest)
    handle = temp.open("xb")  # a fresh random name: if it exists it is not ours to remove
    try:
        with handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            rename_noreplace(temp, dest)
        except FileExistsError:
            temp.unlink()
            return False
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return True


def free_name(folder: Path, name: str) -> Path:
    """`name` in `folder`, or `stem-2.ext`, `stem-3.ext` ... if it is taken."""
    candidate = folder / fit_name(name)
    plain = Path(name)
    n = 2
    while os.path.lexists(candidate):  # a dangling symlink takes a name too
        candidate = folder / fit_name(f"{plain.stem}-{n}{plain.suffix}")
        n += 1
    return candidate


def rename_into(src: StrPath, folder: Path, name: str) -> Path:
    """Rename `src` into `folder` as `name`, or the next free `stem-N` name; never replaces anything."""
    while True:
        dest = free_name(folder, name)
        try:
            rename_noreplace(src, dest)
            return dest
        except FileExistsError:
            continue  # somebody took the name between the check and the rename


def move_no_clobber(src: Path, folder: Path, name: str) -> Path:
    """Move `src` into `folder` under a free name, arriving by rename; across filesystems, copy first.

    On one filesystem any entry moves as itself (a symlink stays a link, a folder moves whole).
    Across filesystems only a regular file is copied (to a temp in `folder`, fsynced, renamed into
    place, then the source unlinked); anything else raises OSError(EXDEV) and stays where it is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        dest = rename_into(src, folder, name)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return _copy_across(src, folder, name)
    fsync_dir(folder)
    return dest


def _copy_across(src: Path, folder: Path, name: str) -> Path:
    try:
        source = open_regular(src)
    except UnsafeFile as exc:
        # Copying would read a symlink's target or block on a FIFO: leave it for a person.
        problem = f"{src.name} is {exc.kind}: not copied to another filesystem (move it by hand)"
        raise OSError(errno.EXDEV, problem, str(src)) from None
    with source:

        def copy(out: IO[bytes]) -> None:
            """Copy the source into the temp file."""
            source.seek(0)
            shutil.copyfileobj(source, out, 1 << 20)

        while not write_atomic(dest := free_name(folder, name), copy):
            pass  # the name was taken meanwhile: the next free one
    os.unlink(src)
    return dest


def remove_temp_files(folder: Path) -> int:
    """Delete temp files a crash left behind (subfolders included); how many."""
    removed = 0
    for path in folder.rglob(f".*{TEMP_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: StrPath) -> BinaryIO:
    """Open a regular file for reading; UnsafeFile for anything else, which is never opened or followed."""
    name = os.path.basename(path)
    # lstat first, so that a FIFO, device or socket is refused without even being opened.
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise UnsafeFile(name, _kind(mode))
    # If the entry was swapped since the lstat, a symlink fails instead of being followed and a FIFO
    # opens at once instead of blocking.
    fd = _open_unfollowed(path, os.O_RDONLY, "a socket")
    try:
        # The descriptor is what gets read, so this check cannot be fooled by another swap.
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile(name, _kind(mode))
        return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a regular file
    except BaseException:
        os.close(fd)
        raise


def open_own(path: StrPath) -> BinaryIO:
    """Open a file of our own to write it anew, creating it if it is gone; UnsafeFile (nothing written)
    if a link, a FIFO, a socket or a file with other names (a hard link) is there instead."""
    name = os.path.basename(path)
    fd = _open_unfollowed(path, os.O_WRONLY | os.O_CREAT, "a FIFO or socket")
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise UnsafeFile(name, _kind(found.st_mode))
        if found.st_nlink != 1:
            raise UnsafeFile(name, "a file with other names (a hard link)")
        os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def _open_unfollowed(path: StrPath, flags: int, enxio: str, dir_fd: int | None = None) -> int:
    """os.open with O_NOFOLLOW and O_NONBLOCK (in `dir_fd` when given): a symlink, a folder opened to
    write, and whatever ENXIO means for `flags` (`enxio`: a socket, or a FIFO without a reader) are
    UnsafeFile instead of being followed or blocking."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    except OSError as exc:
        unsafe = {errno.ELOOP: "a symbolic link", errno.ENXIO: enxio, errno.EISDIR: "a directory"}
        kind = unsafe.get(exc.errno or 0)
        if kind is None:
            raise
        raise UnsafeFile(os.path.basename(path), kind) from None


def open_beneath(root: Path, relative: Path) -> BinaryIO:
    """Open a regular file below `root` following no link on the way, one folder at a time (openat):
    no swap of a folder for a link, however timed, leads out. The root itself is configured (it may be
    a link: the operator's choice). UnsafeFile for a link or anything but a regular file (naming the
    part), FileNotFoundError for a missing part, ValueError for a path that is not plain and relative."""
    parts = relative.parts
    if not parts or relative.is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{relative} is not a plain relative path")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = _open_at(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = _open_at(parts[-1], os.O_RDONLY | os.O_NONBLOCK, dir_fd)
    finally:
        os.close(dir_fd)
    mode = os.fstat(fd).st_mode  # the descriptor itself: no swap can fool this
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFile(parts[-1], _kind(mode))
    return os.fdopen(fd, "rb")


def _open_at(name: str, flags: int, dir_fd: int) -> int:
    try:
        return _open_unfollowed(name, flags, "a socket", dir_fd)
    except NotADirectoryError:  # a file where a folder was
        raise UnsafeFile(name, "not a folder") from None


def read_regular(path: StrPath, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a regular file (more than `limit` means too big); UnsafeFile otherwise."""
    with open_regular(path) as handle:
        return handle.read(limit + 1)


def digest(path: StrPath) -> tuple[int, str]:
    """A regular file's size and sha256, read in chunks (never through a link: UnsafeFile)."""
    sha = hashlib.sha256()
    size = 0
    with open_regular(path) as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()

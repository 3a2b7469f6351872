"""Which files a watched folder takes, by name, and why the others are skipped (logged once each)."""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from scenario_watch import logs
from scenario_watch.files import fit_name

DEFAULT_IGNORE = (
    ".*",
    "*.tmp",
    "*.part",
    "*.filepart",
    "*.crdownload",
    "*.swp",
    "*~",
    "~$*",
    "@eaDir",
    "*.manifest.json",
    "*.error.json",
)
# What a preset folder takes by name (the bytes decide later whether it really is an image).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)
# Skipped paths remembered so each is logged once; past this many the memory starts over.
SKIP_MEMORY = 10_000

log = logs.get()


def _pattern(name: str, ignore: Sequence[str]) -> str | None:
    """The first ignore pattern `name` matches, or None."""
    return next((p for p in (*DEFAULT_IGNORE, *ignore) if fnmatch.fnmatchcase(name, p)), None)


def is_ignored(name: str, ignore: Sequence[str]) -> bool:
    """Whether `name` matches a default or a configured ignore pattern."""
    return _pattern(name, ignore) is not None


def journal_safe(rel: str) -> str:
    """A file's path as the journal can hold it (UTF-8 text): each byte that is not UTF-8, which Python
    keeps as a lone surrogate, becomes `%XX`, so `\xe9t\xe9.json` is taken as `%E9t%E9.json`, not never;
    a part made too long by that is cut short (fit_name)."""
    escaped = "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in rel)
    return escaped if escaped == rel else os.path.join(*(fit_name(part) for part in escaped.split(os.sep)))


def is_json_name(name: str) -> bool:
    """The one rule for prompt file names, shared by the watcher and `validate`: `.json` in any case."""
    return name.lower().endswith(".json")


def is_text_name(name: str) -> bool:
    """A sidecar prompt's name (`photo.txt` beside `photo.jpg`): `.txt` in any case."""
    return name.lower().endswith(".txt")


def is_image_name(name: str) -> bool:
    """Whether a preset folder takes this file as an image (by its name; its bytes are checked later)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Skip:
    """Why a file is not taken; `quiet` for temporary and own files (logged at debug only)."""

    reason: str
    quiet: bool = False


def classify(
    path: str,
    folder: str,
    recursive: bool,
    ignore: Sequence[str] = (),
    *,
    images: bool = False,
    exclude: Sequence[str] = (),
) -> str | Skip | None:
    """`path` relative to `folder` if it is taken, a Skip saying why not, or None when it is not ours
    to judge (outside the folder, in a claim folder, in another source's folder)."""
    rel = os.path.relpath(path, folder)
    parts = rel.split(os.sep)
    if parts[0] == ".." or any(path == e or path.startswith(e + os.sep) for e in exclude):
        return None
    if any(is_ignored(part, ignore) for part in parts[:-1]):  # .processing, .git, @eaDir ...
        return None
    if len(parts) > 1 and images:
        return Skip("in a subfolder of a preset folder (preset folders are not recursive)", quiet=True)
    if len(parts) > 1 and not recursive:
        return Skip("in a subfolder while [watch] recursive is off")
    pattern = _pattern(parts[-1], ignore)
    if pattern is not None:  # hidden and temporary names are how safe writers deliver: not news
        return Skip(f"matches ignore pattern {pattern}", quiet=pattern not in ignore)
    if is_json_name(parts[-1]) or (images and is_image_name(parts[-1])):
        return rel
    if is_text_name(parts[-1]):  # a sidecar: the inbox takes it (its image with it); a preset reads it
        return Skip("a .txt beside an image: read with the image", quiet=True) if images else rel
    if images:
        return Skip("not an image, a .json prompt file or a .txt beside an image")
    return Skip("not a .json prompt file or a .txt beside an image")


class SkipLog:
    """Logs each skipped file once: events repeat and the folder is rescanned, the log must not."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # the observer thread and the main loop both report

    def note(self, path: str, skip: Skip) -> None:
        """Log `path` as skipped unless it was already."""
        with self._lock:
            if path in self._seen:
                return
            if len(self._seen) >= SKIP_MEMORY:
                self._seen.clear()
            self._seen.add(path)
        (log.debug if skip.quiet else log.info)("watch.skipped", path=path, reason=skip.reason)

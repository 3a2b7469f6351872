"""A referenceImages entry: the rules it is checked by (at accept, and again after a restart), and how
its file is read to upload.

An entry is a Scenario asset id, or an image file relative to the prompt's folder (inside it, no `..`,
never a symlink) or under a `[watch] reference_roots` folder (a symlink there is fine once it resolves
inside the roots). `check_references` applies those rules and sniffs each file's type; the dispatcher
keeps what it found, and checks a journaled entry again only after a restart (nothing watched the
folders meanwhile). `read_reference` reads the file to upload: never through a link, bounded, its type
by its bytes, with a clear problem when it went missing or changed since it was accepted.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from scenario_watch.errors import MissingReference, PromptError, UnsafeFile
from scenario_watch.files import open_beneath, open_regular
from scenario_watch.prepare.schema import show

REFERENCES = "referenceImages"  # the input whose entries may be local files, uploaded before generate
MAX_REFERENCE_BYTES = 50 * 1024 * 1024
MISSING = "does not exist in"  # a missing reference file's problem: "'beach.jpg' does not exist in DIR"
NO_LINKS = "name the image file itself, in a folder of its own (no links in the inbox)"
ASSET_ID = re.compile(r"asset_[A-Za-z0-9_-]+")

# Magic bytes of the image types Scenario accepts as references (AVIF and HEIC: see _iso_bmff).
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
IMAGE_KINDS = "a PNG, JPEG, GIF, WebP, TIFF, AVIF or HEIC image"
AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevx"})
HEIF_BRANDS = frozenset({b"mif1", b"msf1"})  # the generic HEIF brands: AVIF or HEIC by what else is listed
HEAD_BYTES = 64


@dataclass(frozen=True)
class Reference:
    """One entry of referenceImages: a Scenario asset id, or a local image file."""

    entry: str
    asset_id: str | None = None
    path: Path | None = None
    mime_type: str | None = None


def check_references(
    entries: list[Any], base_dir: Path, roots: Sequence[Path], checked: Mapping[str, Reference] | None = None
) -> list[Reference]:
    """Check every entry (those in `checked` already are); MissingReference only when a missing file is
    all that is wrong, else PromptError listing every problem."""
    references: list[Reference] = []
    problems: list[str] = []
    hint: str | None = None
    only_missing = True
    for entry in entries:
        try:
            known = checked.get(entry) if checked and isinstance(entry, str) else None
            references.append(known or check_reference(entry, base_dir, roots))
        except PromptError as exc:
            only_missing = only_missing and isinstance(exc, MissingReference)
            hint = hint or exc.hint
            problems.extend(exc.problems)
    if problems:
        raise (MissingReference if only_missing else PromptError)(problems, hint=hint)
    return references


def check_reference(entry: Any, base_dir: Path, roots: Sequence[Path] = ()) -> Reference:
    """Check one referenceImages entry offline: an asset id, or an image file in base_dir or a root."""
    if not isinstance(entry, str) or not entry:
        raise PromptError([f"{REFERENCES}: each entry must be a non-empty string (got {show(entry)})"])
    if "\x00" in entry:  # the OS refuses such paths with ValueError, not OSError
        raise PromptError([f"{REFERENCES}: {entry!r} contains a NUL character"])
    if ASSET_ID.fullmatch(entry):
        return Reference(entry, asset_id=entry)
    problem = _path_problem(Path(entry), base_dir / entry, [base_dir, *roots])
    if problem:
        raise PromptError([f"{REFERENCES}: {entry!r} {problem}"])
    path = base_dir / entry  # an absolute entry stays absolute
    if _inside(Path(os.path.abspath(path)), [Path(os.path.abspath(base_dir))]):
        # In the prompt's folder a reference is the file itself, with no link on the way: the folder
        # resolved, the entry's own path not (`read_reference` refuses a link that appears since), and
        # its head read one folder at a time (a folder swapped for a link meanwhile is not followed).
        base, relative = base_dir.resolve(), os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir))
        path = base / relative
        if _link_on_the_way(path):
            raise PromptError(
                [f"{REFERENCES}: {entry!r} is reached through a symbolic link: refused"], hint=NO_LINKS
            )
        opener: Callable[[], BinaryIO] = partial(open_beneath, base, Path(relative))
    else:  # under a reference root a symlink is fine (it resolves inside the roots: checked above)
        path = path.resolve()
        opener = partial(open_regular, path)
    try:
        with opener() as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEAD_BYTES)
    except UnsafeFile as exc:
        raise PromptError([f"{REFERENCES}: {entry!r} is {exc.kind}: refused (name an image file)"]) from None
    except ValueError:  # "." or "sub/.": the prompt's folder itself, not a file in it
        raise PromptError([f"{REFERENCES}: {entry!r} is a directory: refused (name an image file)"]) from None
    except OSError as exc:
        raise _unreadable(entry, base_dir, exc) from None
    mime = _image_mime(entry, head, size)
    return Reference(entry, path=path, mime_type=mime)  # the file that was checked is the one read


def read_reference(ref: Reference, base_dir: Path, roots: Sequence[Path] = ()) -> tuple[bytes, str]:
    """A local reference's bytes and type, to upload: opened one folder at a time below the prompt's
    folder (or the reference root it lies in) following no link, bounded, typed by its bytes (it may
    have changed since it was checked); PromptError when it is gone, reached through a link, or no
    longer fits."""
    assert ref.path is not None
    linked = PromptError(
        [f"{REFERENCES}: {ref.entry!r} is reached through a symbolic link now: refused"], hint=NO_LINKS
    )
    anchors = [Path(os.path.realpath(folder)) for folder in (base_dir, *roots)]
    anchor = next((a for a in anchors if ref.path.is_relative_to(a) and ref.path != a), None)
    if anchor is None:  # no longer below the folders it was checked in (they moved)
        raise linked
    try:
        with open_beneath(anchor, ref.path.relative_to(anchor)) as handle:
            data = handle.read(MAX_REFERENCE_BYTES + 1)
    except UnsafeFile as exc:
        if _link_on_the_way(ref.path):  # a folder on the way is a link (now)
            raise linked from None
        problem = f"{REFERENCES}: {ref.entry!r} is {exc.kind}: refused (name an image file)"
        raise PromptError([problem]) from None
    except OSError as exc:
        raise _unreadable(ref.entry, base_dir, exc) from None
    if len(data) > MAX_REFERENCE_BYTES:
        raise PromptError([f"{REFERENCES}: {ref.entry!r} grew past {MAX_REFERENCE_BYTES >> 20} MiB"])
    return data, _image_mime(ref.entry, data[:HEAD_BYTES], len(data))


def claimed_image(path: Path, entry: str, label: str, hint: str) -> Reference:
    """A claimed image (a preset's) as its prompt's first reference: a regular image file Scenario takes."""
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEAD_BYTES)
    except UnsafeFile as exc:
        raise PromptError([f"{label} is {exc.kind}: refused, never read"], hint=exc.hint) from None
    mime = image_type(head)
    if mime is None:
        raise PromptError([f"{label} is not {IMAGE_KINDS} (judged by its bytes, not its name)"], hint=hint)
    if size > MAX_REFERENCE_BYTES:
        raise PromptError(
            [f"{label} is larger than {MAX_REFERENCE_BYTES >> 20} MiB, the most Scenario takes"]
        )
    return Reference(entry, path=path.parent.resolve() / path.name, mime_type=mime)  # its folder resolved


def missing_reference_name(problem: str) -> str | None:
    """The file a MissingReference problem names ("'beach.jpg' does not exist in ..."), else None."""
    match = re.match(rf"(?:{REFERENCES}: )?('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\") {MISSING} ", problem)
    return str(ast.literal_eval(match.group(1))) if match else None


def image_type(head: bytes) -> str | None:
    """The MIME type of an image judged by its first bytes, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return _iso_bmff(head)
    for signature, mime in IMAGE_SIGNATURES:
        if head.startswith(signature):
            return mime
    return None


def _iso_bmff(head: bytes) -> str | None:
    """AVIF or HEIC/HEIF from an ISO-BMFF `ftyp` box: its major brand, then its compatible brands."""
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size) if size >= 16 else 16
    # major brand at 8, minor version at 12, compatible brands from 16 to the end of the box
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]
    if any(brand in AVIF_BRANDS for brand in brands):
        return "image/avif"
    if any(brand in HEIC_BRANDS for brand in brands):
        return "image/heic"
    if any(brand in HEIF_BRANDS for brand in brands):
        return "image/heif"
    return None  # MP4, QuickTime and the other ISO-BMFF files are not images


def _image_mime(entry: str, head: bytes, size: int) -> str:
    """The MIME type of a reference file by its first bytes; PromptError when Scenario would not take it."""
    mime = image_type(head)
    if mime is None:
        raise PromptError([f"{REFERENCES}: {entry!r} is not {IMAGE_KINDS}"])
    if size > MAX_REFERENCE_BYTES:
        raise PromptError([f"{REFERENCES}: {entry!r} is larger than {MAX_REFERENCE_BYTES >> 20} MiB"])
    return mime


def _unreadable(entry: str, base_dir: Path, exc: OSError) -> PromptError:
    """A reference file that cannot be opened: missing (it may yet arrive), or unreadable."""
    if isinstance(exc, FileNotFoundError):
        return MissingReference(
            [f"{REFERENCES}: {entry!r} {MISSING} {(base_dir / entry).parent}"],
            hint="drop the image into the inbox beside the prompt file, or fix the name",
        )
    return PromptError([f"{REFERENCES}: {entry!r} cannot be read: {exc.strerror}"])


def _path_problem(entry: Path, path: Path, roots: list[Path]) -> str | None:
    """Why a reference path is refused: it must stay inside the inbox or a reference root."""
    if ".." in entry.parts:
        return "leaves the inbox (..); name a file inside the inbox"
    resolved_roots = [root.resolve() for root in roots]
    if entry.is_absolute() and not _inside(Path(os.path.abspath(path)), resolved_roots):
        return "is an absolute path outside the inbox and [watch] reference_roots"
    try:
        resolved = path.resolve()
    except OSError:  # a folder on the way was swapped while it was resolved (a link gone before readlink)
        return "is reached through a folder that changed while it was checked: refused"
    if not _inside(resolved, resolved_roots):
        return "is a symlink that points outside the inbox and [watch] reference_roots"
    return None


def _link_on_the_way(path: Path) -> bool:
    """Whether a folder on the way to `path` is a symbolic link (its parent does not resolve to itself).

    A folder swapped while it is resolved makes realpath raise (a link gone between lstat and readlink):
    that path is changing under us, and counts as one with a link.
    """
    try:
        return os.path.realpath(path.parent) != os.fspath(path.parent)
    except OSError:
        return True


def _inside(candidate: Path, roots: Sequence[Path]) -> bool:
    return any(candidate == root or root in candidate.parents for root in roots)

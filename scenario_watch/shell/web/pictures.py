"""A prompt's pictures by journal id: its outputs and references, opened safely, and their thumbnails.

A request names a journal id and a number, never a path: the path comes from the journal row. It is
then opened one component at a time below the daemon folder it lies in, none of them followed if it
is a symbolic link, so nothing outside the daemon's folders is ever read, whatever was put in place
of a file or a folder since.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from scenario_watch import files
from scenario_watch.errors import UnsafeFile
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.sections import FolderSettings

THUMB_SIDE = 256
# Bounds on what a thumbnail is made from: bytes read, and pixels decoded (a small file can claim
# 50,000 x 50,000 pixels and take gigabytes once decoded: a decompression bomb).
MAX_INPUT_BYTES = 64 << 20
MAX_PIXELS = 50_000_000
# The cache is bounded too: the oldest thumbnails go (and are made again if they are asked for).
MAX_THUMBS = 2000
KEEP_THUMBS = 1500
# What a browser is given, judged by the bytes (never by the name); anything else is not served.
MIME_TYPES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class NotFound(Exception):
    """No such prompt, picture, or file (any more)."""


class Refused(Exception):
    """The journal names a file that may not be served: a link, not a regular file, outside the folders."""


@dataclass
class Opened:
    """A picture ready to send: its open file, size and MIME type."""

    handle: BinaryIO
    size: int
    mime: str


def sniff(head: bytes) -> str | None:
    """The MIME type of an image a browser shows, from its first bytes; None for anything else."""
    for magic, mime in MIME_TYPES.items():
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    return None


def open_beneath(root: Path, relative: Path) -> BinaryIO:
    """files.open_beneath, said as the page says it: NotFound or Refused."""
    try:
        return files.open_beneath(root, relative)
    except FileNotFoundError:
        raise NotFound(relative.name) from None
    except (UnsafeFile, ValueError) as exc:
        raise Refused(str(exc)) from None


class Pictures:
    """Outputs and references of journal rows, and thumbnails cached under `<state>/thumbs/`."""

    def __init__(
        self,
        store: Store,
        folders: FolderSettings,
        preset_folders: Mapping[str, Path] | None = None,
        reference_roots: Sequence[Path] = (),
    ) -> None:
        self.store = store
        self.folders = folders
        self.preset_folders = dict(preset_folders or {})
        self.thumbs = folders.state / "thumbs"
        roots = [folders.inbox, folders.outbox, folders.done, folders.failed, *self.preset_folders.values()]
        roots += list(reference_roots)
        # The deepest folder first: a preset folder inside the inbox is its own root.
        self.roots = sorted({Path(os.path.normpath(r)) for r in roots}, key=lambda r: -len(r.parts))
        self._thumb_lock = threading.Lock()  # one decode at a time: memory stays bounded
        self._written = 0

    # -- which file ---------------------------------------------------------------------------------

    def _row(self, prompt_id: int) -> Row:
        try:
            return self.store.get(prompt_id)
        except KeyError:
            raise NotFound(f"no prompt {prompt_id}") from None

    def output(self, prompt_id: int, n: int) -> Path:
        """The n-th (from 1) image a prompt wrote into the outbox."""
        images = [name for name in self._row(prompt_id).outputs if name.lower().endswith(IMAGE_SUFFIXES)]
        if not 1 <= n <= len(images):
            raise NotFound(f"prompt {prompt_id} has no output {n}")
        return self.folders.outbox / images[n - 1]

    def reference(self, prompt_id: int, n: int) -> Path:
        """The n-th (from 1) local reference image of a prompt (references by asset id have no file)."""
        row = self._row(prompt_id)
        files = [str(ref["file"]) for ref in row.references if ref.get("file")]
        if not 1 <= n <= len(files):
            raise NotFound(f"prompt {prompt_id} has no reference {n}")
        folder = self.preset_folders.get(row.preset) if row.preset else None
        path = Path(os.path.normpath((folder or row.folder(self.folders.inbox)) / files[n - 1]))
        # A preset's image is the prompt file itself: once filed it lives where final_path says.
        if path == Path(os.path.normpath(row.claimed)) and row.final_path:
            path = Path(row.final_path)
        return path

    # -- opening ------------------------------------------------------------------------------------

    def open(self, path: Path) -> Opened:
        """Open a picture the journal names, below one of the daemon's folders; NotFound or Refused."""
        path = Path(os.path.normpath(path))
        root = next((r for r in self.roots if path.is_relative_to(r) and path != r), None)
        if root is None:
            raise Refused("outside the daemon's folders")
        handle = open_beneath(root, path.relative_to(root))
        try:
            size = os.fstat(handle.fileno()).st_size
            mime = sniff(handle.read(16))
            if mime is None:
                raise Refused("not an image a browser shows")
            handle.seek(0)
            return Opened(handle, size, mime)
        except BaseException:
            handle.close()
            raise

    # -- thumbnails ---------------------------------------------------------------------------------

    def thumbnail(self, kind: str, prompt_id: int, n: int) -> bytes:
        """A small WebP of an output ("output") or reference ("reference"), made once and cached."""
        path = self.output(prompt_id, n) if kind == "output" else self.reference(prompt_id, n)
        opened = self.open(path)
        with opened.handle as handle:
            info = os.fstat(handle.fileno())
            # The file's identity in the name: a file replaced under the same name gets a new thumbnail.
            key = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}".encode()
            cached = self.thumbs / f"{kind}-{prompt_id}-{n}-{hashlib.sha256(key).hexdigest()[:16]}.webp"
            try:
                with open_beneath(self.thumbs, Path(cached.name)) as hit:
                    return hit.read()
            except NotFound:
                pass
            if info.st_size > MAX_INPUT_BYTES:
                raise Refused(f"larger than {MAX_INPUT_BYTES >> 20} MiB")
            with self._thumb_lock:
                data = make_thumbnail(handle.read(MAX_INPUT_BYTES + 1))
        self._keep(cached, data)
        return data

    def _keep(self, cached: Path, data: bytes) -> None:
        self.thumbs.mkdir(parents=True, exist_ok=True)
        temp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.part")
        temp.write_bytes(data)
        os.replace(temp, cached)  # two requests making the same thumbnail write the same bytes
        self._written += 1
        if self._written % 64 == 1:
            self._evict()

    def _evict(self) -> None:
        try:
            entries = [(e.stat().st_mtime, e.path) for e in os.scandir(self.thumbs) if e.is_file()]
        except OSError:
            return
        if len(entries) <= MAX_THUMBS:
            return
        for _, path in sorted(entries)[: len(entries) - KEEP_THUMBS]:
            Path(path).unlink(missing_ok=True)


def make_thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """A WebP at most `side` pixels on its longer side; Refused for a bomb or anything not an image."""
    if len(data) > MAX_INPUT_BYTES:
        raise Refused(f"larger than {MAX_INPUT_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (side, side))  # JPEG: decode at 1/2 .. 1/8 scale, far less memory
                if image.width * image.height > MAX_PIXELS:
                    raise Refused(f"{image.width} x {image.height} pixels: too many to decode")
                image.load()
                small = ImageOps.exif_transpose(image)  # phone photos stand upright
                small.thumbnail((side, side))
                if small.mode not in ("RGB", "RGBA"):
                    small = small.convert(
                        "RGBA" if "A" in small.getbands() or "transparency" in small.info else "RGB"
                    )
                out = io.BytesIO()
                small.save(out, "WEBP", quality=80, method=4)
                return out.getvalue()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Refused(f"too many pixels: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise Refused(f"not an image Pillow reads: {type(exc).__name__}") from None

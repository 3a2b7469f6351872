"""Deterministic, valid PNG images built with zlib + struct, and image-type sniffing."""

from __future__ import annotations

import hashlib
import struct
import zlib

SIZE = 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Two copies of 0..255 so that a 256-byte slice starting at s is the table "add s, modulo 256".
_RAMP = bytes(range(256)) * 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(seed: str, width: int = SIZE, height: int = SIZE) -> bytes:
    """An RGB gradient PNG whose colours (and a text chunk) derive from sha256(seed)."""
    digest = hashlib.sha256(seed.encode()).digest()
    r0, g0, b0, dr, dg, dy = digest[:6]
    row = bytearray(width * 3)
    row[0::3] = bytes((r0 + x * (dr % 3 + 1)) % 256 for x in range(width))
    row[1::3] = bytes((g0 + x * (dg % 2 + 1)) % 256 for x in range(width))
    row[2::3] = bytes([b0]) * width
    base = bytes(row)
    step = dy % 3 + 1
    # bytes.translate shifts a whole row in C: building 256 rows stays well under a millisecond.
    raw = b"".join(b"\x00" + base.translate(_RAMP[(y * step) % 256 :][:256]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # The text chunk makes the bytes differ even if two seeds happened to share colours.
    text = b"Comment\x00" + digest.hex().encode()
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"tEXt", text)
        + _chunk(b"IDAT", zlib.compress(raw, 1))
        + _chunk(b"IEND", b"")
    )


def sniff_mime(data: bytes) -> str | None:
    """The MIME type given by the magic bytes, for the formats the sandbox accepts; else None."""
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def dimensions(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (from IHDR); (0, 0) for anything else."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return 0, 0

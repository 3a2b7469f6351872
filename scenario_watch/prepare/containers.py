"""Byte-level walks of PNG chunks, JPEG segments, EXIF and RIFF (WebP) chunks: metadata, never pixels."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), SOI, EOI})
# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ... IFD).
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}


class Malformed(ValueError):
    """The container is broken: truncated, or a length or checksum that does not add up."""


@dataclass(frozen=True)
class Chunk:
    """One PNG chunk or RIFF chunk: its type and where it lies (``start``..``end`` covers it all)."""

    kind: bytes
    start: int
    end: int
    body_start: int
    body_end: int

    def body(self, data: bytes) -> bytes:
        """The chunk's payload."""
        return data[self.body_start : self.body_end]


@dataclass(frozen=True)
class Segment:
    """One JPEG marker segment before the first scan: ``data[start:end]`` is the whole segment."""

    marker: int
    start: int
    end: int

    def payload(self, data: bytes) -> bytes:
        """The bytes after the marker and its length field."""
        return data[self.start + 4 : self.end]


# --- PNG ----------------------------------------------------------------------------------------


def png_chunks(data: bytes, *, check_crc: bool = True) -> list[Chunk]:
    """Every chunk of a PNG up to IEND; Malformed if it is truncated or (checked) a CRC is wrong."""
    if not data.startswith(PNG_SIGNATURE):
        raise Malformed("not a PNG file (no PNG signature)")
    chunks: list[Chunk] = []
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise Malformed("the file ends before its IEND chunk (truncated)")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise Malformed(f"chunk {_name(kind)} runs past the end of the file (truncated)")
        if check_crc:
            (crc,) = struct.unpack(">I", data[end - 4 : end])
            if zlib.crc32(data[pos + 4 : end - 4]) != crc:
                raise Malformed(f"chunk {_name(kind)} fails its CRC checksum (damaged)")
        chunks.append(Chunk(kind, pos, end, pos + 8, end - 4))
        pos = end
        if kind == b"IEND":
            return chunks


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """A complete PNG chunk: length, type, payload and its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _name(kind: bytes) -> str:
    return kind.decode("latin-1") if kind.isalpha() else repr(kind)


# --- JPEG ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JpegLayout:
    """The header segments of a JPEG (SOI to the first SOS) and where its first image ends."""

    segments: list[Segment]
    end: int  # just after the first image's EOI; multi-picture files (MPO) carry more after it


def jpeg_layout(data: bytes, *, header_only: bool = False) -> JpegLayout:
    """Walk a JPEG's segments and scans to its EOI (or its first SOS); Malformed if a length runs past."""
    if not data.startswith(b"\xff\xd8"):
        raise Malformed("not a JPEG file (no SOI marker)")
    header: list[Segment] = []
    pos, in_header = 2, True
    while True:
        marker, pos = _next_marker(data, pos)
        if marker == EOI:
            return JpegLayout(header, pos)
        if marker in _STANDALONE:
            continue
        if pos + 2 > len(data):
            raise Malformed("the file ends inside a segment header (truncated)")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2 or pos + length > len(data):
            raise Malformed(f"segment 0xFF{marker:02X} runs past the end of the file (truncated)")
        if in_header:
            header.append(Segment(marker, pos - 2, pos + length))
        pos += length
        if marker == SOS:
            if header_only:
                return JpegLayout(header, pos)
            in_header = False
            pos = _skip_entropy(data, pos)


def _next_marker(data: bytes, pos: int) -> tuple[int, int]:
    """The marker at ``pos`` (fill bytes 0xFF allowed before it) and the offset after it."""
    if pos >= len(data) or data[pos] != 0xFF:
        raise Malformed(f"expected a JPEG marker at byte {pos} (truncated or damaged)")
    while pos < len(data) and data[pos] == 0xFF:
        pos += 1
    if pos >= len(data):
        raise Malformed("the file ends inside a marker (truncated)")
    return data[pos], pos + 1


def _skip_entropy(data: bytes, pos: int) -> int:
    """The offset of the first marker after a scan's entropy-coded data (0xFF00 and RSTn belong to it)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            raise Malformed("the file ends inside the image data (truncated)")
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2
            continue
        return pos


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    """A complete JPEG marker segment; ValueError if the payload is over the 65533-byte limit."""
    if len(payload) > 0xFFFF - 2:
        raise ValueError(f"a JPEG segment holds at most 65533 bytes, not {len(payload)}")
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


# --- EXIF ---------------------------------------------------------------------------------------


def exif_summary(raw: bytes) -> tuple[int | None, bool]:
    """(orientation, has GPS) from an EXIF block's first IFD; Malformed if its structure is broken."""
    tiff = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        raise Malformed("no TIFF header")
    order = "<" if tiff[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", tiff[4:8])
    if offset < 8 or offset + 2 > len(tiff):
        raise Malformed("IFD0 outside the block")
    (count,) = struct.unpack(order + "H", tiff[offset : offset + 2])
    if offset + 2 + 12 * count + 4 > len(tiff):  # the entries, then the next IFD's offset
        raise Malformed("IFD0 runs past the block")
    orientation, gps = None, False
    for i in range(count):
        entry = offset + 2 + 12 * i
        tag, kind, number, value = struct.unpack(order + "HHI4s", tiff[entry : entry + 12])
        size = number * TIFF_TYPE_SIZES.get(kind, 0)
        if size > 4 and struct.unpack(order + "I", value)[0] + size > len(tiff):
            raise Malformed(f"tag {tag:#06x} points outside the block")
        if tag == 0x0112 and kind == 3:  # SHORT
            orientation = struct.unpack(order + "H", value[:2])[0]
        elif tag == 0x8825:
            gps = True
    return orientation, gps


# --- RIFF (WebP) --------------------------------------------------------------------------------


def riff_chunks(data: bytes) -> list[Chunk]:
    """The chunks of a RIFF WEBP file, in order; Malformed if a size runs past the end."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise Malformed("not a WebP file (no RIFF WEBP header)")
    (riff_size,) = struct.unpack("<I", data[4:8])
    limit = min(len(data), 8 + riff_size)
    chunks: list[Chunk] = []
    pos = 12
    while pos + 8 <= limit:
        kind = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        end = pos + 8 + size + (size & 1)  # payloads are padded to an even length
        if pos + 8 + size > limit:
            raise Malformed(f"chunk {_name(kind.strip())} runs past the end of the file (truncated)")
        chunks.append(Chunk(kind, pos, min(end, limit), pos + 8, pos + 8 + size))
        pos = end
    return chunks


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    """A complete RIFF chunk, padded to an even length."""
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) & 1 else b"")


def riff_file(chunks: list[bytes]) -> bytes:
    """A RIFF WEBP file from complete chunks, its size field computed."""
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body

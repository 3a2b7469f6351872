"""Provenance written into outputs (PNG text chunks, JPEG/WebP XMP) without re-encoding a pixel."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from scenario_watch import __version__
from scenario_watch.prepare import containers
from scenario_watch.prepare.containers import Malformed

KEYWORD = "scenario-watch"  # the PNG chunk with the JSON record
PARAMETERS = "parameters"  # the PNG chunk with the readable text (the Stable Diffusion web UI's name)
NAMESPACE = "urn:scenario-watch:1.0/"
XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"
JPEG_XMP_LIMIT = 0xFFFF - 2 - len(XMP_APP1)  # one APP1 segment; Extended XMP is not worth its weight
# IPTC's vocabulary for how an image was made; Google, Adobe and news agencies read it.
GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
# XML 1.0 refuses these characters even escaped; a prompt may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
VP8X_XMP, VP8X_ALPHA = 0x04, 0x10


@dataclass(frozen=True)
class InputImage:
    """One reference image of a job: its name in the prompt, its content hash, its Scenario asset."""

    name: str
    sha256: str | None = None
    asset_id: str | None = None


@dataclass(frozen=True)
class Provenance:
    """What made an output: written into it so that it says so after leaving the outbox."""

    prompt: str
    model_id: str
    job_id: str
    inputs: Mapping[str, Any] = field(default_factory=dict)  # the generate inputs besides the prompt
    references: Sequence[InputImage] = ()
    cost: float | None = None  # creative units, when Scenario reported them
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    tool_version: str = __version__

    def record(self) -> dict[str, Any]:
        """The machine-readable form (the JSON written into the file)."""
        return {
            "tool": f"scenario-watch {self.tool_version}",
            "model": self.model_id,
            "job_id": self.job_id,
            "prompt": self.prompt,
            "inputs": dict(self.inputs),
            "references": [
                {key: value for key, value in vars(ref).items() if value is not None}
                for ref in self.references
            ],
            "cost": self.cost,
            "created": _utc(self.created),
        }

    def parameters(self) -> str:
        """The readable form: the prompt, then one line of ``Key: value`` pairs (as SD web UIs write)."""
        pairs: list[tuple[str, Any]] = [("Model", self.model_id), ("Job", self.job_id), *self.inputs.items()]
        if self.references:
            names = [
                f"{ref.name} (sha256 {ref.sha256[:12]})" if ref.sha256 else ref.name
                for ref in self.references
            ]
            pairs.append(("References", "; ".join(names)))
        if self.cost is not None:
            pairs.append(("Cost", f"{self.cost:g} CU"))
        pairs += [("Created", _utc(self.created)), ("Tool", f"scenario-watch {self.tool_version}")]
        return self.prompt + "\n" + ", ".join(f"{key}: {_plain(value)}" for key, value in pairs)


def embed(data: bytes, mime_type: str, info: Provenance) -> bytes:
    """``data`` with ``info`` inserted (PNG, JPEG, WebP); other types unchanged; Malformed if broken."""
    if mime_type == "image/png":
        return _png(data, info)
    if mime_type == "image/jpeg":
        return _jpeg(data, info)
    if mime_type == "image/webp":
        return _webp(data, info)
    return data  # GIF, AVIF...: Scenario does not make them; nothing is better than a guess


def read(data: bytes) -> dict[str, Any] | None:
    """The record embed() wrote into a PNG, JPEG or WebP, or None."""
    try:
        if data.startswith(containers.PNG_SIGNATURE):
            for chunk in containers.png_chunks(data, check_crc=False):
                text = _png_text(chunk.kind, chunk.body(data))
                if text is not None and text[0] == KEYWORD:
                    return _object(json.loads(text[1]))
        elif data.startswith(b"\xff\xd8"):
            for segment in containers.jpeg_layout(data, header_only=True).segments:
                payload = segment.payload(data)
                if segment.marker == 0xE1 and payload.startswith(XMP_APP1):
                    found = _from_xmp(payload[len(XMP_APP1) :])
                    if found is not None:
                        return found
        elif data.startswith(b"RIFF"):
            for chunk in containers.riff_chunks(data):
                if chunk.kind == b"XMP ":
                    found = _from_xmp(chunk.body(data))
                    if found is not None:
                        return found
    except (Malformed, ValueError, ElementTree.ParseError):
        return None
    return None


# --- PNG ----------------------------------------------------------------------------------------


def _png(data: bytes, info: Provenance) -> bytes:
    chunks = containers.png_chunks(data, check_crc=False)
    # Before the pixels (and APNG's first frame control): readers such as Pillow's ``info`` and
    # web UIs' "PNG info" see text chunks there without decoding the image.
    at = next(c.start for c in chunks if c.kind in (b"IDAT", b"fcTL", b"IEND"))
    record = json.dumps(info.record(), ensure_ascii=False, separators=(",", ":"))
    added = _png_text_chunk(PARAMETERS, info.parameters()) + _png_text_chunk(KEYWORD, record, utf8=True)
    return data[:at] + added + data[at:]


def _png_text_chunk(keyword: str, text: str, *, utf8: bool = False) -> bytes:
    """tEXt when Latin-1 can say it (what older readers know), else iTXt (UTF-8, uncompressed)."""
    if not utf8:
        try:
            return containers.png_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1"))
        except UnicodeEncodeError:
            pass
    body = keyword.encode("latin-1") + b"\x00\x00\x00" + b"\x00" + b"\x00" + text.encode("utf-8")
    return containers.png_chunk(b"iTXt", body)


def _png_text(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of an uncompressed tEXt or iTXt chunk, else None."""
    if kind == b"tEXt" and b"\x00" in body:
        keyword, text = body.split(b"\x00", 1)
        return keyword.decode("latin-1"), text.decode("latin-1")
    if kind == b"iTXt" and b"\x00" in body:
        keyword, rest = body.split(b"\x00", 1)
        if rest[:1] != b"\x00":  # compressed: not ours
            return None
        _language, _translated, text = rest[2:].split(b"\x00", 2)
        return keyword.decode("latin-1"), text.decode("utf-8")
    return None


# --- JPEG ---------------------------------------------------------------------------------------


def _jpeg(data: bytes, info: Provenance) -> bytes:
    segments = containers.jpeg_layout(data, header_only=True).segments
    at = 2  # after SOI, and after the JFIF (APP0) and EXIF (APP1) segments that lead by convention
    for segment in segments:
        if segment.marker not in (0xE0, 0xE1):
            break
        at = segment.end
    packet = _xmp(info, limit=JPEG_XMP_LIMIT)
    return data[:at] + containers.jpeg_segment(0xE1, XMP_APP1 + packet) + data[at:]


# --- WebP ---------------------------------------------------------------------------------------


def _webp(data: bytes, info: Provenance) -> bytes:
    chunks = containers.riff_chunks(data)
    parts = [data[c.start : c.end] for c in chunks]
    kinds = [c.kind for c in chunks]
    if not kinds:
        raise Malformed("a WebP file without chunks")
    if kinds[0] == b"VP8X":
        header = parts[0]
        parts[0] = header[:8] + bytes((header[8] | VP8X_XMP,)) + header[9:]
    elif kinds[0] in (b"VP8 ", b"VP8L"):
        # A simple WebP holds nothing but the bitstream: the extended header (VP8X) comes first.
        width, height, alpha = _bitstream_size(kinds[0], chunks[0].body(data))
        flags = VP8X_XMP | (VP8X_ALPHA if alpha else 0)
        body = (
            bytes((flags, 0, 0, 0)) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        )
        parts.insert(0, containers.riff_chunk(b"VP8X", body))
        kinds.insert(0, b"VP8X")
    else:
        raise Malformed(f"a WebP file that starts with {kinds[0]!r}")
    # After the image and its EXIF, before any XMP already there (readers take the first).
    known = (b"VP8X", b"ICCP", b"ANIM", b"ANMF", b"ALPH", b"VP8 ", b"VP8L", b"EXIF")
    at = next((i for i, kind in enumerate(kinds) if kind not in known), len(kinds))
    parts.insert(at, containers.riff_chunk(b"XMP ", _xmp(info)))
    return containers.riff_file(parts)


def _bitstream_size(kind: bytes, body: bytes) -> tuple[int, int, bool]:
    """(width, height, has alpha) from a VP8 or VP8L bitstream header."""
    if kind == b"VP8 ":
        if len(body) < 10 or body[3:6] != b"\x9d\x01\x2a":
            raise Malformed("a VP8 bitstream without its start code")
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    if len(body) < 5 or body[0] != 0x2F:
        raise Malformed("a VP8L bitstream without its signature")
    bits = int.from_bytes(body[1:5], "little")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)


# --- XMP ----------------------------------------------------------------------------------------


def _xmp(info: Provenance, limit: int = 0) -> bytes:
    """An XMP packet with the prompt (dc:description), the tool, the date, and the record as JSON."""
    record = info.record()
    while True:
        packet = _packet(info, record)
        if not limit or len(packet) <= limit or not record["prompt"]:
            return packet
        # One JPEG segment holds 64 KiB: a huge prompt is cut (and says so) rather than dropped.
        excess = len(packet) - limit
        prompt = record["prompt"]
        record = {**record, "prompt": prompt[: max(0, len(prompt) - excess // 2 - 64)] + "…"}
        record["prompt_truncated"] = True


def _packet(info: Provenance, record: Mapping[str, Any]) -> bytes:
    def text(value: str) -> str:
        return escape(_NOT_XML.sub("\ufffd", value))

    source = COMPOSITE if info.references else GENERATED
    prompt = text(record["prompt"])
    as_json = text(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    body = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="scenario-watch {text(info.tool_version)}">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
    xmlns:scenariowatch="{NAMESPACE}">
   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{prompt}</rdf:li></rdf:Alt></dc:description>
   <xmp:CreatorTool>scenario-watch {text(info.tool_version)}</xmp:CreatorTool>
   <xmp:CreateDate>{_utc(info.created)}</xmp:CreateDate>
   <Iptc4xmpExt:DigitalSourceType>{source}</Iptc4xmpExt:DigitalSourceType>
   <scenariowatch:model>{text(info.model_id)}</scenariowatch:model>
   <scenariowatch:job>{text(info.job_id)}</scenariowatch:job>
   <scenariowatch:record>{as_json}</scenariowatch:record>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
    return body.encode("utf-8")


def _from_xmp(packet: bytes) -> dict[str, Any] | None:
    root = ElementTree.fromstring(packet)
    found = root.find(f".//{{{NAMESPACE}}}record")
    return None if found is None or not found.text else _object(json.loads(found.text))


# --- helpers ------------------------------------------------------------------------------------


def _object(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(value: Any) -> str:
    """A value for the ``Key: value`` line, JSON-quoted where a comma would split it (as SD web UIs do)."""
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return json.dumps(shown, ensure_ascii=False) if re.search(r'[,\n"]', shown) else shown

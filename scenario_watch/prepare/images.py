"""Input images normalised before upload: upright, sRGB, 8-bit, no EXIF/GPS; a clean image is left as is."""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass

from PIL import Image, ImageCms, JpegImagePlugin, UnidentifiedImageError, features

from scenario_watch.deliver.convert import DECODING, FORMATS, is_srgb, profile_name, to_srgb
from scenario_watch.errors import BadImage
from scenario_watch.prepare import containers
from scenario_watch.prepare.containers import Malformed
from scenario_watch.prepare.reference import image_type

# Above every common camera sensor (Fujifilm GFX100: 102 MP); one RGB image of this size is 360 MB.
MAX_PIXELS = 120_000_000
# Pillow's own guard (a process-wide setting) agrees with ours: it warns above it and refuses above
# twice it, both of which normalize() reports as too large.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
DECODABLE = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/tiff"} | (
    # Pillow decodes AVIF from 11.2 on, when built with libavif (its wheels are)
    {"image/avif"} if "avif" in features.modules and features.check_module("avif") else set()
)
JPEG_QUALITY = 95
PNG_COMPRESSION = 6
XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_EXTENSION_APP1 = b"http://ns.adobe.com/xmp/extension/\x00"
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
NAMES = {"image/heic": "HEIC", "image/heif": "HEIF", "image/avif": "AVIF", "image/webp": "WebP"}
NORMALIZE_OFF = "or set [images] normalize = false to upload images exactly as they are"


@dataclass(frozen=True)
class Normalized:
    """What to upload instead of an image, what was done to it, and the original's sha256."""

    data: bytes
    mime_type: str
    changes: list[str]
    original_sha256: str

    @property
    def changed(self) -> bool:
        """Whether ``data`` differs from the original bytes."""
        return hashlib.sha256(self.data).hexdigest() != self.original_sha256


@dataclass
class _Survey:
    """What an opened image needs, judged from its header and metadata before its pixels are decoded."""

    orientation: int | None = None
    exif: bool = False
    gps: bool = False
    xmp: bool = False
    profile: ImageCms.ImageCmsProfile | None = None
    profile_name: str = ""
    depth16: bool = False
    frames: int = 1
    upright: bool = False  # Pillow has already turned the pixels (it does for TIFF, as it loads)


def normalize(data: bytes, *, max_side: int = 0, name: str = "the image") -> Normalized:
    """The image as it should be uploaded (see _normalize), at most two decoded at once (convert.DECODING)."""
    with DECODING:
        return _normalize(data, max_side=max_side, name=name)


def _normalize(data: bytes, *, max_side: int, name: str) -> Normalized:
    """The image to upload: upright, sRGB, 8-bit RGB(A), no EXIF/GPS, at most ``max_side`` (0: any)."""
    if not data:
        raise BadImage("empty", f"{name} is empty (0 bytes): drop the image again (the copy may have failed)")
    original_sha256 = hashlib.sha256(data).hexdigest()
    claimed = image_type(data[:64])
    png_kinds = _check_png(data, name) if claimed == "image/png" else set()
    if claimed == "image/jpeg":
        _check_jpeg_exif(data, name)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(name, _header_size(data)) from None
    except UnidentifiedImageError:
        if claimed in DECODABLE:
            raise _damaged(name, claimed, "its header cannot be read") from None
        # Scenario takes HEIC/HEIF (and AVIF without Pillow's AVIF support) as they come: never fail
        # a prompt that works without normalisation.
        kind = NAMES.get(claimed or "", "this format")
        note = f"left as is: {kind} cannot be decoded here, so it is uploaded unchanged"
        return Normalized(data, claimed or "application/octet-stream", [note], original_sha256)
    except (OSError, SyntaxError, ValueError) as exc:
        raise _damaged(name, claimed, str(exc)) from None
    with img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise _too_large(name, img.size)
        jpeg = img.format in ("JPEG", "MPO")
        tiff_orientation = img.tag_v2.get(0x0112) if img.format == "TIFF" else None  # type: ignore[attr-defined]
        if not jpeg:  # PNG text chunks after the pixels (XMP, EXIF) are read as the pixels are
            _load(img, name, claimed)
        survey = _survey(img, data, name, png_kinds)
        if tiff_orientation is not None:  # Pillow applied it and dropped the tag as it loaded
            survey.orientation, survey.upright = tiff_orientation, True
        pixels = _needs_pixels(img, survey, max_side)
        if jpeg:
            if pixels and max_side:
                # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT: less memory and CPU.
                img.draft(img.mode, _fit(img.size, max_side))
            _load(img, name, claimed)
        if pixels:
            return _reencode(img, survey, (width, height), max_side, original_sha256)
        if survey.exif or survey.xmp:
            try:
                return _strip(img, data, survey, original_sha256)
            except Malformed:  # stray bytes between segments: Pillow copes, the byte walk does not
                return _reencode(img, survey, (width, height), 0, original_sha256)
        return Normalized(data, _mime(img), [], original_sha256)


def _survey(img: Image.Image, data: bytes, name: str, png_kinds: set[bytes]) -> _Survey:
    """Orientation, EXIF/GPS, XMP, colour profile, bit depth and frame count of an opened image."""
    animated = getattr(img, "is_animated", False) and img.format != "MPO"  # MPO: a photo plus extras
    survey = _Survey(frames=getattr(img, "n_frames", 1) if animated else 1)
    raw = img.info.get("exif")
    text = img.info.get("Raw profile type exif")  # ImageMagick's PNG text chunk: hex with a header
    if raw or text:
        try:
            if not raw:
                raw = bytes.fromhex("".join(str(text).split("\n")[3:]))
            survey.orientation, survey.gps = containers.exif_summary(raw)
        except ValueError:  # Malformed, or hex that is not
            raise _corrupt_exif(name) from None
        survey.exif = True
    if img.format == "TIFF":
        tags = img.tag_v2  # type: ignore[attr-defined]
        survey.exif = 0x8769 in tags or 0x8825 in tags
        survey.gps = 0x8825 in tags
        survey.xmp = 700 in tags
        survey.depth16 = max(tags.get(258, (8,))) > 8
    survey.xmp = survey.xmp or bool(img.info.get("xmp") or img.info.get("XML:com.adobe.xmp"))
    if img.format == "PNG":
        survey.depth16 = data[24] == 16  # IHDR's bit depth: Pillow decodes 16-bit RGB(A) as 8-bit
    icc = img.info.get("icc_profile")
    # Pillow drops a profile it cannot even unpack (bad zlib data, missing JPEG fragments) silently.
    unpacked = b"iCCP" in png_kinds or any(
        marker == "APP2" and payload.startswith(b"ICC_PROFILE\x00")
        for marker, payload in getattr(img, "applist", [])
    )
    if icc or unpacked:
        try:
            if not icc:
                raise OSError("the profile cannot be unpacked")
            survey.profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            survey.profile_name = profile_name(survey.profile)
        except (OSError, ImageCms.PyCMSError):
            raise BadImage(
                "icc",
                f"{name} has a corrupt ICC colour profile, so its colours cannot be converted to sRGB: "
                "re-export it with a valid profile (or none)",
                NORMALIZE_OFF,
            ) from None
    return survey


def _check_jpeg_exif(data: bytes, name: str) -> None:
    """Judge a JPEG's EXIF before Pillow does (it only warns, as it opens the file, and reads on)."""
    try:
        segments = containers.jpeg_layout(data, header_only=True).segments
    except Malformed:
        return  # Pillow decides whether it is readable at all
    for segment in segments:
        payload = segment.payload(data)
        if segment.marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            try:
                containers.exif_summary(payload)
            except Malformed:
                raise _corrupt_exif(name) from None
            return  # Pillow reads the first EXIF segment only


def _corrupt_exif(name: str) -> BadImage:
    return BadImage(
        "exif",
        f"{name} has a corrupt EXIF block, so which way up it is cannot be known: "
        "re-save it without metadata in an image editor",
        NORMALIZE_OFF,
    )


def _needs_pixels(img: Image.Image, survey: _Survey, max_side: int) -> bool:
    """Whether the pixels must change (and so the image be re-encoded)."""
    return (
        survey.frames > 1
        or survey.orientation not in (None, 1)
        or (survey.profile is not None and not is_srgb(survey.profile))
        or survey.depth16
        or img.mode not in ("1", "L", "RGB", "RGBA")
        or (max_side > 0 and max(img.size) > max_side)
    )


def _load(img: Image.Image, name: str, claimed: str | None) -> None:
    """Decode the (first frame's) pixels, turning Pillow's errors into BadImage."""
    try:
        img.load()
    except OSError as exc:
        if "truncated" in str(exc):
            raise BadImage(
                "truncated",
                f"{name} is truncated: the file ends before its image data does "
                "(an interrupted copy or download?); copy it again from the original",
            ) from None
        raise _damaged(name, claimed, str(exc)) from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise _damaged(name, claimed, str(exc)) from None


def _reencode(
    img: Image.Image, survey: _Survey, source_size: tuple[int, int], max_side: int, sha: str
) -> Normalized:
    """The image with its pixels made upright, sRGB, 8-bit and within max_side, re-encoded."""
    changes: list[str] = []
    fmt = img.format or ""
    if survey.frames > 1:
        what = (
            f"{survey.frames} pages (multi-page TIFF)"
            if fmt == "TIFF"
            else f"{survey.frames} frames (animated {fmt})"
        )
        changes.append(f"took the first of {what}: uploaded as a still")
    sampling = JpegImagePlugin.get_sampling(img) if fmt in ("JPEG", "MPO") else -1
    out = _release(img, to_srgb(img, survey.profile, survey.profile_name, changes, depth16=survey.depth16))
    if survey.orientation in ORIENTATIONS:
        if not survey.upright:
            out = _release(out, out.transpose(ORIENTATIONS[survey.orientation]))
        changes.append(f"rotated upright (EXIF orientation {survey.orientation})")
    elif survey.orientation not in (None, 1):
        changes.append(f"ignored an invalid EXIF orientation ({survey.orientation})")
    if max_side and max(source_size) > max_side:
        # The target comes from the full size: JPEG draft decoding rounds the size it decodes at.
        oriented = source_size[::-1] if survey.orientation in (5, 6, 7, 8) else source_size
        target = _fit(oriented, max_side)
        if out.mode == "1":
            out = _release(out, out.convert("L"))  # Pillow resizes bilevel images by nearest neighbour only
        if out.size != target:
            out = _release(out, out.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0))
        changes.append(f"downscaled {oriented[0]}x{oriented[1]} → {out.size[0]}x{out.size[1]}")
    _note_metadata(survey, changes)
    buffer = io.BytesIO()
    if fmt in ("JPEG", "MPO") and out.mode in ("L", "RGB"):
        options = {"subsampling": sampling} if sampling >= 0 else {}
        out.save(buffer, "JPEG", quality=JPEG_QUALITY, **options)
        changes.append(f"re-encoded as JPEG (quality {JPEG_QUALITY})")
        return Normalized(buffer.getvalue(), "image/jpeg", changes, sha)
    out.save(buffer, "PNG", compress_level=PNG_COMPRESSION)
    changes.append("re-encoded as PNG" + ("" if fmt == "PNG" else f" (from {fmt})"))
    return Normalized(buffer.getvalue(), "image/png", changes, sha)


def _release(old: Image.Image, new: Image.Image) -> Image.Image:
    """``new``, with the pixels of ``old`` freed now rather than at the end (memory: 10 in flight)."""
    if new is not old:
        old.close()
    return new


def _strip(img: Image.Image, data: bytes, survey: _Survey, sha: str) -> Normalized:
    """The same pixels without EXIF/XMP: segments or chunks removed, never re-encoded where possible."""
    changes: list[str] = []
    fmt = img.format
    if fmt in ("JPEG", "MPO"):
        layout = containers.jpeg_layout(data)
        kept = [seg for seg in layout.segments if not _is_jpeg_metadata(seg, data)]
        trailing = len(data) - layout.end
        if trailing:
            # Multi-picture JPEGs (depth maps, gain maps, motion-photo video) carry more after the
            # photo, with their own metadata: the photo alone is what the model should see.
            kept = [seg for seg in kept if not seg.payload(data).startswith(b"MPF\x00")]
        body_start = layout.segments[-1].end if layout.segments else 2
        out = b"\xff\xd8" + b"".join(data[s.start : s.end] for s in kept) + data[body_start : layout.end]
        _note_metadata(survey, changes)
        if trailing:
            changes.append(f"dropped {trailing} bytes stored after the photo (extra images or video)")
        return Normalized(out, "image/jpeg", changes, sha)
    if fmt == "PNG":
        chunks = containers.png_chunks(data, check_crc=False)
        out = containers.PNG_SIGNATURE + b"".join(
            data[c.start : c.end] for c in chunks if not _is_png_metadata(c, data)
        )
        _note_metadata(survey, changes)
        return Normalized(out, "image/png", changes, sha)
    if fmt == "WEBP":
        chunks = containers.riff_chunks(data)
        parts = []
        for chunk in chunks:
            if chunk.kind in (b"EXIF", b"XMP "):
                continue
            part = data[chunk.start : chunk.end]
            if chunk.kind == b"VP8X":  # clear the EXIF (0x08) and XMP (0x04) flags
                part = part[:8] + bytes((part[8] & ~0x0C,)) + part[9:]
            parts.append(part)
        _note_metadata(survey, changes)
        return Normalized(containers.riff_file(parts), "image/webp", changes, sha)
    return _reencode(img, survey, img.size, 0, sha)  # TIFF, AVIF, GIF: metadata lives inside the encoding


def _is_jpeg_metadata(segment: containers.Segment, data: bytes) -> bool:
    payload = segment.payload(data)
    return segment.marker == 0xE1 and payload.startswith((b"Exif\x00", XMP_APP1, XMP_EXTENSION_APP1))


def _is_png_metadata(chunk: containers.Chunk, data: bytes) -> bool:
    if chunk.kind == b"eXIf":
        return True
    if chunk.kind in (b"tEXt", b"zTXt", b"iTXt"):
        keyword = chunk.body(data).split(b"\x00", 1)[0]
        return keyword in (b"XML:com.adobe.xmp", b"Raw profile type exif", b"Raw profile type APP1")
    return False


def _note_metadata(survey: _Survey, changes: list[str]) -> None:
    if survey.exif:
        changes.append("stripped EXIF" + (" (including the GPS location)" if survey.gps else ""))
    if survey.xmp:
        changes.append("stripped XMP")


def _check_png(data: bytes, name: str) -> set[bytes]:
    """The chunk types of a PNG, every CRC checked (Pillow checks only some); BadImage naming the chunk."""
    try:
        return {chunk.kind for chunk in containers.png_chunks(data)}
    except Malformed as exc:
        reason = "truncated" if "truncated" in str(exc) else "damaged"
        raise BadImage(
            reason, f"{name} is a {reason} PNG ({exc}): export or copy it again from the original"
        ) from None


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so that its longer side is ``max_side``."""
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _mime(img: Image.Image) -> str:
    return "image/jpeg" if img.format == "MPO" else Image.MIME.get(img.format or "", "image/png")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height read from a PNG or JPEG header without Pillow (for images it refuses to open)."""
    if data.startswith(containers.PNG_SIGNATURE) and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data.startswith(b"\xff\xd8"):
        try:
            for segment in containers.jpeg_layout(data, header_only=True).segments:
                if segment.marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width
                    height, width = struct.unpack(">HH", segment.payload(data)[1:5])
                    return width, height
        except Malformed:
            return None
    return None


def _too_large(name: str, size: tuple[int, int] | None) -> BadImage:
    what = f"{size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels)" if size else "too large"
    return BadImage(
        "too_large",
        f"{name} is {what}, over the {MAX_PIXELS // 1_000_000} megapixel limit that guards against "
        "decompression bombs: scale it down before dropping it in",
    )


def _damaged(name: str, claimed: str | None, detail: str) -> BadImage:
    kind = (claimed or "image").removeprefix("image/").upper()
    return BadImage(
        "damaged",
        f"{name} cannot be decoded as a {kind} ({detail}): open it in an image editor and save it again",
    )

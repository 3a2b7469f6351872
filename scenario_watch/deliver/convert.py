"""Colour and format conversion with Pillow: any image to 8-bit sRGB, outputs to PNG, JPEG or WebP."""

from __future__ import annotations

import io
import math
import threading
from typing import Literal

from PIL import Image, ImageCms, UnidentifiedImageError

from scenario_watch.errors import BadImage

# Only the formats Scenario accepts: never let Pillow guess among its other plugins (EPS, PSD...).
# AVIF where this Pillow has the plugin (11.2 on).
Image.init()
FORMATS = tuple(name for name in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "AVIF") if name in Image.OPEN)
_SRGB = ImageCms.createProfile("sRGB")
# Read once here, and each transform gets its own sRGB profile: Pillow builds transforms without
# the GIL, and sharing one LittleCMS profile handle between threads is not something to rely on.
SRGB_COLORANTS = (_SRGB.red_colorant, _SRGB.green_colorant, _SRGB.blue_colorant)
Target = Literal["original", "png", "jpeg", "webp"]
TARGET_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# From this quality up, JPEG chroma is kept at full resolution (as ImageMagick does): small
# coloured detail (text, edges) stays sharp where the quality asked for says it matters.
FULL_CHROMA_QUALITY = 90


# Images decoded at once in the whole process (a 12 MP photo takes about 90 MB while it is turned and
# converted): memory stays bounded whatever max_in_flight is; the work is CPU-bound, so little waits.
DECODING = threading.BoundedSemaphore(2)


def convert(data: bytes, mime_type: str, target: Target, quality: int = 90) -> tuple[bytes, str]:
    """Scenario's output in `target` (the same bytes if it is already), in sRGB; BadImage if unreadable."""
    with DECODING:
        return _convert(data, mime_type, target, quality)


def _convert(data: bytes, mime_type: str, target: Target, quality: int) -> tuple[bytes, str]:
    """``data`` in the ``target`` format (sRGB, 8-bit); the same bytes for "original" or the same type."""
    if target == "original" or TARGET_MIME[target] == mime_type:
        return data, mime_type  # never re-encode into the format it already has: that only loses
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(
            "damaged",
            f"the output ({mime_type}) cannot be decoded to convert it to {target} ({exc}): "
            'set [outbox] format = "original" to keep the files as Scenario makes them',
        ) from None
    with img:
        icc = img.info.get("icc_profile")
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc)) if icc else None
        except (OSError, ImageCms.PyCMSError):
            profile = None  # a paid output is not refused for a broken profile: its pixels count as sRGB
        keep_icc = icc if profile is not None and is_srgb(profile) else None
        out = to_srgb(img, profile, profile_name(profile) if profile else "", [])
    buffer = io.BytesIO()
    if target == "png":
        out.save(buffer, "PNG", icc_profile=keep_icc)
    elif target == "jpeg":
        if out.mode in ("RGBA", "1"):
            out = _flatten(out) if out.mode == "RGBA" else out.convert("L")
        subsampling = 0 if quality >= FULL_CHROMA_QUALITY else 2  # 4:4:4 or 4:2:0
        out.save(buffer, "JPEG", quality=quality, subsampling=subsampling, icc_profile=keep_icc)
    else:
        if out.mode not in ("RGB", "RGBA"):
            out = out.convert("RGB")  # WebP holds RGB(A) only
        out.save(buffer, "WEBP", quality=quality, icc_profile=keep_icc)
    return buffer.getvalue(), TARGET_MIME[target]


def _flatten(img: Image.Image) -> Image.Image:
    """An RGBA image over white, as JPEG has no alpha (what a viewer shows on a light page)."""
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=img.getchannel("A"))
    return background


def profile_name(profile: ImageCms.ImageCmsProfile) -> str:
    """The profile's description ("Adobe RGB (1998)"), or "unnamed"."""
    return (profile.profile.profile_description or "").strip() or "unnamed"


def is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """Whether an ICC profile describes sRGB: an RGB matrix profile with sRGB's colorants."""
    info = profile.profile
    if info.xcolor_space.strip() != "RGB":
        return False
    for ours, theirs in zip(
        (info.red_colorant, info.green_colorant, info.blue_colorant), SRGB_COLORANTS, strict=True
    ):
        if ours is None or theirs is None:
            return False  # a LUT profile: converting it is always right, if sometimes needless
        if not all(math.isclose(a, b, abs_tol=0.002) for a, b in zip(ours[0], theirs[0], strict=True)):
            return False
    return True


def to_srgb(
    img: Image.Image,
    profile: ImageCms.ImageCmsProfile | None,
    profile_name: str,
    changes: list[str],
    *,
    depth16: bool = False,
) -> Image.Image:
    """``img`` as 8-bit 1/L/RGB/RGBA sRGB, no ICC profile; may be ``img`` itself, converted in place."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's mode conversions clip 16-bit values at 255: scale them down instead.
        img = img.convert("I").point(lambda value: value / 256).convert("L")
        changes.append("16-bit → 8-bit")
        depth16 = False
    elif mode == "P" or mode == "PA":
        wide = "RGBA" if mode == "PA" or img.has_transparency_data else "RGB"
        img = img.convert(wide)
        changes.append(f"palette → {wide}")
    elif mode not in ("1", "L", "LA", "RGB", "RGBA", "CMYK"):
        img = img.convert("RGBA" if "A" in mode or "a" in mode else "RGB")
        changes.append(f"{mode} → {img.mode}")
    if depth16:
        changes.append("16-bit → 8-bit")  # Pillow decodes 16-bit RGB(A) to 8 bits already
    alpha = img.getchannel("A") if img.mode in ("LA", "RGBA") else None
    colour = img.convert(img.mode[:-1]) if alpha is not None else img
    if profile is not None and not is_srgb(profile):
        if colour.mode == "1":
            colour = colour.convert("L")
        try:
            # RGB to RGB in place: one full-size copy fewer (36 MB for a 12 MP photo).
            in_place = colour.mode == "RGB"
            converted = ImageCms.profileToProfile(
                colour,
                profile,
                ImageCms.createProfile("sRGB"),
                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                outputMode="RGB",
                inPlace=in_place,
                flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
            )
            colour = colour if converted is None else converted
            changes.append(f"converted the {profile_name} ICC profile to sRGB")
        except ImageCms.PyCMSError:
            # A profile for another colour space than the pixels' (an RGB profile on a CMYK image):
            # what the pixels mean is unknown, so they are taken as sRGB.
            changes.append(f"ignored the {profile_name} ICC profile, which does not fit {colour.mode} pixels")
    if colour.mode == "CMYK":
        colour = colour.convert("RGB")
        changes.append("CMYK → RGB")
    if alpha is not None:
        if colour.mode != "RGB":
            colour = colour.convert("RGB")
            changes.append("greyscale with alpha → RGBA")
        colour.putalpha(alpha)
    colour.info = {}  # never carry the source's EXIF, XMP or ICC profile into what is saved
    return colour

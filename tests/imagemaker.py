"""Real test images built with Pillow and struct: ICC profiles, EXIF blocks, raw PNGs, photos."""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Any

from PIL import Image

from scenario_watch.prepare.containers import PNG_SIGNATURE, png_chunk

XYZ = tuple[float, float, float]
D50: XYZ = (0.9642, 1.0, 0.8249)
# Colorants (D50-adapted, as ICC profiles store them) of two common non-sRGB spaces.
ADOBE_RGB: tuple[XYZ, XYZ, XYZ] = (
    (0.60974, 0.31111, 0.01947),
    (0.20528, 0.62567, 0.06087),
    (0.14919, 0.06322, 0.74457),
)
ADOBE_GAMMA = 563 / 256  # 2.19921875, as u8Fixed8 in Adobe's own profile
DISPLAY_P3: tuple[XYZ, XYZ, XYZ] = (
    (0.515102, 0.241182, -0.00105),
    (0.291965, 0.692236, 0.041885),
    (0.157153, 0.066561, 0.784209),
)
SRGB_D50: tuple[XYZ, XYZ, XYZ] = (
    (0.436066, 0.222488, 0.013916),
    (0.385147, 0.716873, 0.097076),
    (0.143066, 0.060608, 0.714096),
)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz: XYZ) -> bytes:
    return b"XYZ \x00\x00\x00\x00" + b"".join(_s15(v) for v in xyz)


def icc_profile(description: str, colorants: tuple[XYZ, XYZ, XYZ], gamma: float | None = None) -> bytes:
    """A real ICC v2 RGB matrix/TRC display profile; gamma None: the sRGB tone curve (parametric)."""
    ascii_text = description.encode("ascii") + b"\x00"
    desc = (
        b"desc\x00\x00\x00\x00" + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)
    )
    if gamma is None:
        params = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
        trc = b"para\x00\x00\x00\x00" + struct.pack(">HH", 3, 0) + b"".join(_s15(p) for p in params)
    else:
        trc = b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, round(gamma * 256)) + b"\x00\x00"
    tags = [
        (b"desc", desc),
        (b"cprt", b"text\x00\x00\x00\x00No copyright, test profile\x00"),
        (b"wtpt", _xyz_tag(D50)),
        (b"rXYZ", _xyz_tag(colorants[0])),
        (b"gXYZ", _xyz_tag(colorants[1])),
        (b"bXYZ", _xyz_tag(colorants[2])),
        (b"rTRC", trc),
        (b"gTRC", trc),
        (b"bTRC", trc),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, blobs = b"", b""
    for signature, blob in tags:
        blob += b"\x00" * (-len(blob) % 4)
        table += signature + struct.pack(">II", offset + len(blobs), len(blob))
        blobs += blob
    size = offset + len(blobs)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8 + 4)
        + b"".join(_s15(v) for v in D50)
        + b"test"
    )
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + blobs


def exif_block(orientation: int | None = None, gps: bool = False, camera: str = "TestCam") -> bytes:
    """An EXIF APP1 payload ("Exif\\0\\0" + TIFF) with a camera model, orientation and GPS position."""
    exif = Image.Exif()
    exif[0x0110] = camera
    if orientation is not None:
        exif[0x0112] = orientation
    if gps:  # a dict, not get_ifd().update(): Pillow 11.0 writes only the former
        exif[0x8825] = {1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 0.0)}
    return exif.tobytes()


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    """``img`` saved in ``fmt`` with Pillow's save options."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """The fully loaded image in ``data``."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def photo(width: int, height: int) -> Image.Image:
    """A colourful RGB test picture with detail (so that JPEG sizes and timings are realistic)."""
    red = Image.linear_gradient("L").resize((width, height))
    green = Image.radial_gradient("L").resize((width, height))
    small = (max(1, width // 4), max(1, height // 4))
    noise = random.Random(f"{width}x{height}").randbytes(small[0] * small[1])  # the same picture each time
    detail = Image.frombytes("L", small, noise).resize((width, height))
    return Image.merge("RGB", (red, green, detail))


def raw_png(width: int, height: int, depth: int, colour_type: int, pixel: bytes) -> bytes:
    """A PNG of one repeated pixel in any bit depth and colour type (Pillow cannot write 16-bit RGB)."""
    row = b"\x00" + pixel * width
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = zlib.compress(row * height)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels that is a few kilobytes on disk."""
    row = bytes(1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def srgb_from(
    colorants: tuple[XYZ, XYZ, XYZ], gamma: float | None, rgb: tuple[int, int, int]
) -> tuple[int, ...]:
    """The 8-bit sRGB value of ``rgb`` in a matrix space (gamma None: sRGB's curve), from first principles."""
    values = [channel / 255 for channel in rgb]
    if gamma is None:
        linear = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in values]
    else:
        linear = [v**gamma for v in values]
    xyz = [sum(colorants[j][i] * linear[j] for j in range(3)) for i in range(3)]
    inverse = _inverse([[SRGB_D50[j][i] for j in range(3)] for i in range(3)])
    srgb_linear = [min(1.0, max(0.0, sum(inverse[i][k] * xyz[k] for k in range(3)))) for i in range(3)]
    encoded = [12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055 for v in srgb_linear]
    return tuple(round(v * 255) for v in encoded)


def _inverse(m: list[list[float]]) -> list[list[float]]:
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    cof = [
        [e * i - f * h, c * h - b * i, b * f - c * e],
        [f * g - d * i, a * i - c * g, c * d - a * f],
        [d * h - e * g, b * g - a * h, a * e - b * d],
    ]
    return [[value / det for value in row] for row in cof]

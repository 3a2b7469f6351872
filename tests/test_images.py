"""images.normalize on real images built with Pillow: what is uploaded is what the person sees."""

from __future__ import annotations

import hashlib

import pytest
from imagemaker import (
    ADOBE_GAMMA,
    ADOBE_RGB,
    DISPLAY_P3,
    decode,
    encode,
    exif_block,
    icc_profile,
    photo,
    png_bomb,
    raw_png,
    srgb_from,
)
from PIL import Image, ImageCms

from scenario_watch.errors import BadImage, PromptError
from scenario_watch.prepare import containers
from scenario_watch.prepare.images import DECODABLE, MAX_PIXELS, normalize

ADOBE = icc_profile("Adobe RGB (1998)", ADOBE_RGB, ADOBE_GAMMA)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def sideways_photo() -> Image.Image:
    """A landscape picture whose top-left quarter is red: easy to find after a rotation."""
    img = Image.new("RGB", (64, 48), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 24))
    return img


def assert_clean(data: bytes) -> Image.Image:
    """Decodes, 8-bit RGB/RGBA/L, no EXIF, no XMP, no ICC profile other than none."""
    img = decode(data)
    assert img.mode in ("L", "RGB", "RGBA")
    assert not img.info.get("exif")
    assert not img.getexif()
    assert not img.info.get("xmp")
    assert "icc_profile" not in img.info or not img.info["icc_profile"]
    return img


# --- images that need work ----------------------------------------------------------------------


def test_orientation_6_jpeg_is_rotated_upright_and_the_tag_dropped() -> None:
    raw = sideways_photo()  # stored 64x48; orientation 6 says "rotate 90° clockwise to view"
    data = encode(raw, "JPEG", quality=95, exif=exif_block(orientation=6))
    result = normalize(data)
    img = assert_clean(result.data)
    assert img.size == (48, 64)  # width and height swapped
    # The stored top-left (red) is the viewed top-right after a clockwise quarter turn.
    assert img.getpixel((40, 8))[0] > 200 and img.getpixel((8, 8))[2] > 200
    assert result.mime_type == "image/jpeg"
    assert "rotated upright (EXIF orientation 6)" in result.changes
    assert "stripped EXIF" in result.changes
    assert result.original_sha256 == hashlib.sha256(data).hexdigest() and result.changed


@pytest.mark.parametrize(
    ("orientation", "where_red"),
    [(2, (48, 8)), (3, (48, 40)), (4, (8, 40)), (5, (8, 8)), (7, (40, 56)), (8, (8, 56))],
)
def test_every_orientation_lands_the_red_corner_where_a_viewer_shows_it(
    orientation: int, where_red: tuple[int, int]
) -> None:
    data = encode(sideways_photo(), "PNG", exif=exif_block(orientation=orientation))
    img = assert_clean(normalize(data).data)
    assert img.size == ((48, 64) if orientation >= 5 else (64, 48))
    assert img.getpixel(where_red)[0] > 200


def test_adobe_rgb_jpeg_is_converted_to_srgb_pixels() -> None:
    colour = (120, 160, 90)
    data = encode(Image.new("RGB", (32, 32), colour), "JPEG", quality=100, icc_profile=ADOBE)
    result = normalize(data)
    img = assert_clean(result.data)
    expected = srgb_from(ADOBE_RGB, ADOBE_GAMMA, colour)  # (99, 161, 85): computed from first principles
    got = img.getpixel((16, 16))
    assert all(abs(a - b) <= 3 for a, b in zip(got, expected, strict=True)), (got, expected)
    assert abs(got[0] - colour[0]) > 15  # the shift is real, not JPEG noise
    assert "converted the Adobe RGB (1998) ICC profile to sRGB" in result.changes
    assert result.mime_type == "image/jpeg"


def test_display_p3_png_is_converted_exactly() -> None:
    colour = (200, 40, 40)
    p3 = icc_profile("Display P3", DISPLAY_P3)  # sRGB's tone curve, wider primaries
    result = normalize(encode(Image.new("RGB", (8, 8), colour), "PNG", icc_profile=p3))
    got = assert_clean(result.data).getpixel((0, 0))
    expected = srgb_from(DISPLAY_P3, None, colour)  # (218, 0, 26): P3's red is beyond sRGB, clipped
    assert all(abs(a - b) <= 1 for a, b in zip(got, expected, strict=True)), (got, expected)
    assert result.changes == ["converted the Display P3 ICC profile to sRGB", "re-encoded as PNG"]


def test_an_alpha_channel_survives_the_colour_conversion() -> None:
    img = Image.new("RGBA", (8, 8), (120, 160, 90, 77))
    out = decode(normalize(encode(img, "PNG", icc_profile=ADOBE)).data)
    assert out.mode == "RGBA" and out.getpixel((0, 0)) == (
        *srgb_from(ADOBE_RGB, ADOBE_GAMMA, (120, 160, 90)),
        77,
    )


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red ink mix
    result = normalize(data)
    img = assert_clean(result.data)
    assert img.mode == "RGB" and result.mime_type == "image/jpeg"
    red, green, blue = img.getpixel((8, 8))
    assert red > 240 and green < 15 and blue < 15
    assert "CMYK → RGB" in result.changes


def test_cmyk_jpeg_with_a_cmyk_profile_mismatch_is_still_rgb() -> None:
    # An RGB profile on CMYK pixels does not fit: the profile is ignored (and said so), not fatal.
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", icc_profile=ADOBE)
    result = normalize(data)
    assert decode(result.data).mode == "RGB"
    assert any("does not fit CMYK pixels" in change for change in result.changes)


def test_16_bit_rgb_png_becomes_8_bit() -> None:
    data = raw_png(6, 4, 16, 2, b"\x12\x34\xab\xcd\xff\xff")  # colour type 2: RGB, 16 bits a sample
    result = normalize(data)
    img = assert_clean(result.data)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (0x12, 0xAB, 0xFF)
    assert containers.png_chunks(result.data)[0].body(result.data)[8] == 8  # IHDR bit depth
    assert "16-bit → 8-bit" in result.changes


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    data = encode(Image.new("I;16", (4, 4), 40000), "PNG")
    result = normalize(data)
    img = assert_clean(result.data)
    assert img.mode == "L" and img.getpixel((0, 0)) == 40000 // 256
    assert result.changes == ["16-bit → 8-bit", "re-encoded as PNG"]


def test_palette_png_becomes_rgb_or_rgba_with_its_transparency() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    assert decode(normalize(encode(palette, "PNG")).data).getpixel((0, 0)) == (255, 0, 0)
    result = normalize(encode(palette, "PNG", transparency=1))
    assert decode(result.data).getpixel((0, 0)) == (255, 0, 0, 0)
    assert "palette → RGBA" in result.changes


def test_a_still_gif_is_a_palette_image_so_it_becomes_rgb_png() -> None:
    result = normalize(encode(photo(40, 30), "GIF"))
    assert decode(result.data).mode == "RGB" and result.mime_type == "image/png"
    assert result.changes == ["palette → RGB", "re-encoded as PNG (from GIF)"]


def test_greyscale_with_alpha_becomes_rgba() -> None:
    result = normalize(encode(Image.new("LA", (4, 4), (100, 50)), "PNG"))
    assert decode(result.data).getpixel((0, 0)) == (100, 100, 100, 50)
    assert "greyscale with alpha → RGBA" in result.changes


def test_gps_exif_is_stripped_from_a_jpeg_without_touching_its_pixels() -> None:
    clean = encode(photo(64, 48), "JPEG", quality=90)
    tagged = encode(photo(64, 48), "JPEG", quality=90, exif=exif_block(gps=True))
    assert decode(tagged).getexif().get_ifd(0x8825)  # the GPS position is really there
    result = normalize(tagged)
    assert result.changes == ["stripped EXIF (including the GPS location)"]
    assert result.data == clean  # the segment is removed: the encoded pixels are Pillow's very bytes
    assert b"TestCam" not in result.data


def test_xmp_and_exif_are_stripped_from_png_and_webp_losslessly() -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    webp = encode(photo(32, 32), "WEBP", exif=exif_block(gps=True), xmp=xmp)
    result = normalize(webp)
    assert result.changes == ["stripped EXIF (including the GPS location)", "stripped XMP"]
    out = decode(result.data)
    assert out.tobytes() == decode(webp).tobytes() and not out.info.get("exif") and not out.info.get("xmp")
    assert [c.kind for c in containers.riff_chunks(result.data)] == [b"VP8X", b"VP8 "]
    png = encode(photo(32, 32), "PNG", exif=exif_block(orientation=1))
    result = normalize(png)
    assert result.changes == ["stripped EXIF"] and b"eXIf" not in result.data
    assert decode(result.data).tobytes() == decode(png).tobytes()


def test_max_side_downscales_keeping_the_aspect_ratio() -> None:
    data = encode(photo(800, 600), "JPEG", quality=90, exif=exif_block(orientation=6))
    result = normalize(data, max_side=200)
    img = assert_clean(result.data)
    assert img.size == (150, 200)
    assert "downscaled 600x800 → 150x200" in result.changes
    assert normalize(data, max_side=1000).data != data  # the EXIF still goes; no downscale noted
    assert not any("downscaled" in c for c in normalize(data, max_side=1000).changes)


def test_animated_gif_and_webp_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "lime", "blue")]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        result = normalize(data)
        img = decode(result.data)
        assert result.mime_type == "image/png" and not getattr(img, "is_animated", False)
        assert img.convert("RGB").getpixel((8, 8))[0] > 200
        assert result.changes[0] == f"took the first of 3 frames (animated {fmt}): uploaded as a still"


def test_a_multi_picture_jpeg_is_a_photo_not_an_animation() -> None:
    first, second = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    data = encode(first, "MPO", save_all=True, append_images=[second], exif=exif_block(gps=True))
    result = normalize(data)
    assert result.mime_type == "image/jpeg"
    assert "stripped EXIF (including the GPS location)" in result.changes
    assert any(change.startswith("dropped ") for change in result.changes)
    img = decode(result.data)
    assert img.format == "JPEG" and img.getpixel((8, 8))[0] > 200 and b"TestCam" not in result.data


# --- clean images are left alone ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        encode(photo(40, 30), "PNG"),
        encode(photo(40, 30), "PNG", icc_profile=SRGB_ICC),
        encode(photo(40, 30), "JPEG", quality=80),
        encode(photo(40, 30).convert("L"), "PNG"),
        encode(photo(40, 30).convert("RGBA"), "WEBP", lossless=True),
        encode(photo(40, 30), "TIFF"),
    ],
    ids=["png", "png-srgb-profile", "jpeg", "grey", "webp", "tiff"],
)
def test_a_clean_image_is_returned_byte_for_byte(data: bytes) -> None:
    result = normalize(data)
    assert result.data is data and result.changes == [] and not result.changed


def test_heic_is_passed_through_with_a_note() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    result = normalize(heic)
    assert result.data is heic and result.mime_type == "image/heic"
    assert result.changes == ["left as is: HEIC cannot be decoded here, so it is uploaded unchanged"]


# --- bad images fail with a sentence a person can act on ----------------------------------------


def bad(data: bytes, reason: str) -> str:
    with pytest.raises(BadImage) as caught:
        normalize(data, name="photo.jpg")
    assert isinstance(caught.value, PromptError) and caught.value.reason == reason
    message = str(caught.value)
    assert message.startswith("photo.jpg ") and ": " in message, message
    return message


def test_zero_bytes() -> None:
    assert "empty (0 bytes)" in bad(b"", "empty")


def test_truncated_jpeg() -> None:
    data = encode(photo(200, 150), "JPEG")
    assert "copy it again" in bad(data[: len(data) // 2], "truncated")


def test_truncated_png() -> None:
    data = encode(photo(200, 150), "PNG")
    assert "truncated" in bad(data[: len(data) // 2], "truncated")


def test_png_with_a_bad_crc() -> None:
    data = bytearray(encode(photo(32, 32), "PNG"))
    idat = next(c for c in containers.png_chunks(bytes(data)) if c.kind == b"IDAT")
    data[idat.end - 1] ^= 0xFF  # the checksum only: Pillow itself would decode this without a word
    assert "chunk IDAT fails its CRC checksum" in bad(bytes(data), "damaged")


def test_decompression_bomb() -> None:
    bomb = png_bomb(20000)
    assert len(bomb) < 100_000  # small on disk, 400 megapixels decoded
    message = bad(bomb, "too_large")
    assert "20000x20000 pixels (400 megapixels)" in message and "scale it down" in message


def test_just_over_the_pixel_limit_is_refused_before_decoding() -> None:
    side = int(MAX_PIXELS**0.5) + 1
    message = bad(png_bomb(side), "too_large")
    assert f"{side}x{side}" in message


def test_corrupt_icc_profile() -> None:
    data = encode(photo(16, 16), "JPEG", icc_profile=b"\x00\x01garbage" * 20)
    message = bad(data, "icc")
    assert "corrupt ICC colour profile" in message and "re-export" in message


def test_corrupt_exif_block() -> None:
    broken = b"Exif\x00\x00MM\x00*\x00\x00\x10\x00"  # IFD0 offset beyond the block
    message = bad(encode(photo(16, 16), "JPEG", exif=broken), "exif")
    assert "corrupt EXIF block" in message and "which way up" in message


def test_garbage_with_a_jpeg_signature_is_damaged() -> None:
    assert "cannot be decoded as a JPEG" in bad(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "damaged")


def test_the_errors_carry_the_way_out() -> None:
    with pytest.raises(BadImage) as caught:
        normalize(encode(photo(16, 16), "JPEG", icc_profile=b"nonsense" * 20))
    assert caught.value.hint is not None and "normalize = false" in caught.value.hint
    assert str(caught.value).startswith("the image has a corrupt ICC colour profile")


# --- container edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"progressive": True}, {"restart_marker_blocks": 1}, {"optimize": True, "subsampling": 0}],
    ids=["progressive", "restart-markers", "optimized-444"],
)
def test_exif_is_stripped_losslessly_from_every_kind_of_jpeg(options: dict[str, object]) -> None:
    picture = photo(96, 64)
    clean = encode(picture, "JPEG", quality=85, **options)
    tagged = encode(picture, "JPEG", quality=85, exif=exif_block(gps=True), **options)
    result = normalize(tagged)
    assert result.data == clean and result.changes == ["stripped EXIF (including the GPS location)"]


def test_xmp_alone_is_stripped_from_a_jpeg() -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    clean = encode(photo(32, 32), "JPEG")
    result = normalize(encode(photo(32, 32), "JPEG", xmp=xmp))
    assert result.data == clean and result.changes == ["stripped XMP"]


def test_orientation_in_a_tiff_tag_is_applied() -> None:
    data = encode(sideways_photo(), "TIFF", tiffinfo={0x0112: 6})
    result = normalize(data)
    img = assert_clean(result.data)
    assert img.size == (48, 64) and img.getpixel((40, 8))[0] > 200
    assert result.mime_type == "image/png" and "re-encoded as PNG (from TIFF)" in result.changes


@pytest.mark.skipif("image/avif" not in DECODABLE, reason="this Pillow cannot decode AVIF")
def test_a_clean_avif_is_left_alone_and_an_oriented_one_made_png() -> None:
    clean = encode(photo(40, 30), "AVIF")
    assert normalize(clean).data is clean
    rotated = normalize(encode(sideways_photo(), "AVIF", exif=exif_block(orientation=6)))
    assert decode(rotated.data).size == (48, 64) and rotated.mime_type == "image/png"


def test_exif_with_a_tag_pointing_outside_the_block_is_corrupt() -> None:
    good = exif_block()
    # IFD0's first entry (the camera model, an ASCII string over 4 bytes) gets an offset far away.
    broken = good[: 6 + 8 + 2 + 8] + b"\x00\x00\xff\xf0" + good[6 + 8 + 2 + 12 :]
    assert "corrupt EXIF block" in bad(encode(photo(16, 16), "JPEG", exif=broken), "exif")


def test_a_png_icc_profile_pillow_cannot_unpack_is_corrupt() -> None:
    # Pillow drops an iCCP chunk whose zlib data is broken without a word; the colours would shift.
    data = encode(photo(16, 16), "PNG")
    chunks = containers.png_chunks(data)
    iccp = containers.png_chunk(b"iCCP", b"Broken profile\x00\x00" + b"not zlib data")
    data = data[: chunks[1].start] + iccp + data[chunks[1].start :]
    assert "corrupt ICC colour profile" in bad(data, "icc")


def test_normalising_is_deterministic() -> None:
    data = encode(photo(64, 48), "JPEG", exif=exif_block(orientation=8), icc_profile=ADOBE)
    assert normalize(data).data == normalize(data).data

"""convert.convert: outputs in the format asked for, in sRGB, then provenance on top."""

from __future__ import annotations

import pytest
from imagemaker import ADOBE_GAMMA, ADOBE_RGB, decode, encode, icc_profile, photo, srgb_from
from PIL import Image, ImageCms

from scenario_watch.deliver.convert import Target, convert
from scenario_watch.deliver.provenance import Provenance, embed, read
from scenario_watch.errors import BadImage
from scenario_watch.sandbox.images import make_png

SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_original_and_the_same_type_are_the_same_bytes() -> None:
    png = make_png("x")
    assert convert(png, "image/png", "original", 50) == (png, "image/png")
    assert convert(png, "image/png", "png", 50)[0] is png  # no re-encoding into what it already is


@pytest.mark.parametrize(
    ("target", "mime", "fmt"), [("webp", "image/webp", "WEBP"), ("jpeg", "image/jpeg", "JPEG")]
)
def test_png_to_lossy_formats_at_the_quality_asked(target: Target, mime: str, fmt: str) -> None:
    png = encode(photo(64, 48), "PNG")
    good, got_mime = convert(png, "image/png", target, 95)
    poor, _ = convert(png, "image/png", target, 20)
    assert got_mime == mime and decode(good).format == fmt and decode(good).size == (64, 48)
    assert len(poor) < len(good)
    red = decode(png).getpixel((10, 10))[0]
    assert abs(decode(good).convert("RGB").getpixel((10, 10))[0] - red) <= 12


def test_jpeg_to_png_is_lossless_from_the_decoded_pixels() -> None:
    jpeg = encode(photo(32, 32), "JPEG", quality=90)
    png, mime = convert(jpeg, "image/jpeg", "png", 90)
    assert mime == "image/png" and decode(png).tobytes() == decode(jpeg).tobytes()


def test_alpha_is_kept_in_webp_and_flattened_on_white_in_jpeg() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    png = encode(rgba, "PNG")
    webp, _ = convert(png, "image/png", "webp", 90)
    assert decode(webp).mode == "RGBA" and decode(webp).getpixel((4, 4))[3] == 0
    jpeg, _ = convert(png, "image/png", "jpeg", 90)
    assert all(channel > 245 for channel in decode(jpeg).getpixel((4, 4)))  # white, not black or red


def test_a_non_srgb_output_is_converted_and_an_srgb_profile_kept() -> None:
    adobe = encode(
        Image.new("RGB", (8, 8), (120, 160, 90)),
        "PNG",
        icc_profile=icc_profile("Adobe", ADOBE_RGB, ADOBE_GAMMA),
    )
    webp, _ = convert(adobe, "image/png", "webp", 100)
    out = decode(webp)
    assert "icc_profile" not in out.info or not out.info["icc_profile"]  # untagged: sRGB
    expected = srgb_from(ADOBE_RGB, ADOBE_GAMMA, (120, 160, 90))
    assert all(abs(a - b) <= 4 for a, b in zip(out.getpixel((4, 4)), expected, strict=True))
    tagged = encode(photo(8, 8), "PNG", icc_profile=SRGB_ICC)
    assert decode(convert(tagged, "image/png", "jpeg", 90)[0]).info["icc_profile"] == SRGB_ICC


def test_provenance_goes_on_top_of_a_converted_output() -> None:
    webp, mime = convert(make_png("y"), "image/png", "webp", 85)
    record = read(embed(webp, mime, Provenance("make it pop", "model_x", "job_9")))
    assert record is not None and record["job_id"] == "job_9"


def test_an_output_that_cannot_be_decoded_names_the_way_out() -> None:
    with pytest.raises(BadImage) as caught:
        convert(b"\x89PNG\r\n\x1a\nnot really", "image/png", "webp", 90)
    assert 'format = "original"' in str(caught.value)

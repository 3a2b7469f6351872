"""provenance.embed: every output says what made it, read back by Pillow and exiftool, pixels untouched."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from imagemaker import decode, encode, exif_block, photo
from PIL import Image, ImageCms

from scenario_watch.deliver.provenance import InputImage, Provenance, embed, read
from scenario_watch.prepare import containers
from scenario_watch.sandbox.images import make_png

INFO = Provenance(
    prompt="Turn the sky into a purple aurora",
    model_id="model_google-gemini-pro-image-editing",
    job_id="job_7f3a",
    inputs={"aspectRatio": "16:9", "resolution": "2K", "seed": 7},
    references=[
        InputImage("beach.jpg", "ab" * 32, "asset_abc123"),
        InputImage("asset_xyz", asset_id="asset_xyz"),
    ],
    cost=5.0,
    created=datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC),
)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def outputs() -> dict[str, tuple[bytes, str]]:
    """Outputs as Scenario might send them: every container variant embed() must handle."""
    rgba = photo(48, 32).convert("RGBA")
    rgba.putalpha(128)
    return {
        "png-sandbox": (make_png("seed"), "image/png"),
        "png-rgba": (encode(rgba, "PNG"), "image/png"),
        "jpeg-jfif": (encode(photo(48, 32), "JPEG", quality=90), "image/jpeg"),
        "jpeg-exif": (encode(photo(48, 32), "JPEG", exif=exif_block(), icc_profile=SRGB_ICC), "image/jpeg"),
        "webp-lossy": (encode(photo(48, 32), "WEBP", quality=80), "image/webp"),
        "webp-lossless-alpha": (encode(rgba, "WEBP", lossless=True), "image/webp"),
        "webp-extended": (
            encode(photo(48, 32), "WEBP", exif=exif_block(), icc_profile=SRGB_ICC),
            "image/webp",
        ),
    }


CASES = outputs()


@pytest.mark.parametrize("case", list(CASES))
def test_embed_keeps_the_pixels_and_read_finds_the_record(case: str) -> None:
    original, mime = CASES[case]
    out = embed(original, mime, INFO)
    assert out != original
    before, after = decode(original), decode(out)
    assert (after.mode, after.size) == (before.mode, before.size)
    assert after.tobytes() == before.tobytes()  # nothing was re-encoded
    record = read(out)
    assert record is not None
    assert record["job_id"] == "job_7f3a" and record["prompt"] == INFO.prompt
    assert record["model"] == "model_google-gemini-pro-image-editing"
    assert record["references"][0] == {"name": "beach.jpg", "sha256": "ab" * 32, "asset_id": "asset_abc123"}
    assert record["cost"] == 5.0 and record["created"] == "2026-03-01T12:30:05Z"
    assert record["inputs"] == {"aspectRatio": "16:9", "resolution": "2K", "seed": 7}
    assert read(original) is None


@pytest.mark.parametrize("case", ["png-sandbox", "png-rgba"])
def test_png_keeps_every_chunk_and_pillow_reads_the_text(case: str) -> None:
    original, _ = CASES[case]
    out = embed(original, "image/png", INFO)
    old = [original[c.start : c.end] for c in containers.png_chunks(original)]
    new = [out[c.start : c.end] for c in containers.png_chunks(out)]  # every CRC checked
    assert [chunk for chunk in new if chunk in old] == old  # all of Scenario's chunks, in their order
    assert len(new) == len(old) + 2
    img = Image.open(io.BytesIO(out))
    # Before IDAT, so Pillow's info has it without decoding (as "PNG info" readers expect).
    assert img.info["parameters"].startswith("Turn the sky into a purple aurora\nModel: model_google")
    assert "Job: job_7f3a" in img.info["parameters"] and "Cost: 5 CU" in img.info["parameters"]
    assert json.loads(img.info["scenario-watch"])["job_id"] == "job_7f3a"


def test_the_parameters_line_quotes_what_would_split_it() -> None:
    info = Provenance(
        "p", "m", "j", inputs={"note": "a, b", "seed": 3}, references=[InputImage("x.png", "12" * 32)]
    )
    line = info.parameters().splitlines()[1]
    assert 'note: "a, b"' in line and "seed: 3" in line and "References: x.png (sha256 121212121212)" in line


def test_a_prompt_beyond_latin_1_goes_into_itxt() -> None:
    info = Provenance("ciel violet — 紫のオーロラ", "m", "job_u")
    out = embed(CASES["png-sandbox"][0], "image/png", info)
    kinds = [c.kind for c in containers.png_chunks(out)]
    assert kinds.count(b"iTXt") == 2 and b"tEXt" in kinds  # the sandbox's own tEXt stays
    assert decode(out).info["parameters"].startswith("ciel violet — 紫のオーロラ")


@pytest.mark.parametrize("case", ["jpeg-jfif", "jpeg-exif"])
def test_jpeg_gets_one_xmp_segment_after_jfif_and_exif(case: str) -> None:
    original, _ = CASES[case]
    out = embed(original, "image/jpeg", INFO)
    segments = containers.jpeg_layout(out, header_only=True).segments
    xmp = [s for s in segments if s.payload(out).startswith(b"http://ns.adobe.com/xap/1.0/\x00")]
    assert len(xmp) == 1
    assert out[: xmp[0].start] + out[xmp[0].end :] == original  # inserted, nothing else touched
    assert all(s.marker in (0xE0, 0xE1) for s in segments[: segments.index(xmp[0])])
    packet = decode(out).info["xmp"]
    assert b"Turn the sky into a purple aurora" in packet and b"job_7f3a" in packet
    assert b"compositeWithTrainedAlgorithmicMedia" in packet
    if case == "jpeg-exif":
        assert decode(out).getexif()[0x0110] == "TestCam" and decode(out).info["icc_profile"] == SRGB_ICC


@pytest.mark.parametrize("case", ["webp-lossy", "webp-lossless-alpha", "webp-extended"])
def test_webp_gets_an_xmp_chunk_and_a_valid_extended_header(case: str) -> None:
    original, _ = CASES[case]
    out = embed(original, "image/webp", INFO)
    chunks = containers.riff_chunks(out)
    assert int.from_bytes(out[4:8], "little") == len(out) - 8
    assert chunks[0].kind == b"VP8X"
    flags = chunks[0].body(out)[0]
    assert flags & 0x04  # XMP
    assert bool(flags & 0x10) == (case == "webp-lossless-alpha")  # alpha, taken from the VP8L header
    width = int.from_bytes(chunks[0].body(out)[4:7], "little") + 1
    height = int.from_bytes(chunks[0].body(out)[7:10], "little") + 1
    assert (width, height) == (48, 32)
    assert [c.kind for c in chunks].count(b"XMP ") == 1
    assert b"job_7f3a" in decode(out).info["xmp"]
    if case == "webp-extended":
        assert decode(out).getexif()[0x0110] == "TestCam" and decode(out).info["icc_profile"] == SRGB_ICC


def test_hostile_prompts_stay_valid_xml_and_round_trip() -> None:
    prompt = "a <b> & 'c' \"d\" ]]> <?xpacket end='w'?> \x01\x1f end"
    info = Provenance(prompt, "m", "job<&>")
    for case in ("jpeg-jfif", "webp-lossy", "png-sandbox"):
        original, mime = CASES[case]
        record = read(embed(original, mime, info))
        assert record is not None and record["prompt"] == prompt and record["job_id"] == "job<&>"


def test_a_huge_prompt_is_cut_to_fit_one_jpeg_segment() -> None:
    info = Provenance("aurora " * 30_000, "m", "job_big")
    out = embed(CASES["jpeg-jfif"][0], "image/jpeg", info)
    record = read(out)
    assert record is not None and record["prompt_truncated"] is True
    assert record["prompt"].startswith("aurora aurora") and record["prompt"].endswith("…")
    assert decode(out).size == (48, 32)
    png_record = read(embed(CASES["png-sandbox"][0], "image/png", info))  # PNG has room for all of it
    assert png_record is not None and png_record["prompt"] == info.prompt


def test_other_types_are_left_alone() -> None:
    gif = encode(photo(8, 8), "GIF")
    assert embed(gif, "image/gif", INFO) is gif


def exiftool(path: Path, *options: str) -> dict[str, str]:
    """exiftool's JSON answer for one file."""
    command = ["exiftool", "-json", "-G1", "-a", *options, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    answer: dict[str, str] = json.loads(result.stdout)[0]
    return answer


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
@pytest.mark.parametrize("case", ["png-sandbox", "jpeg-exif", "webp-lossy", "webp-lossless-alpha"])
def test_exiftool_reads_it_and_finds_nothing_new_wrong(case: str, tmp_path: Path) -> None:
    original, mime = CASES[case]
    before, after = tmp_path / f"before.{mime[6:]}", tmp_path / f"after.{mime[6:]}"
    before.write_bytes(original)
    after.write_bytes(embed(original, mime, INFO))
    tags = exiftool(after)
    if mime == "image/png":
        assert tags["PNG:Parameters"].startswith("Turn the sky into a purple aurora")
        assert json.loads(tags["PNG:Scenario-watch"])["job_id"] == "job_7f3a"
    else:
        assert tags["XMP-dc:Description"] == "Turn the sky into a purple aurora"
        assert tags["XMP-scenariowatch:Job"] == "job_7f3a"
        assert json.loads(tags["XMP-scenariowatch:Record"])["cost"] == 5.0
        assert tags["XMP-iptcExt:DigitalSourceType"].endswith("compositeWithTrainedAlgorithmicMedia")
    # exiftool's validation finds no more to say after the insertion than before it (the test
    # EXIF block lacks a few tags JPEG wants, which it reports either way).
    check = ("-validate", "-warning")
    assert exiftool(after, *check).get("ExifTool:Validate") == exiftool(before, *check).get(
        "ExifTool:Validate"
    )

"""Bad images through the running daemon: each fails unpaid with a clear error file, the daemon lives on.

The unit tests of images.py say what each refusal means; here each goes the whole way: referenced by a
prompt in the inbox, refused before anything is paid, filed in failed/ with its reason, while a good
prompt dropped after them all is still generated. Also: an animated image is uploaded as its first
frame (and the manifest says so), and a naming template that escapes the outbox or names an unknown
token stops the daemon at start (exit 2).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import Folders, StartDaemon, generate_posts, run_cli, wait_for, write_config
from imagemaker import decode, encode, photo, png_bomb
from PIL import Image

from scenario_watch.prepare import containers
from scenario_watch.sandbox import Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


def truncated_jpeg() -> bytes:
    data = encode(photo(64, 64), "JPEG")
    return data[: len(data) // 2]


def bad_crc_png() -> bytes:
    data = bytearray(encode(photo(32, 32), "PNG"))
    idat = next(c for c in containers.png_chunks(bytes(data)) if c.kind == b"IDAT")
    data[idat.end - 1] ^= 0xFF  # the checksum only: Pillow itself would decode it without a word
    return bytes(data)


def corrupt_exif_jpeg() -> bytes:
    broken = b"Exif\x00\x00MM\x00*\x00\x00\x10\x00"  # IFD0's offset lies beyond the block
    return encode(photo(16, 16), "JPEG", exif=broken)


BAD: dict[str, tuple[bytes, str]] = {
    "cut.jpg": (truncated_jpeg(), "truncated"),
    "crc.png": (bad_crc_png(), "chunk IDAT fails its CRC checksum"),
    "bomb.png": (png_bomb(20000), "20000x20000 pixels (400 megapixels)"),
    "zero.png": (b"", "is not a PNG, JPEG"),
    "icc.jpg": (
        encode(photo(16, 16), "JPEG", icc_profile=b"\x00\x01garbage" * 20),
        "corrupt ICC colour profile",
    ),
    "exif.jpg": (corrupt_exif_jpeg(), "corrupt EXIF block"),
}


def test_each_bad_image_fails_unpaid_with_a_clear_error_and_the_daemon_lives_on(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    proc = daemon()
    for image, (data, _) in BAD.items():
        (folders.inbox / image).write_bytes(data)
        folders.drop(f"{Path(image).stem}.json", {"prompt": "edit it", "referenceImages": [image]})
    wait_for(
        lambda: all((folders.failed / f"{Path(image).stem}.error.json").exists() for image in BAD),
        timeout=40,
        what="every bad image's prompt in failed/",
    )
    for image, (_, says) in BAD.items():
        report = json.loads((folders.failed / f"{Path(image).stem}.error.json").read_text())
        assert image in report["error"] and says in report["error"], (image, report)
        assert report["stage"] in ("validate", "references"), report
    assert not generate_posts(sandbox) and not sandbox.generate_jobs  # nothing paid
    (folders.inbox / "fine.png").write_bytes(encode(photo(16, 16), "PNG"))
    folders.drop("good.json", {"prompt": "after all that", "referenceImages": ["fine.png"]})
    wait_for(lambda: (folders.done / "good.json").exists(), what="a good prompt after them")
    assert len(sandbox.generate_jobs) == 1
    assert not proc.daemon.closed and proc.finished.is_set() is False  # type: ignore[attr-defined]


def animation(fmt: str) -> bytes:
    frames = [photo(24, 16), Image.new("RGB", (24, 16), "red"), Image.new("RGB", (24, 16), "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def test_an_animated_gif_or_webp_is_uploaded_as_its_first_frame_and_the_manifest_says_so(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    daemon()
    (folders.inbox / "anim.gif").write_bytes(animation("GIF"))
    folders.drop("gif.json", {"prompt": "still it", "referenceImages": ["anim.gif"]})
    (folders.inbox / "loop.webp").write_bytes(animation("WEBP"))
    folders.drop("loop.txt", None, raw=b"still it too")  # a sidecar pair, for good measure
    wait_for(lambda: (folders.done / "gif.json").exists(), what="the GIF's prompt done")
    wait_for(lambda: (folders.done / "loop.txt").exists(), what="the WebP's pair done")
    for manifest, kind in (("gif", "GIF"), ("loop", "WEBP")):
        [ref] = json.loads((folders.outbox / f"{manifest}.manifest.json").read_text())["references"]
        assert f"took the first of 3 frames (animated {kind}): uploaded as a still" in ref["changes"], ref
        uploaded = decode(sandbox.asset_bytes(ref["assetId"]))
        assert not getattr(uploaded, "is_animated", False) and uploaded.size == (24, 16)
    assert (folders.done / "loop.webp").exists()  # filed with its text


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("../{stem}_{index}", "names must stay inside the outbox"),
        ("/srv/out/{stem}_{index}", "is an absolute path"),
        ("{stem}_{colour}", "names an unknown token {colour}"),
    ],
    ids=["dotdot", "absolute", "unknown-token"],
)
def test_a_bad_naming_template_stops_the_daemon_at_start(
    folders: Folders, sandbox: Sandbox, template: str, says: str
) -> None:
    write_config(folders, sandbox.base_url, outbox={"name": template})
    result = run_cli("run", "-c", str(folders.config), timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "outbox.name" in result.stderr and says in result.stderr, result.stderr
    assert not folders.outbox.exists() or not any(folders.outbox.iterdir())

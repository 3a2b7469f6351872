"""Measure the image work of issue 19: CPU per call, and peak memory with 10 inputs in flight.

    .venv/bin/python tests/benchmarks/images_bench.py           # about a minute
    .venv/bin/python tests/benchmarks/images_bench.py --quick   # fewer repeats

Figures (printed, not asserted):
- normalize() CPU (time.process_time, median of R runs, one thread) on a 12 MP (4000x3000) JPEG
  in five states: clean (decoded only, to validate it, then returned as is), EXIF with GPS only
  (segments removed, no re-encoding), orientation 6 (rotated, re-encoded q95), orientation 6 plus an
  Adobe RGB profile (converted to sRGB too), and the last with max_side = 2048 (draft decoding).
- embed() CPU on a 2K PNG and a 2K JPEG output (what Scenario returns at resolution 2K), and
  convert() CPU from that PNG to WebP and JPEG at quality 90.
- Peak RSS of normalising 10 of the 12 MP worst-case inputs at once in 10 threads: measured in a
  fresh child process (VmHWM, the high-water mark of its resident set) against its own resident set
  just before the threads start (interpreter, Pillow and the 10 input files already in memory).

Not collected by pytest (pyproject: norecursedirs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # imagemaker

from imagemaker import ADOBE_GAMMA, ADOBE_RGB, encode, exif_block, icc_profile, photo

from scenario_watch.deliver.convert import convert
from scenario_watch.deliver.provenance import InputImage, Provenance, embed
from scenario_watch.prepare.images import normalize

INFO = Provenance(
    prompt="Turn the sky into a purple aurora, keep the people on the beach as they are",
    model_id="model_google-gemini-pro-image-editing",
    job_id="job_bench",
    inputs={"aspectRatio": "4:3", "resolution": "2K", "numOutputs": 1},
    references=[InputImage("beach.jpg", "ab" * 32, "asset_bench")],
    cost=5.0,
)


def inputs() -> dict[str, bytes]:
    """The 12 MP JPEG inputs, in the states normalize() tells apart."""
    picture = photo(4000, 3000)
    adobe = icc_profile("Adobe RGB (1998)", ADOBE_RGB, ADOBE_GAMMA)
    return {
        "clean": encode(picture, "JPEG", quality=92),
        "exif+gps only": encode(picture, "JPEG", quality=92, exif=exif_block(orientation=1, gps=True)),
        "orientation 6": encode(picture, "JPEG", quality=92, exif=exif_block(orientation=6, gps=True)),
        "orientation 6 + Adobe RGB": encode(
            picture, "JPEG", quality=92, exif=exif_block(orientation=6, gps=True), icc_profile=adobe
        ),
    }


def cpu(call: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of ``call`` (this thread's process time; nothing else runs)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return statistics.median(times)


def rss_child(folder: str) -> None:
    """In a fresh process: normalise every file in ``folder`` at once; print baseline and peak RSS (MiB)."""
    datas = [path.read_bytes() for path in sorted(Path(folder).iterdir())]
    normalize(datas[0])  # warm Pillow's plugins and LittleCMS up first
    baseline = _status("VmRSS")
    start = time.perf_counter()
    with ThreadPoolExecutor(len(datas)) as pool:
        results = list(pool.map(normalize, datas))
    wall = time.perf_counter() - start
    print(baseline, _status("VmHWM"), f"{wall:.2f}", sum(len(r.data) for r in results))


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--rss-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    repeats = 3 if args.quick else 7
    cases = inputs()
    print(f"normalize() on a 12 MP JPEG (4000x3000), CPU median of {repeats}:")
    for label, data in cases.items():
        size = len(normalize(data).data) >> 10
        seconds = cpu(lambda data=data: normalize(data), repeats)
        print(f"  {label:28} {seconds * 1000:7.0f} ms   {len(data) >> 10:6} KiB -> {size:6} KiB")
    worst = cases["orientation 6 + Adobe RGB"]
    for side in (2048, 1024):  # 2048 decodes at full size (4000/2 < 2048); 1024 at half (draft)
        seconds = cpu(lambda side=side: normalize(worst, max_side=side), repeats)
        print(f"  {f'the same, max_side = {side}':28} {seconds * 1000:7.0f} ms")

    output = photo(2048, 2048)
    png, jpeg = encode(output, "PNG"), encode(output, "JPEG", quality=90)
    print(f"embed() / convert() on a 2K (2048x2048) output, CPU median of {repeats}:")
    for label, data, mime in (("PNG", png, "image/png"), ("JPEG", jpeg, "image/jpeg")):
        seconds = cpu(lambda data=data, mime=mime: embed(data, mime, INFO), repeats)
        print(f"  embed {label:4} ({len(data) >> 10:5} KiB)     {seconds * 1000:8.2f} ms")
    for target in ("webp", "jpeg"):
        seconds = cpu(lambda target=target: convert(png, "image/png", target, 90), repeats)
        print(f"  convert PNG -> {target:5}         {seconds * 1000:8.0f} ms")

    with tempfile.TemporaryDirectory() as folder:
        for i in range(10):
            Path(folder, f"in{i}.jpg").write_bytes(worst)
        answer = subprocess.run(
            [sys.executable, __file__, "--rss-child", folder], capture_output=True, text=True, check=True
        ).stdout.split()
    baseline, peak, wall = float(answer[0]), float(answer[1]), answer[2]
    print("10 x the 12 MP worst case (orientation 6 + Adobe RGB + GPS) normalised at once, 10 threads:")
    extra = peak - baseline
    print(f"  RSS before {baseline:.0f} MiB, peak {peak:.0f} MiB: {extra:.0f} MiB for the 10 ({wall} s wall)")


if __name__ == "__main__":
    main()

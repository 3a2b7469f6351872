"""The journal at scale: size, `status --json` time, start-up to the first POST, pruning (issue #20).

    .venv/bin/python tests/benchmarks/journal_bench.py                  # 100,000 and 1,000,000 prompts
    .venv/bin/python tests/benchmarks/journal_bench.py --sizes 20000    # a quick sanity run

For each size a synthetic journal is built (the real schema, through `Store`; rows shaped like a
real run's: inputs, references, outputs, manifests, about 0.9 KB a prompt as issue #20 measured;
96 % done, 4 % failed; finished over the past `--span-days`, so the default 90 days keeps about a
quarter), then measured:

- size on disk (journal + WAL);
- `scenario-watch status --json -c CONFIG`: wall time of the whole command (Python start-up
  included), median of `--runs`, and an empty journal's time beside it (the floor);
- start-up to the first POST: `scenario-watch run -c CONFIG` started with one prompt already in the
  inbox, timed from Popen to the sandbox (a thread of this process) receiving the generate POST;
- pruning (when the store has it): every prompt finished more than keep_days ago removed in
  batches as the daemon does, rows/s and the slowest batch, the space given back, the size after,
  and `status --json` again.

Figures are with the page cache warm (the journal was just written). Not collected by pytest.

Measured on 2 CPUs shared with other work (Python 3.11.7, SQLite 3.40.1; medians of 7 `status` runs
and 5 starts), journal version 1 (before retention) -> version 2:

    prompts    size        status --json      start-up to first POST
    0          0.05 MB     388 -> 247 ms      355 -> 320 ms
    100,000    143 MB      681 -> 301 ms      465 -> 304 ms
    1,000,000  1,425 MB    3,173 -> 317 ms    1,035 -> 367 ms

Version 2 is 3.4 % bigger (1,474 B a prompt: its indexes). Pruning all but 90 of 365 days at
1,000,000: 753,540 rows at 20,000 rows/s (a batch of 200: 2.9 ms median, 71 ms at most), the space
given back in 30 s of 1,050 steps (3.1 ms median, 128 ms at most), 1,475 -> 373 MB; then `status`
243 ms, start-up 366 ms. Migrating a 1,000,000-prompt journal from version 1: 3.4 s, once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import KEY, SECRET, Api, Daemon, body_of, make_root, wait_until, write_config

from scenario_watch.journal.retention import BATCH
from scenario_watch.journal.store import Store

DAY = 86400.0
KEEP_DAYS = 90.0
JOBS = {"max_in_flight": 8, "poll_interval": 0.25, "poll_max_interval": 1.0}


def hexes(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def rows(n: int, now: float, span_days: float, seed: int = 20) -> Iterator[tuple[Any, ...]]:
    """n finished, filed prompts shaped like a real run's, finished over the past span_days."""
    rng = random.Random(seed)
    for i in range(1, n + 1):
        finished = now - 3600 - (n - i) / n * span_days * DAY  # oldest first, like ids
        claimed, submitted = finished - 40.0, finished - 35.0
        name = f"batch-{i // 1000:04d}/photo-{i:07d}.json"
        failed = i % 25 == 0
        asset = f"asset_{hexes(rng, 96)}"
        ref_sha = hexes(rng, 256)
        inputs = {
            "prompt": f"a watercolour portrait of the person in the photo, soft light, number {i}",
            "aspectRatio": "4:5",
            "numOutputs": 2,
            "referenceImages": [asset],
        }
        refs = [{"file": f"photo-{i:07d}.jpg", "sha256": ref_sha, "size": 2_400_000, "assetId": asset}]
        outs = [f"photo-{i:07d}-{k}.png" for k in (1, 2)]
        delivered = [
            {
                "file": o,
                "assetId": f"asset_{hexes(rng, 96)}",
                "mimeType": "image/png",
                "sha256": hexes(rng, 256),
            }
            for o in outs
        ]
        state = "failed" if failed else "done"
        folder = "failed" if failed else "done"
        yield (
            i,
            name,
            f"/srv/scenario-watch/inbox/.processing/d1/{name}",
            state,
            json.dumps(inputs, sort_keys=True),
            f"photo-{i:07d}",
            None if failed else f"photo-{i:07d}",
            f"job_{hexes(rng, 96)}",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(submitted - 1)),
            1,
            None if i % 50 == 0 else 5.0,  # a failed generation is refunded: half the failed ones
            "[]" if failed else json.dumps([d["assetId"] for d in delivered]),
            "[]" if failed else json.dumps(outs),
            json.dumps(refs),
            "generation" if failed else None,
            "the job failed at Scenario" if failed else None,
            "try again later, or change the prompt" if failed else None,
            f"/srv/scenario-watch/{folder}/{name}",
            1.0,
            None if i % 3 else "portraits",
            "ran" if i % 10 == 0 else None,
            submitted,
            None,
            0,
            "[]" if failed else json.dumps(delivered),
            0,
            hexes(rng, 256),
            claimed,
            submitted,
            finished,
            finished,
        )


COLUMNS = (
    "id, file, claimed, state, inputs, stem, out_stem, job_id, submit_started, submit_attempts, cost,"
    " asset_ids, outputs, refs, stage, error, hint, final_path, progress, preset, hook, sent_at,"
    " lost_since, download_attempts, delivered, answered, file_sha256, claimed_at, submitted_at,"
    " finished_at, updated_at"
)


def build(path: Path, n: int, span_days: float) -> float:
    """Create the journal through Store (its schema, version, pragmas) and fill it; seconds taken."""
    t0 = time.monotonic()
    Store(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    marks = ", ".join("?" for _ in COLUMNS.split(","))
    db.execute("BEGIN")
    db.executemany(f"INSERT INTO prompts ({COLUMNS}) VALUES ({marks})", rows(n, time.time(), span_days))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.monotonic() - t0


def size_mb(path: Path) -> float:
    """Journal + WAL + shared memory, MB."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            total += p.stat().st_size
    return total / 1e6


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SCENARIO_", "CREDENTIALS_"))}
    e.update(SCENARIO_API_KEY=KEY, SCENARIO_API_SECRET=SECRET)
    return e


def status_time(config: Path, runs: int) -> tuple[float, dict[str, Any]]:
    """Median wall seconds of `status --json` (a process each time) and its last report."""
    times, report = [], {}
    for _ in range(runs):
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "scenario_watch", "status", "--json", "-c", str(config)],
            env=env(),
            capture_output=True,
            text=True,
            check=True,
        )
        times.append(time.monotonic() - t0)
        report = json.loads(out.stdout)
    return statistics.median(times), report


def first_post(api: Api, root: Path, config: Path, tag: str) -> float:
    """Start the daemon with one prompt waiting: seconds from Popen to the sandbox receiving its POST."""
    (root / "inbox" / f"{tag}.json").write_bytes(body_of(tag))
    old = time.time() - 60
    os.utime(root / "inbox" / f"{tag}.json", (old, old))  # settled long ago: taken at the start-up scan
    daemon = Daemon(root, config)
    try:
        posts = wait_until(
            lambda: daemon.alive() or [p for p in api.posts(daemon.started) if tag in json.dumps(p.body)],
            60,
            "the first POST",
            0.002,
        )
        return float(posts[0].time - daemon.started)
    finally:
        daemon.stop()


def startup_time(api: Api, root: Path, config: Path, runs: int, label: str) -> list[float]:
    """Start-up to the first POST, `runs` times (the first one warms the schema cache)."""
    return [first_post(api, root, config, f"{label}-{k}") for k in range(runs)]


def prune(path: Path, keep_days: float) -> dict[str, float]:
    """Prune as the daemon's retention does (batches, then the space given back)."""
    store = Store(path)
    try:
        before = time.time() - keep_days * DAY
        removed, batches, t0 = 0, [], time.monotonic()
        while True:  # as Retention.tick does: batches while any row goes, then the space
            b0 = time.monotonic()
            n = store.prune(before, BATCH)
            batches.append(time.monotonic() - b0)
            removed += n
            if n == 0:
                break
        pruning = time.monotonic() - t0
        g0, steps = time.monotonic(), []
        while True:
            s0 = time.monotonic()
            more = store.give_back()
            steps.append(time.monotonic() - s0)
            if not more:
                break
        giving = time.monotonic() - g0
    finally:
        store.close()
    return {
        "removed": removed,
        "seconds": pruning,
        "rows_per_s": removed / pruning if pruning else 0.0,
        "batch_ms": statistics.median(batches) * 1000,
        "slowest_batch_ms": max(batches) * 1000,
        "give_back_s": giving,
        "give_back_steps": len(steps),
        "give_back_ms": statistics.median(steps) * 1000,
        "slowest_give_back_ms": max(steps) * 1000,
    }


def measure(api: Api, base: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    root = make_root(base, f"n{n}")
    config = write_config(root, api.base_url, JOBS)
    journal = root / "state" / "journal.sqlite3"
    res: dict[str, Any] = {"n": n}
    if n:
        res["build_s"] = build(journal, n, args.span_days)
    else:
        Store(journal).close()
    res["size_mb"] = size_mb(journal)
    res["status_s"], report = status_time(config, args.runs)
    res["counts"] = report["counts"]
    res["startup_s"] = startup_time(api, root, config, args.starts, f"n{n}")
    if n:
        res["prune"] = prune(journal, args.keep_days)
        res["size_after_mb"] = size_mb(journal)
        res["status_after_s"], after = status_time(config, args.runs)
        res["counts_after"] = after["counts"]
        res["startup_after_s"] = startup_time(api, root, config, args.starts, f"n{n}-after")
    shutil.rmtree(root, ignore_errors=True)
    return res


def show(res: dict[str, Any]) -> None:
    n = res["n"]
    line = "  {:<24}{}".format
    print(f"\n== {n:,} finished prompts ==")
    if "build_s" in res:
        print(line("built in", f"{res['build_s']:.1f} s"))
    print(line("journal size", f"{res['size_mb']:.1f} MB ({res['size_mb'] * 1e6 / max(n, 1):.0f} B/prompt)"))
    print(line("status --json", f"{res['status_s'] * 1000:.0f} ms median (target <= 500 ms)"))
    print(line("counts", res["counts"]))
    starts = ", ".join(f"{s * 1000:.0f}" for s in res["startup_s"])
    median = statistics.median(res["startup_s"]) * 1000
    print(line("start-up to first POST", f"{median:.0f} ms median ({starts} ms) (target <= 1000 ms)"))
    if "prune" not in res:
        return
    p = res["prune"]
    rate = f"{p['removed']:,} rows in {p['seconds']:.1f} s = {p['rows_per_s']:,.0f} rows/s"
    batch = f"a batch of {BATCH} {p['batch_ms']:.1f} ms median, {p['slowest_batch_ms']:.1f} ms at most"
    print(line("pruned", f"{rate}; {batch}"))
    steps = f"{p['give_back_s']:.1f} s in {p['give_back_steps']} steps"
    each = f"{p['give_back_ms']:.1f} ms median, {p['slowest_give_back_ms']:.1f} ms at most"
    print(line("space given back", f"{steps}, {each}"))
    print(line("size after", f"{res['size_after_mb']:.1f} MB"))
    print(line("status --json after", f"{res['status_after_s'] * 1000:.0f} ms median"))
    print(line("counts after", res["counts_after"]))
    starts = ", ".join(f"{s * 1000:.0f}" for s in res["startup_after_s"])
    median = statistics.median(res["startup_after_s"]) * 1000
    print(line("start-up after", f"{median:.0f} ms median ({starts} ms)"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="100000,1000000", help="journal sizes (finished prompts), comma-separated"
    )
    parser.add_argument("--runs", type=int, default=5, help="status --json runs per measurement (median)")
    parser.add_argument("--starts", type=int, default=3, help="daemon starts per measurement")
    parser.add_argument("--span-days", type=float, default=365.0, help="finished over this many past days")
    parser.add_argument("--keep-days", type=float, default=KEEP_DAYS, help="[journal] keep_days for pruning")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sw-journal-bench-"))
    api = Api("thread", generation_seconds=5.0)
    results = []
    try:
        print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
        for n in [0, *(int(s) for s in args.sizes.split(","))]:
            res = measure(api, base, n, args)
            show(res)
            results.append(res)
    finally:
        api.stop()
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

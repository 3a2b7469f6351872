"""Benchmark the real daemon against the sandbox; print each figure beside its target (issues #6, #11).

    .venv/bin/python tests/benchmarks/bench.py            # full run, about 6 minutes
    .venv/bin/python tests/benchmarks/bench.py --quick    # smaller N, 5 s idle window: a sanity run
    .venv/bin/python tests/benchmarks/bench.py --profile /tmp/drain.txt [--quick] [--native]
        # no figures: one C=16 drain with the daemon started under `py-spy record` (all threads,
        # start-up included, idle samples left out), its collapsed stacks written to the file and
        # the top costs printed (needs py-spy on PATH or beside this Python, and ptrace rights)
    .venv/bin/python tests/benchmarks/bench.py --listener [ROUNDS] [--quick]
        # no other figures: cold C=16 drains with [http] listen on and /metrics scraped every 5 s,
        # alternated with drains without it; CPU per job of each (issue #20: at most 1 ms more)

Figures: pickup latency (moved in, written in place); the main drain (N=200, G=1 s, C=16) by a
daemon started just for it, its CPU counted from process start (/proc/<pid>/stat utime + stime at
the end of the drain, divided by N; start-up CPU shown apart), drain efficiency, polls per job; the
same drain with the sandbox's statusHistory carrying no terminal entry (knob terminal_history=false);
C>=N, idle CPU, a 10,000-file backlog; and two baselines on the same sandbox: a sequential
`requests` loop and the inotifywait | curl | jq shell loop (shell_loop.sh; skipped with a reason
when inotify-tools, curl or jq are missing). The daemon runs as a real subprocess (`python -m
scenario_watch run -c CONFIG`, JSON logs at level info: what users run); the main drains start
cold (ready = its `daemon.started` line), the other daemons are warmed up (one prompt done) before
they are measured. Not collected by pytest (pyproject: norecursedirs).

The sandbox runs in a thread of this process by default: measured against `--sandbox process` (its
own process; CLOCK_MONOTONIC is system-wide, checked at start) the pickup figures were the same
within noise (K=200: median 3.0 / 3.0 ms thread vs 3.1 / 2.7 ms process; p99 9.3 / 9.2 vs 9.4 / 7.3).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

import scenario_watch
from scenario_watch.intake.watcher import filesystem_type
from scenario_watch.sandbox import Sandbox

KEY, SECRET = "sandbox-key", "sandbox-secret"
MODEL = "model_google-gemini-pro-image-editing"
HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
QUOTED_SHELL = {"pickup_median": 8.0, "pickup_p99": 21.0, "drain": 13.4}  # the figures
LOG_LEVEL = "info"  # what users run (issue #11); every daemon of the benchmark logs at this level
READY = '"daemon.started"'  # the JSON log line written once the start-up scan is done
G, C = 1.0, 16  # the main drain: generation seconds, max_in_flight
DRAIN_JOBS = {"max_in_flight": C, "poll_interval": 0.25, "poll_max_interval": 1.0}
FOLDERS = ("inbox", "outbox", "done", "failed", "state", "staging")
# A sandbox in its own process (--sandbox process): stdin closing stops it.
CHILD = """import json, sys, time
from scenario_watch.sandbox import Sandbox
sb = Sandbox(generation_seconds=float(sys.argv[1]), parallel_limit=int(sys.argv[2])).start()
print(json.dumps({"base_url": sb.base_url, "mono": time.monotonic()}), flush=True)
sys.stdin.read()
sb.stop()
"""


@dataclass(frozen=True)
class Scale:
    pickup_k: int = 200  # prompts per pickup series
    spacing: float = 0.05  # seconds between pickup drops
    diag_k: int = 20  # pickup prompts spaced 0.6 s (above watchdog's 0.5 s move-grouping delay)
    drain_n: int = 200
    seq_n: int = 20  # sequential baseline: measured on seq_n, extrapolated to drain_n
    idle_s: float = 30.0
    backlog_n: int = 10_000
    backlog_done: int = 100  # stop the backlog run after this many completions (or a time bound)


QUICK = Scale(pickup_k=40, diag_k=5, drain_n=48, seq_n=4, idle_s=5.0, backlog_n=2000, backlog_done=20)


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: Any
    time: float
    dry_run: bool = False  # an estimate (the first start's backlog figure, the budget): nothing paid


class Api:
    """The sandbox, in a thread of this process or in a process of its own."""

    def __init__(self, mode: str, generation_seconds: float, parallel_limit: int = 1000) -> None:
        self.sandbox: Sandbox | None = None
        self.proc: subprocess.Popen[str] | None = None
        if mode == "thread":
            self.sandbox = Sandbox(generation_seconds=generation_seconds, parallel_limit=parallel_limit)
            self.base_url = self.sandbox.start().base_url
            return
        before = time.monotonic()
        args = [sys.executable, "-c", CHILD, str(generation_seconds), str(parallel_limit)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        # CLOCK_MONOTONIC is system-wide on Linux: the child's reading must fall inside ours.
        if not before <= hello["mono"] <= time.monotonic():
            raise RuntimeError("the sandbox process's monotonic clock differs from ours")
        self.base_url = hello["base_url"]

    def requests(self, since: float = 0.0) -> list[Req]:
        if self.sandbox is not None:
            recs = [(r.server, r.method, r.path, r.query, r.body, r.time) for r in self.sandbox.requests]
        else:
            url = self.base_url.removesuffix("/v1") + "/_sandbox/requests"
            got = requests.get(url, timeout=60).json()
            recs = [(r["server"], r["method"], r["path"], r["query"], r["body"], r["time"]) for r in got]
        return [
            Req(m, p, b, t, dry_run=bool(q.get("dryRun")))
            for s, m, p, q, b, t in recs
            if s == "api" and t >= since
        ]

    def posts(self, since: float = 0.0) -> list[Req]:
        return [
            r for r in self.requests(since) if r.method == "POST" and "/generate/" in r.path and not r.dry_run
        ]

    def stop(self) -> None:
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return value


def make_root(base: Path, name: str) -> Path:
    root = base / name
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True)
    return root


def body_of(text: str) -> bytes:
    return json.dumps({"prompt": text}).encode()


def drop_moved(root: Path, text: str) -> float:
    """Write in staging (same filesystem), then rename into the inbox; t0 just before the rename."""
    staged = root / "staging" / f"{text}.json"
    staged.write_bytes(body_of(text))
    t0 = time.monotonic()
    os.rename(staged, root / "inbox" / staged.name)
    return t0


def drop_in_place(root: Path, text: str) -> float:
    t0 = time.monotonic()
    with open(root / "inbox" / f"{text}.json", "wb") as handle:
        handle.write(body_of(text))
    return t0


def count(folder: Path, prefix: str, suffix: str) -> int:
    return sum(1 for e in os.scandir(folder) if e.name.startswith(prefix) and e.name.endswith(suffix))


def write_config(
    root: Path, base_url: str, jobs: dict[str, float], extra: dict[str, dict[str, Any]] | None = None
) -> Path:
    """The daemon's config.toml for this root: [watch] settle 2 s, JSON logs at LOG_LEVEL."""
    config: dict[str, dict[str, Any]] = {
        "api": {"base_url": base_url, "request_timeout": 30.0},
        "folders": {name: str(root / name) for name in FOLDERS if name != "staging"},
        "jobs": jobs,
        "watch": {"settle": 2.0},
        "log": {"format": "json", "level": LOG_LEVEL},
        **(extra or {}),
    }
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """`python -m scenario_watch run -c CONFIG` in a subprocess, with /proc readings of it."""

    def __init__(self, root: Path, config: Path, wrapper: list[str] | None = None) -> None:
        """`wrapper`: a command that runs the daemon as its child (py-spy record ... --)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SCENARIO_", "CREDENTIALS_"))}
        env.update(SCENARIO_API_KEY=KEY, SCENARIO_API_SECRET=SECRET)
        self.log_path = root / "daemon.log"
        self.log = self.log_path.open("w")
        self.started = time.monotonic()
        cmd = [*(wrapper or []), sys.executable, "-m", "scenario_watch", "run", "-c", str(config)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        if wrapper:  # the daemon is the wrapper's child: read (and signal) that one
            self.pid = wait_until(lambda: self.alive() or self._child(), 30, "the wrapped daemon", 0.005)

    def _child(self) -> int:
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
        return 0

    def ready(self) -> bool:
        """Whether the daemon has logged `daemon.started` (workers up, journal resumed, inbox scanned)."""
        return READY in self.log_path.read_text()

    def alive(self) -> bool:
        """False while it runs (for `alive() or condition`); RuntimeError with its log once it exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the daemon exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        return False

    def cpu(self) -> float:
        """user + sys seconds of the whole process (all threads)."""
        return sum(self.times())

    def times(self) -> tuple[float, float]:
        """(user, sys) seconds of the whole process since it started (/proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK

    def status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def wakeups(self) -> int:
        """Context switches summed over the daemon's threads: how often it ran at all."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextmanager
def running(
    api: Api,
    root: Path,
    jobs: dict[str, float],
    warm: bool | None = True,
    wrapper: list[str] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Iterator[Daemon]:
    """A daemon on this root: warm (one prompt done), cold (just past its `daemon.started` line) or,
    with warm=None, just started. `extra`: more config sections ([http], [metrics])."""
    daemon = Daemon(root, write_config(root, api.base_url, jobs, extra), wrapper)
    try:
        if warm:
            text = f"warmup-{root.name}"
            drop_moved(root, text)
            wait_until(lambda: daemon.alive() or count(root / "done", text, ".json"), 30, "the warm-up", 0.02)
        elif warm is False:
            wait_until(lambda: daemon.alive() or daemon.ready(), 30, "daemon.started", 0.005)
        yield daemon
    finally:
        daemon.stop()


@contextmanager
def shell_loop(api: Api, root: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (root / "shell.log").open("w")
    args = ["bash", str(HERE / "shell_loop.sh"), *(str(root / f) for f in ("inbox", "outbox"))]
    proc = subprocess.Popen(
        [*args, api.base_url, KEY, SECRET], stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_until(lambda: "Watches established" in (root / "shell.log").read_text(), 10, "inotifywait")
        drop_moved(root, f"warmup-{root.name}")
        wait_until(lambda: count(root / "outbox", "warmup", ".done"), 30, "the shell loop's warm-up")
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the loop and its background pollers (own group)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
                break
        log.close()


def first_posts(api: Api, since: float) -> dict[str, float]:
    seen: dict[str, float] = {}
    for r in api.posts(since):
        if isinstance(r.body, dict):
            seen.setdefault(str(r.body.get("prompt")), r.time)
    return seen


def pickup(api: Api, root: Path, tag: str, k: int, spacing: float, in_place: bool = False) -> list[float]:
    """Latency (ms) from the rename (or open) to the generate POST's arrival, for k prompts."""
    drop = drop_in_place if in_place else drop_moved
    time.sleep(1.0)  # start clean: earlier claims' events are out of watchdog's 0.5 s move-grouping queue
    since = time.monotonic()
    t0s = {}
    for i in range(k):
        text = f"{tag}-{i:04d}"
        t0s[text] = drop(root, text)
        time.sleep(spacing)
    wait_until(lambda: t0s.keys() <= first_posts(api, since).keys(), 30, f"{tag} POSTs", 0.2)
    seen = first_posts(api, since)
    return [(seen[text] - t0) * 1000 for text, t0 in t0s.items()]


def drain(
    api: Api, root: Path, tag: str, n: int, suffix: str, daemon: Daemon | None = None
) -> dict[str, float]:
    """Move n prompts in at once; wall time until n results (`suffix` files) are in the outbox."""
    for i in range(n):
        (root / "staging" / f"{tag}-{i:04d}.json").write_bytes(body_of(f"{tag}-{i:04d}"))
    cpu0 = daemon.cpu() if daemon else 0.0
    t0 = time.monotonic()
    for i in range(n):
        os.rename(root / "staging" / f"{tag}-{i:04d}.json", root / "inbox" / f"{tag}-{i:04d}.json")
    wait_until(lambda: count(root / "outbox", tag, suffix) >= n, 300, f"{n} {tag} results", 0.02)
    wall = time.monotonic() - t0
    user, system = daemon.times() if daemon else (0.0, 0.0)
    cpu_end = user + system
    polls = Counter(r.path for r in api.requests(t0) if r.method == "GET" and r.path.startswith("/v1/jobs/"))
    return {
        "wall": wall,
        "cpu_per_job": (cpu_end - cpu0) / n,  # the drain alone
        "cpu_total": cpu_end,  # since process start
        "user": user,
        "sys": system,
        "polls": sum(polls.values()) / n,
        "max_polls": max(polls.values()),
    }


def set_knobs(api: Api, **values: Any) -> None:
    """Turn sandbox knobs over HTTP (the same for a sandbox thread or process)."""
    url = api.base_url.removesuffix("/v1") + "/_sandbox/knobs"
    resp = requests.post(url, json=values, timeout=10)
    resp.raise_for_status()


def cold_drain(
    api: Api, base: Path, key: str, n: int, jobs: dict[str, float], idle_s: float = 0.0
) -> dict[str, Any]:
    """A daemon started for this drain: start-up CPU at `daemon.started`, total CPU at the end / n.

    With idle_s, the same daemon's idle CPU is measured after the drain (not counted in the drain).
    """
    root = make_root(base, key)
    with running(api, root, jobs, warm=False) as daemon:
        ready, startup = time.monotonic() - daemon.started, daemon.cpu()
        res: dict[str, Any] = drain(api, root, key, n, ".manifest.json", daemon)
        res.update(startup_cpu=startup, ready=ready, cpu_from_start=res["cpu_total"] / n)
        res["efficiency"] = -(-n // int(jobs["max_in_flight"])) * G / res["wall"]
        if idle_s:
            res["idle"] = idle(api, daemon, idle_s)
    return res


def idle(api: Api, daemon: Daemon, seconds: float) -> dict[str, float]:
    time.sleep(1.0)  # let the last timers and filings finish
    cpu0, wake0, t0 = daemon.cpu(), daemon.wakeups(), time.monotonic()
    time.sleep(seconds)
    cpu, wake = daemon.cpu() - cpu0, daemon.wakeups() - wake0
    span = time.monotonic() - t0
    return {
        "cpu_ms": cpu * 1000,
        "share": cpu / span,
        "wakeups": wake / span,
        "requests": len(api.requests(t0)),
    }


def backlog(api: Api, base: Path, n: int, done_target: int) -> dict[str, float]:
    """n files waiting at start: first POST after Popen, peak RSS; stopped after done_target jobs."""
    root = make_root(base, "backlog")
    for i in range(n):
        (root / "inbox" / f"b-{i:05d}.json").write_bytes(body_of(f"backlog prompt {i}"))
    with running(api, root, DRAIN_JOBS, warm=None) as daemon:
        first = wait_until(lambda: daemon.alive() or api.posts(daemon.started), 30, "the first POST", 0.005)
        result = {"first_post": first[0].time - daemon.started, "claimed_all": 0.0}
        deadline = daemon.started + 120
        while time.monotonic() < deadline:
            daemon.alive()
            left = count(root / "inbox", "b-", ".json")
            if left == 0 and not result["claimed_all"]:
                result["claimed_all"] = time.monotonic() - daemon.started
            if left == 0 and count(root / "done", "b-", ".json") >= done_target:
                break
            time.sleep(0.25)
        result.update(hwm_mb=daemon.status_kb("VmHWM") / 1024, claimed=n - left)
        result.update(done=count(root / "done", "b-", ".json"), ran=time.monotonic() - daemon.started)
    return result


def sequential(api: Api, base: Path, n: int) -> float:
    """The plain loop: submit, poll every 1 s, download, next; wall seconds for n prompts."""
    root = make_root(base, "sequential")
    session = requests.Session()
    session.auth = (KEY, SECRET)
    for i in range(n):
        (root / "inbox" / f"s-{i:03d}.json").write_bytes(body_of(f"sequential {i}"))
    t0 = time.monotonic()
    for path in sorted((root / "inbox").iterdir()):
        headers = {"Content-Type": "application/json"}
        url = f"{api.base_url}/generate/custom/{MODEL}"
        job = session.post(url, data=path.read_bytes(), headers=headers, timeout=30).json()["job"]
        for _ in range(300):
            time.sleep(1.0)
            job = session.get(f"{api.base_url}/jobs/{job['jobId']}", timeout=30).json()["job"]
            if job["status"] in ("success", "failure", "canceled"):
                break
        for k, asset in enumerate(job["metadata"]["assetIds"], 1):
            asset_url = session.get(f"{api.base_url}/assets/{asset}", timeout=30).json()["asset"]["url"]
            (root / "outbox" / f"{path.stem}_{k}.png").write_bytes(
                requests.get(asset_url, timeout=30).content
            )
    return time.monotonic() - t0


def stats(values: list[float]) -> dict[str, float]:
    p99 = statistics.quantiles(values, n=100, method="inclusive")[98]
    return {"median": statistics.median(values), "p99": p99, "max": max(values)}


def byte_compile() -> str:
    """Byte-compile the package the daemon runs, as `pip install` does. A checkout installed in editable
    mode, under PYTHONDONTWRITEBYTECODE, would compile every module at each daemon start (about 45 ms of
    CPU), which is not what an installed daemon does."""
    package = Path(scenario_watch.__file__).parent
    compileall.compile_dir(package, quiet=1)
    return f"byte-compiled {package} (as an install does)"


def machine(base: Path, mode: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "?")
    git = ["git", "-C", str(HERE.parent.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--porcelain", "scenario_watch"], capture_output=True, text=True)
    changed = " ".join(line[3:] for line in dirty.stdout.splitlines()) or "none"
    return (
        f"machine: {model}, {os.cpu_count()} cores | Python {platform.python_version()} | "
        f"kernel {platform.release()} | temp fs {filesystem_type(base)} | sandbox in a {mode}\n"
        f"code: HEAD {head.strip()}, uncommitted changes under scenario_watch/: {changed}"
    )


class Table:
    def __init__(self, *head: str) -> None:
        self.rows: list[tuple[str, ...]] = [head, ("---",) * len(head)]

    def add(self, *cells: str) -> None:
        self.rows.append(cells)

    def check(
        self, figure: str, value: float, limit: float, unit: str, fmt: str = ".1f", low: bool = True
    ) -> None:
        """A figure beside its target; a miss says by how much (measured / target)."""
        ok = value <= limit if low else value >= limit
        verdict = "pass" if ok else f"MISS ({value / limit:.2f}x the target)"
        self.add(figure, f"{value:{fmt}} {unit}", f"{'≤' if low else '≥'} {limit:{fmt}} {unit}", verdict)

    def print(self, title: str) -> None:
        print(f"\n### {title}\n")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


@contextmanager
def sandbox(mode: str, generation_seconds: float) -> Iterator[Api]:
    api = Api(mode, generation_seconds)
    try:
        yield api
    finally:
        api.stop()


def run(args: argparse.Namespace, base: Path, sc: Scale, skip_shell: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    pickup_jobs = {"max_in_flight": 64, "poll_interval": 0.1, "poll_max_interval": 0.4}
    tight_jobs = {**DRAIN_JOBS, "poll_interval": 0.05, "poll_max_interval": 0.1}
    print(f"pickup: G=0.2 s, [jobs] {pickup_jobs}, K={sc.pickup_k} spaced {sc.spacing * 1000:g} ms")
    print(f"drain: N={sc.drain_n}, G={G:g} s, [jobs] {DRAIN_JOBS}, cold start; again with the sandbox's")
    print(f"  terminal_history=false; then max_in_flight={sc.drain_n} (warm)")
    print(f"diagnostic drain: [jobs] {tight_jobs} (warm); backlog: [jobs] {DRAIN_JOBS}")
    print(f"every daemon: [watch] settle=2.0, [log] json at level {LOG_LEVEL}; sandbox parallel_limit 1000")
    with sandbox(args.sandbox, 0.2) as api:
        root = make_root(base, "pickup")
        with running(api, root, pickup_jobs):
            res["moved"] = stats(pickup(api, root, "moved", sc.pickup_k, sc.spacing))
            res["inplace"] = stats(pickup(api, root, "inplace", sc.pickup_k, sc.spacing, in_place=True))
            res["spaced"] = stats(pickup(api, root, "spaced", sc.diag_k, 0.6))
        print(f"pickup: {res['moved']}", flush=True)
        if not skip_shell:
            root = make_root(base, "shell-pickup")
            with shell_loop(api, root):
                res["shell_pickup"] = stats(pickup(api, root, "moved", sc.pickup_k, sc.spacing))
                # Its own latency, unsaturated: forking curl + jq per file and per poll cannot keep up
                # with a file every 50 ms on a small machine, so its queue (and latency) grows.
                res["shell_slow"] = stats(pickup(api, root, "slow", sc.pickup_k // 5, 0.25))
    with sandbox(args.sandbox, G) as api:
        res["d16"] = cold_drain(api, base, "d16", sc.drain_n, DRAIN_JOBS, sc.idle_s)
        print(f"drain d16: {res['d16']}", flush=True)
        set_knobs(api, terminal_history=False)
        res["d16_noterm"] = cold_drain(api, base, "noterm", sc.drain_n, DRAIN_JOBS)
        set_knobs(api, terminal_history=True)
        print(f"drain d16, no terminal history: {res['d16_noterm']}", flush=True)
        root = make_root(base, "dN")
        with running(api, root, {**DRAIN_JOBS, "max_in_flight": sc.drain_n}) as daemon:
            res["dN"] = drain(api, root, "dN", sc.drain_n, ".manifest.json", daemon)
        print(f"drain dN: {res['dN']}", flush=True)
        root = make_root(base, "tight")
        with running(api, root, tight_jobs) as daemon:
            res["tight"] = drain(api, root, "tight", sc.drain_n, ".manifest.json", daemon)
        if not skip_shell:
            root = make_root(base, "shell-drain")
            with shell_loop(api, root):
                res["shell_drain"] = drain(api, root, "sh", sc.drain_n, ".done")
            print(f"shell drain: {res['shell_drain']}", flush=True)
        res["seq"] = sequential(api, base, sc.seq_n)
    with sandbox(args.sandbox, G) as api:
        res["backlog"] = backlog(api, base, sc.backlog_n, sc.backlog_done)
    return res


def trio(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} / {s['p99']:.1f} / {s['max']:.1f} ms"


def times(baseline: float, ours: float) -> str:
    return f"{baseline / ours:.2f}x"


def report(sc: Scale, res: dict[str, Any], skip_shell: str) -> None:
    t = Table("figure", "measured", "target", "result")
    mv, d16, nt, dn, tight, bl = (res[k] for k in ("moved", "d16", "d16_noterm", "dN", "tight", "backlog"))
    idle = d16["idle"]
    t.check("pickup, moved in: median (#17)", mv["median"], 3.0, "ms")
    t.check("pickup, moved in: p99", mv["p99"], 20.0, "ms")
    t.add("pickup, moved in: median / p99 / max", trio(mv), "", "info")
    t.add("pickup, written in place: median / p99 / max", trio(res["inplace"]), "(separately)", "info")
    t.add(f"pickup, moved in, spaced 600 ms, K={sc.diag_k}", trio(res["spaced"]), "(diagnostic)", "info")
    ideal = -(-sc.drain_n // C) * G
    main = f"drain N={sc.drain_n}, G={G:g} s, C={C}"
    t.add(f"{main}: wall", f"{d16['wall']:.2f} s", f"ideal ceil(N/C) x G = {ideal:g} s", "info")
    t.check(f"{main}: efficiency (ideal / wall, #17)", d16["efficiency"], 0.975, "", ".3f", low=False)
    t.check(f"{main}: within 1.1 x ideal (DESIGN)", d16["efficiency"], 1 / 1.1, "", ".3f", low=False)
    t.check(f"{main}: CPU per job, from process start (#17)", d16["cpu_from_start"] * 1000, 8.0, "ms", ".2f")
    t.add(
        "  of which start-up (to `daemon.started`)",
        f"{d16['startup_cpu'] * 1000:.0f} ms CPU, ready in {d16['ready']:.2f} s",
        f"(/ N = {d16['startup_cpu'] / sc.drain_n * 1000:.2f} ms/job)",
        "info",
    )
    t.add("  drain alone (end - start-up) per job", f"{d16['cpu_per_job'] * 1000:.2f} ms", "", "info")
    split = f"{d16['user']:.2f} s user + {d16['sys']:.2f} s sys"
    t.add("  whole process at the end of the drain", split, "", "info")
    t.check(f"{main}: polls per job (#17)", d16["polls"], 1.3, "", ".2f")
    t.add("  max polls of one job", f"{d16['max_polls']:.0f}", "", "info")
    nt_main = f"{main}, statusHistory without terminal entry"
    t.check(f"{nt_main}: polls per job", nt["polls"], 1.5, "", ".2f")
    got = (
        f"max polls {nt['max_polls']:.0f}, efficiency {nt['efficiency']:.3f}, "
        f"{nt['cpu_from_start'] * 1000:.2f} ms CPU/job from start"
    )
    t.add("  same drain: also", got, "", "info")
    shell = res.get("shell_drain", {}).get("wall")
    limits = [x for x in (shell, QUOTED_SHELL["drain"] if sc.drain_n == 200 else None) if x]
    limit = min(limits) if limits else float("nan")  # beat both the measured and the quoted shell loop
    t.check(f"drain C={sc.drain_n} (>= N): wall, vs the shell loop", dn["wall"], limit, "s", ".2f")
    t.add("  CPU per job (C=N, warm, drain alone)", f"{dn['cpu_per_job'] * 1000:.2f} ms", "", "info")
    t.check(f"idle CPU over {sc.idle_s:g} s (≤ 0.1 % of a core)", idle["cpu_ms"], sc.idle_s, "ms", ".0f")
    wake = f"{idle['wakeups']:.1f}/s / {idle['requests']}"
    t.add("idle: wakeups (all threads) / API requests", wake, "no busy loop / 0", "info")
    t.check(f"backlog {sc.backlog_n}: first POST after start", bl["first_post"], 1.0, "s", ".3f")
    t.check(f"backlog {sc.backlog_n}: peak RSS (VmHWM)", bl["hwm_mb"], 150.0, "MB", ".1f")
    claimed = f"all in {bl['claimed_all']:.1f} s" if bl["claimed_all"] else f"{bl['claimed']:.0f}"
    got = f"{claimed} / {bl['done']:.0f} done at {bl['ran']:.1f} s"
    t.add("backlog: claimed / done when stopped", got, f"(stop at {sc.backlog_done} done, ≤120 s)", "info")
    eff = f"{tight['wall']:.2f} s, efficiency {ideal / tight['wall']:.3f}, {tight['polls']:.1f} polls/job"
    t.add(
        "drain C=16 polling 0.05 s → 0.1 s (warm)",
        f"{eff}, {tight['cpu_per_job'] * 1000:.2f} ms CPU/job (drain alone)",
        "",
        "info",
    )
    t.print("Figures")

    b = Table("loop", "pickup median / p99 / max", f"drain N={sc.drain_n}, G=1 s", "baseline / daemon")
    seq = res["seq"] * sc.drain_n / sc.seq_n
    drain = f"{seq:.1f} s (extrapolated: {sc.seq_n} took {res['seq']:.2f} s)"
    ratio = f"drain {times(seq, d16['wall'])} (C=16), {times(seq, dn['wall'])} (C=N)"
    b.add("sequential Python (requests, poll every 1 s)", "n/a (not a watcher)", drain, ratio)
    if skip_shell:
        b.add("shell loop (shell_loop.sh)", f"skipped: {skip_shell}", "", "")
    else:
        sp, sd = res["shell_pickup"], res["shell_drain"]
        ratio = f"pickup {times(sp['median'], mv['median'])} median, {times(sp['p99'], mv['p99'])} p99"
        ratio += f"; drain {times(sd['wall'], dn['wall'])} (C=N)"
        drain = f"{sd['wall']:.2f} s, {sd['polls']:.2f} polls/job"
        b.add("shell loop (inotifywait, curl, jq; poll every 1 s)", trio(sp), drain, ratio)
        slow = res["shell_slow"]
        ratio = f"pickup {times(slow['median'], mv['median'])} median, {times(slow['p99'], mv['p99'])} p99"
        b.add(f"shell loop, prompts spaced 250 ms (K={sc.pickup_k // 5})", trio(slow), "", ratio)
    q = QUOTED_SHELL
    ratio = (
        f"pickup {times(q['pickup_median'], mv['median'])} median, {times(q['pickup_p99'], mv['p99'])} p99"
    )
    ratio += f"; drain {times(q['drain'], dn['wall'])} (C=N)"
    b.add("shell loop as quoted in the issue", "8 / 21 ms", "13.4 s (N=200)", ratio)
    b.add("scenario-watch", trio(mv), f"{d16['wall']:.2f} s (C=16), {dn['wall']:.2f} s (C=N)", "1x")
    b.print("Baselines (same sandbox, same machine; >1x: the daemon is faster)")


LISTENER_SCRAPE = 5.0  # seconds between scrapes of /metrics (Prometheus' default is 15 s: this is 3x)


@contextmanager
def scraping(url: str, every: float) -> Iterator[list[float]]:
    """Scrape `url` now and every `every` seconds in a thread, as Prometheus would; the answer times."""
    stop = threading.Event()
    times: list[float] = []

    def scrape() -> None:
        while True:
            t0 = time.monotonic()
            requests.get(url, timeout=30).raise_for_status()
            times.append(time.monotonic() - t0)
            if stop.wait(every):
                return

    thread = threading.Thread(target=scrape, name="scraper", daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_work(jobs: int = 20_000, scrapes: int = 200) -> tuple[float, float]:
    """In this process: CPU (ms) of one job's metric events (claim, 5 requests, end) and of one render."""
    from scenario_watch.shell.metrics import Metrics, Snapshot

    api, cdn = "http://127.0.0.1:1/v1", "http://127.0.0.1:2"
    m = Metrics(presets=["recolor"], base_url=api, budget_daily=1000)
    m.set_snapshot(lambda: Snapshot(in_flight=16, waiting={"slot": 184}, budget_remaining=500.0))
    calls = [("POST", f"{api}/generate/custom/m"), ("GET", f"{api}/jobs/j"), ("GET", f"{api}/jobs/j")]
    calls += [("GET", f"{api}/assets/a"), ("GET", f"{cdn}/assets/a?sig=x")]
    t0 = time.process_time()
    for _ in range(jobs):
        m.prompt_taken(None)
        for method, url in calls:
            m.api_response(method, url, 200)
        m.prompt_finished("done", cost=5, duration=1.0)
    per_job = (time.process_time() - t0) / jobs * 1000
    t0 = time.process_time()
    for _ in range(scrapes):
        m.render()
    return per_job, (time.process_time() - t0) / scrapes * 1000


def listener_cost(args: argparse.Namespace, base: Path, sc: Scale, rounds: int) -> None:
    """Cold C=16 drains with [http] listen on (scraped every 5 s) and off, alternated; CPU per job of each."""
    n = sc.drain_n
    print(f"listener: {rounds} round(s) of two cold drains, N={n}, G={G:g} s, [jobs] {DRAIN_JOBS}")
    print(f"  on: [http] listen on loopback, /metrics scraped every {LISTENER_SCRAPE:g} s from the start")
    found: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with sandbox(args.sandbox, G) as api:
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                key = f"listener-{mode}-{r}"
                root = make_root(base, key)
                port = free_port()
                extra = {"http": {"listen": f"127.0.0.1:{port}"}} if mode == "on" else None
                with running(api, root, DRAIN_JOBS, warm=False, extra=extra) as daemon:
                    startup = daemon.cpu()
                    url = f"http://127.0.0.1:{port}/metrics"
                    with scraping(url, LISTENER_SCRAPE) if mode == "on" else nullcontext([]) as scrapes:
                        res = drain(api, root, key, n, ".manifest.json", daemon)
                    slowest = max(scrapes, default=0) * 1000
                    res.update(startup=startup, scrapes=len(scrapes), scrape_ms=slowest)
                found[mode].append(res)
                got = f"{res['cpu_total'] / n * 1000:.2f} ms CPU/job from start, {res['wall']:.2f} s"
                print(f"  round {r + 1} {mode:>3}: {got}, {res['scrapes']:.0f} scrape(s)", flush=True)
    t = Table("figure", "off", "on (scraped every 5 s)", "on - off")

    def row(
        figure: str, of: Callable[[dict[str, float]], float], fmt: str = ".2f", unit: str = "ms"
    ) -> float:
        """One figure, off and on (medians), and the difference."""
        off = statistics.median(of(res) for res in found["off"])
        on = statistics.median(of(res) for res in found["on"])
        t.add(figure, f"{off:{fmt}} {unit}", f"{on:{fmt}} {unit}", f"{on - off:+{fmt}} {unit}")
        return on - off

    row("CPU per job, from process start (median)", lambda res: res["cpu_total"] / n * 1000)
    row("  of which start-up, to `daemon.started`", lambda res: res["startup"] * 1000, ".0f")
    row("  drain alone, per job", lambda res: res["cpu_per_job"] * 1000)
    row("drain wall", lambda res: res["wall"], ".2f", "s")
    scrapes = sum(res["scrapes"] for res in found["on"])
    slowest = max(res["scrape_ms"] for res in found["on"])
    t.add("scrapes answered (slowest)", "", f"{scrapes:.0f} ({slowest:.1f} ms)", "")
    # Each round's two drains ran back to back: their difference cancels most of the drift between rounds.
    rounds_of = zip(found["on"], found["off"], strict=True)
    pairs = [(on["cpu_total"] - off["cpu_total"]) / n * 1000 for on, off in rounds_of]
    more = statistics.mean(pairs)
    t.add("  per round (on - off)", ", ".join(f"{d:+.2f}" for d in pairs), "ms", "info")
    t.check("CPU per job: listener on - off, mean of the rounds", more, 1.0, "ms", ".2f")
    spread = {mode: [res["cpu_total"] / n * 1000 for res in found[mode]] for mode in found}
    ranges = ", ".join(f"{mode} {min(v):.2f}-{max(v):.2f}" for mode, v in spread.items())
    t.add("  run-to-run range (noise)", ranges, "ms", "info")
    per_job, per_render = metrics_work()
    t.add(
        "in-process: one job's metric events",
        f"{per_job * 1000:.1f} µs",
        "(a claim, 5 requests, the end)",
        "info",
    )
    t.add(
        "in-process: one render of /metrics", f"{per_render:.2f} ms", "(at most one every 5 s here)", "info"
    )
    t.print(f"Listener cost (N={n}, {rounds} round(s); median of each)")


# Leaves that are blocking calls (lock, queue, select, recv): py-spy without --idle still samples
# them on this machine, so they are named apart; --gil leaves them out for real.
WAITS = {
    "Condition.wait (threading.py)",
    "Daemon.pump (scenario_watch/shell/daemon.py)",
    "InotifyFD._check_inotify_fd (watchdog/observers/inotify_c.py)",
    "DelayedQueue.get (watchdog/utils/delayed_queue.py)",
    "SocketIO.readinto (socket.py)",
}
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def where(frame: str) -> tuple[str, str]:
    """(function, short file) of one collapsed-stack frame `func (path:line)`."""
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    path = m["file"]
    for marker in ("site-packages/", "/lib/python3", "scenario_watch/"):
        if marker in path:
            path = path[path.index(marker) :].removeprefix("site-packages/")
            break
    return m["func"], path


def summarise(raw: Path, top: int = 25) -> None:
    """Print the top costs of py-spy's collapsed stacks: by thread, self, inclusive and by file."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack and samples.isdigit():
            stacks.append((stack.split(";"), int(samples)))
    total = sum(n for _, n in stacks)
    if not total:
        print(f"no samples in {raw}")
        return
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for frames, n in stacks:
        head = frames[0] if frames[0].startswith(("thread", "process")) else ""
        calls = [f for f in frames if not f.startswith(("thread", "process"))]
        names = " ".join(calls)
        if "MainThread" in head or "_run_module_as_main" in names:  # unnamed before threading starts
            run = "Daemon.run " in names and "Daemon.start " not in names
            kind = "main: shutdown" if "Daemon.close " in names else "main: loop" if run else "main: start-up"
        else:  # worker-N / watchdog's / others, told apart by their outermost calls
            outer = " ".join(calls[:6])
            kind = "workers" if "_work" in outer else "observer" if "watchdog" in outer else "other"
        threads[kind] += n
        if not calls:
            continue
        func, path = where(calls[-1])
        own[f"{func} ({path})"] += n
        files[path] += n
        for frame in {f"{where(f)[0]} ({where(f)[1]})" for f in calls}:
            inclusive[frame] += n

    def show(title: str, counter: Counter[str], k: int = top) -> None:
        print(f"\n{title} ({total} samples)")
        for name, n in counter.most_common(k):
            print(f"  {100 * n / total:5.1f} %  {name}")

    show("by thread (main: start-up = imports and Daemon.start)", threads)
    waiting = sum(n for name, n in own.items() if name in WAITS)
    print(f"\nblocking waits (leaf in {len(WAITS)} known wait calls): {100 * waiting / total:.1f} %")
    show("self (leaf function)", own)
    show("inclusive (function on the stack)", inclusive, 2 * top)
    show("self, by file", files)


def profile(args: argparse.Namespace, base: Path, sc: Scale) -> None:
    """One cold C=16 drain under `py-spy record` (all threads, start-up included); the top costs."""
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.profile).resolve()
    wrapper = [found, "record", "--threads", "--rate", str(args.rate), "--format", "raw", "-o", str(out)]
    wrapper += [*(["--native"] if args.native else []), *(["--gil"] if args.gil else []), "--"]
    print(f"profile: {' '.join(wrapper)} python -m scenario_watch run; N={sc.drain_n}, [jobs] {DRAIN_JOBS}")
    with sandbox(args.sandbox, G) as api:
        root = make_root(base, "profile")
        with running(api, root, DRAIN_JOBS, warm=False, wrapper=wrapper) as daemon:
            res = drain(api, root, "prof", sc.drain_n, ".manifest.json", daemon)
        per_job = res["cpu_total"] / sc.drain_n * 1000
        print(f"drain under py-spy: {res['wall']:.2f} s, {per_job:.2f} ms CPU/job from start (perturbed)")
        wait_until(lambda: out.exists() and out.stat().st_size, 30, "py-spy's output")
    summarise(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller N and a 5 s idle window")
    parser.add_argument(
        "--sandbox", choices=("thread", "process"), default="thread", help="where the sandbox runs"
    )
    parser.add_argument("--profile", metavar="FILE", help="profile one drain with py-spy instead")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (--profile)")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames too (--profile)")
    parser.add_argument(
        "--gil", action="store_true", help="py-spy --gil: only the thread holding the GIL (--profile)"
    )
    parser.add_argument("--summarise", metavar="FILE", help="print the top costs of a py-spy raw file")
    parser.add_argument(
        "--listener",
        type=int,
        nargs="?",
        const=3,
        metavar="ROUNDS",
        help="no other figures: CPU per job with [http] listen on and /metrics scraped every 5 s, "
        "against off (cold drains alternated, ROUNDS of each, default 3)",
    )
    args = parser.parse_args()
    if args.summarise:
        summarise(Path(args.summarise))
        return
    sc = QUICK if args.quick else Scale()
    missing = [tool for tool in ("inotifywait", "curl", "jq", "bash") if shutil.which(tool) is None]
    skip_shell = f"missing {', '.join(missing)} (apt-get install inotify-tools curl jq)" if missing else ""
    base = Path(tempfile.mkdtemp(prefix="sw-bench-"))
    try:
        print(machine(base, args.sandbox), flush=True)
        print(byte_compile(), flush=True)
        if args.profile:
            profile(args, base, sc)
        elif args.listener:
            listener_cost(args, base, sc, args.listener)
        else:
            report(sc, run(args, base, sc, skip_shell), skip_shell)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

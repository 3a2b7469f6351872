"""The daemon's metrics over a sandbox run: scraped from its listener, checked against what the sandbox saw.

The daemon runs in-process (harness.py) on the manual clock it shares with the sandbox; the listener
and every request are real HTTP over loopback, and the textfile is a real file.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Folders, free_port, wait_for, write_config
from harness import HereDaemon
from prometheus_client.parser import text_string_to_metric_families
from web_site import Site

from scenario_watch.errors import ConfigError
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import State
from scenario_watch.sandbox import Fault, Sandbox
from scenario_watch.sandbox.images import make_png

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MONOTONIC = ("_total", "_count", "_sum", "_bucket")


def parse(text: str) -> Samples:
    """Every sample, parsed by prometheus_client's own parser: (name, labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def scrape(url: str) -> Samples:
    answer = requests.get(f"{url}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` that carry these labels (the others summed over)."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)


class Scraper:
    """Scrapes /metrics in a thread, over and over, for as long as the run goes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[Samples] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(scrape(self.url))
            except BaseException as exc:  # surfaced by stop()
                self.errors.append(exc)
                return
            self._stop.wait(0.005)  # pacing: a scraper, not a busy loop

    def stop(self) -> list[Samples]:
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors
        return self.seen


def sandbox_truth(sandbox: Sandbox) -> dict[str, Any]:
    """What the sandbox saw: its generate jobs, their outcomes, and the units the successes cost."""
    jobs = [sandbox.job(job_id) for job_id in sandbox.generate_jobs]
    spent: dict[str, float] = {}
    for job in jobs:
        if job["status"] == "success":
            preset = "recolor" if job["metadata"]["input"]["prompt"] == "make it red" else ""
            spent[preset] = spent.get(preset, 0.0) + job["billing"]["cuCost"]
    return {
        "jobs": len(jobs),
        "succeeded": sum(1 for job in jobs if job["status"] == "success"),
        "failed": sum(1 for job in jobs if job["status"] == "failure"),
        "spent": spent,
    }


def test_metrics_scraped_during_a_sandbox_run_match_what_the_sandbox_saw(
    folders: Folders, sandbox: Sandbox, daemon: Callable[..., HereDaemon]
) -> None:
    port = free_port()
    exporter = folders.root / "node-exporter"
    exporter.mkdir()
    textfile = exporter / "scenario_watch.prom"
    write_config(
        folders,
        sandbox.base_url,
        http={"listen": f"127.0.0.1:{port}"},
        metrics={"textfile": str(textfile), "interval": 1.0},
        presets={"recolor": {"prompt": "make it red"}},
    )
    sandbox.inject(Fault(route="job", kind="status", status=500))  # one poll: urllib3 retries it
    proc = daemon()
    url = f"http://127.0.0.1:{port}"
    scraper = Scraper(url)

    # First half: three prompts, all done.
    for n in range(3):
        folders.drop(f"first-{n}.json", {"prompt": f"first {n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 3, what="three prompts done")
    middle = scrape(url)
    truth = sandbox_truth(sandbox)
    assert total(middle, "scenario_watch_prompts_taken_total") == 3
    assert total(middle, "scenario_watch_prompts_finished_total", outcome="done") == 3
    assert total(middle, "scenario_watch_api_requests_total", endpoint="generate", status_class="2xx") == 3
    assert truth["jobs"] == 3
    assert total(middle, "scenario_watch_creative_units_spent_total") == sum(truth["spent"].values()) > 0
    wait_for(
        lambda: (
            textfile.exists()
            and total(parse(textfile.read_text()), "scenario_watch_prompts_finished_total") == 3
        ),
        what="the textfile to have the first half",
    )
    reader = textfile.open("rb")  # a reader in the middle of the file, as node_exporter might be

    # Second half, while the daemon runs on: one generation fails at Scenario, one image for the preset.
    sandbox.fail_next_jobs(1, "the image was refused", "rephrase the prompt")
    for n in range(2):
        folders.drop(f"second-{n}.json", {"prompt": f"second {n}"})
    staging = folders.root / "staging"
    (staging / "car.png").write_bytes(make_png("car", 64, 48))
    os.replace(staging / "car.png", folders.inbox / "recolor" / "car.png")
    finished = lambda: total(scrape(url), "scenario_watch_prompts_finished_total")  # noqa: E731
    wait_for(lambda: finished() == 6, what="six prompts finished")
    wait_for(lambda: total(scrape(url), "scenario_watch_jobs_in_flight") == 0, what="no job in flight")
    end = scrape(url)
    seen = scraper.stop()

    truth = sandbox_truth(sandbox)
    assert (truth["jobs"], truth["succeeded"], truth["failed"]) == (6, 5, 1)
    assert total(end, "scenario_watch_prompts_taken_total", preset="") == 5
    assert total(end, "scenario_watch_prompts_taken_total", preset="recolor") == 1
    assert total(end, "scenario_watch_prompts_finished_total", outcome="done") == truth["succeeded"]
    assert total(end, "scenario_watch_prompts_finished_total", outcome="failed", stage="generation") == 1
    assert total(end, "scenario_watch_api_requests_total", endpoint="generate") == truth["jobs"]
    assert total(end, "scenario_watch_api_requests_total", endpoint="generate", status_class="2xx") == 6
    assert total(end, "scenario_watch_job_duration_seconds_count") == truth["succeeded"]
    for preset in ("", "recolor"):  # the failed generation is refunded: not spent
        spent = total(end, "scenario_watch_creative_units_spent_total", preset=preset)
        assert spent == truth["spent"].get(preset, 0.0), preset
    # The poll answered 500 once: one more request, and a retry the adapter made by itself.
    assert total(end, "scenario_watch_api_requests_total", endpoint="job", status_class="5xx") == 1
    assert total(end, "scenario_watch_retries_total", reason="server_error") == 1
    assert total(end, "scenario_watch_retries_total") == 1
    assert total(end, "scenario_watch_prompts_waiting") == 0
    assert total(end, "scenario_watch_watcher_up") == 1
    assert total(end, "scenario_watch_last_success_timestamp_seconds") > time.time() - 3600
    published = proc.daemon.heartbeat.state or {}
    assert published["typical"] > 0  # the learned generation time, for status's progress estimate
    assert len(seen) >= 2
    for before, after in itertools.pairwise(seen):  # counters never go back, scrape to scrape
        for key, value in before.items():
            if key[0].endswith(MONOTONIC):
                assert after.get(key, 0.0) >= value, key
    for samples in seen:
        taken = total(samples, "scenario_watch_prompts_taken_total")
        assert total(samples, "scenario_watch_prompts_finished_total") <= taken <= 6

    # The textfile: replaced by rename while the daemon ran (the reader keeps the old one, whole), and
    # its last write is the final text.
    assert os.fstat(reader.fileno()).st_nlink == 0  # renamed over: no name leads to it any more
    assert total(parse(reader.read().decode()), "scenario_watch_prompts_taken_total") == 3
    reader.close()
    proc.stop()
    metrics = proc.daemon.watching.metrics
    assert metrics is not None
    text = textfile.read_text()
    assert text == metrics.render().decode()
    on_disk = parse(text)
    for name in (
        "scenario_watch_prompts_taken_total",
        "scenario_watch_prompts_finished_total",
        "scenario_watch_creative_units_spent_total",
        "scenario_watch_job_duration_seconds_count",
    ):
        assert {k: v for k, v in on_disk.items() if k[0] == name} == {
            k: v for k, v in end.items() if k[0] == name
        }, name
    assert os.listdir(exporter) == ["scenario_watch.prom"]  # no temp file left beside it
    with pytest.raises(requests.ConnectionError):  # the listener is closed with the daemon
        requests.get(f"{url}/metrics", timeout=5)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(route="job", kind="reset"), {"connection": 1}),
        (Fault(route="job", kind="status", status=429, retry_after=1.0), {"rate_limit": 1}),
        (Fault(route="generate", kind="status", status=429, retry_after=1.0), {"rate_limit": 1}),
        (Fault(route="generate", kind="status", status=502), {"lost_answer": 1}),
        (Fault(route="cdn", kind="status", status=403), {"url_expired": 1}),
        (Fault(route="cdn", kind="status", status=500, times=4), {"server_error": 3, "download": 1}),
    ],
    ids=lambda v: f"{v.route}-{v.kind}-{v.status}" if isinstance(v, Fault) else "",
)
def test_each_retry_is_counted_with_its_reason(
    folders: Folders,
    sandbox: Sandbox,
    daemon: Callable[..., HereDaemon],
    fault: Fault,
    expected: dict[str, float],
) -> None:
    write_config(folders, sandbox.base_url, http={"listen": "127.0.0.1:0"})
    sandbox.inject(fault)
    proc = daemon()
    folders.drop("p.json", {"prompt": "a retried prompt"})
    wait_for(lambda: (folders.done / "p.json").exists(), what="the prompt done")
    url = proc.daemon.watching.url
    assert url is not None
    samples = scrape(url)
    retries = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "scenario_watch_retries_total" and value
    }
    assert retries == expected
    assert len(sandbox.generate_jobs) == 1  # whatever was retried, one job was paid for


def test_a_taken_port_stops_the_start(
    folders: Folders, sandbox: Sandbox, daemon: Callable[..., HereDaemon]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(folders, sandbox.base_url, http={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError, match=rf"\[http\] listen = 127.0.0.1:{port}: Address already in use"):
            daemon()
    assert sandbox.generate_jobs == []


def test_no_listener_no_textfile_no_metrics_imported() -> None:
    """Neither [http] listen nor [metrics] textfile: start-up imports no prometheus_client, no listener."""
    code = (
        "import sys, scenario_watch.shell.daemon, scenario_watch.shell.cli;"
        "print(sorted(m for m in sys.modules"
        " if m.startswith(('prometheus_client', 'scenario_watch.shell.web'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_status_estimates_progress_from_the_daemons_learned_generation_time(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    try:
        site.done("earlier.json", "an earlier job")  # the journal's own estimate: about 0 s
        running = site.running("cat.json", "Paint the cat")  # no progress from the API yet
        site.run_daemon({"typical": 10.0})
        later = time.time() + 4.0
        [job] = [j for j in site.status_at(later)["jobs"] if j["id"] == running]
        assert job["progress_estimate"] == pytest.approx(0.4, abs=0.02)
        site.run_daemon({"typical": None})  # not learned yet: the journal's recent jobs say
        [job] = [j for j in site.status_at(later)["jobs"] if j["id"] == running]
        assert job["progress_estimate"] == 0.99  # past the typical (near-instant) job: capped below 1
    finally:
        site.close()


def test_the_journal_keeps_a_running_jobs_progress_for_status(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    """A poll that finds the job running records the API's progress (status shows it); the job then
    ends delivered, and the row is done."""
    write_config(folders, sandbox.base_url, jobs={"poll_interval": 1.0, "poll_max_interval": 2.0})
    sandbox.generation_seconds = 10.0
    proc = daemon()
    folders.drop("slow.json", {"prompt": "a slow one"})
    wait_for(lambda: len(sandbox.generate_jobs) == 1, what="the job paid")
    journal = Store(folders.state / "journal.sqlite3")
    try:
        wait_for(lambda: 0.0 < (journal.get(1).progress or 0.0) < 1.0, what="a progress below 1 journaled")
        wait_for(lambda: (folders.done / "slow.json").exists(), what="the job delivered")
        assert journal.get(1).state == State.DONE
    finally:
        journal.close()
    proc.stop()

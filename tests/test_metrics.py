"""Metrics: counters at events, gauges from the snapshot, the text format, the textfile by rename."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import KEY, SECRET
from prometheus_client.parser import text_string_to_metric_families

from scenario_watch import __version__
from scenario_watch.api.client import ScenarioClient
from scenario_watch.config import MODEL_ID
from scenario_watch.errors import NotFound, TransientError
from scenario_watch.sandbox import Sandbox
from scenario_watch.shell.metrics import Metrics, Snapshot, TextfileWriter, endpoint, waiting_reasons

BASE = "https://api.cloud.scenario.com/v1"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser: (name, labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_events_count_by_bounded_labels_and_names_follow_the_rules() -> None:
    m = Metrics(presets=["recolor"], base_url=BASE)
    for preset in ("recolor", None, "recolor"):
        m.prompt_taken(preset)
    m.prompt_finished("done", preset="recolor", cost=5, duration=12.0, at=1_700_000_000)
    m.prompt_finished("failed", stage="generation", cost=5)  # refunded: not spent
    m.prompt_finished("failed", stage="download", cost=2.5, preset="gone")  # paid; a preset since removed
    m.retry("rate_limit")
    m.retry("something new")

    assert value(m, "scenario_watch_prompts_taken_total", preset="recolor") == 2
    assert value(m, "scenario_watch_prompts_taken_total", preset="") == 1
    done = value(m, "scenario_watch_prompts_finished_total", outcome="done", stage="", preset="recolor")
    assert done == 1
    failed = ("scenario_watch_prompts_finished_total", "failed")
    assert value(m, failed[0], outcome=failed[1], stage="generation", preset="") == 1
    assert value(m, failed[0], outcome=failed[1], stage="download", preset="other") == 1
    assert value(m, "scenario_watch_creative_units_spent_total", preset="recolor") == 5
    assert value(m, "scenario_watch_creative_units_spent_total", preset="") == 0
    assert value(m, "scenario_watch_creative_units_spent_total", preset="other") == 2.5
    assert value(m, "scenario_watch_job_duration_seconds_count", preset="recolor") == 1
    assert value(m, "scenario_watch_job_duration_seconds_sum", preset="recolor") == 12.0
    assert value(m, "scenario_watch_job_duration_seconds_bucket", preset="recolor", le="15.0") == 1
    assert value(m, "scenario_watch_job_duration_seconds_bucket", preset="recolor", le="10.0") == 0
    assert value(m, "scenario_watch_last_success_timestamp_seconds") == 1_700_000_000
    assert value(m, "scenario_watch_retries_total", reason="rate_limit") == 1
    assert value(m, "scenario_watch_retries_total", reason="other") == 1
    assert value(m, "scenario_watch_build_info", version=__version__) == 1

    families = list(text_string_to_metric_families(m.render().decode()))
    for family in families:
        assert family.name.startswith("scenario_watch_"), family.name
        assert "_created" not in family.name  # no doubled series
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    labels = {name for f in families for s in f.samples for name in s.labels}
    # Small fixed sets only: never a file name or a job id.
    assert labels <= {"preset", "outcome", "stage", "endpoint", "status_class", "reason", "version", "le"}


def test_gauges_come_from_the_snapshot_at_scrape_time() -> None:
    m = Metrics(budget_daily=100)
    state = {"in_flight": 0}
    m.set_snapshot(
        lambda: Snapshot(
            in_flight=state["in_flight"],
            waiting={"budget": 3, "slot": 1},
            budget_remaining=7.5,
            watcher_ok=False,
        )
    )
    assert value(m, "scenario_watch_jobs_in_flight") == 0
    state["in_flight"] = 4
    assert value(m, "scenario_watch_jobs_in_flight") == 4  # read at the scrape, never pushed
    assert value(m, "scenario_watch_prompts_waiting", reason="budget") == 3
    assert value(m, "scenario_watch_prompts_waiting", reason="slot") == 1
    assert value(m, "scenario_watch_prompts_waiting", reason="credentials") == 0  # every reason, always
    assert value(m, "scenario_watch_budget_remaining_creative_units") == 7.5
    assert value(m, "scenario_watch_budget_daily_creative_units") == 100
    assert value(m, "scenario_watch_watcher_up") == 0

    m = Metrics()
    m.set_snapshot(lambda: Snapshot())  # no daily cap: no budget series at all
    assert value(m, "scenario_watch_budget_remaining_creative_units") is None
    assert value(m, "scenario_watch_budget_daily_creative_units") is None

    def broken() -> Snapshot:
        raise RuntimeError("the daemon is shutting down")

    m.set_snapshot(broken)  # the scrape still answers (and says the watcher is not known to be up)
    assert value(m, "scenario_watch_watcher_up") == 0


def test_waiting_reasons_from_the_heartbeat() -> None:
    published = {
        "queue": "budget until 2030-01-01T00:00:00Z",
        "queued": 4,
        "waiting": {"7": "reference a.png"},
    }
    assert waiting_reasons(published) == {
        "rate_limit": 0,
        "credentials": 0,
        "budget": 4,
        "unwritable": 0,
        "reference": 1,
        "slot": 0,
    }
    assert waiting_reasons({"queue": "outbox not writable: No space left", "queued": 2})["unwritable"] == 2
    assert waiting_reasons({"queue": "rate limit until x", "queued": 1})["rate_limit"] == 1
    assert waiting_reasons({"queue": "credentials", "queued": 1})["credentials"] == 1
    assert waiting_reasons({"queue": "a free slot", "queued": 5})["slot"] == 5


@pytest.mark.parametrize(
    ("method", "url", "expected"),
    [
        ("POST", f"{BASE}/generate/custom/model_x", "generate"),
        ("POST", f"{BASE}/generate/custom/model_x?dryRun=api&projectId=p", "estimate"),
        ("GET", f"{BASE}/jobs/job_abc?projectId=p", "job"),
        ("GET", f"{BASE}/jobs?createdAfter=x", "jobs_list"),
        ("GET", f"{BASE}/assets/asset_1", "asset"),
        ("POST", f"{BASE}/assets", "upload"),
        ("POST", f"{BASE}/uploads/u1/action", "upload"),
        ("GET", f"{BASE}/models/model_x", "model"),
        ("GET", "https://cdn.cloud.scenario.com/assets/asset_1?sig=abc", "download"),
        ("PUT", "https://s3.example.com/part1?sig=abc", "upload"),
        ("GET", f"{BASE}/teams/t1", "other"),
    ],
)
def test_endpoints_are_a_small_fixed_set(method: str, url: str, expected: str) -> None:
    assert endpoint(method, url, BASE) == expected


def test_requests_are_counted_by_endpoint_and_status_class(sandbox: Sandbox) -> None:
    m = Metrics(base_url=sandbox.base_url)
    client = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id=MODEL_ID, timeout=5, retries=0)
    client.on_response(m.api_response)
    with pytest.raises(NotFound):
        client.get_job("job_nope")
    assert list(client.list_jobs("2020-01-01T00:00:00Z")) == []
    with pytest.raises(TransientError):  # a port nobody listens on: no answer at all
        client.download(f"{sandbox.base_url.rsplit(':', 1)[0]}:9/assets/x", io.BytesIO())
    client.close()
    assert value(m, "scenario_watch_api_requests_total", endpoint="job", status_class="4xx") == 1
    assert value(m, "scenario_watch_api_requests_total", endpoint="jobs_list", status_class="2xx") == 1
    # Another host than the API's is the CDN (a GET there is a download).
    assert value(m, "scenario_watch_api_requests_total", endpoint="download", status_class="error") == 1


def test_textfile_is_the_same_text_written_by_rename(tmp_path: Path) -> None:
    m = Metrics()
    m.set_snapshot(lambda: Snapshot(in_flight=2))
    path = tmp_path / "scenario_watch.prom"
    writer = TextfileWriter(m, path, interval=15.0)
    assert writer.next_due() == float("-inf")  # due at once
    writer.tick(100.0)
    assert path.read_bytes() == m.render()
    assert writer.next_due() == 115.0
    first = os.stat(path).st_ino
    reader = path.open("rb")  # a reader in the middle of the old file...
    m.prompt_taken()
    writer.tick(110.0)  # not due: nothing written
    assert os.stat(path).st_ino == first
    writer.tick(115.0)
    assert os.stat(path).st_ino != first  # a new file renamed over the old one, not rewritten in place
    assert path.read_bytes() == m.render()
    assert b'prompts_taken_total{preset=""} 1.0' in path.read_bytes()
    assert b'prompts_taken_total{preset=""} 0.0' in reader.read()  # ...still reads the old one, whole
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenario_watch.prom"]  # no temp file left


def test_textfile_that_cannot_be_written_is_retried(tmp_path: Path) -> None:
    m = Metrics()
    folder = tmp_path / "gone"
    writer = TextfileWriter(m, folder / "x.prom", interval=1.0)
    assert writer.write() is False  # no folder: logged once, no exception into the daemon's loop
    folder.mkdir()
    writer.tick(5.0)
    assert (folder / "x.prom").read_bytes() == m.render()

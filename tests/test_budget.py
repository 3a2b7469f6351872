"""The daily budget alone: fake journal spend, fake dryRun, a wall clock passed in."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scenario_watch import logs
from scenario_watch.config import BudgetSettings
from scenario_watch.dispatch.budget import Budget, day_start, fits, next_day, shape
from scenario_watch.journal.store import Store

NOON = datetime(2026, 3, 14, 12, 0, tzinfo=UTC).timestamp()


class Journal:
    """What the store would sum: costs of jobs submitted at given times."""

    def __init__(self) -> None:
        self.costs: list[tuple[int, float, float]] = []  # prompt id, submitted at, cost

    def spent_since(self, since: float, exclude: Collection[int] = ()) -> float:
        return sum(cost for pid, at, cost in self.costs if at >= since and pid not in exclude)


class DryRun:
    def __init__(self, per_output: float = 5.0) -> None:
        self.per_output = per_output
        self.calls = 0

    def __call__(self, inputs: dict[str, Any]) -> float:
        self.calls += 1
        return self.per_output * inputs.get("numOutputs", 1)


def make(daily: float = 0.0, max_per_prompt: float = 0.0, now: float = NOON) -> tuple[Budget, Journal]:
    journal = Journal()
    settings = BudgetSettings(daily=daily, max_per_prompt=max_per_prompt)
    return Budget(settings, journal.spent_since, wall=lambda: now), journal


def test_days_are_utc_days() -> None:
    assert datetime.fromtimestamp(day_start(NOON), UTC) == datetime(2026, 3, 14, tzinfo=UTC)
    assert datetime.fromtimestamp(next_day(NOON), UTC) == datetime(2026, 3, 15, tzinfo=UTC)
    midnight = datetime(2026, 3, 15, tzinfo=UTC).timestamp()
    assert day_start(midnight) == midnight and next_day(midnight - 0.001) == midnight


def test_fits_counts_spend_reservations_and_the_estimate() -> None:
    assert fits(5, 15, 0, 22) and fits(5, 12, 5, 22)
    assert not fits(5, 15, 5, 22)
    assert fits(0.1, 21.9, 0.0, 22.0)  # floats: 21.9 + 0.1 is not "over" 22
    assert fits(1000, 1000, 1000, 0)  # 0: no cap


def test_without_limits_nothing_is_estimated() -> None:
    budget, _ = make()
    dry_run = DryRun()
    assert budget.admit(1, {"prompt": "x"}, dry_run).allowed
    assert dry_run.calls == 0


def test_the_cap_admits_until_spend_plus_reservations_would_pass_it() -> None:
    budget, journal = make(daily=22)
    dry_run = DryRun()
    verdicts = [budget.admit(n, {"prompt": f"p{n}", "numOutputs": 1}, dry_run) for n in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, True, False]  # 4 x 5 reserved = 20
    assert dry_run.calls == 1  # one dryRun per shape; then the learned cost
    refused = verdicts[-1]
    assert refused.resumes_at == next_day(NOON) and refused.estimate == 5 and not refused.too_dear
    # Submissions end: their costs land in the journal (counted once meanwhile), then their reservations go.
    journal.costs.append((0, NOON, 5.0))
    assert budget.admit(9, {"prompt": "p9", "numOutputs": 1}, dry_run).spent == 0  # 0 is still reserved
    for n in range(4):
        if n:
            journal.costs.append((n, NOON, 5.0))
        budget.release(n)
    again = budget.admit(5, {"prompt": "again", "numOutputs": 1}, dry_run)
    assert not again.allowed and again.spent == 20


def test_spend_of_yesterday_does_not_count_today() -> None:
    budget, journal = make(daily=10)
    journal.costs.append((1, day_start(NOON) - 1, 100.0))
    assert budget.admit(1, {"prompt": "x"}, DryRun()).allowed


def test_a_learned_cost_comes_from_what_the_api_charged() -> None:
    budget, _ = make(daily=100)
    dry_run = DryRun()
    budget.learn({"numOutputs": 2, "resolution": "4K"}, 14.0)
    verdict = budget.admit(1, {"prompt": "x", "numOutputs": 2, "resolution": "4K"}, dry_run)
    assert verdict.estimate == 14.0 and dry_run.calls == 0
    assert shape({"numOutputs": 2, "referenceImages": ["a", "b"]}) != shape({"numOutputs": 2})


def test_max_per_prompt_refuses_a_dear_prompt_without_reserving_it() -> None:
    budget, _ = make(max_per_prompt=12)
    verdict = budget.admit(1, {"prompt": "x", "numOutputs": 3}, DryRun())
    assert not verdict.allowed and verdict.too_dear and verdict.estimate == 15
    assert budget.admit(2, {"prompt": "y", "numOutputs": 2}, DryRun()).allowed


def test_pause_and_resume_are_logged_once_each() -> None:
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    budget, journal = make(daily=5)
    dry_run = DryRun()
    journal.costs.append((0, NOON, 5.0))
    for n in range(1, 4):
        assert not budget.admit(n, {"prompt": "x"}, dry_run).allowed
    journal.costs.clear()  # as if the day had turned
    assert budget.admit(9, {"prompt": "x"}, dry_run).allowed
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["budget.paused", "budget.resumed"]


def test_the_journal_counts_reported_costs_since_a_time_not_refunds_nor_excluded(tmp_path: Path) -> None:
    store = Store(tmp_path / "journal.sqlite3")
    try:
        ids = [store.add(f"p{n}.json", tmp_path / f"p{n}.json") for n in range(4)]
        for n, prompt_id in enumerate(ids):
            store.queued(prompt_id, {"prompt": f"p{n}"}, f"p{n}", "0" * 64)
            store.submitted(prompt_id, f"job_{n}", 5.0)
        store.failed(ids[1], "generation", "generation failure: refunded", None)  # not paid
        store.failed(ids[2], "timeout", "too slow", None)  # may still be paid: counts
        since = time.time() - 60
        assert store.spent_since(since) == 15.0
        assert store.spent_since(since, exclude=[ids[0]]) == 10.0
        assert store.spent_since(time.time() + 60) == 0.0
    finally:
        store.close()

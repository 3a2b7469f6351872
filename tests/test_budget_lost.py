"""[budget] and lost answers: a reservation lasts until the job is found; learned costs survive restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, make_dispatcher, write_config

from scenario_watch.config import BudgetSettings
from scenario_watch.dispatch.budget import Budget
from scenario_watch.dispatch.dispatcher import Dispatcher
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import Advanced, Again, State
from scenario_watch.sandbox import Fault, Sandbox


def dispatcher(folders: Folders, sandbox: Sandbox, journal: Path) -> Dispatcher:
    write_config(folders, sandbox.base_url, budget={"daily": 100})
    return make_dispatcher(folders, sandbox, journal)


def queued(d: Dispatcher, folders: Folders, name: str, body: str) -> int:
    path = folders.inbox / name
    path.write_text(body)
    prompt_id = d.store.add(name, path)
    assert isinstance(d.accept(prompt_id), Advanced)
    return prompt_id


def test_a_lost_answer_stays_reserved_until_its_job_is_found(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    d = dispatcher(folders, sandbox, tmp_path / "journal.sqlite3")
    prompt_id = queued(d, folders, "p.json", '{"prompt": "lost", "numOutputs": 2}')
    d.budget.learn({"numOutputs": 2}, 10.0)  # so the fault meets the POST, not a dry run
    sandbox.inject(Fault(route="generate", kind="status", status=500, after=True))  # made, answer lost
    assert isinstance(d.submit(prompt_id), Again)
    assert d.store.get(prompt_id).state == State.SUBMITTING
    # The job exists and will be billed 10: the day has 90 left, not 100.
    assert d.budget.remaining() == 90 and d.budget.holds(prompt_id)
    assert isinstance(d.submit(prompt_id), Advanced)  # reconciled: the job is found, its cost journaled
    assert d.store.get(prompt_id).state == State.SUBMITTED
    assert not d.budget.holds(prompt_id) and d.budget.remaining() == 90  # now from the journal
    d.store.close()


def test_a_lost_answer_is_reserved_again_after_a_restart(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite3"
    d = dispatcher(folders, sandbox, journal)
    prompt_id = queued(d, folders, "p.json", '{"prompt": "lost", "numOutputs": 2}')
    d.budget.learn({"numOutputs": 2}, 10.0)  # so the fault meets the POST, not a dry run
    sandbox.inject(Fault(route="generate", kind="status", status=500, after=True))
    assert isinstance(d.submit(prompt_id), Again)
    d.store.close()
    again = dispatcher(folders, sandbox, journal)  # a restart: reservations were in memory
    assert again.budget.remaining() == 90  # held again at the learned cost of its shape (in the journal)
    assert isinstance(again.submit(prompt_id), Advanced)
    assert again.budget.remaining() == 90
    again.store.close()


def test_learned_costs_per_shape_survive_a_restart(
    folders: Folders, sandbox: Sandbox, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite3"
    d = dispatcher(folders, sandbox, journal)
    d.budget.learn({"numOutputs": 3, "resolution": "4K"}, 30.0)
    d.store.close()

    def no_dry_run(_inputs: Any) -> float:
        pytest.fail("a shape whose cost was learned before the restart was estimated again")

    again = dispatcher(folders, sandbox, journal)
    verdict = again.budget.admit(1, {"numOutputs": 3, "resolution": "4K", "prompt": "x"}, no_dry_run)
    assert verdict.allowed and verdict.estimate == 30.0
    again.store.close()
    store = Store(journal)  # and a garbled record is only forgotten, never an error
    store.set_meta("budget_costs", "not json")
    assert (
        Budget(BudgetSettings(daily=1), store.spent_since, meta=store).admit(2, {}, lambda _: 7.0).estimate
        == 7
    )
    store.close()

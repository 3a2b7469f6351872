"""Backlogs: a preset never pays for what its folder held before it; a first start says what waits."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    KEY,
    SECRET,
    Folders,
    StartDaemon,
    generate_posts,
    move_in,
    run_cli,
    wait_for,
    write_config,
)

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.config import load_settings
from scenario_watch.intake import backlog
from scenario_watch.prepare.prompt import PromptRules
from scenario_watch.prepare.schema import BUILTIN
from scenario_watch.sandbox import Sandbox
from scenario_watch.sandbox.images import make_png
from scenario_watch.shell import cli
from scenario_watch.shell.daemon import Daemon


def png(seed: int, width: int = 32) -> bytes:
    """A real, clean PNG of its own (normalising uploads it byte for byte); `width` sets its size."""
    return make_png(f"backlog {seed}", width=width, height=32)


def run_once(folders: Folders, sandbox: Sandbox) -> list[dict[str, Any]]:
    """`run --once` in this process (the real daemon, the sandbox over loopback); its log events."""
    settings = load_settings(folders.config, env={}).settings
    client = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id=settings.api.model_id, timeout=5.0)
    out = io.StringIO()
    logs.configure("json", "debug", stream=out)
    assert Daemon(settings, client, once=True).run() == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def event(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def first_refs(sandbox: Sandbox) -> list[bytes]:
    """The first reference image of each generation the sandbox ran."""
    return sorted(sandbox.asset_bytes(post.body["referenceImages"][0]) for post in generate_posts(sandbox))


def test_a_preset_on_an_outbox_of_15_images_pays_nothing_and_takes_the_16th(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    old = {f"old{n:02d}.png": png(n) for n in range(15)}
    for name, data in old.items():
        move_in(folders, folders.outbox, name, data)
    colour = {"prompt": "colour it in", "folder": str(folders.outbox)}
    write_config(folders, sandbox.base_url, presets={"colour": colour})
    proc = daemon()
    assert proc.saw("preset.backlog_left", preset="colour", count=15, folder=str(folders.outbox))
    move_in(folders, folders.outbox, "new.png", png(16))
    wait_for(lambda: (folders.done / "colour" / "new.png").exists(), what="the 16th edited and filed")
    assert first_refs(sandbox) == [png(16)]  # one job, for the 16th: nothing for the 15 already there
    assert folders.names(folders.outbox / "colour") == ["new.manifest.json", "new_1.png"]
    assert folders.names(folders.done / "colour") == ["new.png"]
    for name, data in old.items():
        assert (folders.outbox / name).read_bytes() == data  # left where they were

    config = ["-c", str(folders.config)]
    shown = run_cli("status", *config)
    assert f"colour: 15 file(s) left alone in {folders.outbox}" in shown.stdout, shown.stdout
    assert "`scenario-watch take colour --all` takes them" in shown.stdout
    assert json.loads(run_cli("status", "--json", *config).stdout)["presets"]["colour"]["left_alone"] == 15

    # Taken on request, while the daemon runs: the named file only.
    taken = run_cli("take", *config, "colour", "old03.png")
    assert taken.returncode == 0 and "old03.png: released" in taken.stdout, taken.stdout + taken.stderr
    wait_for(lambda: (folders.done / "colour" / "old03.png").exists(), what="old03 edited and filed")
    assert first_refs(sandbox) == sorted([png(16), png(3)])
    assert proc.saw("preset.backlog_released", count=1)
    assert json.loads(run_cli("status", "--json", *config).stdout)["presets"]["colour"]["left_alone"] == 14


def test_files_that_arrive_while_the_daemon_is_stopped_are_taken_at_the_next_start(
    folders: Folders, sandbox: Sandbox
) -> None:
    write_config(folders, sandbox.base_url, presets={"recolor": {"prompt": "make it red"}})
    recolor = folders.inbox / "recolor"
    for n in range(3):
        move_in(folders, recolor, f"before{n}.png", png(n))
    events = run_once(folders, sandbox)
    [left] = event(events, "preset.backlog_left")
    assert left["count"] == 3 and left["reason"] == "first seen"
    assert generate_posts(sandbox) == []

    move_in(folders, recolor, "while_stopped.png", png(10))
    move_in(folders, recolor, "before1.png", png(11, width=48))  # replaced by a new file: new
    events = run_once(folders, sandbox)
    assert event(events, "preset.backlog_left") == []  # logged once, when first seen
    assert first_refs(sandbox) == sorted([png(10), png(11, width=48)])
    assert folders.names(recolor) == ["before0.png", "before2.png"]  # still left alone
    assert folders.names(folders.done / "recolor") == ["before1.png", "while_stopped.png"]
    run_once(folders, sandbox)
    assert len(generate_posts(sandbox)) == 2  # nothing more at a third start


def test_take_releases_the_files_named_or_all_for_the_next_start(
    folders: Folders, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(folders, sandbox.base_url, presets={"recolor": {"prompt": "make it red"}})
    recolor = folders.inbox / "recolor"
    for n in range(3):
        move_in(folders, recolor, f"car{n}.png", png(n))
    config = ["-c", str(folders.config)]
    assert cli.main(["take", *config, "recolor", "--all"]) == cli.EXIT_OK  # before any start: nothing yet
    assert "has not seen" in capsys.readouterr().out
    run_once(folders, sandbox)
    assert generate_posts(sandbox) == []
    capsys.readouterr()

    assert cli.main(["take", *config, "recolor"]) == cli.EXIT_CONFIG  # neither names nor --all
    assert cli.main(["take", *config, "recolor", "car9.png", str(recolor / "car1.png")]) == cli.EXIT_INPUT
    out = capsys.readouterr().out
    assert "car9.png: not among the files [presets.recolor] left alone" in out
    assert "car1.png: released" in out
    run_once(folders, sandbox)
    assert first_refs(sandbox) == [png(1)]

    assert cli.main(["take", *config, "recolor", "--all"]) == cli.EXIT_OK
    assert "2 file(s) will be taken" in capsys.readouterr().out
    run_once(folders, sandbox)
    assert first_refs(sandbox) == sorted([png(0), png(1), png(2)])
    assert folders.names(recolor) == []
    assert cli.main(["take", *config, "recolor", "--all"]) == cli.EXIT_OK
    assert "nothing to take" in capsys.readouterr().out
    assert cli.main(["take", *config, "nosuch", "--all"]) == cli.EXIT_CONFIG


def test_a_changed_preset_folder_gets_a_new_baseline(
    folders: Folders, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = folders.root / "first", folders.root / "second"
    move_in(folders, first, "a.png", png(1))
    for n in range(3):
        move_in(folders, second, f"b{n}.png", png(10 + n))
    write_config(folders, sandbox.base_url, presets={"p": {"prompt": "edit", "folder": str(first)}})
    run_once(folders, sandbox)
    write_config(folders, sandbox.base_url, presets={"p": {"prompt": "edit", "folder": str(second)}})
    events = run_once(folders, sandbox)
    [left] = event(events, "preset.backlog_left")
    assert left["count"] == 3 and left["reason"].startswith("its folder changed")
    assert generate_posts(sandbox) == []
    move_in(folders, second, "b9.png", png(19))
    move_in(folders, first, "a2.png", png(2))  # the old folder is no longer the preset's
    run_once(folders, sandbox)
    assert first_refs(sandbox) == [png(19)]

    capsys.readouterr()
    assert cli.main(["status", "-c", str(folders.config)]) == 0
    assert f"p: 3 file(s) left alone in {second}" in capsys.readouterr().out
    # Back to the first folder: what it holds now lay there before the preset watched it (again).
    write_config(folders, sandbox.base_url, presets={"p": {"prompt": "edit", "folder": str(first)}})
    [left] = event(run_once(folders, sandbox), "preset.backlog_left")
    assert left["count"] == 2 and len(generate_posts(sandbox)) == 1


def test_the_first_start_with_a_full_inbox_says_what_waits_and_its_cost_before_paying(
    folders: Folders, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(3):
        folders.drop(f"p{n}.json", {"prompt": f"picture {n}", "numOutputs": 2})
    events = run_once(folders, sandbox)
    [told] = event(events, "inbox.backlog")
    assert told["count"] == 3 and told["estimated_cost"] == 30  # 5 units an output, 2 outputs, 3 files
    assert told["basis"] == "dryRun of 1 parameter shape(s), every file read"
    assert f"3 prompt file(s) waiting in {folders.inbox} (about 30 creative units)" in capsys.readouterr().err
    api = [r for r in sandbox.requests if r.server == "api" and "/generate/" in r.path]
    assert api[0].query.get("dryRun") == "api"  # the estimate came before anything was paid
    assert len(generate_posts(sandbox)) == 3  # and then they are processed, as documented

    folders.drop("later.json", {"prompt": "later"})
    result = run_cli("run", "--once", "-c", str(folders.config))
    assert result.returncode == 0
    assert f"1 prompt file(s) waiting in {folders.inbox}\n" in result.stderr  # --once always says it
    assert '"inbox.backlog"' not in result.stdout  # not the first start any more
    assert len(generate_posts(sandbox)) == 4


def test_the_first_start_estimate_samples_a_big_backlog_and_never_hangs_on_the_api(
    folders: Folders, sandbox: Sandbox
) -> None:
    files = [
        str(folders.drop(f"b{n:03d}.json", {"prompt": "x", "numOutputs": 1 + n % 2}))
        for n in range(backlog.SAMPLE + 8)
    ]
    folders.drop("bad.json", {"prompt": "x", "numOutputs": 9})
    client = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id="model_google-gemini-pro-image-editing")
    rules = PromptRules(BUILTIN)
    cost, basis = backlog.estimate(sorted(files), folders.inbox, client, rules)
    assert cost == pytest.approx(7.5 * len(files))  # 5 and 10 units, half each
    assert basis == f"dryRun of 2 parameter shape(s) over a sample of 32 of {len(files)} files, scaled"
    cost, basis = backlog.estimate([str(folders.inbox / "bad.json")], folders.inbox, client, rules)
    assert cost is None and basis.startswith("unknown: no valid prompt file")
    client.close()
    dead = ScenarioClient("http://127.0.0.1:9/v1", KEY, SECRET, model_id="m", timeout=1.0, retries=0)
    cost, basis = backlog.estimate(files[:1], folders.inbox, dead, rules)
    assert cost is None and basis.startswith("unknown: no dry run answered")


def test_status_shown_from_the_sandbox_journal_says_take_with_sandbox(tmp_path: Path) -> None:
    """`status` falls back to the sandbox's journal; its hint must then name `take --sandbox`, which
    reads that journal (a plain `take` reads the real one and finds nothing left alone)."""
    from scenario_watch.config import BudgetSettings
    from scenario_watch.journal.store import Store
    from scenario_watch.shell import status

    journal = tmp_path / status.SANDBOX_JOURNAL
    store = Store(journal)
    try:
        report = status.build(store, tmp_path / "lock", BudgetSettings(), 0.0)
    finally:
        store.close()
    report["presets"] = {"colour": {"folder": str(tmp_path), "left_alone": 2}}
    assert "`scenario-watch take --sandbox colour --all` takes them" in status.render(report, journal, 0)

"""The live page in a real headless browser (Debian's chromium): no console error, progress, pictures."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import CHROMIUM, Browser
from conftest import Folders, StartDaemon, free_port, wait_for, write_config
from web_site import Site

from scenario_watch.sandbox import Sandbox
from scenario_watch.sandbox.images import make_png

ARTIFACTS = Path(__file__).parent / "artifacts"  # ignored by git: screenshots to look at

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed (.ci/run installs it)"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site")
    yield s
    s.close()


def keep(shot: Path) -> None:
    """Keep a screenshot beside the tests too (tmp_path is removed after a few runs)."""
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    print(f"screenshot: {ARTIFACTS / shot.name}")


def test_the_page_shows_progress_then_the_result_and_failures_with_hints(
    site: Site, browser: Browser, tmp_path: Path
) -> None:
    site.run_daemon({"queue": "budget until 2030-01-02T00:00:00Z", "queued": 1})
    earlier = site.done("beach.json", "Turn the sky into a purple aurora", outputs=2)
    site.failed(
        "typo.json",
        "validate",
        "invalid prompt file: unknown key 'promt'",
        "did you mean 'prompt'? fix the file and run `scenario-watch retry typo.json`",
    )
    running = site.running("cat.json", "Paint the cat in the style of a 1920s travel poster", progress=0.4)
    guessed = site.running("dog.json", "Give the dog a tiny wizard hat")  # the API gave no progress yet
    site.claimed("later.json", "Waits for tomorrow's budget")

    browser.viewport(1280, 900)
    browser.open(site.listener.url + "/")
    browser.wait_js(f"document.querySelector('#running [data-id=\"{running}\"] progress')", "a running job")
    assert browser.js(f"document.querySelector('#running [data-id=\"{running}\"] progress').value") == 0.4
    assert browser.js(f"document.querySelector('#running [data-id=\"{running}\"]').textContent").count("40 %")
    estimate = browser.js(
        f"document.querySelector('#running [data-id=\"{guessed}\"] .estimated').textContent"
    )
    assert estimate.startswith("~") and estimate.endswith("%")  # marked as an estimate
    waiting = browser.js("document.querySelector('#waiting').textContent")
    assert "later.json" in waiting and "waiting for budget until 2030-01-02T00:00:00Z" in waiting
    failure = browser.js("document.querySelector('.card.failed').textContent")
    assert "unknown key 'promt'" in failure and "hint: did you mean 'prompt'?" in failure
    pill = browser.js("document.querySelector('#daemon').textContent")
    assert pill.startswith(f"running · PID {os.getpid()}")  # the journal's lock holder: this test
    loaded = '(id) => [...document.querySelectorAll(`.card[data-id="${id}"] img`)]'
    all_loaded = f"({loaded})({{id}}).every(i => i.complete && i.naturalWidth > 0)"
    browser.wait_js(
        f"({loaded})({earlier}).length === 3 && " + all_loaded.format(id=earlier), "earlier pictures"
    )

    keep(browser.screenshot(tmp_path / "page-running.png"))

    # The job finishes: the page shows its thumbnails beside its reference, without a reload.
    site.finish(running, outputs=2)
    card = f"document.querySelector('.card[data-id=\"{running}\"]')"
    browser.wait_js(card, "the finished job's card")
    assert browser.js(f"{card}.querySelectorAll('a.thumb.output').length") == 2
    assert browser.js(f"{card}.querySelectorAll('a.thumb.reference').length") == 1
    browser.wait_js(all_loaded.format(id=running), "its thumbnails to load")
    assert (
        browser.js(f"{card}.querySelector('a.thumb.output').getAttribute('href')") == f"/picture/{running}/1"
    )
    assert browser.js(f"document.querySelector('#running [data-id=\"{running}\"]')") is None
    keep(browser.screenshot(tmp_path / "page-desktop.png"))

    browser.viewport(390, 844, mobile=True)
    browser.wait_js("document.documentElement.scrollWidth <= 390", "no sideways scrolling on a phone")
    keep(browser.screenshot(tmp_path / "page-phone.png"))

    browser.js("1")  # collect what arrived meanwhile
    assert browser.problems == []

    # The check itself works: an inline script (what the CSP forbids) is reported as a problem.
    browser.js("document.body.append(Object.assign(document.createElement('script'), {textContent: 'x=1'}))")

    def reported() -> bool:
        browser.js("1")  # each call also collects the events that arrived before its answer
        return any("Content Security Policy" in problem for problem in browser.problems)

    wait_for(reported, 10, "the CSP violation to be reported")


def test_the_page_of_a_sandbox_run(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    """The real daemon (a process) on the sandbox: a job's progress, then its thumbnails; a failure's hint."""
    port = free_port()
    write_config(folders, sandbox.base_url, http={"listen": f"127.0.0.1:{port}"})
    proc = daemon()
    url = f"http://127.0.0.1:{port}/"
    assert proc.saw("daemon.page", url=url)
    browser.viewport(1280, 900)
    browser.open(url)
    browser.wait_js(
        "document.querySelector('#daemon').textContent.startsWith('running')", "the daemon's pill"
    )

    # A generation that fails at Scenario, with the API's hint.
    sandbox.fail_next_jobs(1, "the prompt was refused by the safety filter", "rephrase the prompt")
    folders.drop("storm.json", {"prompt": "a storm over the harbour"})
    failed = "document.querySelector('.card.failed')"
    browser.wait_js(failed, "the failure's card")
    text = browser.js(f"{failed}.textContent")
    assert "storm.json" in text and "the prompt was refused by the safety filter" in text
    assert browser.js(f"{failed}.querySelector('.hint').textContent") == "hint: rephrase the prompt"

    # A job long enough to be seen running: the API's progress on a bar, then its thumbnails.
    sandbox.generation_seconds = 6.0
    staging = folders.root / "staging"
    (staging / "cat.png").write_bytes(make_png("a cat", 320, 240))
    os.replace(staging / "cat.png", folders.inbox / "cat.png")
    folders.drop(
        "cat.json", {"prompt": "Paint the cat blue", "referenceImages": ["cat.png"], "numOutputs": 2}
    )
    bars = "[...document.querySelectorAll('#running .job progress[value]')]"
    browser.wait_js(f"{bars}.some(p => p.value > 0 && p.value < 1)", "the running job's progress")
    assert "cat.json" in browser.js("document.querySelector('#running').textContent")
    assert browser.js("document.querySelector('#n-running').textContent") == "1"
    keep(browser.screenshot(tmp_path / "sandbox-run-running.png"))

    done = "document.querySelector('.card.done')"
    browser.wait_js(done, "the finished job's card", timeout=30)
    prompt_id = browser.js(f"{done}.dataset.id")
    assert browser.js(f"{done}.querySelectorAll('a.thumb.output').length") == 2
    assert browser.js(f"{done}.querySelectorAll('a.thumb.reference').length") == 1
    images = f"[...{done}.querySelectorAll('img')]"
    browser.wait_js(f"{images}.every(i => i.complete && i.naturalWidth > 0)", "its thumbnails to load")
    assert (
        browser.js(f"{done}.querySelector('a.thumb.output').getAttribute('href')")
        == f"/picture/{prompt_id}/1"
    )
    assert browser.js("document.querySelector('#running .job')") is None
    keep(browser.screenshot(tmp_path / "sandbox-run-done.png"))
    browser.js("1")  # collect what arrived meanwhile
    assert browser.problems == []

"""The live page in a real headless browser (Debian's chromium): no console error, progress, pictures."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import CHROMIUM, Browser
from conftest import wait_for
from web_site import Site

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

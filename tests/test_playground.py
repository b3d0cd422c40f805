"""The playground at `/` in a real headless browser: Debian's chromium driven by Playwright's Python
API (no browser download). Type a prompt, run it, see shaded tokens, hover for alternatives and the
formula trace, run side by side, see errors inline. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tokensteer.engine import engine_for
from tokensteer.server import Settings, create_app

from server_helpers import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it as root)")


@pytest.fixture(scope="module")
def live(tiny):
    server = LiveServer(create_app(tiny, Settings(), engine=engine_for(tiny)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(live):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 820})
        pg.set_default_timeout(60_000)
        pg.goto(live.url + "/")
        pg.wait_for_function("document.querySelectorAll('#recipe option').length > 1")
        yield pg
        browser.close()


def fill(page, prompt: str, formula: str = "", trace: bool = False, side: bool = False) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max_tokens", "12")
    page.fill("#formula", formula)
    page.set_checked("#trace", trace)
    page.set_checked("#side", side)


def run(page) -> None:
    page.click("#run")
    page.wait_for_function("!document.getElementById('run').disabled && document.querySelectorAll('.column .meta').length > 0 "
                           "&& [...document.querySelectorAll('.column .meta')].every(m => m.textContent || m.parentNode.querySelector('.error'))")


def test_tokens_stream_shaded_with_alternatives_on_hover(page):
    fill(page, "the cat sat on")
    run(page)
    toks = page.locator("#out .column .tok")
    assert toks.count() >= 10
    shades = {toks.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(toks.count())}
    assert all(s.startswith("rgba(255, 120, 40") for s in shades) and len(shades) > 1  # shaded, by probability
    probs = [float(toks.nth(i).get_attribute("data-p")) for i in range(toks.count())]
    assert all(0 < p <= 1 for p in probs)
    toks.nth(0).hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    assert tip.locator("tr").count() >= 2 and "%" in tip.inner_text()


def test_side_by_side_with_trace(page):
    ARTIFACTS.mkdir(exist_ok=True)
    fill(page, "the cat sat on", formula='M + 2*(M("good happy ") - M("bad sad "))', trace=True, side=True)
    run(page)
    cols = page.locator("#out .column")
    assert cols.count() == 2
    assert cols.nth(0).locator(".tok").count() >= 10 and cols.nth(1).locator(".tok").count() >= 10
    assert "without the controls" in cols.nth(1).locator("h3").inner_text()
    cols.nth(0).locator(".tok").nth(2).hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    assert "formula terms" in text.lower() and 'M("good happy ")' in text and "combined" in text
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_errors_show_inline(page, live):
    fill(page, "the cat sat on", formula="M + (")
    run(page)
    err = page.locator("#out .column .error")
    assert err.count() == 1 and "formula error" in err.inner_text()
    page.screenshot(path=str(ARTIFACTS / "playground-error.png"))
    fill(page, "the cat sat on")
    run(page)
    assert page.locator("#out .column .error").count() == 0 and page.locator("#out .tok").count() >= 10

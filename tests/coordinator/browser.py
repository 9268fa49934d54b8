"""Debian's headless Chromium driven by Playwright, for the dashboard tests: a clear failure,
never a skip, when it cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# No GPU, no sandbox (we may be root), and no calls home: this network is closed.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SETUP_HINT = "run `bash scripts/setup.sh --test` (Debian's chromium, and the test extra)"


def chromium() -> Iterator:
    """A running headless Chromium (a Playwright Browser) until the generator is closed."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.fail(f"the dashboard tests need the playwright package: {SETUP_HINT}")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the dashboard tests need {CHROMIUM}: {SETUP_HINT}")
    with sync_playwright() as p:
        try:
            # Each launch gets a new, empty profile directory of its own.
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as e:
            pytest.fail(f"cannot start {CHROMIUM}: {e}")
        try:
            yield browser
        finally:
            browser.close()


class Tab:
    """The dashboard in a fresh browser context (its own sessionStorage), recording console
    errors and uncaught exceptions."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url + "/")

    def expect(self, selector: str):
        """Playwright's retrying assertions on the elements `selector` matches."""
        from playwright.sync_api import expect

        return expect(self.page.locator(selector))

    def close(self) -> None:
        self.context.close()


@contextmanager
def open_tab(browser, url: str) -> Iterator[Tab]:
    """A Tab on `url`, closed when the block ends."""
    tab = Tab(browser, url)
    try:
        yield tab
    finally:
        tab.close()

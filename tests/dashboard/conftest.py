"""Fixtures of the dashboard tests: Debian's chromium driven by Playwright (no browser
download), and the test app served by a real uvicorn with the dashboard mounted."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Debian's chromium is missing (scripts/test installs it: apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope: Playwright's sync API keeps an event loop running in this thread
    # while it is open, which stops the anyio tests of other modules from running.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()


#: Where the browser tests save their screenshots: docs/images/ (shown by docs/dashboard.md)
#: when FASTPROF_UPDATE_SCREENSHOTS=1, else a scratch directory (a test run leaves the tree clean).
IMAGES = (
    os.path.join(os.path.dirname(__file__), "..", "..", "docs", "images")
    if os.environ.get("FASTPROF_UPDATE_SCREENSHOTS") == "1"
    else os.path.join(tempfile.gettempdir(), "fastprof-screenshots")
)

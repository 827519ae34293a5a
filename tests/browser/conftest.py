"""Browser fixtures: Debian's Chromium, headless, driven by Playwright (never a downloaded browser).

In CI (``CI`` set) a missing Chromium fails the suite instead of skipping it: ``.ci/run`` installs
it with apt-get, so its absence there is a broken machine, not an optional extra.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_KEY, Gateway, make_settings, start_gateway

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
# A test run leaves the work tree as it found it: the committed screenshots are rewritten only on
# request (`UPDATE_SCREENSHOTS=1 make test`); otherwise they go to a scratch folder.
SCREENSHOTS_UPDATE = os.environ.get("UPDATE_SCREENSHOTS") == "1"
# The local renderer paces its streamed events, as a real upstream would.
LOCAL_PACED: dict[str, Any] = {"name": "local", "kind": "local", "models": ["*"], "stream_pace_s": 0.05}


# Module scope, not session: Playwright's sync API keeps its own event loop running in this thread
# while it is open, and any asyncio test that ran meanwhile would find "another loop running".
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        message = f"Debian's chromium is missing ({CHROMIUM}); `.ci/run` installs it with apt-get"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    # Retrying assertions wait as long as the pages' own actions (a loaded CI box is slow).
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        # launch() gives every run a fresh temporary profile (user-data-dir) of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Pages in fresh browser contexts (own cookies), with console errors collected."""
    contexts: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("viewport", {"width": 1280, "height": 860})
        context = browser.new_context(accept_downloads=True, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.console_errors = []  # type: ignore[attr-defined]
        # Script errors and CSP refusals; a page answered 4xx on purpose is no error of the page's.
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        page.on(
            "console",
            lambda m: (
                m.type == "error"
                and not m.text.startswith("Failed to load resource")
                and page.console_errors.append(m.text)
            ),
        )
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def console_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("console-gateway")
    gw = start_gateway(make_settings(data_dir, [LOCAL_PACED], console={"thumbnails": True}), data_dir)
    yield gw
    gw.close()


def sign_in(page: Any, gateway: Gateway, key: str = ADMIN_KEY) -> None:
    page.goto(gateway.url + "/console/login")
    page.get_by_label("API key").fill(key)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/console/(overview|usage)$"))


def screenshot(page: Any, name: str, folder: Path | None = None) -> Path:
    target = SCREENSHOTS if SCREENSHOTS_UPDATE or folder is None else folder
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

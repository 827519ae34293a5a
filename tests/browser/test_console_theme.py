"""Dark mode (issue 26): it follows prefers-color-scheme, and a keyboard-operable toggle overrides
it, kept in localStorage across pages and reloads."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

from tests.browser.conftest import sign_in
from tests.conftest import Gateway

DARK_BG = "rgb(15, 19, 24)"
LIGHT_BG = "rgb(246, 247, 249)"


def _background(page: Any) -> str:
    return str(page.evaluate("getComputedStyle(document.body).backgroundColor"))


def test_the_console_follows_the_systems_dark_scheme(console_gateway: Gateway, new_page: Any) -> None:
    page = new_page(color_scheme="dark")
    sign_in(page, console_gateway)
    assert _background(page) == DARK_BG
    expect(page.get_by_role("button", name="Dark mode")).to_have_attribute("aria-pressed", "true")
    light = new_page(color_scheme="light")
    sign_in(light, console_gateway)
    assert _background(light) == LIGHT_BG
    expect(light.get_by_role("button", name="Dark mode")).to_have_attribute("aria-pressed", "false")


def test_the_toggle_works_from_the_keyboard_and_is_remembered(
    console_gateway: Gateway, new_page: Any
) -> None:
    page = new_page(color_scheme="light")
    sign_in(page, console_gateway)
    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Tab")  # the toggle
    assert page.evaluate("document.activeElement.id") == "theme-toggle"
    page.keyboard.press("Space")
    expect(page.locator("#theme-toggle")).to_have_attribute("aria-pressed", "true")
    assert _background(page) == DARK_BG
    assert page.evaluate("localStorage.getItem('console-theme')") == "dark"
    # Another page, then a reload: still dark, against the system's light scheme.
    page.get_by_role("navigation").get_by_role("link", name="Requests").click()
    page.wait_for_url("**/console/requests")
    assert _background(page) == DARK_BG
    page.reload()
    assert _background(page) == DARK_BG
    expect(page.locator("#theme-toggle")).to_have_attribute("aria-pressed", "true")
    # And back to light with Enter.
    page.locator("#theme-toggle").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#theme-toggle")).to_have_attribute("aria-pressed", "false")
    assert _background(page) == LIGHT_BG
    assert page.evaluate("localStorage.getItem('console-theme')") == "light"
    assert page.console_errors == []

"""Keys in the browser (issue 26): the list's budget bars, balance, last use, expiry and state;
a form that sets every admin-API key setting; a copy button for a new secret."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from playwright.sync_api import expect

from app.domain.money import format_micros
from tests.browser.conftest import sign_in
from tests.conftest import Gateway


def wait_logged(gateway: Gateway, request_id: str) -> None:
    """The request log is written in batches off the hot path: wait for this request's row."""
    for _ in range(300):
        if gateway.query(f"SELECT id FROM request_log WHERE request_id = '{request_id}'"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached the request log")


def test_the_key_form_sets_every_setting_and_the_secret_copies(
    console_gateway: Gateway, new_page: Any
) -> None:
    page = new_page(permissions=["clipboard-read", "clipboard-write"])
    sign_in(page, console_gateway)
    page.goto(console_gateway.url + "/console/keys/new")
    page.get_by_label("Name").fill("every-setting")
    page.get_by_label("Owner / tenant").fill("acme")
    page.get_by_label("Expires at (UTC)").fill("2099-01-02T03:04")
    page.get_by_label("Quota (total)").fill("10")
    page.get_by_label("Monthly quota").fill("4")
    page.get_by_label("Balance").fill("7.5")
    page.get_by_label("Price multiplier").fill("1.25")
    page.get_by_label("Requests per minute").fill("60")
    page.get_by_label("Images per minute").fill("30")
    page.get_by_label("Concurrent requests").fill("4")
    page.get_by_label("Queued tasks (max)").fill("3")
    page.get_by_label("Tasks running at once (max)").fill("2")
    page.get_by_label("Moderation policy").select_option("strict")
    page.get_by_label("Blocked phrases (one a line)").fill("kraken\nsea serpent")
    page.get_by_label("Allowed phrases (one a line)").fill("calamari")
    page.get_by_label("Request-log thumbnails").select_option("off")
    page.get_by_label("Metadata (a JSON object)").fill('{"team": "sea", "tier": 2}')
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("heading", name="Key created")).to_be_visible()
    secret = page.get_by_label("API key for “every-setting”").input_value()
    key_id = page.locator("#new-key-id").inner_text()

    # The copy button puts the secret on the clipboard and says so.
    page.get_by_role("button", name="Copy key").click()
    expect(page.locator('[data-copy-status="new-secret"]')).to_have_text("Copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == secret

    body = console_gateway.admin("GET", f"/admin/keys/{key_id}").json()
    assert body["owner"] == "acme" and body["expires_at"] == int(
        datetime(2099, 1, 2, 3, 4, tzinfo=UTC).timestamp()
    )
    assert (body["quota"], body["monthly_quota"], body["balance"]) == ("10.000000", "4.000000", "7.500000")
    assert body["price_multiplier"] == "1.250000"
    assert (body["rpm"], body["ipm"], body["concurrency"]) == (60, 30, 4)
    assert (body["max_queued_tasks"], body["max_tasks_in_flight"]) == (3, 2)
    assert body["moderation"] == "strict" and body["thumbnails"] is False
    assert body["moderation_block"] == ["kraken", "sea serpent"] and body["moderation_allow"] == ["calamari"]
    assert body["metadata"] == {"team": "sea", "tier": 2}

    # Edit: the form shows the stored values, and changes the queue limits.
    page.goto(console_gateway.url + f"/console/keys/{key_id}")
    assert page.get_by_label("Queued tasks (max)").input_value() == "3"
    assert json.loads(page.get_by_label("Metadata (a JSON object)").input_value()) == {
        "team": "sea",
        "tier": 2,
    }
    page.get_by_label("Queued tasks (max)").fill("5")
    page.get_by_label("Tasks running at once (max)").fill("")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_url(re.compile(r".*\?saved=1$"))
    row = console_gateway.key_row(key_id)
    assert (row["max_queued_tasks"], row["max_tasks_in_flight"]) == (5, None)

    # Bad metadata is refused beside its field, and nothing changes.
    page.get_by_label("Metadata (a JSON object)").fill("[1, 2]")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator('[data-error-for="metadata"]')).to_be_visible()
    assert console_gateway.admin("GET", f"/admin/keys/{key_id}").json()["metadata"] == {
        "team": "sea",
        "tier": 2,
    }
    assert page.console_errors == []


def test_the_keys_list_shows_budget_bars_balance_last_use_expiry_and_state(
    console_gateway: Gateway, new_page: Any
) -> None:
    secret, key_id = console_gateway.create_key(
        name="budgeted", quota="2", monthly_quota="1", balance="3", expires_at="2099-05-06T07:08:00Z"
    )
    _, idle_id = console_gateway.create_key(name="never-used")
    console_gateway.admin("PATCH", f"/admin/keys/{idle_id}", json={"enabled": False})
    raw = console_gateway.client(secret).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a budget bar", size="1024x1024", quality="low"
    )
    wait_logged(console_gateway, raw.headers["x-request-id"])
    row = console_gateway.key_row(key_id)
    spent = row["spent_micros"]
    assert spent > 0

    page = new_page()
    sign_in(page, console_gateway)
    page.goto(console_gateway.url + "/console/keys?q=budgeted")
    line = page.locator(f'tr[data-key-id="{key_id}"]')
    expect(line.locator(".key-name")).to_have_text("budgeted")
    expect(line.locator(".key-name")).to_have_attribute("title", key_id)
    expect(line).to_contain_text(key_id)  # the id on its secondary line
    expect(line.locator("td.balance")).to_have_text(format_micros(3_000_000 - spent))
    total = line.locator(f"#quota-{key_id}")
    expect(total).to_have_attribute("value", str(spent))
    expect(total).to_have_attribute("max", "2000000")
    monthly = line.locator(f"#monthly-{key_id}")
    expect(monthly).to_have_attribute("value", str(spent))
    expect(monthly).to_have_attribute("max", "1000000")
    expect(total).to_have_attribute(
        "aria-label", f"Total quota used of budgeted: {spent * 100 // 2_000_000} %"
    )
    expect(line.locator("td.last-used")).not_to_have_text("never")
    expect(line.locator("td.expires")).to_have_text("2099-05-06")
    expect(line.locator("td.expires time")).to_have_attribute("title", "2099-05-06 07:08:00")
    expect(line.locator(".status")).to_have_text("active")

    # The state filter: the disabled key, never used, no budget bars.
    page.get_by_role("searchbox", name="Search").fill("")
    page.get_by_label("State").select_option("disabled")
    page.get_by_role("button", name="Search").click()
    idle = page.locator(f'tr[data-key-id="{idle_id}"]')
    expect(idle.locator(".status")).to_have_text("disabled")
    expect(idle.locator("td.last-used")).to_have_text("never")
    expect(idle.locator("meter")).to_have_count(0)
    expect(page.locator(f'tr[data-key-id="{key_id}"]')).to_have_count(0)
    assert page.console_errors == []

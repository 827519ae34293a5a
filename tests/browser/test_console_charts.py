"""Charts (issue 26): requests stacked by status class (refused ones included), spend by key name
and by model, each bar with a tooltip that reads as a sentence."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import sign_in
from tests.browser.test_console_keys import wait_logged
from tests.conftest import Gateway


def _titles(page: Any, selector: str) -> list[str]:
    return [t for t in page.locator(selector).all_text_contents() if t]


def test_requests_stack_by_status_and_spend_is_drawn_by_key_name_and_model(
    console_gateway: Gateway, new_page: Any
) -> None:
    page = new_page()
    sign_in(page, console_gateway)
    today = datetime.now(UTC).date().isoformat()
    page.goto(console_gateway.url + f"/console/usage?from={today}&to={today}")
    before = _titles(page, "#requests-by-status rect.bar title")

    secret, key_id = console_gateway.create_key(name="chart-tenant")
    client = console_gateway.client(secret)
    raw = client.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a chart of kites", size="1024x1024", quality="low"
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1", prompt="a cat", size="13x17")
    wait_logged(console_gateway, raw.headers["x-request-id"])
    wait_logged(console_gateway, refused.value.response.headers["x-request-id"])

    def count(titles: list[str], name: str) -> int:
        for title in titles:
            found = re.match(rf"{today} · {name}: ([0-9,]+) requests \(\d+ % of [0-9,]+\)$", title)
            if found:
                return int(found.group(1).replace(",", ""))
        return 0

    # Today's bar is read live: one more ok and one more 4xx than before, each with its share.
    page.reload()
    after = _titles(page, "#requests-by-status rect.bar title")
    assert count(after, "ok") == count(before, "ok") + 1, after
    assert count(after, "4xx") == count(before, "4xx") + 1, after
    expect(page.locator("#requests-by-status .legend")).to_have_text(["ok", "4xx", "5xx", "blocked"])

    # Spend by key shows the key's name (with the head of its id), and by model the model.
    (charged,) = [r for r in console_gateway.ledger() if r["key_id"] == key_id]
    cost = f"{charged['cost_micros'] // 1_000_000}.{charged['cost_micros'] % 1_000_000:06d}"
    by_key = _titles(page, "#spend-by-key rect.bar title")
    assert f"chart-tenant ({key_id[:10]}…): {cost} PTC" in by_key, by_key
    assert any(t.startswith("gpt-image-1: ") for t in _titles(page, "#spend-by-model rect.bar title"))

    # The overview carries the same stack; a tenant's usage page too, of their own requests only.
    page.goto(console_gateway.url + "/console/overview")
    expect(page.locator("#requests-by-status")).to_be_visible()
    tenant = new_page()
    sign_in(tenant, console_gateway, secret)
    tenant.goto(console_gateway.url + f"/console/usage?from={today}&to={today}")
    mine = _titles(tenant, "#requests-by-status rect.bar title")
    assert count(mine, "ok") == 1 and count(mine, "4xx") == 1, mine
    assert tenant.locator("#spend-by-key").count() == 0
    assert page.console_errors == [] and tenant.console_errors == []

"""Webhook pages in the browser (issue 26): a key's endpoints (add, disable, rotate with the secret
shown once, delete) and the deliveries page (status, attempts, next retry, last code, redeliver)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LOCAL_PACED, sign_in
from tests.conftest import Gateway, make_settings, start_gateway
from tests.fakes.webhook_receiver import WebhookReceiver


@pytest.fixture
def hooked_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """No task workers (a task stays queued until cancelled) and an hour's backoff: a failed
    delivery waits for the redeliver button, not for its own retry."""
    gw = start_gateway(
        make_settings(tmp_path, [LOCAL_PACED], tasks={"workers": 0}, webhooks={"initial_backoff_s": 3600.0}),
        tmp_path,
    )
    yield gw
    gw.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    site = WebhookReceiver().start()
    yield site
    site.stop()


def _delivery(gateway: Gateway, attempts: int) -> dict[str, Any]:
    """The one delivery, once its attempt count is written (the sender records it after the call)."""
    for _ in range(400):
        rows = gateway.query(f"SELECT * FROM webhook_deliveries WHERE attempts >= {attempts}")
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no delivery reached {attempts} attempt(s)")


def test_endpoints_are_added_rotated_disabled_and_deleted_and_a_delivery_is_redelivered(
    hooked_gateway: Gateway, new_page: Any, receiver: WebhookReceiver
) -> None:
    gw = hooked_gateway
    secret, key_id = gw.create_key(name="hooked-tenant")
    page = new_page()
    sign_in(page, gw)

    # Add an endpoint from the key's page; its secret is shown once, with a copy button.
    page.goto(gw.url + f"/console/keys/{key_id}")
    page.get_by_role("link", name="Endpoints of this key").click()
    expect(page.get_by_role("heading", name="Webhook endpoints of hooked-tenant")).to_be_visible()
    page.get_by_label("Endpoint URL").fill("ftp://nowhere.example/")
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.locator('[data-error-for="url"]')).to_contain_text("absolute http(s) URL")
    page.get_by_label("Endpoint URL").fill(receiver.url)
    page.get_by_label("Description (optional)").fill("image events")
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.get_by_role("heading", name="Endpoint added")).to_be_visible()
    expect(page.get_by_role("button", name="Copy secret")).to_be_visible()
    first_secret = page.get_by_label(f"Signing secret for {receiver.url}").input_value()
    endpoint_id = page.locator("#endpoint-id").inner_text()
    assert first_secret.startswith("whsec_")
    receiver.secret = first_secret
    page.get_by_role("link", name="All endpoints of this key").click()
    assert first_secret not in page.content()  # once only
    row = page.locator(f'tr[data-endpoint-id="{endpoint_id}"]')
    expect(row).to_contain_text("image events")
    expect(row.locator(".status")).to_have_text("enabled")

    # A task's event fails at the receiver (500): pending, one attempt, a next retry, code 500.
    receiver.fail_next(500)
    raw = gw.client(secret).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a hooked lighthouse", size="1024x1024", extra_query={"async": "true"}
    )
    task_id = raw.http_response.json()["id"]
    gw.client(secret).post(f"/tasks/{task_id}/cancel", cast_to=object)  # type: ignore[call-overload]
    (failed,) = receiver.wait_for(1)
    assert failed.answered == 500 and failed.event["type"] == "image.task.cancelled"
    delivery = _delivery(gw, 1)
    page.get_by_role("navigation").get_by_role("link", name="Webhooks").click()
    line = page.locator(f'tr[data-delivery-id="{delivery["id"]}"]')
    expect(line.locator(".status")).to_have_text("pending")
    expect(line.locator("td.attempts")).to_have_text("1")
    expect(line.locator("td.last-code")).to_have_text("500")
    expect(line.locator("td.next-retry")).not_to_have_text("—")
    expect(line.locator(".key-name")).to_have_text("hooked-tenant")
    expect(line.locator(".key-name")).to_have_attribute("title", key_id)
    expect(line).to_contain_text(receiver.url)

    # Redeliver from the deliveries page: sent now, same webhook-id, delivered.
    page.get_by_label("Status").select_option("pending")
    page.get_by_role("button", name="Filter").click()
    line.get_by_role("button", name=f"Redeliver {delivery['id']}").click()
    expect(page.get_by_role("status")).to_contain_text("being sent again")
    assert page.get_by_label("Status").input_value() == "pending"  # back on the filtered list
    second = receiver.wait_for(2)[1]
    assert second.verified and second.answered < 300
    assert second.headers["webhook-id"] == failed.headers["webhook-id"] == delivery["id"]
    _delivery(gw, 2)
    page.goto(gw.url + "/console/webhooks?status=delivered")
    expect(line.locator(".status")).to_have_text("delivered")
    expect(line.locator("td.attempts")).to_have_text("2")
    expect(line.locator("td.next-retry")).to_have_text("—")

    # Rotate: a new secret, shown once; the next redelivery is signed with it.
    page.goto(gw.url + f"/console/keys/{key_id}/webhooks")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Rotate secret of {receiver.url}").click()
    expect(page.get_by_role("heading", name="Secret rotated")).to_be_visible()
    rotated = page.get_by_label(f"Signing secret for {receiver.url}").input_value()
    assert rotated.startswith("whsec_") and rotated != first_secret
    receiver.secret = rotated
    page.goto(gw.url + "/console/webhooks")
    page.get_by_role("button", name=f"Redeliver {delivery['id']}").click()
    expect(page.get_by_role("status")).to_contain_text("being sent again")
    assert receiver.wait_for(3)[2].verified

    # Disable, then delete: the admin API sees both.
    page.goto(gw.url + f"/console/keys/{key_id}/webhooks")
    page.get_by_role("button", name=f"Disable {receiver.url}").click()
    expect(page.get_by_role("status")).to_have_text("Endpoint disabled.")
    expect(row.locator(".status")).to_have_text("disabled")
    listed = gw.admin("GET", f"/admin/keys/{key_id}/webhooks").json()["data"]
    assert [(e["id"], e["enabled"]) for e in listed] == [(endpoint_id, False)]
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Delete {receiver.url}").click()
    expect(page.get_by_role("status")).to_have_text("Endpoint deleted.")
    expect(row).to_have_count(0)
    assert gw.admin("GET", f"/admin/keys/{key_id}/webhooks").json()["data"] == []
    assert page.console_errors == []


def test_a_tenant_cannot_open_webhook_pages(console_gateway: Gateway, new_page: Any) -> None:
    secret, key_id = console_gateway.create_key(name="no-hooks")
    page = new_page()
    sign_in(page, console_gateway, secret)
    for path in (f"/console/keys/{key_id}/webhooks", "/console/webhooks"):
        response = page.goto(console_gateway.url + path)
        assert response is not None and response.status == 403, path

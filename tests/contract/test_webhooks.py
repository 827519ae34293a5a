"""Task webhooks (issue 16): Standard Webhooks signatures verified by a real receiver, retries after
a 500 and while the receiver is down, an outbox that survives a gateway restart, redelivery, and
endpoints only an admin can set."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.webhook_receiver import WebhookReceiver

GEN = "/v1/images/generations"
FAST = {"initial_backoff_s": 0.1, "max_backoff_s": 0.5, "poll_s": 0.05}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.stop()


def submit(gw: Gateway, key: str, *, prompt: str = "hook", **query: str) -> httpx.Response:
    return httpx.post(
        gw.url + GEN,
        params={"async": "true", **query},
        json={"model": "gpt-image-1", "prompt": prompt, "quality": "low"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def add_endpoint(gw: Gateway, key_id: str, url: str) -> dict[str, Any]:
    created = gw.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": url, "description": "t"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["secret"].startswith("whsec_") and body["id"].startswith("we_")
    return dict(body)


def deliveries(gw: Gateway, **params: str) -> list[dict[str, Any]]:
    listed = gw.admin("GET", "/admin/webhooks/deliveries", params=params)
    assert listed.status_code == 200, listed.text
    return list(listed.json()["data"])


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_events_are_signed_with_the_keys_secret_and_carry_the_task(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.start()
    gw = gateway_with(fake_upstream_config(upstream), webhooks=FAST)
    key, key_id = gw.create_key(name="hooked")
    endpoint = add_endpoint(gw, key_id, receiver.url)
    receiver.secret = endpoint["secret"]
    # The secret is shown once: never in a listing.
    listed = gw.admin("GET", f"/admin/keys/{key_id}/webhooks").json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]
    assert endpoint["secret"] not in gw.admin("GET", f"/admin/keys/{key_id}/webhooks").text

    task_id = submit(gw, key).json()["id"]
    (got,) = receiver.wait_for(1)
    assert got.verified and got.answered == 204
    event = got.event
    assert event["type"] == "image.task.succeeded" and event["id"] == got.headers["webhook-id"]
    assert event["data"]["id"] == task_id and event["data"]["status"] == "succeeded"
    polled = gw.admin("GET", "/healthz")  # keep the admin client warm; then the tenant's view
    assert polled.status_code == 200
    seen = httpx.get(gw.url + f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert (
        event["data"]["status"] == seen["status"]
        and event["data"]["result"]["usage"] == seen["result"]["usage"]
    )
    # Any other secret fails to verify the same delivery.
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(got.body, got.headers)
    assert wait_until(lambda: [d["status"] for d in deliveries(gw, task_id=task_id)] == ["delivered"])

    # A failed task sends image.task.failed with the error.
    upstream.enqueue_fault(Fault.status(400, "refused upstream", code="content_policy_violation"))
    failed_id = submit(gw, key, prompt="fails").json()["id"]
    second = receiver.wait_for(2)[1]
    assert second.verified and second.event["type"] == "image.task.failed"
    assert second.event["data"]["id"] == failed_id
    assert second.event["data"]["error"]["code"] == "content_policy_violation"

    # Rotation: a new secret, shown once; the next event verifies with it and not with the old one.
    rotated = gw.admin("POST", f"/admin/keys/{key_id}/webhooks/{endpoint['id']}/rotate").json()
    assert rotated["secret"] != endpoint["secret"]
    submit(gw, key, prompt="after rotation")
    third = receiver.wait_for(3, verified_only=False)[2]
    assert not third.verified  # the receiver still holds the old secret
    Webhook(rotated["secret"]).verify(third.body, third.headers)


def test_a_delivery_is_retried_after_a_500(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.start()
    gw = gateway_with(fake_upstream_config(upstream), webhooks=FAST)
    key, key_id = gw.create_key(name="retried")
    receiver.secret = add_endpoint(gw, key_id, receiver.url)["secret"]
    receiver.fail_next(500, 503)
    task_id = submit(gw, key).json()["id"]
    attempts = receiver.wait_for(3, verified_only=False)
    assert [a.answered for a in attempts] == [500, 503, 204]
    assert all(a.verified for a in attempts)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1  # one event, tried three times
    assert wait_until(lambda: deliveries(gw, task_id=task_id)[0]["status"] == "delivered")
    (row,) = deliveries(gw, task_id=task_id)
    assert row["attempts"] == 3 and row["last_status_code"] == 204

    # The admin's redeliver action sends it again, with the same webhook-id.
    again = gw.admin("POST", f"/admin/webhooks/deliveries/{row['id']}/redeliver")
    assert again.status_code == 200 and again.json()["status"] == "pending"
    fourth = receiver.wait_for(4)[3]
    assert fourth.headers["webhook-id"] == row["id"] and fourth.verified
    missing = gw.admin("POST", "/admin/webhooks/deliveries/msg_nope/redeliver")
    assert missing.status_code == 404


def test_the_outbox_survives_a_restart_while_the_receiver_is_down(
    upstream: FakeOpenAI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    data_dir = tmp_path / "gw"
    settings = make_settings(data_dir, [fake_upstream_config(upstream)], webhooks=FAST)
    first = start_gateway(settings, data_dir)
    try:
        key, key_id = first.create_key(name="restart")
        receiver.secret = add_endpoint(first, key_id, receiver.url)["secret"]
        task_id = submit(first, key).json()["id"]
        # The receiver is down: attempts fail and are recorded, the event stays pending.
        assert wait_until(lambda: (deliveries(first, task_id=task_id) or [{}])[0].get("attempts", 0) >= 2)
        (pending,) = deliveries(first, task_id=task_id)
        assert pending["status"] == "pending" and pending["last_error"]
        assert receiver.url not in pending["last_error"]
    finally:
        first.close()
    receiver.start()
    assert receiver.received == []  # nothing arrives while no gateway runs
    second = start_gateway(settings, data_dir)
    try:
        (got,) = receiver.wait_for(1)
        assert got.verified and got.event["data"]["id"] == task_id
        assert got.headers["webhook-id"] == pending["id"]
        assert wait_until(lambda: deliveries(second, task_id=task_id)[0]["status"] == "delivered")
    finally:
        second.close()


def test_a_tenant_cannot_aim_a_webhook_at_an_arbitrary_url(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.start()
    gw = gateway_with(fake_upstream_config(upstream), webhooks=FAST)
    key, key_id = gw.create_key(name="tenant")
    _, other_id = gw.create_key(name="other")
    others = add_endpoint(gw, other_id, receiver.url)
    for chosen in (receiver.url, "https://attacker.example/hook", others["id"], "we_unknown"):
        refused = submit(gw, key, webhook=chosen)
        assert refused.status_code == 400, (chosen, refused.text)
        assert refused.json()["error"]["param"] == "webhook"
    # A URL in the body is not a webhook either: nothing is delivered anywhere.
    sneaky = httpx.post(
        gw.url + GEN,
        params={"async": "true"},
        json={"model": "gpt-image-1", "prompt": "x", "webhook_url": receiver.url, "webhook": receiver.url},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert sneaky.status_code == 202
    # webhook applies to async requests only.
    sync = httpx.post(
        gw.url + GEN,
        params={"webhook": "none"},
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert sync.status_code == 400 and sync.json()["error"]["param"] == "webhook"
    # Its own endpoint it may choose; "none" sends nothing.
    own = add_endpoint(gw, key_id, receiver.url)
    receiver.secret = own["secret"]
    chosen_id = submit(gw, key, webhook=own["id"]).json()["id"]
    silent_id = submit(gw, key, webhook="none").json()["id"]
    (got,) = receiver.wait_for(1)
    assert got.event["data"]["id"] == chosen_id
    assert wait_until(
        lambda: (
            httpx.get(gw.url + f"/v1/tasks/{silent_id}", headers={"Authorization": f"Bearer {key}"}).json()[
                "status"
            ]
            == "succeeded"
        )
    )
    assert deliveries(gw, task_id=silent_id) == [] and deliveries(gw, task_id=sneaky.json()["id"]) == []
    assert [r.event["data"]["id"] for r in receiver.received] == [chosen_id]
    # Endpoint URLs are checked when the admin sets them.
    bad = gw.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": "file:///etc/passwd"})
    assert bad.status_code == 400

"""``POST /v1/tasks/{id}/cancel`` (issue 26, SPEC §11): a queued task stops at once and its hold
is released exactly; a running one finishes and is billed; webhooks get image.task.cancelled."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Gateway, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.webhook_receiver import WebhookReceiver

FAST_HOOKS = {"initial_backoff_s": 0.1, "max_backoff_s": 0.5, "poll_s": 0.05}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.stop()


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.05)
    return value


def submit(client: openai.OpenAI, prompt: str = "a queued lighthouse") -> dict[str, Any]:
    raw = client.images.with_raw_response.generate(
        model="gpt-image-1", prompt=prompt, size="1024x1024", quality="low", extra_query={"async": "true"}
    )
    assert raw.http_response.status_code == 202
    body: dict[str, Any] = raw.http_response.json()
    return body


def cancel(client: openai.OpenAI, task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.post(f"/tasks/{task_id}/cancel", cast_to=object)  # type: ignore[arg-type]
    return body


def test_a_queued_task_is_cancelled_at_once_and_its_hold_released(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.start()
    # No worker in this process: the task stays queued until cancelled.
    gw = gateway_with(fake_upstream_config(upstream), tasks={"workers": 0}, webhooks=FAST_HOOKS)
    key, key_id = gw.create_key(name="canceller", balance="10")
    created = gw.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": receiver.url})
    receiver.secret = created.json()["secret"]
    client = gw.client(key)
    task = submit(client)
    held = gw.key_row(key_id)
    assert task["status"] == "queued" and held["reserved_micros"] > 0
    calls_before = upstream.count("/v1/images/generations")

    # Another key cannot cancel it (and cannot tell it exists).
    with pytest.raises(openai.NotFoundError):
        cancel(gw.client(), task["id"])
    cancelled = cancel(client, task["id"])
    assert cancelled["id"] == task["id"] and cancelled["status"] == "cancelled"
    assert cancelled["error"]["code"] == "task_cancelled" and cancelled["finished_at"] is not None
    # The hold is released exactly: nothing reserved, nothing spent, the balance whole, no ledger row.
    row = gw.key_row(key_id)
    assert (row["reserved_micros"], row["spent_micros"], row["balance_micros"]) == (0, 0, 10_000_000)
    assert gw.query(f"SELECT COUNT(*) AS n FROM reservations WHERE key_id = '{key_id}'") == [{"n": 0}]
    assert [r for r in gw.ledger() if r["key_id"] == key_id] == []
    # Polling agrees; cancelling again changes nothing.
    polled = client.get(f"/tasks/{task['id']}", cast_to=object)  # type: ignore[call-overload]
    assert polled["status"] == "cancelled"
    assert cancel(client, task["id"])["status"] == "cancelled"
    assert gw.key_row(key_id)["reserved_micros"] == 0
    # The webhook: image.task.cancelled, signed like every other event.
    (got,) = receiver.wait_for(1)
    assert got.verified and got.event["type"] == "image.task.cancelled"
    assert got.event["data"]["id"] == task["id"] and got.event["data"]["status"] == "cancelled"
    # The upstream was never called.
    assert upstream.count("/v1/images/generations") == calls_before


def test_a_running_task_finishes_and_is_billed(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    key, key_id = gw.create_key(name="runner")
    client = gw.client(key)
    upstream.hold(10_000, timeout_s=60)  # held until released
    try:
        task = submit(client, "a running lighthouse")
        assert wait_until(lambda: upstream.in_flight == 1)
        answered = cancel(client, task["id"])
        # Already at the upstream, which offers no cancel: it runs on.
        assert answered["status"] == "in_progress"
    finally:
        upstream.release()
    done = wait_until(
        lambda: (
            (t := client.get(f"/tasks/{task['id']}", cast_to=object))["status"] == "succeeded"  # type: ignore[call-overload]
            and t
        )
    )
    assert done and done["status"] == "succeeded"
    rows = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert len(rows) == 1 and rows[0]["cost_micros"] > 0 and rows[0]["status"] == "succeeded"
    row = gw.key_row(key_id)
    assert row["reserved_micros"] == 0 and row["spent_micros"] == rows[0]["cost_micros"]

"""The webhook sender isolates its deliveries: one event that cannot be rendered (its result image
unreadable on this node) is retried on its own backoff and holds back no other event. Before, its
exception failed the whole round, so every other due event of the batch stayed leased and unsent
(found by the cluster suite: a node without the worker's store blocked all deliveries)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from app.core.errors import NotFoundError
from app.db.tables import WebhookDelivery
from app.webhooks.endpoints import WebhookEndpoints
from app.webhooks.outbox import Outbox
from app.webhooks.sender import WebhookSender
from tests.fakes.webhook_receiver import WebhookReceiver

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Endpoint:
    url: str
    secret: str = SECRET
    enabled: bool = True


@dataclass
class RecordingOutbox:
    """The outbox's three calls the sender makes, recorded."""

    due: list[WebhookDelivery]
    delivered_ids: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    async def claim_due(self, limit: int) -> list[WebhookDelivery]:
        taken, self.due = self.due[:limit], self.due[limit:]
        return taken

    async def delivered(self, delivery: WebhookDelivery, status: int) -> None:
        self.delivered_ids.append(delivery.id)

    async def attempt_failed(self, delivery: WebhookDelivery, status: int | None, error: str) -> None:
        self.failed.append((delivery.id, error))


class OneEndpoint:
    def __init__(self, url: str) -> None:
        self.endpoint = Endpoint(url)

    async def get(self, endpoint_id: str) -> Endpoint:
        return self.endpoint


def delivery(task_id: str) -> WebhookDelivery:
    return WebhookDelivery(
        id="msg_" + task_id,
        endpoint_id="we_1",
        key_id="key_1",
        task_id=task_id,
        event_type="image.task.succeeded",
        snapshot={"id": task_id},
        status="pending",
        attempts=1,
        created_at=datetime.now(UTC),
    )


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver().start()
    hook.secret = SECRET
    yield hook
    hook.stop()


async def test_an_event_that_cannot_be_rendered_holds_back_no_other(receiver: WebhookReceiver) -> None:
    async def render(task_id: str) -> dict[str, Any] | None:
        if task_id == "task_unreadable":
            raise NotFoundError("No such image.")
        return {"id": task_id, "status": "succeeded"}

    outbox = RecordingOutbox([delivery("task_a"), delivery("task_unreadable"), delivery("task_b")])
    sender = WebhookSender(
        cast(Outbox, outbox),
        cast(WebhookEndpoints, OneEndpoint(receiver.url)),
        render,
        timeout_s=10,
        concurrency=4,
        batch=10,
        poll_s=1,
    )
    try:
        assert await sender.send_due() == 3
    finally:
        if sender._session is not None:
            await sender._session.close()
    assert sorted(outbox.delivered_ids) == ["msg_task_a", "msg_task_b"]
    assert outbox.failed == [("msg_task_unreadable", "could not render: NotFoundError")]
    assert sorted(r.event["data"]["id"] for r in receiver.received) == ["task_a", "task_b"]
    assert all(r.verified for r in receiver.received)

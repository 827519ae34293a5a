"""Send due outbox deliveries: sign them (Standard Webhooks, via the ``standardwebhooks`` package),
POST them, and record the outcome. A 2xx is delivered; anything else (an error status, a refused
connection, a timeout) is retried with backoff. Logs name the delivery and endpoint ids, never the
URL (it may carry a token) or the secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from standardwebhooks import Webhook

from app.db.tables import WebhookDelivery
from app.upstream.client import TRANSPORT_ERRORS, Session, delivery_session
from app.webhooks.endpoints import WebhookEndpoints
from app.webhooks.outbox import Outbox

log = logging.getLogger(__name__)

# The task object as GET /v1/tasks/{id} shows it, or None when the task is gone.
RenderTask = Callable[[str], Awaitable[dict[str, Any] | None]]


def signed_headers(secret: str, message_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``."""
    signature = Webhook(secret).sign(message_id, at, body.decode("utf-8"))
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "image-gateway-webhooks/1",
    }


def event_body(delivery: WebhookDelivery, task: dict[str, Any] | None) -> bytes:
    return orjson.dumps(
        {
            "object": "event",
            "id": delivery.id,
            "type": delivery.event_type,
            "created_at": int(delivery.created_at.timestamp()),
            "data": task if task is not None else delivery.snapshot,
        }
    )


class WebhookSender:
    def __init__(
        self,
        outbox: Outbox,
        endpoints: WebhookEndpoints,
        render: RenderTask,
        *,
        timeout_s: float,
        concurrency: int,
        batch: int,
        poll_s: float,
    ) -> None:
        self._outbox = outbox
        self._endpoints = endpoints
        self._render = render
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._batch = batch
        self._poll_s = poll_s
        self.wakeup = asyncio.Event()
        self._session: Session | None = None

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    sent = await self.send_due()
                except Exception:
                    log.exception("webhook delivery round failed; retrying")
                    sent = 0
                if sent:
                    continue
                self.wakeup.clear()
                try:
                    async with asyncio.timeout(self._poll_s):
                        await self.wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            if self._session is not None:
                await self._session.close()

    async def send_due(self) -> int:
        """Claim and send one batch of due deliveries; returns how many were claimed."""
        due = await self._outbox.claim_due(self._batch)
        await asyncio.gather(*(self._send(delivery) for delivery in due))
        return len(due)

    async def _send(self, delivery: WebhookDelivery) -> None:
        async with self._slots:
            endpoint = await self._endpoints.get(delivery.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                await self._outbox.attempt_failed(delivery, None, "endpoint removed or disabled")
                return
            try:
                rendered = await self._render(delivery.task_id)
            except Exception as exc:
                # One event that cannot be rendered now (its result image unreadable: a store
                # outage, or a node whose store is not the one the worker wrote to) is retried
                # with its own backoff; it must not fail the round and hold back every other event.
                log.warning(
                    "webhook event could not be rendered",
                    extra={"fields": {"delivery_id": delivery.id, "error": type(exc).__name__}},
                )
                await self._outbox.attempt_failed(delivery, None, f"could not render: {type(exc).__name__}")
                return
            body = event_body(delivery, rendered)
            headers = signed_headers(endpoint.secret, delivery.id, body, datetime.now(UTC))
            status: int | None = None
            try:
                async with self._http().post(
                    endpoint.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    await response.read()
            except TRANSPORT_ERRORS as exc:
                error = f"could not deliver: {type(exc).__name__}"
            else:
                if 200 <= status < 300:
                    await self._outbox.delivered(delivery, status)
                    return
                error = f"receiver answered {status}"
            log.warning(
                "webhook delivery failed",
                extra={
                    "fields": {
                        "delivery_id": delivery.id,
                        "endpoint_id": delivery.endpoint_id,
                        "attempt": delivery.attempts,
                        "error": error,
                    }
                },
            )
            await self._outbox.attempt_failed(delivery, status, error)

    def _http(self) -> Session:
        if self._session is None:
            self._session = delivery_session(total_timeout_s=self._timeout_s)
        return self._session

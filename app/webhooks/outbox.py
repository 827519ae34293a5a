"""The webhook outbox: deliveries written in the transaction that finishes their task, so an event
is never lost and never sent for an outcome that did not commit; claimed with a lease by whichever
process sends (several may: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), retried with exponential
backoff until delivered or past ``retry_period_s``.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.errors import InvalidRequestError, NotFoundError
from app.db.tables import Task, WebhookDelivery, utcnow
from app.db.writer import Writer

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
SUCCEEDED_EVENT, FAILED_EVENT = "image.task.succeeded", "image.task.failed"
# A task its owner cancelled while queued (POST /v1/tasks/{id}/cancel).
CANCELLED_EVENT = "image.task.cancelled"


def event_for(status: str) -> str:
    if status == "cancelled":
        return CANCELLED_EVENT
    return SUCCEEDED_EVENT if status == "succeeded" else FAILED_EVENT


def snapshot_of(task: Task, status: str, error: dict[str, Any] | None) -> dict[str, Any]:
    """What the event says if the task is gone (purged) by the time it is sent."""
    return {
        "id": task.id,
        "task_id": task.id,
        "object": "image.task",
        "status": status,
        "model": task.model,
        "endpoint": task.endpoint,
        **({"error": error} if error else {}),
    }


def public(row: WebhookDelivery) -> dict[str, Any]:
    def ts(value: datetime | None) -> int | None:
        return int(value.timestamp()) if value is not None else None

    return {
        "id": row.id,
        "object": "gateway.webhook_delivery",
        "endpoint_id": row.endpoint_id,
        "key_id": row.key_id,
        "task_id": row.task_id,
        "event_type": row.event_type,
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt_at": ts(row.next_attempt_at) if row.status == PENDING else None,
        "give_up_at": ts(row.give_up_at),
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "created_at": ts(row.created_at),
        "delivered_at": ts(row.delivered_at),
    }


class Outbox:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: Writer,
        *,
        retry_period_s: float,
        initial_backoff_s: float,
        max_backoff_s: float,
        send_lease_s: float,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self._sessions = sessions
        self._writer = writer
        self.retry_period = timedelta(seconds=retry_period_s)
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._send_lease = timedelta(seconds=send_lease_s)
        self._now = clock
        self._rng = rng or random.Random()

    def enqueue_in(
        self, c: Connection, task: Task, *, status: str, error: dict[str, Any] | None = None
    ) -> int:
        """Queue the task's event for each endpoint it chose, inside the caller's transaction."""
        endpoints = [str(e) for e in (task.spec or {}).get("webhooks") or []]
        if not endpoints:
            return 0
        now = self._now()
        c.execute(
            insert(WebhookDelivery),
            [
                dict(
                    id="msg_" + secrets.token_hex(12),
                    endpoint_id=endpoint,
                    key_id=task.key_id,
                    task_id=task.id,
                    event_type=event_for(status),
                    snapshot=snapshot_of(task, status, error),
                    status=PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    give_up_at=now + self.retry_period,
                    created_at=now,
                )
                for endpoint in endpoints
            ],
        )
        return len(endpoints)

    def enqueue_event_in(
        self,
        c: Connection,
        *,
        key_id: str,
        subject_id: str,
        event_type: str,
        snapshot: dict[str, Any],
        endpoints: Sequence[str],
    ) -> int:
        """Queue an event that is not a task's (a batch's: ``batch.completed``, …) for ``endpoints``,
        inside the caller's transaction. ``subject_id`` takes the delivery's task id column: the
        sender's render function tells the subjects apart by their id prefix."""
        if not endpoints:
            return 0
        now = self._now()
        c.execute(
            insert(WebhookDelivery),
            [
                dict(
                    id="msg_" + secrets.token_hex(12),
                    endpoint_id=endpoint,
                    key_id=key_id,
                    task_id=subject_id,
                    event_type=event_type,
                    snapshot=snapshot,
                    status=PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    give_up_at=now + self.retry_period,
                    created_at=now,
                )
                for endpoint in endpoints
            ],
        )
        return len(endpoints)

    async def claim_due(self, limit: int) -> list[WebhookDelivery]:
        """Lease up to ``limit`` deliveries that are due: pushed ``send_lease_s`` ahead, so another
        process does not send them meanwhile, and due again if this one dies mid-send."""
        # A read first: an idle outbox then costs no write transaction (SQLite's write lock) per poll.
        async with self._sessions() as session:
            any_due = await session.scalar(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= self._now())
                .limit(1)
            )
        if any_due is None:
            return []

        def claim(c: Connection) -> list[WebhookDelivery]:
            now = self._now()
            due = (
                select(WebhookDelivery.id)
                .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(limit)
            )
            if c.dialect.name == "postgresql":
                due = due.with_for_update(skip_locked=True)
            ids = list(c.scalars(due))
            if not ids:
                return []
            rows = c.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == PENDING)
                .values(next_attempt_at=now + self._send_lease, attempts=WebhookDelivery.attempts + 1)
                .returning(*WebhookDelivery.__table__.columns)
            ).all()
            return [WebhookDelivery(**row._asdict()) for row in rows]

        return await self._writer.run(claim)

    async def delivered(self, delivery: WebhookDelivery, status_code: int) -> None:
        await self._set(
            delivery.id,
            status=DELIVERED,
            delivered_at=self._now(),
            last_status_code=status_code,
            last_error=None,
        )

    async def attempt_failed(self, delivery: WebhookDelivery, status_code: int | None, error: str) -> None:
        """Back off exponentially (with jitter) for another try, or give up past the retry period."""
        now = self._now()
        backoff = min(self._initial * 2.0 ** max(delivery.attempts - 1, 0), self._max)
        retry_at = now + timedelta(seconds=backoff * (1.0 - 0.2 * self._rng.random()))
        if retry_at > delivery.give_up_at:
            await self._set(delivery.id, status=FAILED, last_status_code=status_code, last_error=error[:300])
            return
        await self._set(
            delivery.id, next_attempt_at=retry_at, last_status_code=status_code, last_error=error[:300]
        )

    async def redeliver(self, delivery_id: str) -> dict[str, Any]:
        """Send again now (delivered or failed alike), with a fresh retry period; same ``webhook-id``
        so receivers can tell it is the same event."""
        now = self._now()

        def reset(c: Connection) -> WebhookDelivery | None:
            row = c.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(status=PENDING, next_attempt_at=now, give_up_at=now + self.retry_period)
                .returning(*WebhookDelivery.__table__.columns)
            ).one_or_none()
            return WebhookDelivery(**row._asdict()) if row is not None else None

        row = await self._writer.run(reset)
        if row is None:
            raise NotFoundError(f"No webhook delivery with id '{delivery_id}'.", param="delivery_id")
        return public(row)

    async def page(
        self,
        *,
        limit: int,
        status: str | None = None,
        key_id: str | None = None,
        task_id: str | None = None,
        endpoint_id: str | None = None,
    ) -> list[dict[str, Any]]:
        if status is not None and status not in (PENDING, DELIVERED, FAILED):
            raise InvalidRequestError("status must be pending, delivered or failed.", param="status")
        query = select(WebhookDelivery)
        for column, value in (
            (WebhookDelivery.status, status),
            (WebhookDelivery.key_id, key_id),
            (WebhookDelivery.task_id, task_id),
            (WebhookDelivery.endpoint_id, endpoint_id),
        ):
            if value is not None:
                query = query.where(column == value)
        async with self._sessions() as session:
            rows: Sequence[WebhookDelivery] = (
                await session.scalars(
                    query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit)
                )
            ).all()
        return [public(row) for row in rows]

    async def _set(self, delivery_id: str, **values: Any) -> None:
        def write(c: Connection) -> None:
            c.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))

        await self._writer.run(write)

"""A key's webhook endpoints: created, listed, rotated and removed by the admin; chosen by requests.

The gateway only ever calls a URL an operator entered. A request names an endpoint by id (``webhook``
query parameter), and only among its own key's endpoints; without one, every enabled endpoint of
the key gets the task's events. Secrets are Standard Webhooks secrets (``whsec_`` + base64 of 32
random bytes), shown once, when created or rotated.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.errors import InvalidRequestError, NotFoundError
from app.db.tables import ApiKey, WebhookEndpoint, utcnow

# A request may name at most this many endpoints.
MAX_CHOSEN = 10
NO_WEBHOOK = "none"


_ENABLED = (
    select(WebhookEndpoint.key_id, WebhookEndpoint.id)
    .where(WebhookEndpoint.key_id.in_(bindparam("keys", expanding=True)), WebhookEndpoint.enabled.is_(True))
    .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
)


def enabled_endpoints(c: Connection, key_ids: Sequence[str]) -> dict[str, list[str]]:
    """Each key's enabled endpoints (a task's default), read inside the caller's transaction: the
    task queue resolves them in the transaction that inserts a batch of tasks, once per batch."""
    found: dict[str, list[str]] = {}
    for key_id, endpoint_id in c.execute(_ENABLED, {"keys": list(key_ids)}):
        found.setdefault(key_id, []).append(endpoint_id)
    return found


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        host = None
    if host is None or parts.scheme not in ("http", "https") or any(ch.isspace() for ch in url):
        raise InvalidRequestError("A webhook URL must be an absolute http(s) URL.", param="url")
    if parts.username or parts.password:
        raise InvalidRequestError("A webhook URL may not carry credentials.", param="url")
    return url


def public(row: WebhookEndpoint, *, secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "object": "gateway.webhook_endpoint",
        "key_id": row.key_id,
        "url": row.url,
        "description": row.description,
        "enabled": row.enabled,
        "created_at": int(row.created_at.timestamp()),
        "rotated_at": int(row.rotated_at.timestamp()) if row.rotated_at else None,
    }
    if secret:
        body["secret"] = row.secret
    return body


class WebhookEndpoints:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(self, key_id: str, *, url: str, description: str | None) -> dict[str, Any]:
        check_url(url)
        async with self._sessions.begin() as session:
            if await session.get(ApiKey, key_id) is None:
                raise NotFoundError(f"No API key with id '{key_id}'.", param="id")
            row = WebhookEndpoint(
                id="we_" + secrets.token_hex(12),
                key_id=key_id,
                url=url,
                secret=new_secret(),
                description=description,
                enabled=True,
                created_at=utcnow(),
            )
            session.add(row)
            await session.flush()
            return public(row, secret=True)

    async def list_for(self, key_id: str) -> list[dict[str, Any]]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(WebhookEndpoint)
                .where(WebhookEndpoint.key_id == key_id)
                .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
            )
            return [public(row) for row in rows]

    async def rotate(self, key_id: str, endpoint_id: str) -> dict[str, Any]:
        async with self._sessions.begin() as session:
            row = await self._row(session, key_id, endpoint_id)
            row.secret, row.rotated_at = new_secret(), utcnow()
            await session.flush()
            return public(row, secret=True)

    async def update(
        self, key_id: str, endpoint_id: str, *, url: str | None, enabled: bool | None
    ) -> dict[str, Any]:
        async with self._sessions.begin() as session:
            row = await self._row(session, key_id, endpoint_id)
            if url is not None:
                row.url = check_url(url)
            if enabled is not None:
                row.enabled = enabled
            await session.flush()
            return public(row)

    async def delete(self, key_id: str, endpoint_id: str) -> None:
        async with self._sessions.begin() as session:
            await session.delete(await self._row(session, key_id, endpoint_id))

    async def get(self, endpoint_id: str) -> WebhookEndpoint | None:
        async with self._sessions() as session:
            return await session.get(WebhookEndpoint, endpoint_id)

    async def choose(self, key_id: str, requested: Sequence[str] | None) -> list[str]:
        """The endpoints a task's events go to: those named (each must be this key's), or by
        default every enabled endpoint of the key; ``none`` for no webhook."""
        async with self._sessions() as session:
            rows = list(
                await session.scalars(
                    select(WebhookEndpoint).where(
                        WebhookEndpoint.key_id == key_id, WebhookEndpoint.enabled.is_(True)
                    )
                )
            )
        if requested is None:
            return [row.id for row in rows]
        names = [n.strip() for item in requested for n in item.split(",") if n.strip()]
        if names == [NO_WEBHOOK]:
            return []
        own = {row.id for row in rows}
        if len(names) > MAX_CHOSEN or not names or any(name not in own for name in names):
            raise InvalidRequestError(
                "'webhook' must name webhook endpoints of this API key (ids like 'we_…', set by the "
                "gateway's admin), or 'none'. URLs are not accepted.",
                param="webhook",
            )
        return list(dict.fromkeys(names))

    async def _row(self, session: AsyncSession, key_id: str, endpoint_id: str) -> WebhookEndpoint:
        row = await session.get(WebhookEndpoint, endpoint_id)
        if row is None or row.key_id != key_id:
            raise NotFoundError(f"No webhook endpoint with id '{endpoint_id}'.", param="webhook_id")
        return row

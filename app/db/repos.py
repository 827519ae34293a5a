"""Typed, keyword-only queries. Each takes the session it runs in; callers own the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.tables import ApiKey, LedgerEntry, utcnow


async def create_key(
    *,
    session: AsyncSession,
    key_id: str,
    key_hash: str,
    prefix: str,
    name: str,
    owner: str | None,
    models: list[str] | None,
    moderation: str,
    enabled: bool,
    expires_at: datetime | None,
    metadata: dict[str, Any] | None,
) -> ApiKey:
    row = ApiKey(
        id=key_id,
        key_hash=key_hash,
        prefix=prefix,
        name=name,
        owner=owner,
        models=models,
        moderation=moderation,
        enabled=enabled,
        expires_at=expires_at,
        metadata_=metadata,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return row


async def get_key(*, session: AsyncSession, key_id: str) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def get_key_by_hash(*, session: AsyncSession, key_hash: str) -> ApiKey | None:
    result = await session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))
    return result.scalar_one_or_none()


async def list_keys(*, session: AsyncSession, include_revoked: bool = True) -> Sequence[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return (await session.execute(query)).scalars().all()


async def list_ledger_entries(
    *, session: AsyncSession, key_id: str | None = None, request_id: str | None = None
) -> Sequence[LedgerEntry]:
    query = select(LedgerEntry).order_by(LedgerEntry.id)
    if key_id is not None:
        query = query.where(LedgerEntry.key_id == key_id)
    if request_id is not None:
        query = query.where(LedgerEntry.request_id == request_id)
    return (await session.execute(query)).scalars().all()

"""Tenant API keys: create, authenticate, change, revoke. Framework-free."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.cluster.bus import ClusterBus
from app.core.errors import AuthenticationError, InvalidRequestError, NotFoundError
from app.core.security import display_prefix, generate_api_key, hash_key, looks_like_key
from app.db import repos
from app.db.tables import ApiKey, utcnow
from app.domain.money import format_micros, to_micros
from app.moderation.lists import validate_terms
from app.schemas.admin import ApiKeyCreateRequest, ApiKeyObject, ApiKeyUpdateRequest

KeyStatus = Literal["active", "disabled", "expired", "revoked"]
_CACHE_MAX = 10_000
INVALID_KEY_MESSAGE = "Incorrect API key provided. You can create keys with the gateway's admin API."


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated key behind a request, as the request path needs it."""

    key_id: str
    name: str
    owner: str | None
    models: frozenset[str] | None
    moderation: str
    price_multiplier_ppm: int = 1_000_000
    rpm: int | None = None
    ipm: int | None = None
    concurrency: int | None = None
    moderation_allow: tuple[str, ...] = ()
    max_queued_tasks: int | None = None
    moderation_block: tuple[str, ...] = ()
    # Console thumbnails: None follows the global console.thumbnails setting.
    thumbnails: bool | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def key_status(row: ApiKey, now: datetime | None = None) -> KeyStatus:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if not row.enabled:
        return "disabled"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def to_public(row: ApiKey) -> ApiKeyObject:
    def ts(value: datetime | None) -> int | None:
        return int(value.timestamp()) if value is not None else None

    return ApiKeyObject(
        id=row.id,
        name=row.name,
        owner=row.owner,
        prefix=row.prefix + "…",
        models=row.models,
        moderation=row.moderation,
        enabled=row.enabled,
        status=key_status(row),
        created_at=int(row.created_at.timestamp()),
        expires_at=ts(row.expires_at),
        revoked_at=ts(row.revoked_at),
        metadata=row.metadata_,
        quota=_money(row.quota_micros),
        monthly_quota=_money(row.monthly_quota_micros),
        balance=_money(row.balance_micros),
        spent=format_micros(row.spent_micros),
        reserved=format_micros(row.reserved_micros),
        price_multiplier=format_micros(row.price_multiplier_ppm),
        rpm=row.rpm,
        ipm=row.ipm,
        concurrency=row.concurrency,
        max_queued_tasks=row.max_queued_tasks,
        max_tasks_in_flight=row.max_tasks_in_flight,
        moderation_allow=row.moderation_allow,
        moderation_block=row.moderation_block,
        thumbnails=row.thumbnails,
    )


def _active_caller(row: ApiKey | None) -> Caller:
    """The caller for a key row, or 401 when there is none or it is not active."""
    if row is None:
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    status = key_status(row)
    if status != "active":
        raise AuthenticationError(f"This API key is {status}.")
    return _caller(row)


def _caller(row: ApiKey) -> Caller:
    return Caller(
        key_id=row.id,
        name=row.name,
        owner=row.owner,
        models=frozenset(row.models) if row.models is not None else None,
        moderation=row.moderation,
        price_multiplier_ppm=row.price_multiplier_ppm,
        rpm=row.rpm,
        ipm=row.ipm,
        concurrency=row.concurrency,
        moderation_allow=tuple(row.moderation_allow or ()),
        moderation_block=tuple(row.moderation_block or ()),
        thumbnails=row.thumbnails,
        max_queued_tasks=row.max_queued_tasks,
    )


def _money(value: int | None) -> str | None:
    return None if value is None else format_micros(value)


# Request fields that hold money or a multiplier → their table columns (in micro-units).
_MONEY_FIELDS = {
    "quota": "quota_micros",
    "monthly_quota": "monthly_quota_micros",
    "balance": "balance_micros",
    "price_multiplier": "price_multiplier_ppm",
}


class KeyService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        known_models: Sequence[str],
        *,
        pepper: bytes,
        cache_ttl_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        bus: ClusterBus | None = None,
    ) -> None:
        self._sessions = sessions
        self._known_models = list(known_models)
        self._pepper = pepper
        # Valid keys seen recently, by hash: saves a database round trip per request. Changes
        # made through this process take effect at once; through another one (a replica, the
        # CLI) as soon as its message on the cluster bus arrives (Redis pub/sub, milliseconds),
        # and without Redis, or when the message is lost, within ``cache_ttl_s``.
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        self._cache_ttl_s = cache_ttl_s
        self._clock = clock
        # Bumped by every invalidation: a database read that began before one is not cached, so a
        # row read just before a change was committed cannot outlive the change's message.
        self._epoch = 0
        self._bus = bus
        if bus is not None:
            bus.subscribe("keys", self._invalidated)

    @staticmethod
    def _check_terms(changes: dict[str, object]) -> None:
        for field in ("moderation_allow", "moderation_block"):
            terms = changes.get(field)
            if isinstance(terms, list):
                try:
                    validate_terms(terms)
                except ValueError as exc:
                    raise InvalidRequestError(str(exc), param=field, code="invalid_value") from None

    def _check_models(self, models: list[str] | None) -> None:
        unknown = sorted(set(models or ()) - set(self._known_models))
        if unknown:
            raise InvalidRequestError(
                f"Unknown model(s) {unknown}. Known models: {', '.join(self._known_models)}.",
                param="models",
                code="invalid_value",
            )

    async def authenticate(self, token: str | None) -> Caller:
        """The caller for a bearer token; 401 for a missing, unknown, disabled, revoked or expired key."""
        if not token or not looks_like_key(token):
            raise AuthenticationError(INVALID_KEY_MESSAGE)
        key_hash = hash_key(token, self._pepper)
        cached = self._cache.get(key_hash)
        if cached is not None and self._clock() - cached[0] < self._cache_ttl_s:
            return _active_caller(cached[1])  # status is re-checked: expiry passes with time
        epoch = self._epoch
        async with self._sessions() as session:
            row = await repos.get_key_by_hash(session=session, key_hash=key_hash)
        if row is not None and self._cache_ttl_s > 0 and epoch == self._epoch:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key_hash] = (self._clock(), row)
        return _active_caller(row)

    def _drop(self, key_id: str | None) -> None:
        """Forget one key's cached row (None: every row)."""
        self._epoch += 1
        if key_id is None:
            self._cache.clear()
            return
        for key_hash in [h for h, (_, row) in self._cache.items() if row.id == key_id]:
            del self._cache[key_hash]

    def _invalidated(self, payload: str | None) -> None:
        self._drop(payload or None)

    async def _changed(self, key_id: str) -> None:
        """A committed change to a key: here at once, on the other nodes through the bus."""
        self._drop(key_id)
        if self._bus is not None:
            await self._bus.publish("keys", key_id)

    async def caller_for(self, key_id: str) -> Caller:
        """The caller behind a key id (a worker running a queued task); 401 if no longer active."""
        async with self._sessions() as session:
            row = await repos.get_key(session=session, key_id=key_id)
        return _active_caller(row)

    async def create(self, request: ApiKeyCreateRequest) -> tuple[ApiKeyObject, str]:
        """A new key; the plaintext is returned here and never stored."""
        self._check_models(request.models)
        self._check_terms(request.model_dump())
        key = generate_api_key()
        async with self._sessions.begin() as session:
            row = await repos.create_key(
                session=session,
                key_id="key_" + secrets.token_hex(12),
                key_hash=hash_key(key, self._pepper),
                prefix=display_prefix(key),
                name=request.name,
                owner=request.owner,
                models=request.models,
                moderation=request.moderation,
                enabled=request.enabled,
                expires_at=request.expires_at,
                metadata=request.metadata,
            )
            self._apply_limits(row, request.model_dump(exclude_unset=True))
            await session.flush()
            public = to_public(row)
        return public, key

    async def list(self) -> list[ApiKeyObject]:
        async with self._sessions() as session:
            return [to_public(row) for row in await repos.list_keys(session=session)]

    async def get(self, key_id: str) -> ApiKeyObject:
        async with self._sessions() as session:
            return to_public(await self._row(session, key_id))

    async def update(self, key_id: str, request: ApiKeyUpdateRequest) -> ApiKeyObject:
        changes = request.model_dump(exclude_unset=True)
        if "models" in changes:
            self._check_models(changes["models"])
        self._check_terms(changes)
        async with self._sessions.begin() as session:
            row = await self._row(session, key_id)
            if row.revoked_at is not None:
                raise InvalidRequestError("A revoked key cannot be changed.", param="id", code="key_revoked")
            for field, value in changes.items():
                if field in ("name", "enabled", "moderation") and value is None:
                    continue
                if field in _MONEY_FIELDS or field in (
                    "rpm",
                    "ipm",
                    "concurrency",
                    "max_queued_tasks",
                    "max_tasks_in_flight",
                    "moderation_allow",
                    "moderation_block",
                    "thumbnails",
                ):
                    continue
                setattr(row, "metadata_" if field == "metadata" else field, value)
            self._apply_limits(row, changes)
            await session.flush()
            public = to_public(row)
        await self._changed(key_id)
        return public

    @staticmethod
    def _apply_limits(row: ApiKey, changes: dict[str, object]) -> None:
        for field, column in _MONEY_FIELDS.items():
            if field in changes:
                value = changes[field]
                if field == "price_multiplier" and value is None:
                    value = Decimal(1)
                setattr(row, column, to_micros(value, where=field) if isinstance(value, Decimal) else None)
        for field in (
            "rpm",
            "ipm",
            "concurrency",
            "max_queued_tasks",
            "max_tasks_in_flight",
            "moderation_allow",
            "moderation_block",
            "thumbnails",
        ):
            if field in changes:
                setattr(row, field, changes[field])

    async def top_up(self, key_id: str, amount: Decimal) -> ApiKeyObject:
        """Add credit; a key without a balance starts one at ``amount``."""
        micros = to_micros(amount, where="amount")
        async with self._sessions.begin() as session:
            row = await self._row(session, key_id)
            await session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id)
                .values(balance_micros=func.coalesce(ApiKey.balance_micros, 0) + micros)
            )
            await session.refresh(row)
            public = to_public(row)
        # The cached row carries no balance, but a top-up is a change like any other: no node
        # should act on the row from before it.
        await self._changed(key_id)
        return public

    async def revoke(self, key_id: str) -> ApiKeyObject:
        """Revocation is permanent; the row stays so the ledger keeps its owner."""
        async with self._sessions.begin() as session:
            row = await self._row(session, key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                row.enabled = False
            await session.flush()
            public = to_public(row)
        await self._changed(key_id)
        return public

    async def _row(self, session: AsyncSession, key_id: str) -> ApiKey:
        row = await repos.get_key(session=session, key_id=key_id)
        if row is None:
            raise NotFoundError(f"No API key with id '{key_id}'.", param="id")
        return row

"""The per-process cache of valid keys: immediate for this process's changes, bounded elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.auth.keys import KeyService
from app.core.errors import AuthenticationError
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from app.schemas.admin import ApiKeyCreateRequest, ApiKeyUpdateRequest

PEPPER = b"p" * 32


async def test_cache_ttl_and_invalidation(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await upgrade_head(engine)
    now = [1000.0]
    try:
        sessions = create_sessionmaker(engine)
        replica = KeyService(sessions, ["gpt-image-1"], pepper=PEPPER, cache_ttl_s=5, clock=lambda: now[0])
        other = KeyService(sessions, ["gpt-image-1"], pepper=PEPPER)
        public, key = await replica.create(ApiKeyCreateRequest(name="cached"))
        assert (await replica.authenticate(key)).key_id == public.id

        # Revoked elsewhere: this process notices once its cached entry is older than the TTL.
        await other.revoke(public.id)
        assert (await replica.authenticate(key)).key_id == public.id
        now[0] += 5.1
        with pytest.raises(AuthenticationError):
            await replica.authenticate(key)

        # Changed through this process: at once.
        public2, key2 = await replica.create(ApiKeyCreateRequest(name="local", rpm=5))
        assert (await replica.authenticate(key2)).rpm == 5
        await replica.update(public2.id, ApiKeyUpdateRequest(rpm=7))
        assert (await replica.authenticate(key2)).rpm == 7
        await replica.revoke(public2.id)
        with pytest.raises(AuthenticationError):
            await replica.authenticate(key2)
    finally:
        await engine.dispose()


async def test_a_change_heard_from_another_node_drops_the_key_at_once(tmp_path: Path) -> None:
    """What the cluster bus delivers (app/cluster/bus.py): a key id, or None after a reconnect."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await upgrade_head(engine)
    try:
        sessions = create_sessionmaker(engine)
        replica = KeyService(sessions, ["gpt-image-1"], pepper=PEPPER, cache_ttl_s=300)
        other = KeyService(sessions, ["gpt-image-1"], pepper=PEPPER)
        first, key1 = await replica.create(ApiKeyCreateRequest(name="one"))
        second, key2 = await replica.create(ApiKeyCreateRequest(name="two"))
        for key in (key1, key2):
            await replica.authenticate(key)
        await other.revoke(first.id)
        await other.revoke(second.id)
        assert (await replica.authenticate(key1)).key_id == first.id  # cached, TTL 300 s

        replica._invalidated(first.id)
        with pytest.raises(AuthenticationError):
            await replica.authenticate(key1)
        assert (await replica.authenticate(key2)).key_id == second.id  # only that key was dropped
        replica._invalidated(None)  # messages may have been lost: everything goes
        with pytest.raises(AuthenticationError):
            await replica.authenticate(key2)
    finally:
        await engine.dispose()


async def test_a_read_overtaken_by_an_invalidation_is_not_cached(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await upgrade_head(engine)
    try:
        sessions = create_sessionmaker(engine)
        replica = KeyService(sessions, ["gpt-image-1"], pepper=PEPPER, cache_ttl_s=300)
        public, key = await replica.create(ApiKeyCreateRequest(name="raced"))
        real_sessions = replica._sessions

        def sessions_then_invalidate() -> object:
            # The row is read, then (before it is cached) a change to the key is heard.
            replica._invalidated(public.id)
            return real_sessions()

        replica._sessions = sessions_then_invalidate  # type: ignore[assignment]
        await replica.authenticate(key)
        replica._sessions = real_sessions
        assert replica._cache == {}
    finally:
        await engine.dispose()

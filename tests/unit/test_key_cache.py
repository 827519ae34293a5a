"""The per-process cache of valid keys: immediate for this process's changes, bounded elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from app.errors import AuthenticationError
from app.keys import KeyService
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

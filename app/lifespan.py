"""Open every long-lived resource at start and close it at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.engine import make_url

from app.billing.ledger import LedgerService
from app.billing.limits import RateLimiter, build_limiter
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from app.images.capabilities import Catalog
from app.images.service import ImageService
from app.keys import KeyService
from app.security import ensure_admin_key
from app.settings import Settings
from app.state import AppState, UploadPolicy
from app.upstream.registry import ProviderRegistry
from app.upstream.router import Router

log = logging.getLogger(__name__)


def resolve_admin_key(settings: Settings) -> str:
    """The configured admin key, or the one generated once under the data directory."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value()
    key, path = ensure_admin_key(settings.data_dir)
    log.info("admin key read from file", extra={"fields": {"path": str(path)}})
    return key


async def prepare(settings: Settings) -> None:
    """One-time start-up work done before any worker starts: schema and admin key."""
    if _is_sqlite(settings):
        engine = create_engine(settings.database.url)
        try:
            await upgrade_head(engine)
        finally:
            await engine.dispose()
    resolve_admin_key(settings)


def _is_sqlite(settings: Settings) -> bool:
    return make_url(settings.database.url).get_backend_name() == "sqlite"


@asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[AppState]:
    """Everything the gateway needs, opened in dependency order and closed in reverse."""
    catalog = Catalog.from_file(settings.models_file)
    engine = create_engine(settings.database.url, echo=settings.database.echo)
    registry = ProviderRegistry.build(settings.upstreams, catalog)
    limiter: RateLimiter | None = None
    try:
        # SQLite is the embedded default: keep it at the newest schema without a separate step.
        # Shared databases (PostgreSQL) are migrated on purpose, with `python -m app migrate`.
        if _is_sqlite(settings):
            await upgrade_head(engine)
        sessions = create_sessionmaker(engine)
        uploads = UploadPolicy.from_settings(settings, catalog)
        uploads.spool_root.mkdir(parents=True, exist_ok=True)
        ledger = LedgerService(sessions, hold_ttl_s=settings.billing.hold_ttl_s)
        limiter = build_limiter(
            settings.redis.url,
            prefix=settings.rate_limits.prefix,
            lease_ttl_s=settings.rate_limits.lease_ttl_s,
            fail_open=settings.rate_limits.fail_open,
        )
        if settings.redis.url is None and settings.server.workers > 1:
            log.warning("rate limits are per worker process: set redis.url to share them")
        yield AppState(
            settings=settings,
            engine=engine,
            sessions=sessions,
            catalog=catalog,
            registry=registry,
            keys=KeyService(sessions, catalog.names()),
            images=ImageService(
                catalog=catalog, registry=registry, router=Router(registry), ledger=ledger, limiter=limiter
            ),
            admin_key=resolve_admin_key(settings),
            ledger=ledger,
            uploads=uploads,
        )
    finally:
        if limiter is not None:
            await limiter.aclose()
        await registry.aclose()
        await engine.dispose()


async def _reconcile_forever(state: AppState) -> None:
    """Release holds left by requests whose process died (SPEC §5: a failure releases it all)."""
    while True:
        try:
            released = await state.ledger.release_expired()
            if released:
                log.warning("released stale holds", extra={"fields": {"count": released}})
        except Exception:
            log.exception("hold reconciliation failed; retrying later")
        await asyncio.sleep(state.settings.billing.reconcile_every_s)


@asynccontextmanager
async def _background(state: AppState) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(_reconcile_forever(state), name="reconciler")]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as state, _background(state):
            app.state.gateway = state
            log.info(
                "gateway ready",
                extra={
                    "fields": {
                        "upstreams": state.registry.provider_names(),
                        "models": state.registry.models(),
                    }
                },
            )
            yield

    return lifespan

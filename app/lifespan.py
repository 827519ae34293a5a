"""Open every long-lived resource at start and close it at shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.engine import make_url

from app.billing.ledger import LedgerService
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from app.images.capabilities import Catalog
from app.images.service import ImageService
from app.keys import KeyService
from app.security import ensure_admin_key
from app.settings import Settings
from app.state import AppState
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
    try:
        # SQLite is the embedded default: keep it at the newest schema without a separate step.
        # Shared databases (PostgreSQL) are migrated on purpose, with `python -m app migrate`.
        if _is_sqlite(settings):
            await upgrade_head(engine)
        sessions = create_sessionmaker(engine)
        yield AppState(
            settings=settings,
            engine=engine,
            sessions=sessions,
            catalog=catalog,
            registry=registry,
            keys=KeyService(sessions, catalog.names()),
            images=ImageService(
                catalog=catalog, registry=registry, router=Router(registry), ledger=LedgerService(sessions)
            ),
            admin_key=resolve_admin_key(settings),
        )
    finally:
        await registry.aclose()
        await engine.dispose()


def make_lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_state(settings) as state:
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

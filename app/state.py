"""The typed bundle of long-lived resources the lifespan opens and the handlers use."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.billing.ledger import LedgerService
from app.images.capabilities import Catalog
from app.images.service import ImageService
from app.keys import KeyService
from app.settings import Settings
from app.upstream.registry import ProviderRegistry


@dataclass(slots=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    catalog: Catalog
    registry: ProviderRegistry
    keys: KeyService
    images: ImageService
    admin_key: str
    ledger: LedgerService

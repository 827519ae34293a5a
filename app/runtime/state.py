"""The typed bundle of long-lived resources the lifespan opens and the handlers use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth.keys import KeyService
from app.batches.files import FileService
from app.batches.service import BatchService
from app.billing.ledger import LedgerService
from app.console.requestlog import RequestLog
from app.db.readiness import Readiness
from app.domain.catalog import Catalog
from app.images.intake.spool import UploadLimits
from app.images.service import ImageService, InputLimits
from app.moderation.audit import ModerationLog
from app.runtime.settings import Settings
from app.storage import ImageStore
from app.tasks.service import TaskService
from app.telemetry.metrics import Metrics
from app.upstream.registry import ProviderRegistry
from app.upstream.router import Router
from app.webhooks.endpoints import WebhookEndpoints
from app.webhooks.outbox import Outbox


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """Where edit uploads are spooled and how big they may be."""

    spool_root: Path
    limits: UploadLimits
    inputs: InputLimits

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog) -> UploadPolicy:
        edits = [caps.edit for name in catalog.names() if (caps := catalog.get(name)) and caps.edit]
        uploads = settings.uploads
        return cls(
            spool_root=Path(uploads.spool_dir or Path(settings.data_dir) / "spool"),
            limits=UploadLimits(
                # Parts are refused while arriving at the catalog-wide cap; per-model caps are
                # checked once the model is known.
                max_file_bytes=max((e.max_image_bytes for e in edits), default=4 * 1024 * 1024),
                max_files=max((e.max_images for e in edits), default=1),
                max_field_bytes=uploads.max_field_bytes,
                max_fields=uploads.max_fields,
            ),
            inputs=InputLimits(max_pixels=uploads.max_input_pixels, max_edge=uploads.max_input_edge),
        )


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
    uploads: UploadPolicy
    store: ImageStore
    tasks: TaskService
    router: Router
    metrics: Metrics
    moderation_log: ModerationLog
    webhooks: WebhookEndpoints
    outbox: Outbox
    # What /readyz reports (the database, Redis, and whether this node is draining).
    readiness: Readiness
    files: FileService
    batches: BatchService
    # Every /v1 request for the console (None: console.request_log off).
    request_log: RequestLog | None = None

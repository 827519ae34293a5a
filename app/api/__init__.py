"""The HTTP edge: the only package that knows FastAPI."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import (
    admin_keys,
    admin_moderation,
    admin_upstreams,
    admin_webhooks,
    batch_files,
    batches,
    files,
    health,
    images,
    models,
    tasks,
    usage,
)


def build_api_router() -> APIRouter:
    router = APIRouter()
    router.include_router(images.router)
    router.include_router(models.router)
    router.include_router(tasks.router)
    router.include_router(files.router)
    # After the image links: /v1/files/images/{name} must win over /v1/files/{id}/….
    router.include_router(batch_files.router)
    router.include_router(batches.router)
    router.include_router(admin_keys.router)
    router.include_router(admin_upstreams.router)
    router.include_router(admin_moderation.router)
    router.include_router(admin_webhooks.router)
    router.include_router(usage.router)
    router.include_router(health.router)
    return router

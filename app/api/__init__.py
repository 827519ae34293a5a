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


def api_routers() -> list[APIRouter]:
    """The API's routers in matching order, for the app to include one by one.

    Not one router that includes the others: FastAPI 0.165 wraps each inclusion in an
    ``_IncludedRouter`` that matches and dispatches through its own level, so a second level made
    every request match and dispatch twice over (~5% of a small answer's CPU in the profile)."""
    return [
        images.router,
        models.router,
        tasks.router,
        files.router,
        # After the image links: /v1/files/images/{name} must win over /v1/files/{id}/….
        batch_files.router,
        batches.router,
        admin_keys.router,
        admin_upstreams.router,
        admin_moderation.router,
        admin_webhooks.router,
        usage.router,
        health.router,
    ]

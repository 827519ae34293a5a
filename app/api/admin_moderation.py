"""``GET /admin/moderation/events``: the audit trail of blocked requests (no raw prompts by default)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import AdminDep, StateDep
from app.db.tables import ModerationEvent

router = APIRouter(prefix="/admin/moderation", tags=["admin"], dependencies=[AdminDep])


@router.get("/events")
async def moderation_events(
    state: StateDep,
    key_id: str | None = None,
    category: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    # An event id (the table's integer key): bounded so the database never sees an overflowing int.
    before: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> dict[str, Any]:
    rows = await state.moderation_log.recent(key_id=key_id, category=category, limit=limit, before=before)
    data = [event_view(row) for row in rows]
    return {"object": "list", "data": data, "has_more": len(data) == limit}


def event_view(row: ModerationEvent) -> dict[str, Any]:
    """One audit event as the admin API (and the console's audit page) show it."""
    return {
        "id": row.id,
        "object": "moderation.event",
        "request_id": row.request_id,
        "key_id": row.key_id,
        "stage": row.stage,
        "level": row.level,
        "checker": row.checker,
        "categories": row.categories,
        "rules": row.rules,
        "prompt_sha256": row.prompt_sha256,
        "prompt": row.prompt,
        "image_sha256": row.image_sha256,
        "created_at": int(row.created_at.timestamp()),
    }

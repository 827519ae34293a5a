"""Webhook administration: a key's endpoints (``/admin/keys/{id}/webhooks``) and the outbox
(``/admin/webhooks/deliveries``, with a redeliver action). Behind the admin key only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.responses import Response

from app.api.deps import AdminDep, StateDep
from app.schemas.base import StrictWireModel

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


class EndpointCreateRequest(StrictWireModel):
    url: str = Field(min_length=1, max_length=2000)
    description: str | None = Field(default=None, max_length=200)


class EndpointUpdateRequest(StrictWireModel):
    url: str | None = Field(default=None, min_length=1, max_length=2000)
    enabled: bool | None = None


@router.post("/keys/{key_id}/webhooks", status_code=201)
async def create_endpoint(key_id: str, body: EndpointCreateRequest, state: StateDep) -> dict[str, Any]:
    """The endpoint with its signing ``secret``, shown this once."""
    return await state.webhooks.create(key_id, url=body.url, description=body.description)


@router.get("/keys/{key_id}/webhooks")
async def list_endpoints(key_id: str, state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": await state.webhooks.list_for(key_id)}


@router.patch("/keys/{key_id}/webhooks/{endpoint_id}")
async def update_endpoint(
    key_id: str, endpoint_id: str, body: EndpointUpdateRequest, state: StateDep
) -> dict[str, Any]:
    return await state.webhooks.update(key_id, endpoint_id, url=body.url, enabled=body.enabled)


@router.post("/keys/{key_id}/webhooks/{endpoint_id}/rotate")
async def rotate_secret(key_id: str, endpoint_id: str, state: StateDep) -> dict[str, Any]:
    """A new secret, shown this once; deliveries from now on are signed with it."""
    return await state.webhooks.rotate(key_id, endpoint_id)


@router.delete("/keys/{key_id}/webhooks/{endpoint_id}", status_code=204)
async def delete_endpoint(key_id: str, endpoint_id: str, state: StateDep) -> Response:
    await state.webhooks.delete(key_id, endpoint_id)
    return Response(status_code=204)


@router.get("/webhooks/deliveries")
async def list_deliveries(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    status: str | None = None,
    key_id: str | None = None,
    task_id: str | None = None,
    endpoint_id: str | None = None,
) -> dict[str, Any]:
    data = await state.outbox.page(
        limit=limit, status=status, key_id=key_id, task_id=task_id, endpoint_id=endpoint_id
    )
    return {"object": "list", "data": data}


@router.post("/webhooks/deliveries/{delivery_id}/redeliver")
async def redeliver(delivery_id: str, state: StateDep) -> dict[str, Any]:
    """Send the event again now, with the same ``webhook-id`` and a fresh retry period."""
    delivery = await state.outbox.redeliver(delivery_id)
    state.tasks.on_events()
    return delivery

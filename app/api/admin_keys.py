"""Admin key management: ``/admin/keys``. Behind the admin key only."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminDep, StateDep
from app.schemas.admin import (
    ApiKeyCreatedResponse,
    ApiKeyCreateRequest,
    ApiKeyList,
    ApiKeyObject,
    ApiKeyUpdateRequest,
    TopUpRequest,
)

router = APIRouter(prefix="/admin/keys", tags=["admin"], dependencies=[AdminDep])


@router.post("", status_code=201)
async def create_key(body: ApiKeyCreateRequest, state: StateDep) -> ApiKeyCreatedResponse:
    public, key = await state.keys.create(body)
    return ApiKeyCreatedResponse(**public.model_dump(), key=key)


@router.get("")
async def list_keys(state: StateDep) -> ApiKeyList:
    return ApiKeyList(data=await state.keys.list())


@router.get("/{key_id}")
async def get_key(key_id: str, state: StateDep) -> ApiKeyObject:
    return await state.keys.get(key_id)


@router.patch("/{key_id}")
async def update_key(key_id: str, body: ApiKeyUpdateRequest, state: StateDep) -> ApiKeyObject:
    return await state.keys.update(key_id, body)


@router.delete("/{key_id}")
async def revoke_key(key_id: str, state: StateDep) -> ApiKeyObject:
    return await state.keys.revoke(key_id)


@router.post("/{key_id}/topup")
async def top_up(key_id: str, body: TopUpRequest, state: StateDep) -> ApiKeyObject:
    return await state.keys.top_up(key_id, body.amount)

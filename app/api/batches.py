"""OpenAI's Batch API for images: ``/v1/batches`` (issue 27; the runner is app/batches/service.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse

from app.api.deps import CallerDep, StateDep
from app.api.images import public_base
from app.batches.service import batch_object
from app.core.errors import InvalidJSONError

router = APIRouter(prefix="/v1/batches", tags=["batches"])

NO_STORE = {"cache-control": "no-store"}


@router.post("")
async def create_batch(request: Request, caller: CallerDep, state: StateDep) -> JSONResponse:
    try:
        payload = await request.json()
    except ValueError:
        raise InvalidJSONError() from None
    row = await state.batches.create(caller, payload, base_url=public_base(request, state))
    return JSONResponse(batch_object(row))


@router.get("")
async def list_batches(
    caller: CallerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JSONResponse:
    rows, has_more = await state.batches.page(caller.key_id, limit=limit, after=after)
    data = [batch_object(row) for row in rows]
    body = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
    return JSONResponse(body, headers=NO_STORE)


@router.get("/{batch_id}")
async def get_batch(batch_id: str, caller: CallerDep, state: StateDep) -> JSONResponse:
    return JSONResponse(batch_object(await state.batches.get(batch_id, caller.key_id)), headers=NO_STORE)


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, caller: CallerDep, state: StateDep) -> JSONResponse:
    return JSONResponse(batch_object(await state.batches.cancel(batch_id, caller.key_id)))

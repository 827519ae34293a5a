"""``GET /v1/tasks/{id}`` and ``GET /v1/tasks``: a key's asynchronous requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse

from app.api.deps import CallerDep, StateDep
from app.api.images import public_base
from app.errors import NotFoundError

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

# Task state changes underneath a client that polls: never let a cache answer for the gateway.
NO_STORE = {"cache-control": "no-store"}


@router.get("/{task_id}")
async def get_task(task_id: str, request: Request, caller: CallerDep, state: StateDep) -> JSONResponse:
    task = await state.tasks.queue.get(task_id, caller.key_id)
    if task is None:
        # Another key's task is indistinguishable from a missing one.
        raise NotFoundError(f"No task with id '{task_id}'.", param="task_id")
    body = await state.tasks.view(task, base_url=public_base(request, state))
    headers = dict(NO_STORE)
    if task.status in ("queued", "in_progress"):
        headers["retry-after"] = "1"
    return JSONResponse(body, headers=headers)


@router.get("")
async def list_tasks(
    request: Request,
    caller: CallerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JSONResponse:
    rows, has_more = await state.tasks.queue.page(caller.key_id, limit=limit, after=after)
    base = public_base(request, state)
    data = [await state.tasks.view(row, base_url=base) for row in rows]
    body = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
    return JSONResponse(body, headers=NO_STORE)

"""``GET /v1/tasks/{id}``, ``GET /v1/tasks`` and ``POST /v1/tasks/{id}/cancel``: a key's
asynchronous requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from app.api.deps import CallerDep, StateDep
from app.api.images import public_base
from app.api.streaming import json_events_response
from app.core.errors import NotFoundError
from app.db.repos import list_ledger_entries
from app.runtime.state import AppState
from app.schemas.tasks import ImageTask, ImageTaskList, example

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

# Task state changes underneath a client that polls: never let a cache answer for the gateway.
NO_STORE = {"cache-control": "no-store"}


TASK: dict[int | str, dict[str, Any]] = {
    200: {"model": ImageTask, "content": {"application/json": {"example": example()}}}
}
EVENTS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events: `image.task.progress` (data: the task object) on each "
        "change, then `image.task.succeeded` or `image.task.failed` (the final task object).",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@router.get("/{task_id}", responses=TASK)
async def get_task(task_id: str, request: Request, caller: CallerDep, state: StateDep) -> JSONResponse:
    task = await state.tasks.queue.get(task_id, caller.key_id)
    if task is None:
        # Another key's task is indistinguishable from a missing one.
        raise NotFoundError(f"No task with id '{task_id}'.", param="task_id")
    body = await state.tasks.view(task, base_url=public_base(request, state))
    headers = dict(NO_STORE)
    if task.status in ("queued", "in_progress"):
        headers["retry-after"] = "1"
    elif state.settings.server.upstream_header:
        # A finished task's result names its upstream, as a synchronous answer does (the ledger's
        # row for it: the one record of who served it, whichever node ran the task).
        request.state.upstream = await _served_by(state, task.key_id, task.request_id)
    return JSONResponse(body, headers=headers)


async def _served_by(state: AppState, key_id: str, request_id: str) -> str | None:
    async with state.sessions() as session:
        rows = await list_ledger_entries(session=session, key_id=key_id, request_id=request_id)
    served = [row.upstream for row in rows if row.upstream]
    return served[-1] if served else None


@router.post("/{task_id}/cancel", responses=TASK)
async def cancel_task(task_id: str, request: Request, caller: CallerDep, state: StateDep) -> JSONResponse:
    """Cancel a task of the calling key (SPEC §11). A queued task stops at once: its status becomes
    ``cancelled``, its hold is released (nothing is charged) and ``image.task.cancelled`` goes to
    its webhooks. A task already running is not stopped (no provider offers a cancel): it finishes
    and is billed, and the answer shows it still ``in_progress``. A finished task is answered as
    it is. Another key's task is a 404, as on ``GET``."""
    task = await state.tasks.cancel(task_id, caller.key_id)
    if task is None:
        raise NotFoundError(f"No task with id '{task_id}'.", param="task_id")
    body = await state.tasks.view(task, base_url=public_base(request, state))
    return JSONResponse(body, headers=NO_STORE)


@router.get("/{task_id}/events", responses=EVENTS)
async def task_events(task_id: str, request: Request, caller: CallerDep, state: StateDep) -> Response:
    """Follow a task live over SSE: ``image.task.progress`` with the task object each time its
    status or progress changes (its current state first), then ``image.task.succeeded`` or
    ``image.task.failed`` with the final task object, and the end of the stream. The states are
    the ones polling shows, in the same order, and the final event names match the webhooks'."""
    task = await state.tasks.queue.get(task_id, caller.key_id)
    if task is None:
        raise NotFoundError(f"No task with id '{task_id}'.", param="task_id")
    base = public_base(request, state)
    # Read from the database, like a poll: the task may be running in another process.
    interval = min(state.settings.tasks.poll_s, 1.0)

    async def events() -> AsyncIterator[tuple[str, Any]]:
        current = task
        last: tuple[str, bytes] | None = None
        while True:
            # Compared by stored names, not the rendered links, whose signatures change with time.
            marker = (current.status, orjson.dumps(state.tasks.progress(current)))
            if marker != last:
                last = marker
                view = await state.tasks.view(current, base_url=base)
                final = view["status"] in ("succeeded", "failed", "cancelled")
                name = f"image.task.{view['status']}" if final else "image.task.progress"
                yield name, view
                if final:
                    return
            await asyncio.sleep(interval)
            reread = await state.tasks.queue.get(task_id, caller.key_id)
            if reread is None:  # purged meanwhile
                raise NotFoundError(f"No task with id '{task_id}'.", param="task_id")
            current = reread

    return json_events_response(events(), ping_s=state.settings.server.sse_ping_s, headers=dict(NO_STORE))


@router.get("", responses={200: {"model": ImageTaskList}})
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

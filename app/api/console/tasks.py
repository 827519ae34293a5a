"""The console's task detail page and its cancel action (issue 26).

The page shows a task as its owner's API would (``TaskService.view``: status, progress with
previews, result, error), plus what only the console shows: the webhook deliveries of its events
and its ledger rows. Cancel runs the API's own ``TaskService.cancel`` (``POST
/v1/tasks/{id}/cancel``), for the task's key: the operator may cancel any task, a tenant their own.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.console.web import ConsoleDenied, OperatorDep, ViewerDep, check_csrf, redirect, render
from app.api.deps import StateDep
from app.api.images import public_base
from app.console.queries import any_task, key_names, request_rows, task_deliveries
from app.console.sessions import Viewer
from app.db.tables import Task
from app.runtime.state import AppState

router = APIRouter()


async def _visible(state: AppState, viewer: Viewer, task_id: str) -> Task:
    task = await any_task(state.sessions, task_id[:40])
    if task is None or (not viewer.is_operator and task.key_id != viewer.key_id):
        # Another key's task is indistinguishable from a missing one.
        raise ConsoleDenied(404, "No such task.")
    return task


@router.get("/tasks/{task_id}")
async def task_detail(request: Request, task_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    task = await _visible(state, viewer, task_id)
    view = await state.tasks.view(task, base_url=public_base(request, state))
    deliveries = await task_deliveries(state.sessions, task.id)
    rows = await request_rows(state.sessions, task.request_id, key_id=task.key_id)
    names = await key_names(state.sessions, [task.key_id])
    return render(
        request,
        "task.html",
        {
            "task": task,
            "view": view,
            "deliveries": deliveries,
            "rows": rows,
            "key_name": names.get(task.key_id, task.key_id),
            "cancelled": request.query_params.get("cancelled"),
        },
    )


@router.post("/tasks/{task_id}/cancel")
async def cancel_task(request: Request, task_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    task = await _visible(state, viewer, task_id)
    after = await state.tasks.cancel(task.id, task.key_id)
    outcome = "1" if after is not None and after.status == "cancelled" else "0"
    return redirect(f"/console/tasks/{task.id}?cancelled={outcome}")


@router.post("/tasks/{task_id}/deliveries/{delivery_id}/redeliver")
async def redeliver(
    request: Request, task_id: str, delivery_id: str, viewer: OperatorDep, state: StateDep
) -> Response:
    """The admin API's redeliver (same ``webhook-id``, a fresh retry period), for the operator."""
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    task = await _visible(state, viewer, task_id)
    if delivery_id not in {d.id for d in await task_deliveries(state.sessions, task.id)}:
        raise ConsoleDenied(404, "No such delivery for this task.")
    await state.outbox.redeliver(delivery_id)
    state.tasks.on_events()
    return redirect(f"/console/tasks/{task.id}?redelivered={delivery_id}")

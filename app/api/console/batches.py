"""The console's Batches pages (issue 27): the list, a batch's detail with its counts and progress,
cancel, and downloads of its output and error files.

The operator sees every key's batches; a tenant only their own key's, and another key's batch is
indistinguishable from a missing one. Cancel is the API's own ``BatchService.cancel`` (``POST
/v1/batches/{id}/cancel``) for the batch's key; downloads stream the stored JSONL as ``GET
/v1/files/{id}/content`` does, never read whole into memory.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, func, or_, select
from starlette.responses import Response

from app.api.batch_files import stream_file
from app.api.console.web import PAGE_HEADERS, ConsoleDenied, ViewerDep, check_csrf, redirect, render
from app.api.deps import StateDep
from app.batches.service import ACTIVE
from app.console.queries import key_names
from app.console.sessions import Viewer
from app.core.errors import NotFoundError
from app.db.tables import Batch, BatchLine
from app.runtime.state import AppState

router = APIRouter()

PAGE_SIZE = 50
STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
# What each line state means on the page (app/batches/service.py: pending → queued → ok | error).
LINE_STATES = {"pending": "waiting", "queued": "admitted", "ok": "completed", "error": "failed"}
CANCELLABLE = ("validating", "in_progress")
Text = Annotated[str | None, Query(max_length=200)]


async def _visible(state: AppState, viewer: Viewer, batch_id: str) -> Batch:
    async with state.sessions() as session:
        row = await session.get(Batch, batch_id[:40])
    if row is None or (not viewer.is_operator and row.key_id != viewer.key_id):
        raise ConsoleDenied(404, "No such batch.")
    return row


def progress(row: Batch) -> int:
    """Percent of the lines that have ended (completed or failed), 0 before validation counted."""
    return (100 * (row.completed + row.failed)) // row.total if row.total else 0


@router.get("/batches")
async def batches_page(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    key_id: Text = None,
    status: Text = None,
    before: Text = None,
) -> Response:
    scope = (key_id or None) if viewer.is_operator else viewer.key_id
    query = select(Batch)
    if scope is not None:
        query = query.where(Batch.key_id == scope)
    if status:
        query = query.where(Batch.status == status)
    async with state.sessions() as session:
        if before:
            anchor = await session.get(Batch, before[:40])
            if anchor is not None:
                query = query.where(
                    or_(
                        Batch.created_at < anchor.created_at,
                        and_(Batch.created_at == anchor.created_at, Batch.id < anchor.id),
                    )
                )
        rows = (
            await session.scalars(
                query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(PAGE_SIZE + 1)
            )
        ).all()
    page, more = rows[:PAGE_SIZE], len(rows) > PAGE_SIZE
    names = await key_names(state.sessions, [b.key_id for b in page]) if viewer.is_operator else {}
    return render(
        request,
        "batches.html",
        {
            "batches": page,
            "next_before": page[-1].id if more and page else None,
            "names": names,
            "progress": progress,
            "key_id": scope or "",
            "status": status or "",
            "statuses": STATUSES,
        },
    )


@router.get("/batches/{batch_id}")
async def batch_detail(request: Request, batch_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    row = await _visible(state, viewer, batch_id)
    async with state.sessions() as session:
        counted = await session.execute(
            select(BatchLine.state, func.count())
            .where(BatchLine.batch_id == row.id)
            .group_by(BatchLine.state)
        )
        lines = {LINE_STATES.get(line_state, line_state): int(n) for line_state, n in counted}
    names = await key_names(state.sessions, [row.key_id])
    return render(
        request,
        "batch.html",
        {
            "batch": row,
            "lines": lines,
            "percent": progress(row),
            "active": row.status in ACTIVE,
            "cancellable": row.status in CANCELLABLE,
            "key_name": names.get(row.key_id, row.key_id),
            "errors": _validation_errors(row.errors),
            "cancelled": request.query_params.get("cancelled"),
        },
    )


def _validation_errors(errors: dict[str, Any] | None) -> list[dict[str, Any]]:
    data = (errors or {}).get("data")
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    row = await _visible(state, viewer, batch_id)
    if row.status not in CANCELLABLE:
        return redirect(f"/console/batches/{row.id}?cancelled=0")
    await state.batches.cancel(row.id, row.key_id)
    return redirect(f"/console/batches/{row.id}?cancelled=1")


@router.get("/batches/{batch_id}/{which}.jsonl")
async def download(batch_id: str, which: str, viewer: ViewerDep, state: StateDep) -> Response:
    row = await _visible(state, viewer, batch_id)
    file_id = {"output": row.output_file_id, "errors": row.error_file_id}.get(which)
    if file_id is None:
        raise ConsoleDenied(404, "This batch has no such file (yet).")
    try:
        stored = await state.files.get(file_id, row.key_id)
        return await stream_file(state, stored, filename=f"{row.id}_{which}.jsonl", headers=PAGE_HEADERS)
    except NotFoundError:  # a blob gone missing is a 404 page, not a broken download
        raise ConsoleDenied(404, "This file has expired.") from None

"""OpenAI's Files API for batches: ``/v1/files`` and ``/v1/files/{id}[/content]`` (issue 27).

The signed image links (``GET /v1/files/images/{name}``, app/api/files.py) are registered before
this router, so ``/v1/files/images/…`` never reaches these routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, StreamingResponse

from app.api.deps import CallerDep, StateDep
from app.batches.files import file_object
from app.batches.upload import receive_file
from app.db.tables import StoredFile
from app.runtime.state import AppState

router = APIRouter(prefix="/v1/files", tags=["files"])

NO_STORE = {"cache-control": "no-store"}


@router.post("")
async def create_file(request: Request, caller: CallerDep, state: StateDep) -> JSONResponse:
    """Upload a JSONL batch input file (multipart: ``file``, ``purpose=batch``), streamed to the store."""
    files = state.files
    upload = await receive_file(
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        spool_root=state.uploads.spool_root,
        max_bytes=files.limits.max_bytes,
        max_lines=files.limits.max_lines,
    )
    try:
        row = await files.create(caller.key_id, upload)
    finally:
        await asyncio.to_thread(upload.cleanup)
    return JSONResponse(file_object(row))


@router.get("")
async def list_files(
    caller: CallerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    rows, has_more = await state.files.page(
        caller.key_id, limit=limit, after=after, purpose=purpose, order=order
    )
    data = [file_object(row) for row in rows]
    body = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
    return JSONResponse(body, headers=NO_STORE)


@router.get("/{file_id}")
async def get_file(file_id: str, caller: CallerDep, state: StateDep) -> JSONResponse:
    return JSONResponse(file_object(await state.files.get(file_id, caller.key_id)), headers=NO_STORE)


@router.get("/{file_id}/content")
async def get_file_content(file_id: str, caller: CallerDep, state: StateDep) -> StreamingResponse:
    row = await state.files.get(file_id, caller.key_id)
    return await stream_file(state, row, filename=row.filename, headers=NO_STORE)


async def stream_file(
    state: AppState, row: StoredFile, *, filename: str, headers: Mapping[str, str]
) -> StreamingResponse:
    """A stored file as a streamed JSONL download (the API's and the console's). The first chunk
    is read here, so a blob gone missing raises ``NotFoundError`` (a 404), not a broken 200."""
    chunks = state.files.content(row)
    first = await anext(chunks, b"")

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/jsonl",
        headers={
            **headers,
            "content-length": str(row.bytes),
            "content-disposition": f'attachment; filename="{filename.replace(chr(34), "")}"',
        },
    )


@router.delete("/{file_id}")
async def delete_file(file_id: str, caller: CallerDep, state: StateDep) -> JSONResponse:
    row = await state.files.delete(file_id, caller.key_id)
    return JSONResponse({"id": row.id, "object": "file", "deleted": True})

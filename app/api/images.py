"""``POST /v1/images/generations`` and ``/edits``: parse, hand to the image service, shape the reply."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import CallerDep, StateDep
from app.billing.pricing import format_micros
from app.errors import InvalidJSONError
from app.images.service import ImageOutcome, ImageStream
from app.images.uploads import parse_multipart
from app.state import AppState
from app.streaming import sse_response

router = APIRouter(prefix="/v1/images", tags=["images"])
T = TypeVar("T")


async def read_json(request: Request) -> object:
    """The decoded body. Parsed here rather than by FastAPI, because unknown fields must survive
    untouched to be forwarded upstream, and errors must be OpenAI-shaped."""
    body = await request.body()
    if not body:
        raise InvalidJSONError("the body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSONError() from None


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, cancelling it if the client hangs up first.

    The body has been read by now, so the next ASGI message can only be the disconnect. Without
    this, a client that gave up would still have its upstream call run, and be billed for it.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


@router.post("/generations")
async def create_image(request: Request, caller: CallerDep, state: StateDep) -> Response:
    request_id: str = request.state.request_id
    job = state.images.prepare_generation(
        caller=caller,
        payload=await read_json(request),
        request_id=request_id,
        query_response_format=request.query_params.get("response_format"),
    )
    request.state.model = job.model
    outcome = await cancel_on_disconnect(request, state.images.execute(caller=caller, job=job))
    return _reply(request, state, outcome)


@router.post("/edits")
async def edit_image(request: Request, caller: CallerDep, state: StateDep) -> Response:
    request_id: str = request.state.request_id
    form = await parse_multipart(
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        spool_root=state.uploads.spool_root,
        limits=state.uploads.limits,
    )
    handed_over = False
    try:
        job = await state.images.prepare_edit(
            caller=caller,
            form=form,
            request_id=request_id,
            limits=state.uploads.inputs,
            query_response_format=request.query_params.get("response_format"),
        )
        request.state.model = job.model
        outcome = await cancel_on_disconnect(request, state.images.execute(caller=caller, job=job))
        if isinstance(outcome, ImageStream):
            # The spooled files live until the stream ends, wherever that happens.
            outcome.closers.append(lambda: asyncio.to_thread(form.cleanup))
            handed_over = True
        return _reply(request, state, outcome)
    finally:
        if not handed_over:
            await asyncio.to_thread(form.cleanup)


def _reply(request: Request, state: AppState, outcome: ImageOutcome | ImageStream) -> Response:
    if isinstance(outcome, ImageStream):
        request.state.upstream = outcome.upstream
        return sse_response(outcome, ping_s=state.settings.server.sse_ping_s, headers=outcome.headers)
    request.state.upstream = outcome.upstream
    request.state.cost_micros = outcome.cost_micros
    return Response(
        orjson.dumps(outcome.body),
        media_type="application/json",
        headers={**outcome.headers, "x-gateway-cost": format_micros(outcome.cost_micros)},
    )

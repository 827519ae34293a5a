"""``POST /v1/images/generations`` and ``/edits``: parse, hand to the image service, shape the reply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.api.deps import caller_and_state
from app.api.streaming import sse_response
from app.auth.keys import Caller
from app.core.errors import GatewayError, InvalidJSONError, InvalidRequestError
from app.domain.jobs import ImageJob
from app.domain.money import format_micros
from app.images.admission.lifecycle import job_headers
from app.images.intake.spool import UploadForm, parse_multipart
from app.images.relay import ImageStream
from app.images.service import Draft, EditDraft, GenerationDraft, ImageOutcome, VariationDraft
from app.runtime.state import AppState

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


def wants_async(request: Request) -> bool:
    """``?async=true`` (or 1/yes): answer 202 with a task instead of waiting."""
    value = request.query_params.get("async")
    if value is None or value.lower() in ("false", "0", "no", ""):
        if "webhook" in request.query_params:
            raise InvalidRequestError("'webhook' applies to async=true requests only.", param="webhook")
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise InvalidRequestError(f"Invalid value for 'async': '{value}'. Use true or false.", param="async")


def _seen(request: Request) -> Callable[[ImageJob], None]:
    """Admission's ``validated`` callback: the access log's model, and the job whose lifecycle
    headers every answer carries."""

    def seen(job: ImageJob) -> None:
        request.state.model = job.model
        request.state.job = job
        # The request log hashes it (and keeps it only with moderation.store_prompts).
        request.state.prompt = job.prompt

    return seen


def _job_headers(request: Request) -> dict[str, str]:
    job: ImageJob | None = getattr(request.state, "job", None)
    return job_headers(job) if job is not None else {}


@contextmanager
def lifecycle_headers(request: Request) -> Iterator[None]:
    """A model's lifecycle headers (Sunset, Deprecation, x-gateway-model) on errors too: every
    answer about a model that is being retired says so, once admission has validated it."""
    try:
        yield
    except GatewayError as exc:
        exc.headers = {**_job_headers(request), **exc.headers}
        raise


async def submit_task(
    request: Request, state: AppState, caller: Caller, draft: Draft, form: UploadForm | None = None
) -> Response:
    task, headers = await state.tasks.submit(
        caller=caller,
        draft=draft,
        idempotency_key=request.headers.get("idempotency-key"),
        form=form,
        # Ids of the key's own webhook endpoints (or "none"); absent: all of the key's endpoints.
        webhooks=request.query_params.getlist("webhook") if "webhook" in request.query_params else None,
        validated=_seen(request),
    )
    body = await state.tasks.view(task, base_url=public_base(request, state))
    return JSONResponse(
        body,
        status_code=202,
        headers={
            **_job_headers(request),
            **headers,
            "location": f"/v1/tasks/{task.id}",
            "retry-after": "1",
            "cache-control": "no-store",
        },
    )


async def run_now(
    request: Request, state: AppState, caller: Caller, draft: Draft
) -> ImageOutcome | ImageStream:
    """Admit (the one admission path) and execute, cancelled if the client hangs up first."""

    async def admitted() -> ImageOutcome | ImageStream:
        admission = await state.images.admit(caller=caller, draft=draft, validated=_seen(request))
        return await state.images.execute(
            caller=caller, admission=admission, base_url=public_base(request, state)
        )

    return await cancel_on_disconnect(request, admitted())


@router.post("/generations")
async def create_image(request: Request) -> Response:
    caller, state = await caller_and_state(request)
    return await generate_as(request, state, caller)


async def generate_as(request: Request, state: AppState, caller: Caller) -> Response:
    """A generation for ``caller``: the API's route, and the console's playground (same path)."""
    payload = await read_json(request)
    draft = GenerationDraft(
        payload=payload,
        request_id=request.state.request_id,
        query_response_format=request.query_params.get("response_format"),
    )
    with lifecycle_headers(request):
        if wants_async(request):
            return await submit_task(request, state, caller, draft)
        return _reply(request, state, await run_now(request, state, caller, draft))


@router.post("/edits")
async def edit_image(request: Request) -> Response:
    caller, state = await caller_and_state(request)
    return await edit_as(request, state, caller)


async def edit_as(request: Request, state: AppState, caller: Caller) -> Response:
    """An edit for ``caller``: the API's route, and the console's playground (same path)."""
    asynchronous = wants_async(request)
    form = await parse_multipart(
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        spool_root=state.uploads.spool_root,
        limits=state.uploads.limits,
    )
    handed_over = False
    try:
        draft = EditDraft(
            form=form,
            request_id=request.state.request_id,
            limits=state.uploads.inputs,
            query_response_format=request.query_params.get("response_format"),
        )
        with lifecycle_headers(request):
            if asynchronous:
                # The task moves the files out of the spool; the empty spool goes in `finally`.
                return await submit_task(request, state, caller, draft, form)
            outcome = await run_now(request, state, caller, draft)
            if isinstance(outcome, ImageStream):
                # The spooled files live until the stream ends, wherever that happens.
                outcome.closers.append(lambda: asyncio.to_thread(form.cleanup))
                handed_over = True
            return _reply(request, state, outcome)
    finally:
        if not handed_over:
            await asyncio.to_thread(form.cleanup)


@router.post("/variations")
async def create_variation(request: Request) -> Response:
    """dall-e-2's legacy endpoint: forwarded to an upstream that still serves dall-e-2, otherwise
    OpenAI's 404 ``model_not_found`` naming the retirement."""
    caller, state = await caller_and_state(request)
    if wants_async(request):
        raise InvalidRequestError(
            "async=true is not supported for image variations.", param="async", code="invalid_value"
        )
    form = await parse_multipart(
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        spool_root=state.uploads.spool_root,
        limits=state.uploads.limits,
    )
    try:
        draft = VariationDraft(
            form=form,
            request_id=request.state.request_id,
            limits=state.uploads.inputs,
            query_response_format=request.query_params.get("response_format"),
        )
        with lifecycle_headers(request):
            return _reply(request, state, await run_now(request, state, caller, draft))
    finally:
        await asyncio.to_thread(form.cleanup)


def public_base(request: Request, state: AppState) -> str:
    """Where clients reach this gateway, for the links it hands out."""
    configured = state.settings.server.public_url
    return configured.rstrip("/") if configured else str(request.base_url).rstrip("/")


def _reply(request: Request, state: AppState, outcome: ImageOutcome | ImageStream) -> Response:
    if isinstance(outcome, ImageStream):
        request.state.upstream = outcome.upstream

        def settled(cost: int) -> None:
            request.state.cost_micros = cost

        outcome.on_settled.append(settled)
        return sse_response(
            outcome,
            ping_s=state.settings.server.sse_ping_s,
            headers={**_job_headers(request), **outcome.headers},
            shutdown_grace_s=state.settings.server.shutdown_grace_s,
        )
    request.state.upstream = outcome.upstream
    request.state.cost_micros = outcome.cost_micros
    body = outcome.body
    return Response(
        body if isinstance(body, bytes) else orjson.dumps(body),
        media_type="application/json",
        headers={
            **_job_headers(request),
            **outcome.headers,
            "x-gateway-cost": format_micros(outcome.cost_micros),
        },
    )

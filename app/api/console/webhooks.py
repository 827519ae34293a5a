"""Webhook pages (operator only, issue 26): a key's endpoints, and the outbox of deliveries.

Every action runs the admin API's own services (``state.webhooks``: ``WebhookEndpoints``;
``state.outbox``: ``Outbox``), so the console and ``/admin/keys/{id}/webhooks`` share one set of
rules and messages. A signing secret is shown once, on the page that answers the create or rotate,
which is ``no-store`` like every console page.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.api.console.web import ConsoleDenied, OperatorDep, check_csrf, redirect, render
from app.api.deps import StateDep
from app.console.queries import key_names
from app.console.webhookrows import endpoint_urls
from app.core.errors import GatewayError
from app.runtime.state import AppState
from app.schemas.admin import ApiKeyObject

router = APIRouter()
DELIVERY_STATUSES = ("pending", "delivered", "failed")
FILTERS = ("status", "key_id", "endpoint_id", "task_id")
# The outbox page is a recent window, not an archive: filters narrow it.
DELIVERIES_SHOWN = 200


async def _key(state: AppState, key_id: str) -> ApiKeyObject:
    try:
        return await state.keys.get(key_id[:40])
    except GatewayError:
        raise ConsoleDenied(404, "No such key.") from None


async def _endpoints_page(
    request: Request,
    state: AppState,
    key: ApiKeyObject,
    *,
    errors: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    endpoints = await state.webhooks.list_for(key.id)
    return render(
        request,
        "webhook_endpoints.html",
        {
            "key": key,
            "endpoints": endpoints,
            "errors": errors or {},
            "values": values or {},
            "notice": request.query_params.get("done"),
        },
        status=status,
    )


@router.get("/keys/{key_id}/webhooks")
async def endpoints(request: Request, key_id: str, viewer: OperatorDep, state: StateDep) -> Response:  # noqa: ARG001
    return await _endpoints_page(request, state, await _key(state, key_id))


@router.post("/keys/{key_id}/webhooks")
async def add_endpoint(request: Request, key_id: str, viewer: OperatorDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    key = await _key(state, key_id)
    url = str(form.get("url") or "").strip()
    description = str(form.get("description") or "").strip() or None
    values = {"url": url, "description": description or ""}
    if not url or len(url) > 2000:
        errors = {"url": "Enter the endpoint's URL (at most 2,000 characters)."}
        return await _endpoints_page(request, state, key, errors=errors, values=values, status=400)
    if description is not None and len(description) > 200:
        errors = {"description": "At most 200 characters."}
        return await _endpoints_page(request, state, key, errors=errors, values=values, status=400)
    try:
        created = await state.webhooks.create(key.id, url=url, description=description)
    except GatewayError as exc:
        errors = {exc.param or "url": exc.message}
        return await _endpoints_page(
            request, state, key, errors=errors, values=values, status=exc.status_code
        )
    return _secret_page(request, key, created, rotated=False)


def _secret_page(request: Request, key: ApiKeyObject, endpoint: dict[str, Any], *, rotated: bool) -> Response:
    return render(
        request,
        "webhook_secret.html",
        {"key": key, "endpoint": endpoint, "rotated": rotated},
        status=200 if rotated else 201,
    )


async def _endpoint_action(request: Request, viewer: Any, state: AppState, key_id: str) -> ApiKeyObject:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    return await _key(state, key_id)


@router.post("/keys/{key_id}/webhooks/{endpoint_id}/rotate")
async def rotate(
    request: Request, key_id: str, endpoint_id: str, viewer: OperatorDep, state: StateDep
) -> Response:
    key = await _endpoint_action(request, viewer, state, key_id)
    try:
        rotated = await state.webhooks.rotate(key.id, endpoint_id[:40])
    except GatewayError:
        raise ConsoleDenied(404, "No such webhook endpoint.") from None
    return _secret_page(request, key, rotated, rotated=True)


@router.post("/keys/{key_id}/webhooks/{endpoint_id}/enabled")
async def set_enabled(
    request: Request, key_id: str, endpoint_id: str, viewer: OperatorDep, state: StateDep
) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    key = await _key(state, key_id)
    enabled = form.get("enabled") == "1"
    try:
        await state.webhooks.update(key.id, endpoint_id[:40], url=None, enabled=enabled)
    except GatewayError:
        raise ConsoleDenied(404, "No such webhook endpoint.") from None
    return redirect(f"/console/keys/{key.id}/webhooks?done={'enabled' if enabled else 'disabled'}")


@router.post("/keys/{key_id}/webhooks/{endpoint_id}/delete")
async def delete(
    request: Request, key_id: str, endpoint_id: str, viewer: OperatorDep, state: StateDep
) -> Response:
    key = await _endpoint_action(request, viewer, state, key_id)
    try:
        await state.webhooks.delete(key.id, endpoint_id[:40])
    except GatewayError:
        raise ConsoleDenied(404, "No such webhook endpoint.") from None
    return redirect(f"/console/keys/{key.id}/webhooks?done=deleted")


@router.get("/webhooks")
async def deliveries(
    request: Request,
    viewer: OperatorDep,  # noqa: ARG001
    state: StateDep,
    status: Annotated[str, Query(max_length=20)] = "",
    key_id: Annotated[str, Query(max_length=40)] = "",
    endpoint_id: Annotated[str, Query(max_length=40)] = "",
    task_id: Annotated[str, Query(max_length=40)] = "",
) -> Response:
    wanted = status if status in DELIVERY_STATUSES else None
    rows = await state.outbox.page(
        limit=DELIVERIES_SHOWN,
        status=wanted,
        key_id=key_id or None,
        task_id=task_id or None,
        endpoint_id=endpoint_id or None,
    )
    filters = {"status": wanted or "", "key_id": key_id, "endpoint_id": endpoint_id, "task_id": task_id}
    names = await key_names(state.sessions, [row["key_id"] for row in rows] + [key_id])
    urls = await endpoint_urls(state.sessions, [row["endpoint_id"] for row in rows])
    return render(
        request,
        "webhook_deliveries.html",
        {
            "deliveries": rows,
            "names": names,
            "urls": urls,
            "filter": filters,
            "back": urlencode({name: value for name, value in filters.items() if value}),
            "statuses": DELIVERY_STATUSES,
            "shown": DELIVERIES_SHOWN,
            "redelivered": request.query_params.get("redelivered"),
        },
    )


@router.post("/webhooks/deliveries/{delivery_id}/redeliver")
async def redeliver(request: Request, delivery_id: str, viewer: OperatorDep, state: StateDep) -> Response:
    """The admin API's redeliver: the same ``webhook-id``, sent now, with a fresh retry period."""
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    try:
        await state.outbox.redeliver(delivery_id[:40])
    except GatewayError:
        raise ConsoleDenied(404, "No such webhook delivery.") from None
    state.tasks.on_events()
    # Back to the filtered list the button was on: only this page's own filters are kept.
    back = dict(parse_qsl(str(form.get("back") or "")[:1000]))
    query = {name: back[name][:40] for name in FILTERS if back.get(name)}
    query["redelivered"] = delivery_id[:40]
    return redirect("/console/webhooks?" + urlencode(query))

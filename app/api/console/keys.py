"""Key pages (operator only): list and search, create with every limit, edit, revoke, top up.

Forms are turned into the admin API's own request models (``ApiKeyCreateRequest``,
``ApiKeyUpdateRequest``, ``TopUpRequest``) and handed to the same ``KeyService``: one set of
rules, and the same messages beside the field they name.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.responses import Response

from app.api.console.web import ConsoleDenied, OperatorDep, check_csrf, redirect, render, session_store
from app.api.deps import StateDep
from app.billing.ledger import period_of
from app.console.keyrows import key_rows
from app.core.errors import GatewayError
from app.runtime.state import AppState
from app.schemas.admin import ApiKeyCreateRequest, ApiKeyObject, ApiKeyUpdateRequest, TopUpRequest

router = APIRouter(prefix="/keys")
LIMIT_FIELDS = (
    "quota",
    "monthly_quota",
    "balance",
    "price_multiplier",
    "rpm",
    "ipm",
    "concurrency",
    "max_queued_tasks",
    "max_tasks_in_flight",
)
KEY_STATES = ("active", "disabled", "expired", "revoked")


def _blank_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def form_to_fields(form: FormData, *, creating: bool) -> dict[str, Any]:
    """The admin API's JSON body for a submitted key form. A blank limit means "no limit"."""
    fields: dict[str, Any] = {"name": str(form.get("name") or "").strip()}
    fields["owner"] = _blank_to_none(form.get("owner"))
    for name in LIMIT_FIELDS:
        fields[name] = _blank_to_none(form.get(name))
    fields["moderation"] = form.get("moderation") or "default"
    fields["models"] = None if form.get("all_models") else [str(m) for m in form.getlist("models")]
    expires = _blank_to_none(form.get("expires_at"))
    # <input type=datetime-local> has no zone: the form says it is UTC.
    fields["expires_at"] = (
        f"{expires}:00+00:00" if isinstance(expires, str) and len(expires) == 16 else expires
    )
    thumbs = form.get("thumbnails") or "inherit"
    fields["thumbnails"] = {"on": True, "off": False}.get(str(thumbs))
    for name in ("moderation_allow", "moderation_block"):
        lines = [line.strip() for line in str(form.get(name) or "").splitlines() if line.strip()]
        fields[name] = lines or None
    fields["metadata"] = _metadata(form.get("metadata"))
    if not creating:
        fields["enabled"] = bool(form.get("enabled"))
    return fields


def _metadata(value: object) -> Any:
    """The metadata box holds a JSON object. Text that is not JSON goes to the model as it is, and
    the model's own rule (a dict) refuses it beside the field."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def validation_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "form"
        errors.setdefault(field, error["msg"])
    return errors


def _form_values(key: ApiKeyObject | None, fields: dict[str, Any] | None) -> dict[str, Any]:
    """What the form shows: the submitted values after an error, else the key's current ones."""
    if fields is not None:
        values = dict(fields)
    elif key is not None:
        values = key.model_dump()
    else:
        return {"moderation": "default", "models": None, "thumbnails": None, "enabled": True}
    expires = values.get("expires_at")
    if isinstance(expires, int):
        values["expires_at"] = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M")
    elif isinstance(expires, str):
        values["expires_at"] = expires[:16]
    for name in ("moderation_allow", "moderation_block"):
        values[name] = "\n".join(values.get(name) or [])
    metadata = values.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        values["metadata"] = json.dumps(metadata, indent=2, ensure_ascii=False)
    return values


def _key_form(
    request: Request,
    state: AppState,
    *,
    key: ApiKeyObject | None,
    fields: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
    notice: str | None = None,
) -> Response:
    return render(
        request,
        "key_form.html",
        {
            "key": key,
            "values": _form_values(key, fields),
            "errors": errors or {},
            "models": state.catalog.names(),
            "thumbnails_default": state.settings.console.thumbnails,
            "notice": notice,
        },
        status=status,
    )


@router.get("")
async def list_keys(
    request: Request,
    viewer: OperatorDep,  # noqa: ARG001
    state: StateDep,
    q: Annotated[str, Query(max_length=200)] = "",
    state_filter: Annotated[str, Query(alias="state", max_length=20)] = "",
) -> Response:
    wanted = state_filter if state_filter in KEY_STATES else ""
    keys, truncated = await key_rows(state.sessions, period=period_of(datetime.now(UTC)), q=q, state=wanted)
    return render(request, "keys.html", {"keys": keys, "q": q, "state": wanted, "truncated": truncated})


@router.get("/new")
async def new_key(request: Request, viewer: OperatorDep, state: StateDep) -> Response:  # noqa: ARG001
    return _key_form(request, state, key=None)


@router.post("")
async def create_key(request: Request, viewer: OperatorDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    fields = form_to_fields(form, creating=True)
    try:
        body = ApiKeyCreateRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        public, secret = await state.keys.create(body)
    except ValidationError as exc:
        return _key_form(request, state, key=None, fields=fields, errors=validation_errors(exc), status=400)
    except GatewayError as exc:
        return _key_form(
            request,
            state,
            key=None,
            fields=fields,
            errors={exc.param or "form": exc.message},
            status=exc.status_code,
        )
    # Shown here, once: the page is no-store and the secret is in no URL, log or later page.
    return render(request, "key_created.html", {"key": public, "secret": secret}, status=201)


@router.get("/{key_id}")
async def edit_key(request: Request, key_id: str, viewer: OperatorDep, state: StateDep) -> Response:  # noqa: ARG001
    key = await _get(state, key_id)
    return _key_form(request, state, key=key, notice=request.query_params.get("saved") and "Saved.")


@router.post("/{key_id}")
async def update_key(request: Request, key_id: str, viewer: OperatorDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    key = await _get(state, key_id)
    fields = form_to_fields(form, creating=False)
    try:
        body = ApiKeyUpdateRequest.model_validate(fields)
        await state.keys.update(key_id, body)
    except ValidationError as exc:
        return _key_form(request, state, key=key, fields=fields, errors=validation_errors(exc), status=400)
    except GatewayError as exc:
        return _key_form(
            request,
            state,
            key=key,
            fields=fields,
            errors={exc.param or "form": exc.message},
            status=exc.status_code,
        )
    return redirect(f"/console/keys/{key_id}?saved=1")


@router.post("/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str, viewer: OperatorDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    await _get(state, key_id)
    await state.keys.revoke(key_id)
    await session_store(state).close_for_key(key_id)
    return redirect(f"/console/keys/{key_id}?saved=1")


@router.post("/{key_id}/topup")
async def top_up(request: Request, key_id: str, viewer: OperatorDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    key = await _get(state, key_id)
    try:
        body = TopUpRequest.model_validate({"amount": _blank_to_none(form.get("amount"))})
        await state.keys.top_up(key_id, body.amount)
    except ValidationError as exc:
        return _key_form(
            request,
            state,
            key=key,
            errors={"amount": validation_errors(exc).get("amount", "Invalid amount.")},
            status=400,
        )
    return redirect(f"/console/keys/{key_id}?saved=1")


async def _get(state: AppState, key_id: str) -> ApiKeyObject:
    try:
        return await state.keys.get(key_id[:40])
    except GatewayError:
        raise ConsoleDenied(404, "No such key.") from None

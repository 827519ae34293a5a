"""The image playground: a form built from the catalog, run through the API's own code path.

Decision (README: Console): the page posts to ``/console/playground/generations`` (or
``/edits``), which hands the request to the very functions behind ``/v1/images/*``
(``generate_as`` / ``edit_as``) with the caller taken from the session: the tenant's own key, or
the key the operator chose to act as. So validation, moderation, limits, reservation, routing,
streaming and billing are the API's, byte for byte, and no key's secret ever reaches the browser
or needs storing (the gateway keeps only key hashes, so it could not hold the secret anyway).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.api.console.web import ViewerDep, check_csrf, render
from app.api.deps import StateDep
from app.api.images import edit_as, generate_as
from app.auth.keys import Caller
from app.console.sessions import Viewer
from app.core.errors import AuthenticationError, InvalidRequestError
from app.domain.catalog import ModelCapabilities
from app.runtime.state import AppState

router = APIRouter(prefix="/playground")


def model_controls(caps: ModelCapabilities) -> dict[str, Any]:
    """What the playground offers for a model: only what the catalog says it takes."""
    free = caps.free_size
    return {
        "name": caps.name,
        "family": caps.family,
        "max_prompt_chars": caps.max_prompt_chars,
        "sizes": list(caps.sizes),
        "default_size": caps.default_size,
        "free_size": None
        if free is None
        else {
            "multiple": free.multiple,
            "max_ratio": free.max_ratio,
            "min_pixels": free.min_pixels,
            "max_pixels": free.max_pixels,
            "max_edge": free.max_edge,
        },
        "qualities": list(caps.qualities),
        "default_quality": caps.default_quality,
        "n_max": caps.n_max,
        "output_formats": list(caps.output_formats) if caps.family == "gpt-image" else [],
        "background": caps.family == "gpt-image" and "background" not in caps.unsupported_fields,
        "transparent_background": caps.transparent_background,
        "moderation": caps.family == "gpt-image" and "moderation" not in caps.unsupported_fields,
        "stream": caps.stream,
        "max_partial_images": caps.max_partial_images if caps.stream else 0,
        "edit": None
        if caps.edit is None
        else {"max_images": caps.edit.max_images, "formats": list(caps.edit.formats), "mask": caps.edit.mask},
        "input_fidelity": list(caps.input_fidelity),
    }


async def acting_caller(state: AppState, viewer: Viewer, acting_as: str | None) -> Caller:
    """The key a playground request runs as: a tenant's own, or the one the operator picked."""
    key_id = viewer.key_id if not viewer.is_operator else acting_as
    if not key_id:
        raise InvalidRequestError(
            "Choose a key to act as.", param="key_id", code="missing_required_parameter"
        )
    try:
        return await state.keys.caller_for(key_id[:40])
    except AuthenticationError:
        raise InvalidRequestError("That key is not active.", param="key_id", code="invalid_value") from None


@router.get("")
async def playground(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    acting_as: Annotated[str | None, Query(alias="as")] = None,
) -> Response:
    keys = [k for k in await state.keys.list() if k.status == "active"] if viewer.is_operator else []
    models: list[dict[str, Any]] = []
    error = None
    if viewer.is_operator and not acting_as:
        # No silent default (issue 26): the operator says which key pays before anything runs.
        return render(
            request,
            "playground.html",
            {"models": [], "keys": keys, "acting_as": "", "error": None, "choose": True},
        )
    try:
        caller = await acting_caller(state, viewer, acting_as)
    except InvalidRequestError as exc:
        error = exc.message
    else:
        for name in state.images.models_for(caller):
            caps = state.catalog.get(name)
            if caps is not None:
                models.append(model_controls(caps))
    return render(
        request,
        "playground.html",
        {"models": models, "keys": keys, "acting_as": acting_as or "", "error": error},
    )


@router.post("/generations")
async def generate(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    acting_as: Annotated[str | None, Query(alias="as")] = None,
) -> Response:
    check_csrf(request, viewer, None)
    caller = await acting_caller(state, viewer, acting_as)
    request.state.key_id, request.state.key_name = caller.key_id, caller.name
    return await generate_as(request, state, caller)


@router.post("/edits")
async def edit(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    acting_as: Annotated[str | None, Query(alias="as")] = None,
) -> Response:
    check_csrf(request, viewer, None)
    caller = await acting_caller(state, viewer, acting_as)
    request.state.key_id, request.state.key_name = caller.key_id, caller.name
    return await edit_as(request, state, caller)

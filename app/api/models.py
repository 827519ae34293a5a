"""``GET /v1/models``: the models this key may use, in OpenAI's list shape, each with its
lifecycle (``state``: active, deprecated or retired; ``retired_at``; ``replacement``) and, for a
dated snapshot, the entry it is an alias of."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CallerDep, StateDep
from app.core.errors import NotFoundError
from app.runtime.state import AppState
from app.schemas.images import ModelList, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])

# OpenAI's model objects carry a creation time; the catalog has none, so one fixed epoch is used.
CATALOG_CREATED = 1_700_000_000


def _model(name: str, state: AppState) -> ModelObject:
    info = state.images.lifecycle.describe(name)
    return ModelObject(
        id=name,
        created=CATALOG_CREATED,
        owned_by="image-gateway",
        state=info["state"] or "active",
        retired_at=info["retired_at"],
        replacement=info["replacement"],
        alias_of=info["alias_of"],
    )


@router.get("")
async def list_models(caller: CallerDep, state: StateDep) -> ModelList:
    return ModelList(data=[_model(name, state) for name in state.images.models_for(caller)])


@router.get("/{model_id}")
async def get_model(model_id: str, caller: CallerDep, state: StateDep) -> ModelObject:
    if model_id not in state.images.models_for(caller):
        raise NotFoundError(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return _model(model_id, state)

"""``GET /v1/files/images/{name}``: stored images behind signed, expiring links.

No bearer key here: the link's signature is the credential (a browser or ``<img>`` can fetch it).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import FileResponse

from app.api.deps import StateDep
from app.errors import NotFoundError
from app.storage import LocalImageStore, content_type_for

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get("/images/{name}")
async def get_image(name: str, state: StateDep, expires: str = "", sig: str = "") -> FileResponse:
    store = state.store
    if not isinstance(store, LocalImageStore):
        # Object stores hand out their own presigned links; nothing is served from here.
        raise NotFoundError("No such image.")
    path = await store.open_signed(name, expires=expires, sig=sig)
    return FileResponse(
        path,
        media_type=content_type_for(name),
        headers={"cache-control": "private, max-age=300", "x-content-type-options": "nosniff"},
    )

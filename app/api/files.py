"""``GET /v1/files/images/{name}``: stored images behind signed, expiring links.

No bearer key here: the link's signature is the credential (a browser or ``<img>`` can fetch it).
A local store's file is sent as it is; an S3 store with ``storage.gateway_links`` is read from the
bucket a chunk at a time, so any node serves any node's links (they share the signing key).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import FileResponse, Response, StreamingResponse

from app.api.deps import StateDep
from app.storage import LocalImageStore, content_type_for

router = APIRouter(prefix="/v1/files", tags=["files"])

_HEADERS = {"cache-control": "private, max-age=300", "x-content-type-options": "nosniff"}


@router.get("/images/{name}")
async def get_image(name: str, state: StateDep, expires: str = "", sig: str = "") -> Response:
    store = state.store
    if isinstance(store, LocalImageStore):
        path = await store.open_signed(name, expires=expires, sig=sig)
        return FileResponse(path, media_type=content_type_for(name), headers=_HEADERS)
    image = await store.open_signed_stream(name, expires=expires, sig=sig)
    return StreamingResponse(
        image.chunks,
        media_type=content_type_for(name),
        headers={**_HEADERS, "content-length": str(image.size)},
    )

"""Keep result images in the image store, and hand them out as signed URLs or base64.

``response_format=url`` works for every model because the gateway itself stores the bytes and
links them (SPEC §1.1); task results are always stored, so a task row holds names, not megabytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from app.core.errors import ImageStoreError, UpstreamError
from app.storage import ImageStore, StoredImage

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def content_type_of(body: dict[str, Any], fallback: str) -> str:
    """The stored content type of a body's (or a streamed event's) images, by ``output_format``."""
    fmt = body.get("output_format") if isinstance(body.get("output_format"), str) else fallback
    return _CONTENT_TYPES.get(str(fmt), "image/png")


async def store_b64(b64: Any, store: ImageStore, *, content_type: str) -> StoredImage:
    """One base64 image into the store (decoded off the event loop); an upstream's bad base64 is
    its error (502), not the gateway's."""
    if not isinstance(b64, str):
        raise UpstreamError("The upstream service returned an image the gateway cannot store.")
    try:
        data = await asyncio.to_thread(base64.b64decode, b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UpstreamError("The upstream service returned an image that is not valid base64.") from exc
    try:
        return await store.put(data, content_type=content_type)
    except Exception as exc:
        raise store_failure(exc) from exc


def store_failure(exc: BaseException) -> ImageStoreError:
    """The error a client sees when the store refused a generated image: it names the failure
    (an OS error's own text, such as "No space left on device"; other stores' errors by kind only,
    as their messages may name buckets or endpoints)."""
    if isinstance(exc, ImageStoreError):
        return exc
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return ImageStoreError(
        f"The image was generated (and charged) but the gateway could not store it: {cause}. "
        "Images already stored are kept until the retention period ends."
    )


async def store_images(body: dict[str, Any], store: ImageStore, *, output_format: str) -> dict[str, Any]:
    """A copy of ``body`` whose images are in the store: each item's ``b64_json`` becomes ``image``.

    Every image is tried, so one that fails leaves the others stored; then the first failure is
    raised (``ImageStoreError`` for a store's, ``UpstreamError`` for an upstream's bad image)."""
    content_type = content_type_of(body, output_format)
    items = body.get("data") or []

    async def keep(item: Any) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise UpstreamError("The upstream service returned an image the gateway cannot store.")
        stored = await store_b64(item.get("b64_json"), store, content_type=content_type)
        kept = {k: v for k, v in item.items() if k != "b64_json"}
        kept["image"] = stored.name
        return kept

    kept = await asyncio.gather(*(keep(item) for item in items), return_exceptions=True)
    for outcome in kept:
        if isinstance(outcome, BaseException):
            raise outcome
    return {**body, "data": [item for item in kept if not isinstance(item, BaseException)]}


async def render_images(
    stored: dict[str, Any], store: ImageStore, *, response_format: str, base_url: str, ttl_s: int
) -> dict[str, Any]:
    """The client's view of a stored body: signed URLs, or base64 read back from the store."""

    async def show(item: dict[str, Any]) -> dict[str, Any]:
        name = item.get("image")
        shown = {k: v for k, v in item.items() if k != "image"}
        if not isinstance(name, str):
            return shown
        if response_format == "url":
            shown["url"] = await store.url_for(name, base_url=base_url, ttl_s=ttl_s)
        else:
            data = await store.read(name)
            shown["b64_json"] = await asyncio.to_thread(lambda: base64.b64encode(data).decode("ascii"))
        return shown

    items = [item for item in stored.get("data") or [] if isinstance(item, dict)]
    return {**stored, "data": list(await asyncio.gather(*(show(item) for item in items)))}


def image_names(stored: dict[str, Any] | None) -> list[str]:
    """Every stored image a body refers to (for deletion with its task)."""
    if not stored:
        return []
    return [item["image"] for item in stored.get("data") or [] if isinstance(item, dict) and "image" in item]

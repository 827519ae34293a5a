"""The image-store port: where ``response_format=url`` images and task results are kept.

Names are made by the store, never by a client: ``img_<32 hex>.<ext>``. Every operation that takes
a name checks it against that exact shape first, so a name from a URL cannot reach outside the store
(``../x``, ``%2e%2e/x``, absolute paths, NUL bytes all fail the pattern). A name that fails is
answered 404 ``not_found``, like a name that was never stored: no such image can exist, and the
answer reveals nothing about the layout behind it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from app.core.errors import NotFoundError

# The formats the Images API produces (output_format png | jpeg | webp).
_EXTENSIONS: dict[str, str] = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_CONTENT_TYPES: dict[str, str] = {ext: ctype for ctype, ext in _EXTENSIONS.items()}
NAME_PATTERN = re.compile(r"img_[0-9a-f]{32}\.(?:png|jpg|webp)")
# Where the gateway serves the links it signs itself (app/api/files.py).
ROUTE_PREFIX = "/v1/files/images/"


@dataclass(frozen=True, slots=True)
class StoredImage:
    name: str
    size: int
    content_type: str


@dataclass(frozen=True, slots=True)
class ImageBytes:
    """A stored image on its way out: its size, and its bytes in chunks (closed when exhausted)."""

    size: int
    chunks: AsyncIterator[bytes]


class ImageStore(Protocol):
    async def start(self) -> None:
        """Prepare the backing store (directory, bucket); called once by the lifespan."""
        ...

    async def put(self, data: bytes, *, content_type: str) -> StoredImage: ...

    async def url_for(self, name: str, *, base_url: str, ttl_s: int) -> str:
        """A signed link valid for ``ttl_s`` seconds. ``base_url`` is the gateway's public base
        (``http://127.0.0.1:8080``), used by stores the gateway serves itself; S3 ignores it."""
        ...

    async def read(self, name: str) -> bytes:
        """The image's bytes, or ``NotFoundError``."""
        ...

    async def open_signed_stream(self, name: str, *, expires: str, sig: str) -> ImageBytes:
        """Check a gateway link's signature and expiry (403) and the image's existence (404), then
        stream it. A store whose links are not the gateway's answers 404: it serves nothing here."""
        ...

    async def delete(self, name: str) -> None:
        """Remove the image; removing a missing image is not an error."""
        ...

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Remove images last written before ``cutoff`` (timezone-aware); return how many."""
        ...

    async def aclose(self) -> None: ...


def new_name(content_type: str) -> str:
    """A fresh image name; 128 random bits make collisions a non-issue without a check."""
    try:
        ext = _EXTENSIONS[content_type]
    except KeyError:
        raise ValueError(f"unsupported image content type {content_type!r}") from None
    return f"img_{secrets.token_hex(16)}.{ext}"


def check_name(name: str) -> str:
    """Return ``name`` if the store could have made it, else raise 404 (see the module docstring)."""
    if not NAME_PATTERN.fullmatch(name):
        raise NotFoundError("No such image.")
    return name


def content_type_for(name: str) -> str:
    """The content type of a (checked) image name, from its extension."""
    return _CONTENT_TYPES[check_name(name).rsplit(".", 1)[1]]


def require_aware(cutoff: datetime) -> datetime:
    # A naive datetime would be read as local time by one store and as UTC by another.
    if cutoff.tzinfo is None or cutoff.utcoffset() is None:
        raise ValueError("cutoff must be timezone-aware")
    return cutoff


async def purge_expired(store: ImageStore, *, retention_s: int, now: datetime | None = None) -> int:
    """Remove images older than the retention period."""
    current = datetime.now(UTC) if now is None else now
    return await store.purge_older_than(current - timedelta(seconds=retention_s))

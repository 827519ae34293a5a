"""Small WebP thumbnails of generated images, for the console's request log.

Off by default (``console.thumbnails``), per key overridable (the key's ``thumbnails``). When on,
each completed image is shrunk to ``thumbnail_edge`` pixels on its long side, encoded as WebP
(a few KB), put in the image store beside the full images (so it is purged with them after
``storage.retention_s``) and linked to its request by a ``request_thumbnails`` row. It runs after
the response has been handed back, off the event loop, and a failure only logs: a thumbnail is
never worth a failed or slower request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from PIL import Image, UnidentifiedImageError
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.keys import Caller
from app.db.tables import RequestThumbnail, utcnow
from app.storage import ImageStore

log = logging.getLogger(__name__)
WEBP_QUALITY = 60
# Rows of purged thumbnails are deleted at most this often (one indexed DELETE).
_PURGE_EVERY_S = 600.0
# Bounded work: a decoded image is at most this many pixels (the gateway's own outputs are far less).
_MAX_PIXELS = 40_000_000


def make_thumbnail(data: bytes, edge: int) -> tuple[bytes, int, int]:
    """WebP bytes and size of ``data`` shrunk to ``edge`` on its long side. Blocking: run in a thread."""
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > _MAX_PIXELS:
            raise ValueError("image too large for a thumbnail")
        image.draft("RGB", (edge, edge))  # JPEG: decode at reduced scale straight away
        small = image.convert("RGBA") if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")
        small.thumbnail((edge, edge), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.save(out, format="WEBP", quality=WEBP_QUALITY, method=4)
        return out.getvalue(), small.width, small.height


class Thumbnailer:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        store: ImageStore,
        *,
        default_on: bool,
        edge: int,
        retention_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._default_on = default_on
        self._edge = edge
        self._retention = timedelta(seconds=retention_s)
        self._clock = clock
        self._last_purge: float | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def wants(self, caller: Caller) -> bool:
        return caller.thumbnails if caller.thumbnails is not None else self._default_on

    def keep(self, *, caller: Caller, request_id: str, images: list[str], first_position: int = 0) -> None:
        """Make and store thumbnails of base64 ``images`` in the background."""
        if not images or not self.wants(caller):
            return
        task = asyncio.create_task(self._keep(caller.key_id, request_id, images, first_position))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for the thumbnails in progress (shutdown, tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _keep(self, key_id: str, request_id: str, images: list[str], first: int) -> None:
        rows: list[RequestThumbnail] = []
        for offset, b64 in enumerate(images):
            try:
                raw = await asyncio.to_thread(base64.b64decode, b64, validate=True)
                data, width, height = await asyncio.to_thread(make_thumbnail, raw, self._edge)
                stored = await self._store.put(data, content_type="image/webp")
            except (binascii.Error, ValueError, OSError, UnidentifiedImageError):
                log.warning("no thumbnail for an image", extra={"fields": {"request_id": request_id}})
                continue
            except Exception:
                log.exception("thumbnail failed", extra={"fields": {"request_id": request_id}})
                continue
            rows.append(
                RequestThumbnail(
                    request_id=request_id,
                    key_id=key_id,
                    image=stored.name,
                    position=first + offset,
                    width=width,
                    height=height,
                    created_at=utcnow(),
                )
            )
        if not rows:
            return
        try:
            async with self._sessions.begin() as session:
                session.add_all(rows)
                if self._due_purge():
                    cutoff = utcnow() - self._retention
                    await session.execute(
                        delete(RequestThumbnail).where(RequestThumbnail.created_at < cutoff)
                    )
        except Exception:
            log.exception("thumbnail rows not written", extra={"fields": {"request_id": request_id}})

    def _due_purge(self) -> bool:
        now = self._clock()
        if self._last_purge is not None and now - self._last_purge < _PURGE_EVERY_S:
            return False
        self._last_purge = now
        return True

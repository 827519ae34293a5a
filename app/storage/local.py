"""The default image store: one directory, links served by the gateway and signed with HMAC.

Links look like ``{base_url}/v1/files/images/{name}?expires=<unix>&sig=<hex>``. The route behind them
calls ``open_signed`` and streams the returned path (e.g. with a ``FileResponse``).

Files are written to a temp file in the same directory and renamed into place, so a reader sees
either no file or the whole image, never a partial one. There is no fsync: these are short-lived
copies of generated results, and an image lost to a power cut costs less than a sync per image.
All file-system calls run in a worker thread so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

from app.core.errors import NotFoundError
from app.storage.base import (
    NAME_PATTERN,
    ROUTE_PREFIX,
    ImageBytes,
    StoredImage,
    check_name,
    new_name,
    require_aware,
)
from app.storage.signing import UrlSigner

__all__ = ["ROUTE_PREFIX", "LocalImageStore"]

_TEMP_PREFIX = ".tmp-"
_CHUNK = 256 * 1024


class LocalImageStore:
    def __init__(
        self, path: str | Path, signer: UrlSigner, *, clock: Callable[[], float] = time.time
    ) -> None:
        # absolute(), not resolve(): no I/O at construction, and names are single checked components.
        self.root = Path(path).absolute()
        self.signer = signer
        self._clock = clock

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def aclose(self) -> None:
        return None

    def path_for(self, name: str) -> Path:
        """The file behind a valid name (404 ``NotFoundError`` otherwise); does not check it exists."""
        path = self.root / check_name(name)
        # The pattern already forbids separators and dots-only names; this guards the guard.
        if path.parent != self.root:
            raise NotFoundError("No such image.")
        return path

    async def put(self, data: bytes, *, content_type: str) -> StoredImage:
        name = new_name(content_type)
        await asyncio.to_thread(self._write, self.path_for(name), data)
        return StoredImage(name=name, size=len(data), content_type=content_type)

    def _write(self, path: Path, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=_TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    async def url_for(self, name: str, *, base_url: str, ttl_s: int) -> str:
        query = self.signer.query(check_name(name), ttl_s, now=self._clock())
        return f"{base_url.rstrip('/')}{ROUTE_PREFIX}{name}?{urlencode(query)}"

    async def open_signed(self, name: str, *, expires: str, sig: str) -> Path:
        """Check a link's name, signature and expiry, then return the file to send.

        Raises ``NotFoundError`` (404) for a name the store cannot have made or an image that is gone,
        ``PermissionDeniedError`` (403, ``invalid_signature`` or ``url_expired``) for a bad link.
        The signature is checked before existence, so probing with forged links reveals nothing.
        """
        path = self.path_for(name)
        self.signer.verify(name, expires, sig, now=self._clock())
        if not await asyncio.to_thread(path.is_file):
            raise NotFoundError("No such image.")
        return path

    async def open_signed_stream(self, name: str, *, expires: str, sig: str) -> ImageBytes:
        """As ``open_signed``, the file as chunks (the route sends the path itself, with sendfile)."""
        path = await self.open_signed(name, expires=expires, sig=sig)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
            size = await asyncio.to_thread(os.fstat, handle.fileno())
        except FileNotFoundError:
            raise NotFoundError("No such image.") from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(handle.read, _CHUNK):
                    yield chunk
            finally:
                handle.close()

        return ImageBytes(size=size.st_size, chunks=chunks())

    async def read(self, name: str) -> bytes:
        path = self.path_for(name)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError("No such image.") from None

    async def delete(self, name: str) -> None:
        path = self.path_for(name)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Remove images modified before ``cutoff``; also sweeps temp files left by a crash."""
        return await asyncio.to_thread(self._purge, require_aware(cutoff).timestamp())

    def _purge(self, cutoff_ts: float) -> int:
        try:
            # Streamed, not listed: a day of images can be 100,000 entries, and a list of them (each
            # keeps its stat, ~900 bytes) left the process tens of MB larger after every purge in
            # the soak: freed, but too fragmented to go back to the OS.
            with os.scandir(self.root) as entries:
                return self._purge_entries(entries, cutoff_ts)
        except FileNotFoundError:
            return 0

    @staticmethod
    def _purge_entries(entries: Iterator[os.DirEntry[str]], cutoff_ts: float) -> int:
        removed = 0
        for entry in entries:
            is_image = NAME_PATTERN.fullmatch(entry.name) is not None
            # Anything else in the directory is not ours to delete.
            if not (is_image or entry.name.startswith(_TEMP_PREFIX)):
                continue
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff_ts:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # deleted meanwhile (a concurrent purge or delete)
            removed += is_image
        return removed

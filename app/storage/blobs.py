"""Whole files next to the images: batch input, output and error files (``/v1/files``).

A blob is written from a local file (the upload's spool, or a file being assembled) and read back
in chunks, so no blob is ever held whole in memory, however large. Blobs live beside the images
(``<images>/files/`` on disk, ``<prefix>files/`` in a bucket) and their names (``blob_<32 hex>``)
never match the image purge's pattern: a file's lifetime is its row's (``files.retention_s``), not
the images'. Names are made here and checked on every call, like image names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from app.core.errors import NotFoundError
from app.storage.base import ImageStore
from app.storage.local import LocalImageStore

if TYPE_CHECKING:
    from app.storage.s3 import S3ImageStore

BLOB_PATTERN = re.compile(r"blob_[0-9a-f]{32}")
CHUNK_BYTES = 1024 * 1024
_MISSING = "No such file."


def new_blob_name() -> str:
    return f"blob_{secrets.token_hex(16)}"


def check_blob(name: str) -> str:
    if not BLOB_PATTERN.fullmatch(name):
        raise NotFoundError(_MISSING)
    return name


class BlobStore(Protocol):
    async def put_file(self, name: str, source: Path) -> None:
        """Store the local file ``source`` under ``name``; ``source`` is consumed (moved or deleted)."""
        ...

    def chunks(self, name: str) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks of at most ``CHUNK_BYTES`` (``NotFoundError`` if missing)."""
        ...

    async def delete(self, name: str) -> None: ...


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / check_blob(name)

    async def put_file(self, name: str, source: Path) -> None:
        target = self._path(name)

        def move() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            # A rename when the spool shares the file system, else a copy: readers never see a part.
            temp = self.root / f".tmp-{name}"
            shutil.move(source, temp)
            os.replace(temp, target)

        await asyncio.to_thread(move)

    async def chunks(self, name: str) -> AsyncIterator[bytes]:
        path = self._path(name)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise NotFoundError(_MISSING) from None
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield chunk
        finally:
            handle.close()

    async def delete(self, name: str) -> None:
        path = self._path(name)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)


class S3BlobStore:
    """Blobs in the image bucket; boto3's ``upload_file`` sends large files as a multipart upload."""

    def __init__(self, store: S3ImageStore) -> None:
        self._client = store.client
        self._bucket = store.bucket
        self._prefix = store.prefix + "files/"

    def _key(self, name: str) -> str:
        return self._prefix + check_blob(name)

    async def put_file(self, name: str, source: Path) -> None:
        key = self._key(name)
        try:
            await asyncio.to_thread(self._client.upload_file, str(source), self._bucket, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(source.unlink)

    async def chunks(self, name: str) -> AsyncIterator[bytes]:
        from botocore.exceptions import ClientError

        key = self._key(name)
        try:
            response = await asyncio.to_thread(self._client.get_object, Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(_MISSING) from None
            raise
        body = response["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK_BYTES):
                yield chunk
        finally:
            body.close()

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self._bucket, Key=self._key(name))


def blob_store_for(store: ImageStore) -> BlobStore:
    """The blob store beside ``store``: same directory tree or same bucket."""
    if isinstance(store, LocalImageStore):
        return LocalBlobStore(store.root / "files")
    from app.storage.s3 import S3ImageStore

    if isinstance(store, S3ImageStore):
        return S3BlobStore(store)
    raise TypeError(f"no blob store for {type(store).__name__}")

"""Files (OpenAI's Files API, ``purpose=batch``): rows in ``files``, bytes in the blob store.

Only the key that uploaded a file sees it: every lookup is by id *and* key, and another key's file
is the same 404 as a missing one. Files expire ``files.retention_s`` after their upload; the purge
deletes the blob first and the row after, so a crash in between leaves a row whose content is a
404, never an orphan blob nobody can find.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.batches.upload import UploadedFile
from app.core.errors import InvalidRequestError, NotFoundError
from app.db.tables import StoredFile, utcnow
from app.storage.blobs import BlobStore, new_blob_name

log = logging.getLogger(__name__)

# batch: JSONL input files; vision and user_data: images that edit lines name by file id.
UPLOAD_PURPOSES = ("batch", "vision", "user_data")
KNOWN_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def file_object(row: StoredFile) -> dict[str, Any]:
    """The ``FileObject`` of the SDK (``types/file_object.py``)."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at.timestamp()),
        "expires_at": int(row.expires_at.timestamp()) if row.expires_at is not None else None,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
    }


@dataclass(frozen=True, slots=True)
class FileLimits:
    max_bytes: int
    max_lines: int
    retention_s: int


class FileService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], blobs: BlobStore, limits: FileLimits
    ) -> None:
        self._sessions = sessions
        self.blobs = blobs
        self.limits = limits

    async def create(self, key_id: str, upload: UploadedFile) -> StoredFile:
        """Keep an upload spooled by ``receive_file`` (its purpose checked here) as a file."""
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise InvalidRequestError(
                "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
            )
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequestError(
                f"This gateway keeps files for the Batch API only: purpose must be 'batch' (or "
                f"'vision' / 'user_data' for the images of edit lines), not '{purpose[:64]}'.",
                param="purpose",
                code="invalid_value",
            )
        if upload.bytes == 0:
            raise InvalidRequestError("The file is empty.", param="file", code="invalid_value")
        return await self.keep(
            key_id,
            upload.path,
            filename=upload.filename,
            purpose=purpose,
            size=upload.bytes,
            lines=upload.lines,
        )

    async def keep(
        self, key_id: str, source: Path, *, filename: str, purpose: str, size: int, lines: int
    ) -> StoredFile:
        """Store the local file ``source`` (consumed) and record it; the blob goes first, so a row
        never names a blob that was not written."""
        blob = new_blob_name()
        await self.blobs.put_file(blob, source)
        now = utcnow()
        row = StoredFile(
            id=new_file_id(),
            key_id=key_id,
            purpose=purpose,
            filename=filename,
            bytes=size,
            lines=lines,
            blob=blob,
            created_at=now,
            expires_at=now + timedelta(seconds=self.limits.retention_s),
        )
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
        except BaseException:
            await self.blobs.delete(blob)
            raise
        return row

    async def get(self, file_id: str, key_id: str) -> StoredFile:
        async with self._sessions() as session:
            row = await session.get(StoredFile, file_id)
        if row is None or row.key_id != key_id:
            raise NotFoundError(f"No such File object: {file_id}", param="id")
        return row

    async def page(
        self, key_id: str, *, limit: int, after: str | None, purpose: str | None, order: str
    ) -> tuple[Sequence[StoredFile], bool]:
        query = select(StoredFile).where(StoredFile.key_id == key_id)
        if purpose is not None:
            query = query.where(StoredFile.purpose == purpose)
        newest_first = order != "asc"
        if after is not None:
            anchor = await self.get(after, key_id)
            cursor = (StoredFile.created_at, StoredFile.id)
            query = query.where(
                (cursor[0] < anchor.created_at) | ((cursor[0] == anchor.created_at) & (cursor[1] < anchor.id))
                if newest_first
                else (cursor[0] > anchor.created_at)
                | ((cursor[0] == anchor.created_at) & (cursor[1] > anchor.id))
            )
        ordering = (
            (StoredFile.created_at.desc(), StoredFile.id.desc())
            if newest_first
            else (StoredFile.created_at.asc(), StoredFile.id.asc())
        )
        async with self._sessions() as session:
            rows = (await session.scalars(query.order_by(*ordering).limit(limit + 1))).all()
        return rows[:limit], len(rows) > limit

    def content(self, row: StoredFile) -> AsyncIterator[bytes]:
        return self.blobs.chunks(row.blob)

    async def delete(self, file_id: str, key_id: str) -> StoredFile:
        row = await self.get(file_id, key_id)
        await self.blobs.delete(row.blob)
        async with self._sessions() as session, session.begin():
            await session.execute(delete(StoredFile).where(StoredFile.id == row.id))
        return row

    async def purge_expired(self, now: datetime | None = None) -> int:
        """Delete files past their ``expires_at``: blob first, then row (see the module docstring)."""
        cutoff = now or utcnow()
        purged = 0
        while True:
            async with self._sessions() as session:
                rows = (
                    await session.scalars(select(StoredFile).where(StoredFile.expires_at < cutoff).limit(200))
                ).all()
            for row in rows:
                await self.blobs.delete(row.blob)
            if rows:
                async with self._sessions() as session, session.begin():
                    await session.execute(
                        delete(StoredFile).where(StoredFile.id.in_([row.id for row in rows]))
                    )
            purged += len(rows)
            if len(rows) < 200:
                return purged
